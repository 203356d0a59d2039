"""ResNet-20 with an adaptive classifier head, optionally with adaptive convolution channels (§4).

The paper adapts only the head: a DynamicMLP 64 -> D -> classes with one hidden layer on top of the
option-A ResNet-20 trunk (16/32/64 channels, BN, global average pool); "learning filter counts is out
of scope" [P]. Beyond the paper, ``adaptive_channels=True`` also gives every BasicBlock's internal
width (conv1 -> bn1 -> relu -> conv2) its own importance distribution: the block's post-ReLU channels
are multiplied by p (a forward pre-hook of conv2) and grow or shrink through the same width surgery
(BatchNorm included). The residual stream's width is tied across a stage's blocks and is not adapted.
New channels are drawn as a fresh Conv2d's (incoming) and at conv2's Kaiming+ std (outgoing), not
N(0, 1): unit-variance 3x3 filters would swamp the block.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from widthlab.methods.adaptive.distributions import make_distribution
from widthlab.methods.adaptive.layer import AdaptiveScale, AdaptiveSite, prefixed_sites
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig, kaiming_plus_
from widthlab.models.resnet import ResNet, ResNetConfig
from widthlab.nn.resize import WidthSite


class AdaptiveResNet(ResNet):
    """A :class:`~widthlab.models.resnet.ResNet` whose head ``fc`` is an :class:`AdaptiveMLP`.

    Args:
        config: the trunk (``head_width`` must be 0).
        head: ``AdaptiveMLPConfig`` fields of the head except its sizes (lam0, k, activation...).
        adaptive_channels: adapt each block's internal channels too (module docstring); their
            distributions share the head's family, k and boundary.
        channels_lam0: initial rate of the channel distributions; None starts every block at the
            trunk's nominal width w 2^s (lam0 = c / (w 2^s - 1.5), c = -ln(1 - k), so D(lam0) = w 2^s)
            instead of the head's D(lam0), which would be far wider than a CIFAR trunk.
    """

    def __init__(self, config: ResNetConfig, head: dict[str, Any], adaptive_channels: bool = False,
                 channels_lam0: float | None = None):
        if config.head_width:
            raise ValueError("the adaptive ResNet builds its own head; head_width must be 0")
        super().__init__(config)
        c_in = self.fc.in_features
        self.fc = AdaptiveMLP(AdaptiveMLPConfig(in_features=c_in, out_features=config.num_classes,
                                                hidden_layers=1, flatten=False, **head))
        self.adaptive_channels = adaptive_channels
        if adaptive_channels:
            for stage in self.stages():
                for block in stage:
                    k = head.get("k", 0.9)
                    lam0 = channels_lam0 or -math.log1p(-k) / (block.conv1.out_channels - 1.5)
                    dist = make_distribution(head.get("distribution", "exponential"), lam0=lam0,
                                             boundary=head.get("boundary"),
                                             options=head.get("distribution_options"))
                    block.scale = AdaptiveScale(dist, k=k, dim=1)
                    self._rebuild_block(block, block.scale.dist.width(block.scale.k))
                    kaiming_plus_(block.conv2, block.scale.importance(block.conv1.out_channels),
                                  head.get("init", "gaussian"))
                    # Bound method: deep copies of the model re-bind it to the copied scale.
                    block.conv2.register_forward_pre_hook(block.scale.scale_input)

    @staticmethod
    def _rebuild_block(block: nn.Module, D: int) -> None:
        """Give a freshly built block D internal channels (construction only: no optimizer exists yet)."""
        conv1, conv2 = block.conv1, block.conv2
        block.conv1 = nn.Conv2d(conv1.in_channels, D, 3, stride=conv1.stride, padding=1, bias=False)
        nn.init.kaiming_normal_(block.conv1.weight)  # the trunk's Kaiming-normal fan-in init
        block.bn1 = nn.BatchNorm2d(D)
        block.conv2 = nn.Conv2d(D, conv2.out_channels, 3, padding=1, bias=False)

    def adaptive_sites(self, prefix: str = "") -> list[AdaptiveSite]:
        sites = prefixed_sites(self.fc.adaptive_sites(), "fc", label="head")
        if self.adaptive_channels:
            for s, stage in enumerate(self.stages(), start=1):
                for b, block in enumerate(stage):
                    p = f"layer{s}.{b}"
                    site = WidthSite(name=f"{p}.mid", producer=block.conv1, consumer=block.conv2,
                                     norms=(block.bn1,), producer_name=f"{p}.conv1",
                                     consumer_name=f"{p}.conv2", norm_names=(f"{p}.bn1",))
                    sites.append(AdaptiveSite(site.name, block.scale, site, grow_init="kaiming"))
        return prefixed_sites(sites, prefix)

    def width_sites(self) -> list[WidthSite]:
        """Every resizable width: block internals (adaptive or not) and the head's hidden layer."""
        sites = [s for s in super().width_sites() if not s.name.startswith("head")]
        return sites + [s.site for s in self.adaptive_sites() if s.name.startswith("head")]

    def widths(self) -> dict[str, int]:
        """The adaptive widths only (head, and block channels when adaptive): the learned widths."""
        return {s.name: s.width for s in self.adaptive_sites()}


def adaptive_resnet20(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 16,
                      head: dict[str, Any] | None = None, adaptive_channels: bool = False,
                      channels_lam0: float | None = None) -> AdaptiveResNet:
    """ResNet-20 (stages w, 2w, 4w of 3 option-A BasicBlocks, Kaiming-normal fan-in init) with an
    adaptive head 4w -> D -> classes (§4), D = D(lam0) at start (117 for the paper's lam0 = 0.02)."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet20 needs image inputs (C, H, W), got {tuple(input_shape)}")
    config = ResNetConfig(in_channels=input_shape[0], num_classes=num_outputs, width=width, blocks=(3, 3, 3),
                          stem="cifar", shortcut="pad", head_width=0, init="kaiming_fan_in")
    return AdaptiveResNet(config, dict(head or {}), adaptive_channels=adaptive_channels,
                          channels_lam0=channels_lam0)
