"""Losses and metrics, accumulated on the device so the training step never waits for the host."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def data_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The data term of the loss, averaged over the batch.

    Args:
        kind: ``cross_entropy``, ``mse`` (mean over all output entries) or ``half_sse``
            (1/2 ||o - y||^2 summed over outputs, mean over the batch).
    """
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    y = targets.reshape(outputs.shape).to(outputs.dtype)
    if kind == "mse":
        return F.mse_loss(outputs, y)
    if kind == "half_sse":
        return 0.5 * (outputs - y).pow(2).flatten(1).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}")


class Accumulator:
    """Running sums of loss and correct predictions, kept as device tensors until read."""

    def __init__(self, classification: bool, device: torch.device):
        self.classification = classification
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        # Set if any step's full objective (data loss + extra terms) was NaN/inf; read once per epoch.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor,
            objective: torch.Tensor | None = None) -> None:
        n = targets.shape[0]
        if objective is not None:
            self.nonfinite |= ~torch.isfinite(objective.detach())
        self.loss_sum += loss.detach().double() * n
        if self.classification:
            self.correct += (outputs.detach().argmax(1) == targets).sum()
        self.count += n

    def result(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            return {}
        out = {f"{prefix}_loss": float(self.loss_sum) / self.count}
        if self.classification:
            out[f"{prefix}_accuracy"] = float(self.correct) / self.count
        return out
