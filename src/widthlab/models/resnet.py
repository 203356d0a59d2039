"""ResNets whose width is the stem's output channels: ResNet-18 (CIFAR and ImageNet stems), ResNet-20.

Reads top to bottom: config -> blocks -> model -> builders + presets. One :class:`ResNet` covers all
three; they differ only in stem, blocks per stage and shortcut type:

- ``resnet18``: 3x3 stride-1 stem, no max-pool; stages w, 2w, 4w, 8w of 2 blocks; 1x1 conv + BN
  shortcut where the shape changes (option B); PyTorch default init.
- ``resnet18_imagenet``: 7x7 stride-2 stem + 3x3 stride-2 max-pool; otherwise as ``resnet18``;
  Kaiming-normal fan-out init for convs.
- ``resnet20``: 3x3 stride-1 stem; stages w, 2w, 4w of 3 blocks; option-A shortcuts (stride-2
  subsampling + zero channel padding, no parameters); Kaiming-normal fan-in init.

Counted weights (Golubeva et al. 2021, §2 and App. A): ResNet-18 has N(w) = 2724 w^2 + k^2 c_in w + 8 w C
with k = 3
(CIFAR stem) or 7 (ImageNet stem). Inits follow each architecture's reference: the kuangliu CIFAR
ResNet-18 the wide & sparse code uses keeps PyTorch's defaults; torchvision's ResNet-18 (the paper's
"standard PyTorch ResNet-18") uses Kaiming-normal fan-out convs; the option-A ResNet-20 of AWNN uses
Kaiming-normal fan-in for convs and the Linear head. BatchNorm always starts at weight 1, bias 0.

All three end in adaptive average pooling: on 32x32 inputs it equals the CIFAR code's ``avg_pool(4)``,
and it lets the tests run on small images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.models._registry import MODELS, check_choice, check_int
from widthlab.nn.resize import WidthSite

Stem = Literal["cifar", "imagenet"]
Shortcut = Literal["conv", "pad"]
Init = Literal["default", "kaiming_fan_out", "kaiming_fan_in"]
INITS = ("default", "kaiming_fan_out", "kaiming_fan_in")


@dataclass(frozen=True)
class ResNetConfig:
    """Construction-time shape of a :class:`ResNet` (after width surgery, ask ``ResNet.widths()``).

    Attributes:
        in_channels: input image channels c_in.
        num_classes: outputs C of the head.
        width: w, the stem's output channels; stage s (0-based) has ``w * 2**s`` channels.
        blocks: BasicBlocks per stage; stage 0 keeps the resolution, later stages halve it.
        stem: ``"cifar"`` (3x3 stride-1 conv) or ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2
            max-pool).
        shortcut: ``"conv"`` (1x1 conv + BN, option B) or ``"pad"`` (option A: stride-2 subsampling and
            zero channel padding, no parameters), used where a block changes stride or channels.
        head_width: 0 for a Linear head; D > 0 for a ``Linear -> ReLU -> Linear`` head with D hidden
            units (AWNN's fixed-width ResNet-20 baselines, Errica et al. 2025, experimental setup).
        init: ``"default"`` (PyTorch), ``"kaiming_fan_out"`` (convs, torchvision) or
            ``"kaiming_fan_in"`` (convs and Linears, option-A ResNet-20).
    """

    in_channels: int = 3
    num_classes: int = 10
    width: int = 64
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem: Stem = "cifar"
    shortcut: Shortcut = "conv"
    head_width: int = 0
    init: Init = "default"

    def __post_init__(self):
        check_int("in_channels", self.in_channels)
        check_int("num_classes", self.num_classes)
        check_int("width", self.width)
        object.__setattr__(self, "blocks",
                           tuple(check_int(f"blocks[{i}]", n) for i, n in enumerate(self.blocks)))
        if not self.blocks:
            raise ValueError("option 'blocks' must list at least one stage")
        check_choice("stem", self.stem, ("cifar", "imagenet"))
        check_choice("shortcut", self.shortcut, ("conv", "pad"))
        check_int("head_width", self.head_width, minimum=0)
        check_choice("init", self.init, INITS)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels per stage: (w, 2w, 4w, ...)."""
        return tuple(self.width * 2**s for s in range(len(self.blocks)))


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, CIFAR ResNets): subsample by ``stride``, zero-pad channels.

    Has no parameters, so it adds nothing to any weight count. The extra channels are split evenly
    before and after the input's (``planes // 4`` on each side when the width doubles).
    """

    def __init__(self, stride: int, out_channels: int):
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, c_in, H/s, W/s)
        extra = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))  # (B, c_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, out_channels={self.out_channels}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The block-internal width (conv1's output channels) is the block's resizable width site; the
    block's output width is tied to the residual stream of its stage and is not a site.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: Shortcut = "conv"):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.shortcut = PadShortcut(stride, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem -> stages ``layer1..layerS`` of BasicBlocks -> global average pool -> head ``fc``.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer2.1.conv1``, ``fc``) so that site and
    parameter names read the same as in the literature.
    """

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        widths = config.stage_widths
        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(config.in_channels, widths[0], kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(config.in_channels, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for s, (n_blocks, c_out) in enumerate(zip(config.blocks, widths)):
            stride = 1 if s == 0 else 2
            blocks = []
            for b in range(n_blocks):
                blocks.append(BasicBlock(c_in, c_out, stride if b == 0 else 1, config.shortcut))
                c_in = c_out
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if config.head_width:
            d, c = config.head_width, config.num_classes
            self.fc: nn.Module = nn.Sequential(nn.Linear(c_in, d), nn.ReLU(), nn.Linear(d, c))
        else:
            self.fc = nn.Linear(c_in, config.num_classes)
        self._init_weights()

    def init_law(self, module: nn.Module) -> str:
        """The law this network draws a layer's weight from: ``"kaiming_normal_fan_out"``
        (N(0, 2 / (k^2 C_out)), convs under ``kaiming_fan_out``), ``"kaiming_normal_fan_in"``
        (N(0, 2 / fan_in), convs and Linears under ``kaiming_fan_in``) or ``"default"`` (PyTorch's
        U(+-1/sqrt(fan_in))). Sparse members re-draw from the same law, fan-in corrected."""
        if isinstance(module, nn.Conv2d) and self.config.init == "kaiming_fan_out":
            return "kaiming_normal_fan_out"
        if isinstance(module, (nn.Conv2d, nn.Linear)) and self.config.init == "kaiming_fan_in":
            return "kaiming_normal_fan_in"
        return "default"

    def _init_weights(self) -> None:
        for m in self.modules():
            law = self.init_law(m)
            if law == "kaiming_normal_fan_out":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif law == "kaiming_normal_fan_in":
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        """The stage containers ``layer1``, ``layer2``, ... in forward order."""
        return [getattr(self, f"layer{s + 1}") for s in range(len(self.config.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, w, H', W')
        for stage in self.stages():
            x = stage(x)  # (B, w 2^s, H'/2^s, W'/2^s)
        x = torch.flatten(self.avgpool(x), 1)  # (B, w 2^(S-1))
        return self.fc(x)  # (B, C)

    def width_sites(self) -> list[WidthSite]:
        """One site per BasicBlock, ``layer{s}.{b}.mid`` (conv1 -> bn1 -> conv2), plus ``head.0``
        for a hidden head. Built from the current modules at each call."""
        sites = []
        for s, stage in enumerate(self.stages(), start=1):
            for b, block in enumerate(stage):
                p = f"layer{s}.{b}"
                sites.append(WidthSite(
                    name=f"{p}.mid", producer=block.conv1, consumer=block.conv2, norms=(block.bn1,),
                    producer_name=f"{p}.conv1", consumer_name=f"{p}.conv2", norm_names=(f"{p}.bn1",),
                ))
        if isinstance(self.fc, nn.Sequential):
            sites.append(WidthSite(name="head.0", producer=self.fc[0], consumer=self.fc[2],
                                   producer_name="fc.0", consumer_name="fc.2"))
        return sites

    def widths(self) -> dict[str, int]:
        """Current site widths ``{"layer1.0.mid": w, ...}``, read from the live weight shapes."""
        return {s.name: s.width for s in self.width_sites()}


def _channels(input_shape: tuple[int, ...]) -> int:
    """The channel count of a ``(C, H, W)`` input shape."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    return input_shape[0]


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64, head_width: int = 0,
             init: Init = "default") -> ResNet:
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool); 884,502 weights at w=18 on CIFAR-10."""
    return ResNet(ResNetConfig(in_channels=_channels(input_shape), num_classes=num_outputs,
                               width=width, blocks=(2, 2, 2, 2), stem="cifar", shortcut="conv",
                               head_width=head_width, init=init))


@MODELS.register("resnet18_imagenet")
def resnet18_imagenet(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 64,
                      head_width: int = 0, init: Init = "kaiming_fan_out") -> ResNet:
    """ResNet-18 for ImageNet (7x7 stride-2 stem + max-pool); 11,678,912 weights at w=64, C=1000."""
    return ResNet(ResNetConfig(in_channels=_channels(input_shape), num_classes=num_outputs,
                               width=width, blocks=(2, 2, 2, 2), stem="imagenet", shortcut="conv",
                               head_width=head_width, init=init))


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 16, head_width: int = 0,
             init: Init = "kaiming_fan_in") -> ResNet:
    """ResNet-20 (stages w, 2w, 4w of 3 BasicBlocks, option-A shortcuts; Errica et al. 2025,
    architectures)."""
    return ResNet(ResNetConfig(in_channels=_channels(input_shape), num_classes=num_outputs,
                               width=width, blocks=(3, 3, 3), stem="cifar", shortcut="pad",
                               head_width=head_width, init=init))


# -- presets: names encode the width w --

def resnet18_w18(input_shape: tuple[int, ...] = (3, 32, 32), num_outputs: int = 10) -> ResNet:
    """The wide & sparse paper's CIFAR baseline of Fig. 1 (w=18)."""
    return resnet18(input_shape, num_outputs, width=18)


def resnet18_imagenet_w64(input_shape: tuple[int, ...] = (3, 224, 224), num_outputs: int = 1000) -> ResNet:
    """The standard ImageNet ResNet-18 (11.7M counted weights)."""
    return resnet18_imagenet(input_shape, num_outputs, width=64)
