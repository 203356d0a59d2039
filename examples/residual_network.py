"""A residual network learns its widths, residual streams included, on scikit-learn's bundled digits.

In a ResNet the channels of a residual stream are written by several layers at once (the stem, every
block's last convolution, a stage's projection shortcut) and read by several (every next block, the
next stage, the classifier): they can only change together. ``widthlab.discover`` traces the model
with ``torch.fx`` and reports

* the *sites*: one producer -> norms -> consumer chain, here each block's conv1 -> bn1 -> relu -> conv2;
* the *groups*: widths tied by residual additions, named after their first producer (``"conv1+2"``:
  the stem and two more producers);
* the *fixed* widths, with the reason (the classifier's output is the model's output).

The adaptive-width method (Errica et al., 2025, Section 3) then runs on the sites and on the groups
named: every block's internal width and both residual streams learn their size from the ELBO, each
with its own importance distribution, and a group grows or shrinks as one (every producer's output
channels, every BatchNorm, every consumer's input channels, in the same order).

The self-expanding method (Mitchell et al., 2023) then grows a fresh copy of the same network from
its discovered sites and groups: a candidate unit is one new output channel of every producer of the
width, scored by the natural expansion score Δη′ summed over every consumer that would read it (the
patch K-FAC factors of each convolution), and inserted with zero outgoing weights, so the network's
function is unchanged at the moment it grows.

Run: ``python examples/residual_network.py`` (well under a minute on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import widthlab
from widthlab.data.registry import load_dataset

EPOCHS = 6


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus an identity (or 1x1 projection) shortcut, then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-18-style network, small: a stem, two stages of two blocks, pooling, a classifier."""

    def __init__(self, classes: int = 10, widths: tuple[int, int] = (8, 16)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0], 1), BasicBlock(widths[0], widths[0], 1))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2), BasicBlock(widths[1], widths[1], 1))
        self.fc = nn.Linear(widths[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))))
    return torch.stack(xs), torch.as_tensor(ys)


def main() -> None:
    data = load_dataset("digits", as_image=True)  # (1, 8, 8) images, 10 classes; no download
    x, y = as_tensors(data.train)
    x_test, y_test = as_tensors(data.test)

    torch.manual_seed(0)
    model = SmallResNet()
    found = widthlab.discover(model, x[:2])
    print("sites :", ", ".join(f"{s.name} -> {s.consumer_name}" for s in found.sites))
    for g in found.groups:
        print(f"group : {g.name}: producers {', '.join(g.producers)}; read by {', '.join(g.consumers)}")
    for f in found.fixed:
        print(f"fixed : {', '.join(f.producers)}: {'; '.join(f.reasons)}")

    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    names = [s.name for s in found.sites] + [g.name for g in found.groups]
    aw = widthlab.AdaptiveWidth(model, optimizer, x[:2], sites=names, n_observations=len(x))
    print(f"start : {aw.widths()}")

    g = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = aw.loss(F.cross_entropy(model(x[idx]), y[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            aw.step()  # blocks and streams resized where D(lambda) moved; optimizer remapped
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}")
        print(f"         widths {aw.widths()}")
    stream = aw.widths()[found.groups[0].name]
    tied = (model.conv1.out_channels, model.layer1[1].conv2.out_channels, model.layer2[0].conv1.in_channels)
    assert tied == (stream,) * 3, "a residual stream changes as one"

    print("self-expanding, from the same network at its built widths:")
    torch.manual_seed(0)
    model = SmallResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    se = widthlab.SelfExpanding(model, optimizer, (x, y), epochs=3, cooldown=1, max_widths=[32],
                                tau=0.01, alpha=0.001, proposals=8, mala_bursts=2, mala_steps=5,
                                score_batch=256, max_additions=4, expand_at_start=False)
    print(f"start : {dict(zip((p.name for p in se.model.places), se.widths()))}")
    for epoch in range(3):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        added = se.epoch_end()  # an expansion event; the optimizer is remapped after each insertion
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}, "
              f"{len(added)} channels added: {', '.join(e.description for e in added) or '-'}")
    print(f"widths {dict(zip((p.name for p in se.model.places), se.widths()))}")


if __name__ == "__main__":
    main()
