"""Recurrent classifier whose cells are MLPs (the fixed-width baseline of AWNN's RNN; Errica et al. 2025,
architectures).

Reads top to bottom: config -> model -> builder. h_0 = 0, h_t = tanh(MLP_in(x_t) + MLP_hh(h_{t-1})),
logits = Linear(h_T). The two cell MLPs (F -> width -> H and H -> width -> H) hold the resizable widths;
the hidden state size H is fixed. ``depth=0`` gives linear cells (a vanilla tanh RNN). The adaptive
counterpart (``widthlab.methods.adaptive.rnn``) passes adaptive MLPs as the cells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from widthlab.models._registry import MODELS, check_choice, check_int
from widthlab.models.mlp import ACTIVATIONS, MLP, MLPConfig
from widthlab.nn.resize import WidthSite

Cell = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class RNNConfig:
    """Shape of an :class:`RNN`.

    Attributes:
        input_size: F, features per time step.
        num_classes: outputs C.
        hidden_size: H, the recurrent state (128 in the paper).
        width: hidden width of each cell MLP.
        depth: hidden layers per cell MLP (0: linear cells).
        activation: activation inside the cell MLPs.
    """

    input_size: int
    num_classes: int
    hidden_size: int = 128
    width: int = 24
    depth: int = 1
    activation: str = "relu6"

    def __post_init__(self):
        check_int("input_size", self.input_size)
        check_int("num_classes", self.num_classes)
        check_int("hidden_size", self.hidden_size)
        check_int("width", self.width)
        check_int("depth", self.depth, minimum=0)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))


class RNN(nn.Module):
    """``h_t = tanh(cell_in(x_t) + cell_hh(h_{t-1}))``, ``logits = out(h_T)`` on (B, T, F) inputs.

    Args:
        config: the shape.
        cell: factory ``cell(in_features, out_features) -> module`` for the two cells acting on the last
            axis; default: a plain :class:`~widthlab.models.mlp.MLP` with ``depth`` hidden layers.
    """

    def __init__(self, config: RNNConfig, cell: Cell | None = None):
        super().__init__()
        self.config = c = config
        if cell is None:
            def cell(i: int, o: int) -> nn.Module:
                return MLP(MLPConfig(i, o, widths=(c.width,) * c.depth, activation=c.activation))
        self.cell_in = cell(c.input_size, c.hidden_size)
        self.cell_hh = cell(c.hidden_size, c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, F = x.shape
        u = self.cell_in(x.reshape(B * T, F)).reshape(B, T, -1)  # input path of every step at once
        h = x.new_zeros(B, self.config.hidden_size)
        for t in range(T):
            h = torch.tanh(u[:, t] + self.cell_hh(h))  # (B, H)
        return self.out(h)  # (B, C)

    def width_sites(self) -> list[WidthSite]:
        """The cells' hidden layers, ``cell_in.hidden.i`` and ``cell_hh.hidden.i``."""
        sites = []
        for prefix in ("cell_in", "cell_hh"):
            for s in getattr(self, prefix).width_sites():
                sites.append(WidthSite(f"{prefix}.{s.name}", s.producer, s.consumer, s.norms,
                                       f"{prefix}.{s.producer_name}", f"{prefix}.{s.consumer_name}",
                                       tuple(f"{prefix}.{n}" for n in s.norm_names)))
        return sites

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.width_sites()}


@MODELS.register("rnn")
def rnn(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 24, depth: int = 1,
        hidden_size: int = 128, activation: str = "relu6") -> RNN:
    """MLP-cell RNN on (T, F) sequences (e.g. PMNIST rows: T = F = 28); see :class:`RNNConfig`."""
    if len(input_shape) != 2:
        raise ValueError(f"rnn needs sequence inputs (steps, features), got input_shape {tuple(input_shape)}")
    return RNN(RNNConfig(input_size=input_shape[1], num_classes=num_outputs, hidden_size=hidden_size,
                         width=width, depth=depth, activation=activation))
