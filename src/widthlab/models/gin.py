"""Graph Isomorphism Network for graph classification, in plain PyTorch (Errica et al. 2025, architectures).

Reads top to bottom: config -> aggregation helpers -> model -> builder. Layer 0 embeds node features
with an MLP (F -> width -> E); each further layer is a GIN convolution
h <- ReLU(BN(MLP((1 + eps) h + sum_{u -> v} h_u))) with a trainable eps per layer; the readout mean-pools
every layer's node embeddings, maps each to logits with its own Linear and sums them over layers. The
embedding size E is fixed; the MLPs' hidden widths are the resizable widths. Inputs are
:class:`~widthlab.data.graphs.GraphBatch` objects. ReLU after layer 0 (unspecified in the source) is our
choice, so that every pooled embedding is of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.models._registry import MODELS, check_choice, check_int
from widthlab.models.mlp import ACTIVATIONS, MLP, MLPConfig
from widthlab.nn.resize import WidthSite

MLPFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class GINConfig:
    """Shape of a :class:`GIN`.

    Attributes:
        in_features: node feature size F.
        num_classes: outputs C.
        embed_dim: node embedding size E (64 in the paper).
        layers: the first MLP plus the GIN convolutions (2, 3 or 5 in the paper).
        width: hidden width of every MLP.
        activation: activation inside the MLPs.
    """

    in_features: int
    num_classes: int
    embed_dim: int = 64
    layers: int = 3
    width: int = 64
    activation: str = "relu"

    def __post_init__(self):
        for key in ("in_features", "num_classes", "embed_dim", "layers", "width"):
            check_int(key, getattr(self, key))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))


def sum_neighbours(h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """(N, E) -> (N, E): for every node v, the sum of h_u over edges u -> v."""
    src, dst = edge_index
    return torch.zeros_like(h).index_add_(0, dst, h[src])


def mean_pool(h: torch.Tensor, batch: torch.Tensor, counts: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """(N, E) node embeddings -> (G, E) per-graph means."""
    total = h.new_zeros(num_graphs, h.shape[1]).index_add_(0, batch, h)
    return total / counts.unsqueeze(1)


class GIN(nn.Module):
    """GIN with per-layer mean-pool readouts summed into the logits.

    Args:
        config: the shape.
        mlp: factory ``mlp(in_features, out_features) -> module`` on (N, in) node tensors; default a
            plain one-hidden-layer :class:`~widthlab.models.mlp.MLP` of ``width`` units.
    """

    def __init__(self, config: GINConfig, mlp: MLPFactory | None = None):
        super().__init__()
        self.config = c = config
        if mlp is None:
            def mlp(i: int, o: int) -> nn.Module:
                return MLP(MLPConfig(i, o, widths=(c.width,), activation=c.activation))
        E = c.embed_dim
        self.mlps = nn.ModuleList([mlp(c.in_features, E)] + [mlp(E, E) for _ in range(c.layers - 1)])
        self.eps = nn.Parameter(torch.zeros(c.layers - 1))
        self.norms = nn.ModuleList(nn.BatchNorm1d(E) for _ in range(c.layers - 1))
        self.readouts = nn.ModuleList(nn.Linear(E, c.num_classes) for _ in range(c.layers))

    def forward(self, g) -> torch.Tensor:
        h = F.relu(self.mlps[0](g.x))  # (N, E)
        logits = self.readouts[0](mean_pool(h, g.batch, g.counts, g.num_graphs))  # (G, C)
        for l in range(1, len(self.mlps)):
            z = (1 + self.eps[l - 1]) * h + sum_neighbours(h, g.edge_index)
            h = F.relu(self.norms[l - 1](self.mlps[l](z)))
            logits = logits + self.readouts[l](mean_pool(h, g.batch, g.counts, g.num_graphs))
        return logits

    def width_sites(self) -> list[WidthSite]:
        """The MLPs' hidden layers, ``mlps.{l}.hidden.{i}``."""
        sites = []
        for l, m in enumerate(self.mlps):
            p = f"mlps.{l}"
            for s in m.width_sites():
                sites.append(WidthSite(f"{p}.{s.name}", s.producer, s.consumer, s.norms,
                                       f"{p}.{s.producer_name}", f"{p}.{s.consumer_name}",
                                       tuple(f"{p}.{n}" for n in s.norm_names)))
        return sites

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.width_sites()}


@MODELS.register("gin")
def gin(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64, embed_dim: int = 64,
        layers: int = 3, activation: str = "relu") -> GIN:
    """GIN on graphs with ``input_shape = (node features,)``; see :class:`GINConfig`."""
    if len(input_shape) != 1:
        raise ValueError(f"gin needs node-feature inputs (features,), got input_shape {tuple(input_shape)}")
    return GIN(GINConfig(in_features=input_shape[0], num_classes=num_outputs, embed_dim=embed_dim,
                         layers=layers, width=width, activation=activation))
