"""Adaptive Transformer (Errica et al. 2025, architectures): every position-wise feed-forward block learns
its width.

Each FFN of the encoder and decoder is an adaptive MLP d_model -> D -> d_model (ReLU inside, no inner
dropout), so a 6 + 6-layer model has 12 lam's; attention, d_model and the embeddings are fixed. The
paper trains it with plain token cross-entropy (no theta or lam prior: ``sigma_theta: null``); its only
width pressure is then Adam's coupled weight decay, which also pulls r toward 0 [U].
"""

from __future__ import annotations

from typing import Any

from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite, prefixed_sites
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig
from widthlab.models.transformer import Seq2SeqTransformer, TransformerConfig


class AdaptiveTransformer(Seq2SeqTransformer):
    """:class:`~widthlab.models.transformer.Seq2SeqTransformer` with adaptive feed-forward blocks.

    Args:
        config: the plain shape (``width`` unused: every FFN starts at D(lam0)).
        cell: ``AdaptiveMLPConfig`` fields of the FFNs except sizes (``activation`` relu by default).
    """

    def __init__(self, config: TransformerConfig, cell: dict[str, Any]):
        def make(d: int) -> nn.Module:
            return AdaptiveMLP(AdaptiveMLPConfig(in_features=d, out_features=d, hidden_layers=1,
                                                 flatten=False, **cell))

        super().__init__(config, ffn=make)

    def adaptive_sites(self, prefix: str = "") -> list[AdaptiveSite]:
        sites = [s for name, ffn in self.ffns() for s in prefixed_sites(ffn.adaptive_sites(), name)]
        return prefixed_sites(sites, prefix)

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.adaptive_sites()}
