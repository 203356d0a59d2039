"""Small models written the way users write them, without torchvision: an ``nn.Sequential`` MLP, a
ResNet-18-style CNN with BatchNorm, a pre-norm Transformer encoder block and a module with a custom
forward. Shared by the discovery tests and the tests of the methods on any model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sequential_mlp(widths=(16, 12)):
    a, b = widths
    return nn.Sequential(nn.Linear(5, a), nn.ReLU(), nn.Linear(a, b), nn.BatchNorm1d(b), nn.Tanh(),
                         nn.Dropout(0.1), nn.Linear(b, 3))


class Block(nn.Module):
    """ResNet BasicBlock: conv-bn-relu-conv-bn, plus an identity or 1x1-conv shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18-style: a stem and two stages of two BasicBlocks, global pool, linear classifier."""

    def __init__(self, w=(8, 16), classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layer1 = nn.Sequential(Block(w[0], w[0], 1), Block(w[0], w[0], 1))
        self.layer2 = nn.Sequential(Block(w[0], w[1], 2), Block(w[1], w[1], 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[1], classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder block between an input projection and a pooled classifier."""

    def __init__(self, d_in=6, d=16, ff=32, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(0.0), nn.Linear(ff, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, d_in)
        x = self.embed(x)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.norm2(x))
        return self.head(x.mean(1))


class TwoTowers(nn.Module):
    """A user-written forward: two towers summed, a mixer, and a concatenation feeding the head."""

    def __init__(self, width=10):
        super().__init__()
        self.a, self.b = nn.Linear(6, width), nn.Linear(6, width)
        self.mix = nn.Linear(width, 8)
        self.side = nn.Linear(6, 4)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        h = F.relu(self.a(x)) * 0.5 + torch.tanh(self.b(x))
        h = F.silu(self.mix(h))
        return self.out(torch.cat([h, self.side(x)], dim=1))


class Gate(nn.Module):
    """A forward that branches on tensor values: ``torch.fx`` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x


def gated_mlp():
    """An MLP whose module "1" is a :class:`Gate` (data-dependent control flow)."""
    return nn.Sequential(nn.Linear(4, 8), Gate(), nn.Linear(8, 2))
