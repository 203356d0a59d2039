"""A place in a model where a width method may insert layers: :class:`LayerSlot`.

Self-expanding networks (Mitchell et al. 2023, layer addition) add depth by inserting a new hidden
layer whose weights are the identity and whose activation is the rational activation at its identity
coefficients (v = c = 0, l = 1: σ(x) = x), so that the network computes exactly the same function;
the new layer's units then train, and its width grows like any other. A model built by its user has no
such place, and where one may go is the user's decision: a :class:`LayerSlot` marks it. Empty, it is
the identity; each insertion appends one ``Linear(features, features)`` (weight I, bias 0) and one
identity :class:`~widthlab.nn.rational.RationalActivation`. Both are bit-exact identities (every
product is x·1 or x·0; the rational activation's normaliser is exactly 1 at identity), so a model's
outputs are bitwise unchanged by an insertion. ::

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(20, 64), nn.Linear(64, 10)
            self.grow_here = widthlab.LayerSlot(64, max_layers=3)

        def forward(self, x):
            return self.out(self.grow_here(torch.relu(self.inp(x))))

The inserted layers' widths are ordinary width sites (the rational activation is resized with them),
so the methods that grow widths find and grow them after an insertion.
"""

from __future__ import annotations

import torch
from torch import nn

from widthlab.nn.rational import RationalActivation
from widthlab.nn.resize import ResizeEvent

__all__ = ["LayerSlot", "SlotLayer"]


class SlotLayer(nn.Module):
    """One inserted layer: ``act(linear(x))``, a Linear map and a per-unit rational activation."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = RationalActivation(out_features, init="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class LayerSlot(nn.Module):
    """Where layers may be inserted; the identity until one is.

    Args:
        features: the width of the tensor passing through (its last axis).
        max_layers: how many layers may be inserted here.
    """

    def __init__(self, features: int, max_layers: int = 4):
        super().__init__()
        if features < 1 or max_layers < 0:
            raise ValueError(f"LayerSlot: features must be >= 1 and max_layers >= 0, got {features}, "
                             f"{max_layers}")
        self.features, self.max_layers = int(features), int(max_layers)
        self.layers = nn.ModuleList()
        # Follows the model's .to(device, dtype), so that an empty slot knows where new layers go.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @property
    def room(self) -> int:
        """Layers that may still be inserted."""
        return self.max_layers - len(self.layers)

    @property
    def out_features(self) -> int:
        """The width the slot hands on (its last layer's, which may have grown since)."""
        return self.layers[-1].linear.out_features if len(self.layers) else self.features

    def insert(self, prefix: str = "") -> ResizeEvent:
        """Append one identity layer, reading the current output width; returns the event with its
        parameters as ``added`` (``prefix``: this slot's name in the model, for the parameter names)."""
        if self.room <= 0:
            raise ValueError(f"layer slot {prefix!r} is full ({self.max_layers} layers)")
        d = self.out_features
        layer = SlotLayer(d, d)
        with torch.no_grad():
            layer.linear.weight.copy_(torch.eye(d))
            layer.linear.bias.zero_()
        layer.to(device=self.anchor.device, dtype=self.anchor.dtype)
        i = len(self.layers)
        self.layers.append(layer)
        name = f"{prefix}.layers.{i}" if prefix else f"layers.{i}"
        added = tuple((f"{name}.{n}", p) for n, p in layer.named_parameters())
        return ResizeEvent(added=added, description=f"{prefix or 'slot'}: layer {i} inserted (identity, "
                                                    f"width {d})", widths={name: d})
