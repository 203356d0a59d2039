"""What every method hands to a run: the model to train, its callbacks, extra summary fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class MethodPlan:
    """What a method contributes to a run.

    Attributes:
        model: the model to train (possibly rebuilt or wrapped by the method).
        callbacks: trainer callbacks implementing the method (see ``train/callbacks.py``).
        summary: extra fields for the run's summary entry (e.g. ``base_width``, ``family``).
    """

    model: nn.Module
    callbacks: list[Any] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
