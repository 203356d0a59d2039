"""ResNet-18 with bottlenecks that hold the weight count of a base width (Golubeva et al. 2021, §2.2).

The wide & sparse paper compares its sparse families with two ways of widening at a fixed weight
count (Fig. 3; no code was released, so the constructions below are our reconstruction):

- **Linear bottleneck**: every block conv, shortcut conv and the classifier W (d_i -> d_o) becomes a
  product W1 W2 through d_b channels: a k x k conv d_i -> d_b then a 1x1 conv d_b -> d_o with no
  activation between (:class:`FactorizedConv2d`; :class:`FactorizedLinear` for the head). The
  composite is a k x k conv whose (d_o, k^2 d_i) weight matrix has rank <= d_b, so the dense layer's
  functions need d_b = min(k^2 d_i, d_o). At d_b = min(d_i, d_o) (the factorised base) this holds for
  the head, the 1x1 shortcuts and every conv with d_o <= d_i, but not for the 3x3 stage-entry convs
  d_i -> 2 d_i, which are limited to rank d_i of 2 d_i. A smaller d_b is a further rank constraint.
  The stem (3 input channels) stays dense.
- **Non-linear bottleneck**: inside each BasicBlock the residual width w_s grows with w while the
  mid channels (conv1's outputs) shrink to d_b,s ~ w0_s^2 / w_s, which keeps a block's
  9 (c_in + c_out) d_b at its base value (paper §2.2: the first layer's input and the second's
  output widen, the shared inner width shrinks).

Matching (Fig. 3 holds the total weight count). Linear: each factorised layer gets
d_b = floor(N_l(target) / (k^2 d_i + d_o)), clamped to [1, min(d_i, d_o)], where N_l(target) is that
layer's count in the base network; the stem's growth is then absorbed by taking channels from the
layers with the largest cost per channel, stopping at the total nearest the target. ``match``:
``"factorized"`` (default) targets the factorised base (w0, d_b = min(d_i, d_o)), so the w = w0 member
is that base itself, with no rank constraint beyond the stage entries'; ``"dense"`` targets the dense
base N(w0), the count the sparse family keeps, which already rank-constrains the w = w0 member.
Non-linear: the layers that cannot shrink (stem, shortcuts, head) grow with w, and the block mids
give back that growth in proportion, stage by stage: d_b,s = alpha w0_s^2 / w_s with one alpha for
all blocks, rounded down or up so that the total stays at or below N(w0). The residual mismatch is
reported, not hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from widthlab.models._registry import MODELS, check_choice, check_int
from widthlab.models.resnet import Init, ResNet, ResNetConfig, _channels

Match = Literal["dense", "factorized"]


class FactorizedConv2d(nn.Module):
    """``b(a(x))``: a k x k conv d_i -> d_b (carrying stride and padding), then a 1x1 conv d_b -> d_o."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, rank: int, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.a = nn.Conv2d(c_in, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.b = nn.Conv2d(rank, c_out, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class FactorizedLinear(nn.Module):
    """``b(a(x))``: Linear d_i -> d_b without bias, then Linear d_b -> d_o with the layer's bias."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@dataclass(frozen=True)
class _Layer:
    """A layer that the bottleneck may shrink: its module name, kernel size k, d_i and d_o."""

    name: str
    k: int
    c_in: int
    c_out: int

    @property
    def dense(self) -> int:
        return self.k * self.k * self.c_in * self.c_out

    @property
    def unit_cost(self) -> int:
        """Weights per bottleneck channel: k^2 d_i + d_o."""
        return self.k * self.k * self.c_in + self.c_out


def _plan_layers(cfg: ResNetConfig) -> tuple[list[_Layer], list[tuple[str, int, int, int]], int]:
    """Block convs, shortcut convs and head of a conv-shortcut ResNet, plus its stem's count.

    Returns:
        (layers, blocks, stem) where blocks are ``(prefix, c_in, c_out, has_shortcut)`` per
        BasicBlock and stem is the stem conv's weight count.
    """
    if cfg.shortcut != "conv" or cfg.head_width:
        raise ValueError("bottleneck ResNets need conv shortcuts and a Linear head (head_width 0)")
    k_stem = 7 if cfg.stem == "imagenet" else 3
    stem = k_stem * k_stem * cfg.in_channels * cfg.width
    layers, blocks = [], []
    c_in = cfg.width
    for s, (n_blocks, c_out) in enumerate(zip(cfg.blocks, cfg.stage_widths), start=1):
        for b in range(n_blocks):
            p = f"layer{s}.{b}"
            short = int(b == 0 and (s > 1 or c_in != c_out))
            blocks.append((p, c_in, c_out, short))
            layers += [_Layer(f"{p}.conv1", 3, c_in, c_out), _Layer(f"{p}.conv2", 3, c_out, c_out)]
            if short:
                layers.append(_Layer(f"{p}.shortcut.0", 1, c_in, c_out))
            c_in = c_out
    layers.append(_Layer("fc", 1, c_in, cfg.num_classes))
    return layers, blocks, stem


def _fit(targets: list[int], costs: list[int], caps: list[int], fixed: int, total_target: int
         ) -> tuple[list[int], int]:
    """Channels per layer: floor(target/cost) clamped to [1, cap], then moved towards the total target.

    Flooring leaves up to one channel's cost per layer unused, and fixed layers may have grown; so
    channels are then added (or removed), largest cost first while the total stays on the same side
    of the target, and a last cheapest channel is added or removed if that lands nearer.

    Returns:
        (channels, total weights including ``fixed``).
    """
    d = [max(1, min(cap, t // c)) for t, c, cap in zip(targets, costs, caps)]
    total = fixed + sum(x * c for x, c in zip(d, costs))
    sign = 1 if total < total_target else -1  # +1: add channels, -1: remove them
    while total != total_target:
        movable = [i for i in range(len(d)) if (d[i] < caps[i] if sign > 0 else d[i] > 1)]
        if not movable:
            break
        same_side = [i for i in movable if sign * (total_target - total - sign * costs[i]) >= 0]
        if same_side:
            j = max(same_side, key=lambda i: costs[i])
        else:
            j = min(movable, key=lambda i: costs[i])
            if abs(total + sign * costs[j] - total_target) >= abs(total - total_target):
                break
        d[j] += sign
        total += sign * costs[j]
        if not same_side:
            break
    return d, total


def linear_bottleneck_ranks(cfg: ResNetConfig, base_width: int, match: Match = "factorized"
                            ) -> tuple[dict[str, int], int, int]:
    """d_b per factorised layer of the width-``cfg.width`` network, matched to the base at w0.

    Returns:
        (ranks by layer name, the network's counted weights, the target count).
    """
    check_choice("match", match, ("dense", "factorized"))
    base_layers, _, base_stem = _plan_layers(replace(cfg, width=base_width))
    layers, _, stem = _plan_layers(cfg)
    if match == "dense":
        targets = [bl.dense for bl in base_layers]
    else:
        targets = [min(bl.c_in, bl.c_out) * bl.unit_cost for bl in base_layers]
    d, total = _fit(targets, [x.unit_cost for x in layers], [min(x.c_in, x.c_out) for x in layers],
                    stem, base_stem + sum(targets))
    return {x.name: r for x, r in zip(layers, d)}, total, base_stem + sum(targets)


def _fit_proportional(ideal: list[float], costs: list[int], caps: list[int], fixed: int, target: int
                      ) -> tuple[list[int], int]:
    """Integer channels near ``ideal``: each floor(ideal) (at least 1, at most its cap), then raised to
    ceil(ideal) in order of decreasing fractional part wherever the total stays <= ``target``.

    Returns:
        (channels, total weights including ``fixed``).
    """
    d = [min(cap, max(1, math.floor(x))) for x, cap in zip(ideal, caps)]
    total = fixed + sum(x * c for x, c in zip(d, costs))
    order = sorted(range(len(d)), key=lambda i: (math.floor(ideal[i]) - ideal[i], i))
    for i in order:
        if d[i] == math.floor(ideal[i]) < ideal[i] and d[i] < caps[i] and total + costs[i] <= target:
            d[i] += 1
            total += costs[i]
    return d, total


def nonlinear_bottleneck_mids(cfg: ResNetConfig, base_width: int) -> tuple[dict[str, int], int, int]:
    """Mid channels d_b per BasicBlock of the width-``cfg.width`` network, matched to dense N(w0).

    Block b of stage s gets d_b,s = alpha w0_s^2 / w_s (module docstring), rounded; alpha is the
    share of the base's block weights left once the stem, shortcuts and head have grown to width w:
    alpha = (N(w0) - fixed(w)) / sum_b 9 (c_in + c_out) w0_s^2 / w_s, which is 1 at w = w0.

    Returns:
        (mid channels by block prefix, the network's counted weights, the target N(w0)).

    Raises:
        ValueError: the stem, shortcuts and head alone reach N(w0) at this width.
    """
    base_layers, base_blocks, base_stem = _plan_layers(replace(cfg, width=base_width))
    layers, blocks, stem = _plan_layers(cfg)
    if len(base_blocks) != len(blocks):
        raise ValueError("base and member must have the same blocks")
    target = base_stem + sum(x.dense for x in base_layers)
    # Shortcuts and head keep their dense size at width w; only the block mids shrink.
    fixed = stem + sum(x.dense for x in layers if not x.name.endswith((".conv1", ".conv2")))
    costs = [9 * (ci + co) for _, ci, co, _ in blocks]
    shape = [co0 * co0 / co for (_, _, co0, _), (_, _, co, _) in zip(base_blocks, blocks)]  # w0_s^2 / w_s
    alpha = (target - fixed) / sum(c * x for c, x in zip(costs, shape))
    if alpha <= 0:
        raise ValueError(f"width {cfg.width}: the stem, shortcuts and head alone hold {fixed:,} weights, "
                         f"more than the base's {target:,}; no non-linear bottleneck fits")
    d, total = _fit_proportional([alpha * x for x in shape], costs, [co for _, _, co, _ in blocks],
                                 fixed, target)
    return {p: m for (p, _, _, _), m in zip(blocks, d)}, total, target


class LinearBottleneckResNet(ResNet):
    """A :class:`ResNet` whose block convs, shortcut convs and head are factorised with given ranks.

    Not width-resizable: ``width_sites()`` is empty (a factorised pair is not a plain producer ->
    consumer site), so ``widths()`` is empty too.
    """

    def __init__(self, config: ResNetConfig, ranks: dict[str, int]):
        super().__init__(config)
        self.ranks = dict(ranks)
        for name, r in ranks.items():
            old = self.get_submodule(name)
            if isinstance(old, nn.Linear):
                new: nn.Module = FactorizedLinear(old.in_features, old.out_features, r)
            else:
                new = FactorizedConv2d(old.in_channels, old.out_channels, old.kernel_size[0], r,
                                       stride=old.stride[0], padding=old.padding[0])
            self.set_submodule(name, new)
        self._init_weights()

    def width_sites(self) -> list:
        return []

    def widths(self) -> dict[str, int]:
        return {}


def linear_bottleneck_resnet(config: ResNetConfig, base_width: int, match: Match = "factorized"
                             ) -> LinearBottleneckResNet:
    """The linear-bottleneck member at ``config.width`` of the family based at ``base_width``."""
    ranks, _, _ = linear_bottleneck_ranks(config, base_width, match)
    return LinearBottleneckResNet(config, ranks)


def nonlinear_bottleneck_resnet(config: ResNetConfig, base_width: int) -> ResNet:
    """The non-linear-bottleneck member at ``config.width``: a :class:`ResNet` whose block mids are
    narrowed (its ``widths()`` report the mid channels d_b,s)."""
    mids, _, _ = nonlinear_bottleneck_mids(config, base_width)
    model = ResNet(config)
    for prefix, d_b in mids.items():
        block = model.get_submodule(prefix)
        c_in, c_out, stride = block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0]
        block.conv1 = nn.Conv2d(c_in, d_b, 3, stride=stride, padding=1, bias=False)
        block.bn1 = nn.BatchNorm2d(d_b)
        block.conv2 = nn.Conv2d(d_b, c_out, 3, padding=1, bias=False)
    model._init_weights()
    return model


def _config(input_shape, num_outputs, width, base_width, init) -> ResNetConfig:
    if base_width is None:
        raise ValueError("option 'base_width' is required (the width whose weight count is kept)")
    check_int("base_width", base_width)
    return ResNetConfig(in_channels=_channels(input_shape), num_classes=num_outputs, width=width,
                        blocks=(2, 2, 2, 2), stem="cifar", shortcut="conv", init=init)


@MODELS.register("resnet18_linear_bottleneck")
def resnet18_linear_bottleneck(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64,
                               base_width: int | None = None, match: Match = "factorized",
                               init: Init = "default") -> LinearBottleneckResNet:
    """CIFAR ResNet-18 at ``width`` with linear bottlenecks holding the weights of ``base_width``."""
    return linear_bottleneck_resnet(_config(input_shape, num_outputs, width, base_width, init),
                                    base_width, match)


@MODELS.register("resnet18_nonlinear_bottleneck")
def resnet18_nonlinear_bottleneck(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64,
                                  base_width: int | None = None, init: Init = "default") -> ResNet:
    """CIFAR ResNet-18 at ``width`` with block mids narrowed to hold the weights of ``base_width``."""
    return nonlinear_bottleneck_resnet(_config(input_shape, num_outputs, width, base_width, init),
                                       base_width)
