"""Expandable networks of the self-expanding method: an MLP with per-neuron rational activations
(Mitchell et al. 2023, the rational activation) and a small CNN whose channels and stages can grow (Mitchell
et al. 2023, the CNN variant).

Growth is real module surgery (``insertion.py``), not fixed capacity plus masks as in the JAX code:
a neuron is a new row/column of two weight matrices, a layer is a new module. The model only describes
its current shape; ``architecture()`` / ``set_architecture()`` let a checkpoint restore that shape before
the trainer loads the weights.

Reads top to bottom: init -> ExpandableMLP -> ExpandableCNN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from widthlab.nn.rational import RationalActivation
from widthlab.nn.resize import WidthSite

INITS = ("lecun", "torch")


@torch.no_grad()
def lecun_normal_(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """flax's default Dense kernel init: N(0, 1/fan_in) truncated to ±2σ, variance-corrected."""
    fan_in = math.prod(w.shape[1:])
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
    return nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=generator)


@torch.no_grad()
def init_linear_(layer: nn.Linear, init: str, generator: torch.Generator | None = None) -> None:
    """``"lecun"``: official flax Dense (lecun_normal kernel, bias ~ N(0, 1)); ``"torch"``: PyTorch's."""
    if init == "lecun":
        lecun_normal_(layer.weight, generator)
        if layer.bias is not None:
            layer.bias.normal_(0.0, 1.0, generator=generator)
    elif init == "torch":
        bound = 1.0 / layer.in_features ** 0.5
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class ExpandableMLP(nn.Module):
    """``x -> flatten -> [Linear -> rational] * L -> Linear``, with L and every width free to grow.

    Module names: ``layers.{i}`` for the Linear layers (``layers.{L}`` is the output layer) and
    ``acts.{i}`` for the per-neuron rational activation of hidden layer i. Zero hidden layers is a
    linear model (experiment 2 starts so).

    Args:
        in_features, out_features: input size d (flattened) and number of outputs C.
        widths: initial hidden widths, input side first.
        init: ``"lecun"`` (official) or ``"torch"`` for the Linear layers; activations draw
            (v, c, l) ~ N(0, 1).
        eps_mode: rational normalisation guard (``"floor"`` exact identity; ``"add"`` official).
        generator: random source of the initial parameters.
    """

    def __init__(self, in_features: int, out_features: int, widths: Sequence[int] = (), *,
                 init: str = "lecun", eps_mode: str = "floor", generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.init, self.eps_mode = init, eps_mode
        dims = [self.in_features, *[int(w) for w in widths], self.out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(RationalActivation(w, init="normal", eps_mode=eps_mode, generator=generator)
                                  for w in dims[1:-1])
        for layer in self.layers:
            init_linear_(layer, init, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # (B, d)
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))  # (B, n_i)
        return self.layers[-1](x)  # (B, C)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.acts)

    def hidden_widths(self) -> list[int]:
        return [int(layer.weight.shape[0]) for layer in self.layers[:-1]]

    def widths(self) -> dict[str, int]:
        """Current hidden widths ``{"hidden.0": n_1, ...}`` from the live weight shapes."""
        return {f"hidden.{i}": w for i, w in enumerate(self.hidden_widths())}

    def width_sites(self) -> list[WidthSite]:
        """Hidden layer i: ``layers.i`` rows -> ``layers.{i+1}`` columns (``acts.i`` is resized apart)."""
        return [WidthSite(name=f"hidden.{i}", producer=self.layers[i], consumer=self.layers[i + 1],
                          producer_name=f"layers.{i}", consumer_name=f"layers.{i + 1}")
                for i in range(self.depth)]

    supports_depth = True

    @property
    def depth_fan_in(self) -> int:
        """Width of a layer added in depth (the output layer's fan-in)."""
        return int(self.layers[-1].in_features)

    def site_layers(self, i: int) -> tuple[str, str]:
        """Qualified names of the producer and the consumer of hidden layer i's units."""
        return f"layers.{i}", f"layers.{i + 1}"

    def architecture(self) -> dict:
        return {"kind": "mlp", "widths": self.hidden_widths()}

    def set_architecture(self, arch: dict) -> None:
        """Rebuild the modules to the given hidden widths (values are placeholders until loaded)."""
        widths = [int(w) for w in arch["widths"]]
        if widths == self.hidden_widths():
            return
        ref = self.layers[0].weight
        dims = [self.in_features, *widths, self.out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=ref.dtype, device=ref.device)
                                    for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(RationalActivation(w, init="identity", eps_mode=self.eps_mode,
                                                     dtype=ref.dtype, device=ref.device) for w in widths)


class ExpandableCNN(nn.Module):
    """A small plain CNN whose channels and depth can grow.

    ``[Conv3x3(pad 1) -> rational -> (max-pool 2)] * L -> global average pool -> Linear``. Each stage's
    channels are a width site (producer ``convs.i``, consumer ``convs.{i+1}`` or the head); new channels
    get zero outgoing weights, so growth preserves the logits exactly. A stage added in depth goes after
    the last one, before the head: a 3×3 convolution with the identity kernel (centre tap I, bias 0),
    the identity rational activation and no pooling, so the logits are unchanged (the convolutional
    counterpart of the MLP's identity layer insertion).

    Args:
        input_shape: (C, H, W).
        num_outputs: classes.
        channels: initial channels per stage.
        pool: max-pool after each stage (2×2).
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (16, 32), *,
                 pool: bool = True, eps_mode: str = "floor", generator: torch.Generator | None = None):
        super().__init__()
        c_in = int(input_shape[0])
        self.input_shape, self.num_outputs = tuple(input_shape), num_outputs
        self.pool, self.eps_mode = pool, eps_mode
        dims = [c_in, *[int(c) for c in channels]]
        self.pools = [bool(pool)] * (len(dims) - 1)  # per stage: max-pool after it (inserted stages: no)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(RationalActivation(c, init="normal", eps_mode=eps_mode, dim=1,
                                                     generator=generator) for c in dims[1:])
        self.head = nn.Linear(dims[-1], num_outputs)
        for conv in self.convs:
            lecun_normal_(conv.weight, generator)
            nn.init.zeros_(conv.bias)
        init_linear_(self.head, "torch", generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))  # (B, C)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, c, H, W), the input of a stage added in depth."""
        for conv, act, pool in zip(self.convs, self.acts, self.pools):
            x = act(conv(x))  # (B, c_i, H, W)
            if pool:
                x = nn.functional.max_pool2d(x, 2, ceil_mode=True)
        return x

    @property
    def depth_fan_in(self) -> int:
        """Channels of a stage added in depth (those of the last stage, or of the input)."""
        return self.hidden_widths()[-1] if self.depth else int(self.input_shape[0])

    @property
    def depth(self) -> int:
        return len(self.convs)

    def hidden_widths(self) -> list[int]:
        return [int(c.weight.shape[0]) for c in self.convs]

    def widths(self) -> dict[str, int]:
        return {f"stage.{i}": w for i, w in enumerate(self.hidden_widths())}

    def consumer(self, i: int) -> nn.Module:
        return self.convs[i + 1] if i + 1 < self.depth else self.head

    def width_sites(self) -> list[WidthSite]:
        return [WidthSite(name=f"stage.{i}", producer=self.convs[i], consumer=self.consumer(i),
                          producer_name=f"convs.{i}",
                          consumer_name=f"convs.{i + 1}" if i + 1 < self.depth else "head")
                for i in range(self.depth)]

    supports_depth = True

    def site_layers(self, i: int) -> tuple[str, str]:
        """Qualified names of the producer and the consumer of stage i's channels."""
        return f"convs.{i}", (f"convs.{i + 1}" if i + 1 < self.depth else "head")

    def architecture(self) -> dict:
        return {"kind": "cnn", "widths": self.hidden_widths(), "pools": list(self.pools)}

    def set_architecture(self, arch: dict) -> None:
        widths = [int(w) for w in arch["widths"]]
        pools = [bool(p) for p in arch.get("pools", [self.pool] * len(widths))]
        if widths == self.hidden_widths() and pools == self.pools:
            return
        self.pools = pools
        ref = self.head.weight
        kw = {"dtype": ref.dtype, "device": ref.device}
        dims = [self.input_shape[0], *widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, **kw) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(RationalActivation(c, init="identity", eps_mode=self.eps_mode, dim=1, **kw)
                                  for c in widths)
        self.head = nn.Linear(dims[-1], self.num_outputs, **kw)
