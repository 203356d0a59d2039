"""Encoder-decoder Transformer for sequence-to-sequence tasks (Errica et al. 2025, the Multi30K setting).

Reads top to bottom: config -> blocks (feed-forward, encoder layer, decoder layer) -> model -> builder.
Post-LN layers as in the original Transformer and the paper's model: x <- LN(x + Dropout(sublayer(x))).
One token embedding (std d_model^-1/2, scaled by sqrt(d_model)) shared by source and target, as the
paper's shared GPT-2 vocabulary; sinusoidal positions; padding token 0 masked in attention; a causal
mask in the decoder's self-attention. The position-wise feed-forward blocks d -> width -> d (ReLU, no
inner dropout) hold the resizable widths; attention and d_model are fixed.

Inputs: (B, 2, L) int64 = (source, decoder input) as produced by ``widthlab.data.seq2seq``; outputs
(B, L, V) logits for teacher-forced next-token prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from widthlab.models._registry import MODELS, check_int
from widthlab.nn.resize import WidthSite

PAD = 0
FFNFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`Seq2SeqTransformer`.

    Attributes:
        vocab_size: V (shared by source and target).
        max_len: longest sequence (positions table size).
        d_model, heads: model width and attention heads (512 and 8 in the paper).
        layers: encoder layers = decoder layers (6 in the paper).
        width: feed-forward hidden width (2048 in the paper's largest fixed baseline).
        dropout: residual and attention dropout (0.1).
    """

    vocab_size: int
    max_len: int
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    width: int = 256
    dropout: float = 0.1

    def __post_init__(self):
        for key in ("vocab_size", "max_len", "d_model", "heads", "layers", "width"):
            check_int(key, getattr(self, key))
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"option 'dropout' must lie in [0, 1), got {self.dropout}")


class FeedForward(nn.Module):
    """``Linear(d, width) -> ReLU -> Linear(width, d)`` on the last axis; one width site ``hidden.0``."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, width), nn.Linear(width, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))

    def width_sites(self) -> list[WidthSite]:
        return [WidthSite("hidden.0", self.layers[0], self.layers[1], producer_name="layers.0",
                          consumer_name="layers.1")]


class EncoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig, ffn: nn.Module):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c.d_model, c.heads, dropout=c.dropout, batch_first=True)
        self.ffn = ffn
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a, _ = self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig, ffn: nn.Module):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c.d_model, c.heads, dropout=c.dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(c.d_model, c.heads, dropout=c.dropout, batch_first=True)
        self.ffn = ffn
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c.d_model) for _ in range(3))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, causal: torch.Tensor, tgt_pad: torch.Tensor,
                src_pad: torch.Tensor) -> torch.Tensor:
        a, _ = self.self_attn(y, y, y, attn_mask=causal, key_padding_mask=tgt_pad, need_weights=False)
        y = self.norm1(y + self.drop(a))
        a, _ = self.cross_attn(y, memory, memory, key_padding_mask=src_pad, need_weights=False)
        y = self.norm2(y + self.drop(a))
        return self.norm3(y + self.drop(self.ffn(y)))


def sinusoidal_positions(max_len: int, d: int) -> torch.Tensor:
    """(max_len, d) table: sin on even, cos on odd features, wavelengths up to 10000 * 2 pi."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(max_len, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table


class Seq2SeqTransformer(nn.Module):
    """Post-LN encoder-decoder Transformer with teacher forcing.

    Args:
        config: the shape.
        ffn: factory ``ffn(d_model) -> module`` for every feed-forward block (encoder then decoder);
            default: :class:`FeedForward` of ``width`` units.
    """

    def __init__(self, config: TransformerConfig, ffn: FFNFactory | None = None):
        super().__init__()
        self.config = c = config
        if ffn is None:
            def ffn(d: int) -> nn.Module:
                return FeedForward(d, c.width)
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD)
        # Token embeddings are multiplied by sqrt(d_model) (Vaswani et al. 2017, §3.4), so they are drawn
        # with std d_model^-1/2 (as fairseq does): the scaled embedding then has unit scale, like the
        # sinusoidal positions it is added to. nn.Embedding's N(0, 1) would make it sqrt(d_model) times
        # larger (8x at d_model 64) and drown the positions, which a reordering task cannot do without:
        # the seq2seq study stalled near 25% token accuracy with it and reaches 99% without it.
        nn.init.normal_(self.embed.weight, std=c.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.register_buffer("positions", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(c, ffn(c.d_model)) for _ in range(c.layers))
        self.decoder = nn.ModuleList(DecoderLayer(c, ffn(c.d_model)) for _ in range(c.layers))
        self.out = nn.Linear(c.d_model, c.vocab_size)
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        return self.drop(self.embed(tokens) * math.sqrt(self.config.d_model) + self.positions[:L])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src, tgt = x[:, 0], x[:, 1]  # (B, L) each
        src_pad, tgt_pad = src == PAD, tgt == PAD
        L = tgt.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), 1)
        memory = self._embed(src)
        for layer in self.encoder:
            memory = layer(memory, src_pad)  # (B, L, d)
        y = self._embed(tgt)
        for layer in self.decoder:
            y = layer(y, memory, causal, tgt_pad, src_pad)
        return self.out(y)  # (B, L, V)

    def ffns(self) -> list[tuple[str, nn.Module]]:
        """The feed-forward blocks with their module names, encoder first."""
        return [(f"encoder.{i}.ffn", l.ffn) for i, l in enumerate(self.encoder)] + \
               [(f"decoder.{i}.ffn", l.ffn) for i, l in enumerate(self.decoder)]

    def width_sites(self) -> list[WidthSite]:
        """One site per feed-forward block, ``encoder.{i}.ffn.hidden.0`` / ``decoder.{i}.ffn.hidden.0``."""
        sites = []
        for p, ffn in self.ffns():
            for s in ffn.width_sites():
                sites.append(WidthSite(f"{p}.{s.name}", s.producer, s.consumer, s.norms,
                                       f"{p}.{s.producer_name}", f"{p}.{s.consumer_name}"))
        return sites

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.width_sites()}


@MODELS.register("transformer")
def transformer(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 256, d_model: int = 128,
                heads: int = 4, layers: int = 2, dropout: float = 0.1) -> Seq2SeqTransformer:
    """Encoder-decoder Transformer on (2, L) token pairs with a vocabulary of ``num_outputs`` tokens."""
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ValueError(f"transformer needs (2, L) token-pair inputs, got input_shape {tuple(input_shape)}")
    return Seq2SeqTransformer(TransformerConfig(vocab_size=num_outputs, max_len=input_shape[1],
                                                d_model=d_model, heads=heads, layers=layers, width=width,
                                                dropout=float(dropout)))
