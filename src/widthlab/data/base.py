"""The one container every dataset is delivered in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import Dataset

Task = Literal["classification", "regression"]
# A batch-level training transform: (x, generator) -> x, applied on the batch's device.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TaskData:
    """Train/validation/test splits of one task plus what a model builder needs to know.

    Attributes:
        name: dataset name as given in the study (``"digits"``, ``"mnist"``...).
        task: ``"classification"`` (integer labels) or ``"regression"`` (float targets).
        train, val, test: map-style datasets returning ``(x, y)``; ``val`` may be empty.
        input_shape: shape of one input ``x`` (``(64,)`` for digits, ``(3, 32, 32)`` for CIFAR).
        num_outputs: number of classes, or of regression targets.
        augment: optional batch transform applied to training inputs only.
        meta: free-form facts for the record (source files, standardisation constants...).
        collate: optional ``DataLoader`` collate function; a collated ``x`` may be any object with a
            ``.to(device)`` method.
    """

    name: str
    task: Task
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_outputs: int
    augment: Augment | None = None
    meta: dict = field(default_factory=dict)
    # Batch collation for datasets whose items are not plain tensors (graphs); None: torch's default.
    collate: Callable | None = None
