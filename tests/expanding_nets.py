"""Small expandable networks and data shared by the self-expansion tests (float64)."""

from __future__ import annotations

import torch

from widthlab.methods.expanding.model import ExpandableCNN

DT = torch.float64


def small_cnn(seed: int = 0):
    """A two-stage ExpandableCNN (3 and 4 channels) on 12 random 2x6x6 images with 3 classes."""
    model = ExpandableCNN((2, 6, 6), 3, (3, 4), generator=torch.Generator().manual_seed(seed)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 2, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


class EventTrainer:
    """What an expansion event reads from a trainer: the model, the epoch, the training set, the device."""

    def __init__(self, model, x, y):
        self.model, self.epoch = model, 0
        self.data = type("D", (), {"train": torch.utils.data.TensorDataset(x, y)})()
        self.device = torch.device("cpu")
