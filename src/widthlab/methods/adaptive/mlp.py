"""Adaptive MLP (the official DynamicMLP; Errica et al. 2025): every hidden layer learns its width.

Reads top to bottom: config -> initialisation -> model -> dense export. The same module is the
standalone MLP of the synthetic and tabular experiments and the building block of the other adaptive
architectures (ResNet-20 head, RNN cells, GIN layers, Transformer feed-forward blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.methods.adaptive.distributions import make_distribution
from widthlab.methods.adaptive.layer import AdaptiveScale, AdaptiveSite, prefixed_sites
from widthlab.models.mlp import ACTIVATIONS as MODEL_ACTIVATIONS
from widthlab.nn.resize import WidthSite

# One activation table for fixed and adaptive models; ReLU6 is the paper's recommended bounded
# activation (Errica et al. 2025, the rescaling h * p), and the default of AdaptiveMLPConfig.
ACTIVATIONS = MODEL_ACTIVATIONS
INITS = ("gaussian", "uniform", "kaiming")


@dataclass(frozen=True)
class AdaptiveMLPConfig:
    """Construction-time shape of an :class:`AdaptiveMLP`; the live widths are ``widths()``.

    Attributes:
        in_features, out_features: the fixed input and output sizes.
        hidden_layers: number of adaptive hidden layers, each with its own lam_l.
        lam0: initial rate of every layer; the initial width is D(lam0) (232 for 0.01).
        k: width quantile (0.9 in the paper).
        distribution: importance family (``distributions.FAMILIES``).
        distribution_options: the family's own options (``gamma0``, ``b``, ``b0``, ``slope``...).
        boundary: optional floor on lam (caps the width at D(boundary)).
        activation: inner activation (``relu6`` default: bounded, §2).
        act_outer: optional activation applied after the rescaling (``leaky_relu`` in the RNN).
        init: ``gaussian`` (Kaiming+: N(0, 2 / sum p^2) for every Linear after the first, §3),
            ``uniform`` (U(±sqrt(6 / sum p^2))) or ``kaiming`` (plain Kaiming normal everywhere).
        flatten: flatten inputs to (B, in_features) first (standalone models); else the layers act on
            the last axis (cells inside other models).
    """

    in_features: int
    out_features: int
    hidden_layers: int = 1
    lam0: float = 0.01
    k: float = 0.9
    distribution: str = "exponential"
    distribution_options: dict[str, Any] = field(default_factory=dict)
    boundary: float | None = None
    activation: str = "relu6"
    act_outer: str | None = None
    init: str = "gaussian"
    flatten: bool = True

    def __post_init__(self):
        if self.hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {self.hidden_layers}")
        for key, value, known in (("activation", self.activation, ACTIVATIONS),
                                  ("init", self.init, INITS)):
            if value not in known:
                raise ValueError(f"{key} must be one of {', '.join(known)}, got {value!r}")
        if self.act_outer is not None and self.act_outer not in ACTIVATIONS:
            raise ValueError(f"act_outer must be null or one of {', '.join(ACTIVATIONS)}, got "
                             f"{self.act_outer!r}")


@torch.no_grad()
def kaiming_plus_(layer: nn.Linear | nn.Conv2d, p: torch.Tensor | None, init: str,
                  generator: torch.Generator | None = None) -> None:
    """Initialise ``layer``'s weight for inputs rescaled by ``p`` (Kaiming+, Thm 3.1 [P]; §3).

    With inputs a ⊙ p the pre-activation variance is Var(W) · sum(p^2) · E[a^2] instead of
    Var(W) · fan_in · E[a^2], so Kaiming's 2/fan_in becomes 2/sum(p^2) (times the kernel area for a
    convolution). ``p`` None (an input layer) or ``init="kaiming"`` give plain Kaiming normal, gain sqrt(2).
    Biases keep PyTorch's default.
    """
    w = layer.weight
    area = math.prod(w.shape[2:])
    if p is None or init == "kaiming":
        std = math.sqrt(2.0 / (w.shape[1] * area))
        w.normal_(0.0, std, generator=generator)
        return
    s2 = float((p.detach().double() ** 2).sum()) * area
    if init == "gaussian":
        w.normal_(0.0, math.sqrt(2.0 / s2), generator=generator)
    else:
        bound = math.sqrt(6.0 / s2)
        w.uniform_(-bound, bound, generator=generator)


class AdaptiveMLP(nn.Module):
    """``[Linear -> act -> ⊙ p_l (-> act_outer)] * L -> Linear`` with learned widths D_l.

    Module names: ``layers.{i}`` (``layers.{L}`` is the output layer) and ``scales.{i}`` (holding
    ``scales.{i}.dist.r``, lam's parameter), so that checkpoints and optimizer state read by name.
    """

    def __init__(self, config: AdaptiveMLPConfig):
        super().__init__()
        self.config = c = config
        self.scales = nn.ModuleList(
            AdaptiveScale(make_distribution(c.distribution, lam0=c.lam0, boundary=c.boundary,
                                            options=c.distribution_options), k=c.k)
            for _ in range(c.hidden_layers))
        widths = [s.dist.width(c.k) for s in self.scales]
        dims = (c.in_features, *widths, c.out_features)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.act = ACTIVATIONS[c.activation]()
        self.act_outer = ACTIVATIONS[c.act_outer]() if c.act_outer else None
        for i, layer in enumerate(self.layers):
            p = self.scales[i - 1].importance(widths[i - 1]) if i > 0 else None
            kaiming_plus_(layer, p, c.init)
        self._fold_ok = c.act_outer in _HOMOGENEOUS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.flatten:
            x = x.reshape(x.shape[0], -1)  # (B, *input_shape) -> (B, d)
        fold = None  # the previous layer's scale when it is folded into this layer (_folds)
        layers = list(self.layers)  # (slicing a ModuleList builds a new module: 20 us a step)
        for layer, consumer, scale in zip(layers, layers[1:], self.scales):
            x = self.act(_linear(layer, x, fold))  # (..., D_l)
            fold = scale if self._folds(scale, consumer, x) else None
            if fold is None:
                x = scale(x)
            if self.act_outer is not None:
                x = self.act_outer(x)
        return _linear(layers[-1], x, fold)  # (..., out_features)

    def _folds(self, scale: AdaptiveScale, consumer: nn.Module, a: torch.Tensor) -> bool:
        """Whether to apply p_l as W_{l+1} diag(p_l) instead of a ⊙ p_l (the same function, §2).

        Cheaper when W_{l+1} has fewer entries than the activations (narrow outputs: classifier heads,
        Transformer FFNs over many tokens): forward and backward then multiply the weight, not the batch.
        Exact because act_outer, if any, is positively homogeneous and p >= 0 (see fold_importance).
        Not done when hooks watch the consumer (e.g. the FLOP meter's), which must see it called.
        """
        return (scale.adapt and self._fold_ok and type(consumer) is nn.Linear
                and consumer.weight.numel() < a.numel() and not _has_hooks(consumer))

    def width_sites(self) -> list[WidthSite]:
        """Hidden layer i: ``layers.i`` rows -> ``layers.{i+1}`` columns; rebuilt at every call."""
        return [WidthSite(name=f"hidden.{i}", producer=self.layers[i], consumer=self.layers[i + 1],
                          producer_name=f"layers.{i}", consumer_name=f"layers.{i + 1}")
                for i in range(len(self.scales))]

    def adaptive_sites(self, prefix: str = "") -> list[AdaptiveSite]:
        sites = [AdaptiveSite(s.name, scale, s) for s, scale in zip(self.width_sites(), self.scales)]
        return prefixed_sites(sites, prefix)

    def widths(self) -> dict[str, int]:
        """Current hidden widths ``{"hidden.0": D_0, ...}`` from the live weight shapes."""
        return {s.name: s.width for s in self.width_sites()}

    def to_dense(self) -> nn.Module:
        """A plain MLP computing the same function (see :func:`fold_importance`)."""
        return fold_importance(self)


_HOMOGENEOUS = (None, "relu", "leaky_relu")  # act_outer with f(c x) = c f(x) for c >= 0


def _linear(layer: nn.Module, x: torch.Tensor, fold: AdaptiveScale | None) -> torch.Tensor:
    """``layer(x)``, or ``layer(x ⊙ p)`` computed as ``F.linear(x, W diag(p), b)`` for fold's p."""
    if fold is None:
        return layer(x)
    return F.linear(x, fold.rescale(layer.weight, -1), layer.bias)  # (out, D) ⊙ (D,): column scaling


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def fold_importance(m: AdaptiveMLP) -> nn.Module:
    """Export: fold each p_l into the next layer's columns, W_{l+1} diag(p_l) (§5, export).

    Valid because act_outer, when present, is positively homogeneous (relu, leaky_relu: f(c x) = c f(x)
    for c > 0) or is applied to non-negative values (after relu/relu6) where relu/leaky_relu are the
    identity. Standalone (flattening) MLPs become a :class:`widthlab.models.mlp.MLP`; cells become an
    ``nn.Sequential``. Truncation settings (``support``, ``unit_mask``) are folded in as well.

    Raises:
        ValueError: an activation pair that cannot be expressed as one plain activation.
    """
    from widthlab.models.mlp import MLP, MLPConfig

    c = m.config
    if c.act_outer is not None:
        homogeneous = c.act_outer in ("relu", "leaky_relu")
        nonneg_inner = c.activation in ("relu", "relu6")
        if not (homogeneous and (nonneg_inner or c.act_outer == c.activation == "relu")):
            raise ValueError(f"cannot export activation={c.activation!r} with act_outer={c.act_outer!r} "
                             "as a plain MLP")
    widths = [layer.out_features for layer in m.layers[:-1]]
    with torch.no_grad():
        ps = [scale.importance(w) if scale.adapt else torch.ones(w) for scale, w in zip(m.scales, widths)]
        linears = []
        for i, layer in enumerate(m.layers):
            lin = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device,
                            dtype=layer.weight.dtype)
            w = layer.weight.detach().clone()
            if i > 0:
                w = w * ps[i - 1].to(w)  # (out, D_{i-1}) * (D_{i-1},): column scaling
            lin.weight.copy_(w)
            lin.bias.copy_(layer.bias.detach())
            linears.append(lin)
    if c.flatten and c.activation in ("relu6", "relu", "leaky_relu", "tanh", "gelu"):
        dense = MLP(MLPConfig(in_features=c.in_features, out_features=c.out_features, widths=tuple(widths),
                              activation=c.activation))
        for dst, src in zip(dense.layers, linears):
            dst.load_state_dict(src.state_dict())
        return dense.to(m.layers[0].weight.device)
    mods: list[nn.Module] = []
    for lin in linears[:-1]:
        mods += [lin, ACTIVATIONS[c.activation]()]
    return nn.Sequential(*mods, linears[-1])


def adaptive_mlp(in_features: int, out_features: int, **options) -> AdaptiveMLP:
    """Build an :class:`AdaptiveMLP`; ``options`` are the fields of :class:`AdaptiveMLPConfig`."""
    return AdaptiveMLP(AdaptiveMLPConfig(in_features=in_features, out_features=out_features, **options))
