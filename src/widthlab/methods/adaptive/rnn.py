"""Adaptive RNN (the official DynamicRNN; Errica et al. 2025, architectures): both cell MLPs learn their
widths.

h_0 = 0, h_t = tanh(MLP_in(x_t) + MLP_hh(h_{t-1})), logits = Linear(h_T), with the hidden state size fixed
(128) and each cell an :class:`~widthlab.methods.adaptive.mlp.AdaptiveMLP` with ``depth`` adaptive hidden
layers (the paper's num_hidden_layers 2 -> 1 + 1, 4 -> 2 + 2), so 2 or 4 lam's. The cells' outputs (the
128-dim pre-activations of h) are not rescaled; inside the cells act_outer defaults to leaky_relu, as
in the official RNN configs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite, prefixed_sites
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig
from widthlab.models.rnn import RNN, RNNConfig


class AdaptiveRNN(RNN):
    """:class:`~widthlab.models.rnn.RNN` with adaptive cells.

    Args:
        config: the plain shape (``width`` and ``activation`` unused: the cells start at D(lam0)).
        cell: ``AdaptiveMLPConfig`` fields of the cells except sizes, depth and flattening.
    """

    def __init__(self, config: RNNConfig, cell: dict[str, Any]):
        depth = max(config.depth, 1)

        def make(i: int, o: int) -> nn.Module:
            return AdaptiveMLP(AdaptiveMLPConfig(in_features=i, out_features=o, hidden_layers=depth,
                                                 flatten=False, **cell))

        super().__init__(config, cell=make)

    def adaptive_sites(self, prefix: str = "") -> list[AdaptiveSite]:
        sites = prefixed_sites(self.cell_in.adaptive_sites(), "cell_in") + \
            prefixed_sites(self.cell_hh.adaptive_sites(), "cell_hh")
        return prefixed_sites(sites, prefix)

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.adaptive_sites()}
