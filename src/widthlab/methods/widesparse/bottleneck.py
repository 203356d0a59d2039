"""The two bottleneck families the paper compares wide & sparse against (Golubeva et al. 2021, §2.2).

Both widen a ResNet while holding the base's weight count by shrinking inner channel counts instead
of removing random weights; the networks themselves live in :mod:`widthlab.models.bottleneck`.
Channel counts are integers, so a member cannot always hit the target exactly: each member carries
its residual ``mismatch`` (counted weights minus target), which the wide & sparse plan reports in
the run summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from widthlab.models.bottleneck import (
    Match,
    linear_bottleneck_ranks,
    linear_bottleneck_resnet,
    nonlinear_bottleneck_mids,
    nonlinear_bottleneck_resnet,
)
from widthlab.models.resnet import ResNet, ResNetConfig

Kind = Literal["linear_bottleneck", "nonlinear_bottleneck"]
KINDS = ("linear_bottleneck", "nonlinear_bottleneck")


@dataclass(frozen=True)
class BottleneckMember:
    """Sizes of one bottleneck network.

    Attributes:
        width: w, the residual (stem) width.
        kind: ``"linear_bottleneck"`` or ``"nonlinear_bottleneck"``.
        counted: its counted weights N.
        target: the weight count it is matched to.
        dims: d_b per factorised layer (linear) or per block (non-linear).
    """

    width: int
    kind: str
    counted: int
    target: int
    dims: dict[str, int]

    @property
    def mismatch(self) -> int:
        """counted - target (positive: more weights than the base)."""
        return self.counted - self.target

    @property
    def relative_mismatch(self) -> float:
        return self.mismatch / self.target


def bottleneck_sizes(config: ResNetConfig, base_width: int, kind: Kind, match: Match = "factorized"
                     ) -> BottleneckMember:
    """The member at ``config.width`` of a bottleneck family based at ``base_width`` (sizes only)."""
    if kind == "linear_bottleneck":
        dims, total, target = linear_bottleneck_ranks(config, base_width, match)
    elif kind == "nonlinear_bottleneck":
        dims, total, target = nonlinear_bottleneck_mids(config, base_width)
    else:
        raise ValueError(f"bottleneck kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return BottleneckMember(config.width, kind, total, target, dims)


def bottleneck_family(config: ResNetConfig, base_width: int, widths: Sequence[int], kind: Kind,
                      match: Match = "factorized") -> list[BottleneckMember]:
    """Sizes of the members at ``widths`` (each ``config`` with its width replaced)."""
    return [bottleneck_sizes(dataclasses.replace(config, width=w), base_width, kind, match) for w in widths]


def bottleneck_member(model: nn.Module, base_width: int, kind: Kind, match: Match = "factorized"
                      ) -> tuple[nn.Module, BottleneckMember]:
    """Rebuild a widthlab ResNet (at its width w) as the bottleneck member based at ``base_width``.

    The new network is freshly initialised from torch's global generator.

    Raises:
        ValueError: ``model`` is not a plain :class:`~widthlab.models.resnet.ResNet` with conv
            shortcuts and a Linear head (ResNet-18, either stem).
    """
    if type(model) is not ResNet:
        raise ValueError(f"the bottleneck variants rebuild a widthlab ResNet-18; got {type(model).__name__}")
    cfg = model.config
    sizes = bottleneck_sizes(cfg, base_width, kind, match)
    if kind == "linear_bottleneck":
        new: nn.Module = linear_bottleneck_resnet(cfg, base_width, match)
    else:
        new = nonlinear_bottleneck_resnet(cfg, base_width)
    return new, sizes
