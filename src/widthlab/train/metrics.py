"""Losses and metrics, accumulated on the device so the training step never waits for the host."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Targets that token-level losses and accuracies skip (padding), torch's cross_entropy default.
IGNORE_INDEX = -100


def data_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The data term of the loss, averaged over the batch.

    Args:
        kind: ``cross_entropy``, ``mse`` (mean over all output entries) or ``half_sse``
            (1/2 ||o - y||^2 summed over outputs, mean over the batch).

    Sequence outputs (B, T, ..., V) against targets (B, T, ...) are flattened to tokens; cross-entropy
    then averages over the tokens whose target is not ``IGNORE_INDEX`` (padding).
    """
    if kind == "cross_entropy":
        if outputs.dim() > 2:
            return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return F.cross_entropy(outputs, targets)
    y = targets.reshape(outputs.shape).to(outputs.dtype)
    if kind == "mse":
        return F.mse_loss(outputs, y)
    if kind == "half_sse":
        return 0.5 * (outputs - y).pow(2).flatten(1).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}")


class Accumulator:
    """Running sums of loss and correct predictions, kept as device tensors until read.

    For sequence outputs (more than 2 dims) the sums run over non-padding tokens instead of examples:
    loss and accuracy are per token, counted on the device (``tokens``) so nothing is read per step.
    """

    def __init__(self, classification: bool, device: torch.device):
        self.classification = classification
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.sequence = False
        # Set if any step's full objective (data loss + extra terms) was NaN/inf; read once per epoch.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor,
            objective: torch.Tensor | None = None) -> None:
        n = targets.shape[0]
        if objective is not None:
            self.nonfinite |= ~torch.isfinite(objective.detach())
        if outputs.dim() > 2 and self.classification:
            valid = targets != IGNORE_INDEX
            n_tok = valid.sum()
            self.loss_sum += loss.detach().double() * n_tok
            self.correct += ((outputs.detach().argmax(-1) == targets) & valid).sum()
            self.tokens += n_tok
            self.sequence = True
            self.count += n
            return
        self.loss_sum += loss.detach().double() * n
        if self.classification:
            self.correct += (outputs.detach().argmax(1) == targets).sum()
        self.count += n

    def all_reduce(self, reduce_sum) -> None:
        """Sum this accumulator over data-parallel ranks (``reduce_sum`` sums a tensor in place)."""
        counts = torch.tensor([self.count], dtype=torch.int64, device=self.loss_sum.device)
        reduce_sum(self.loss_sum)
        reduce_sum(self.correct)
        reduce_sum(counts)
        reduce_sum(self.tokens)
        flag = self.nonfinite.to(torch.int64)
        reduce_sum(flag)
        self.nonfinite = flag > 0
        self.count = int(counts.item())

    def result(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            return {}
        denominator = max(int(self.tokens), 1) if self.sequence else self.count
        out = {f"{prefix}_loss": float(self.loss_sum) / denominator}
        if self.classification:
            out[f"{prefix}_accuracy"] = float(self.correct) / denominator
        return out
