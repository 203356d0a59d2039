"""An adaptive-width CNN with BatchNorm, trained in a plain PyTorch loop on scikit-learn's bundled digits.

Adaptive Width Neural Networks (Errica et al., 2025, Section 3) give each layer a learned importance
distribution over its units, here a discretised exponential with rate lambda: unit j's output is
multiplied by p_j ∝ exp(-lambda j), and the layer keeps D = floor(-ln(1 - k) / lambda) + 2 units
(k = 0.9). lambda is trained with the weights by the ELBO of Section 3 (the data loss plus Gaussian
priors on the weights, divided by the training-set size N), and when it moves D, units are appended to
or cut from the unimportant tail.

``widthlab.AdaptiveWidth`` does this to an ordinary model: it traces it (``torch.fx``) to find its
width sites, conv1 -> bn1 -> relu -> conv2 and conv2 -> bn2 -> relu -> pool -> flatten -> fc here,
inserts the rescaling in front of each consumer, adds lambda's parameters to the optimizer, and after
each optimizer step resizes what moved, BatchNorm included, keeping the optimizer state of every
surviving channel (``optimizer_mode="keep"``). At the end, ``fold_adaptive`` folds the importances
into the weights: a plain CNN of the learned widths with the same predictions.

Run: ``python examples/adaptive_cnn_plain_loop.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import widthlab
from widthlab.data.registry import load_dataset

EPOCHS = 10


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, global average pooling, a linear classifier."""

    def __init__(self, classes: int = 10, c1: int = 16, c2: int = 24):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))))
    return torch.stack(xs), torch.as_tensor(ys)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    data = load_dataset("digits", as_image=True)  # (1, 8, 8) images, 10 classes; no download
    x, y = as_tensors(data.train)
    x_test, y_test = as_tensors(data.test)

    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    aw = widthlab.AdaptiveWidth(model, optimizer, x[:2], n_observations=len(x))
    print(f"adaptive widths at start: {aw.widths()}")

    g = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        resizes = 0
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = aw.loss(F.cross_entropy(model(x[idx]), y[idx]))  # data loss + ELBO priors / N
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            resizes += len(aw.step())  # resize where D(lambda) moved; the optimizer is remapped
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, widths {aw.widths()}, {resizes} resizes, "
              f"test accuracy {accuracy(model, x_test, y_test):.3f}")

    widths = aw.widths()
    model.eval()
    with torch.no_grad():
        before = model(x_test).argmax(1)
        widthlab.fold_adaptive(model)  # W diag(p): a plain CNN of the learned widths
        after = model(x_test).argmax(1)
    assert (model.conv1.out_channels, model.conv2.out_channels) == (widths["conv1"], widths["conv2"])
    print(f"folded into a plain CNN with {model.conv1.out_channels} and {model.conv2.out_channels} channels; "
          f"{(before == after).float().mean().item():.1%} of test predictions unchanged")


if __name__ == "__main__":
    main()
