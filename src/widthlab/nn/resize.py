"""The record of a structural change: which units of which parameter survived, and which are new.

Every width change in widthlab (grow, shrink, truncate, insert) is committed by code in ``nn/`` and
returns a :class:`ResizeEvent`. Optimizer state is then remapped from the event alone by
``widthlab.nn.optim_surgery`` -- no other module edits optimizer state.

Convention for one resized parameter along dimension ``dim``::

    new.index_select(dim, arange(len(kept)))  ==  old.index_select(dim, kept)   # survivors, in order
    new.narrow(dim, len(kept), n_new)           are the appended units            # fresh

A parameter whose shape did not change but whose ``nn.Parameter`` object was replaced is recorded with
``dim=None`` (all entries survive in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class ParamResize:
    """One parameter tensor before and after a width change.

    Attributes:
        name: qualified parameter name in the model after the change (e.g. ``"layers.0.weight"``).
        old: the parameter object before the change (may be the same object as ``new``).
        new: the parameter object now registered in the model.
        dim: the resized dimension, or None when only the object was replaced.
        kept: int64 indices into ``old`` along ``dim`` of the surviving units, in their new order.
        n_new: number of units appended after the survivors.
    """

    name: str
    old: nn.Parameter
    new: nn.Parameter
    dim: int | None
    kept: torch.Tensor | None
    n_new: int = 0

    def __post_init__(self):
        if self.dim is None:
            if tuple(self.old.shape) != tuple(self.new.shape):
                raise ValueError(f"{self.name}: shape changed {tuple(self.old.shape)} -> "
                                 f"{tuple(self.new.shape)} but no resized dim was given")
            return
        if self.kept is None:
            raise ValueError(f"{self.name}: dim={self.dim} needs kept indices")
        expect = len(self.kept) + self.n_new
        if self.new.shape[self.dim] != expect:
            raise ValueError(f"{self.name}: new size {self.new.shape[self.dim]} along dim {self.dim} "
                             f"!= {len(self.kept)} kept + {self.n_new} new")


@dataclass(frozen=True)
class ResizeEvent:
    """All parameter changes of one committed structural edit.

    ``added`` lists parameters that did not exist before (a new layer); ``removed`` lists parameters
    that no longer exist in the model.
    """

    params: tuple[ParamResize, ...] = ()
    added: tuple[tuple[str, nn.Parameter], ...] = ()
    removed: tuple[nn.Parameter, ...] = ()
    description: str = ""
    widths: dict[str, int] = field(default_factory=dict)
    # How optimizer state of the changed tensors is remapped: "keep" (slice survivors, zero new units)
    # or "reset" (drop it, as the adaptive-width paper's code does); None lets the trainer choose "keep".
    optimizer_mode: str | None = None

    def __bool__(self) -> bool:
        return bool(self.params or self.added or self.removed)

    def merge(self, other: ResizeEvent) -> ResizeEvent:
        """Combine two events applied one after the other.

        A parameter touched by both appears twice, chained (the second entry's ``old`` is the first
        entry's ``new``); consumers must therefore process ``params`` in order.
        """
        return ResizeEvent(
            params=self.params + other.params,
            added=self.added + other.added,
            removed=self.removed + other.removed,
            description="; ".join(d for d in (self.description, other.description) if d),
            widths={**self.widths, **other.widths},
            optimizer_mode=self.optimizer_mode or other.optimizer_mode,
        )


@dataclass(frozen=True, eq=False)
class WidthSite:
    """One resizable width: the units produced by ``producer`` and consumed by ``consumer``.

    The producer is a Linear (its rows) or Conv2d (its output channels) with its bias; ``norms`` are the
    per-unit layers in between (BatchNorm1d/2d, LayerNorm over the unit axis) in forward order; the
    consumer is a Linear (its columns) or Conv2d (its input channels). Element-wise activations in
    between need no editing. Models expose their sites with ``width_sites() -> list[WidthSite]``.

    Attributes:
        name: a stable label of the width (``"hidden.0"``, ``"layer2.1.mid"``), used in records.
        producer_name, consumer_name, norm_names: qualified module names inside the model, so that a
            resize event can name the parameters it changed.
    """

    name: str
    producer: nn.Module
    consumer: nn.Module
    norms: tuple[nn.Module, ...] = ()
    producer_name: str = ""
    consumer_name: str = ""
    norm_names: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        w = getattr(self.producer, "weight", None)
        if w is None:  # a CSR sparse Linear (wide & sparse) holds no dense weight
            return int(self.producer.out_features)
        return int(w.shape[0])
