"""Adaptive GIN (the official DynamicDGN; Errica et al. 2025, architectures): every layer's MLP learns its
hidden width.

Layer 0 is an adaptive MLP F -> D_0 -> 64; each GIN convolution's MLP is 64 -> D_l -> 64; the node
embedding size (64), the (1 + eps) self-weights, the BatchNorms and the summed per-layer readouts are
as in the plain :class:`~widthlab.models.gin.GIN`. One lam per layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite, prefixed_sites
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig
from widthlab.models.gin import GIN, GINConfig


class AdaptiveGIN(GIN):
    """:class:`~widthlab.models.gin.GIN` whose MLPs are one-hidden-layer adaptive MLPs.

    Args:
        config: the plain shape (``width``/``activation`` unused).
        cell: ``AdaptiveMLPConfig`` fields of the MLPs except sizes.
    """

    def __init__(self, config: GINConfig, cell: dict[str, Any]):
        def make(i: int, o: int) -> nn.Module:
            return AdaptiveMLP(AdaptiveMLPConfig(in_features=i, out_features=o, hidden_layers=1,
                                                 flatten=False, **cell))

        super().__init__(config, mlp=make)

    def adaptive_sites(self, prefix: str = "") -> list[AdaptiveSite]:
        sites = [s for l, m in enumerate(self.mlps) for s in prefixed_sites(m.adaptive_sites(), f"mlps.{l}")]
        return prefixed_sites(sites, prefix)

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.adaptive_sites()}
