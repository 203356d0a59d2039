"""Method names for study files -> builders that turn a model into (model, callbacks).

A method builder takes the method's options from the study as keyword arguments and returns a
:class:`MethodPlan`. ``dense`` trains the model as built. The other methods register here from their
own packages under ``widthlab.methods`` as they are implemented.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from widthlab._registry import Registry
from widthlab.data.base import TaskData


@dataclass
class MethodPlan:
    """What a method contributes to a run.

    Attributes:
        model: the model to train (possibly wrapped or rebuilt by the method).
        callbacks: trainer callbacks implementing the method.
        summary: extra summary fields (e.g. ``base_width``, ``family``, ``connectivity``).
    """

    model: nn.Module
    callbacks: list[Any] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


MethodBuilder = Callable[..., MethodPlan]
METHODS: Registry[MethodBuilder] = Registry("method")


@METHODS.register("dense")
def dense(model: nn.Module, data: TaskData, *, seed: int) -> MethodPlan:
    """Train the model as built: the baseline every width method is compared with."""
    return MethodPlan(model)


def method_options(name: str) -> dict[str, Any]:
    """Keyword options of method ``name`` (besides ``seed``) with their defaults."""
    sig = inspect.signature(METHODS.get(name))
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "seed"}


def build_method(name: str, options: dict[str, Any], model: nn.Module, data: TaskData, *,
                 seed: int) -> MethodPlan:
    return METHODS.get(name)(model, data, seed=seed, **options)
