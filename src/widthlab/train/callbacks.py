"""The callback protocol through which every width method talks to the trainer.

The trainer knows no method. A method is an object with any subset of the hooks below; the trainer
calls each hook that exists (``getattr``), in the order the callbacks were given. Hooks receive the
trainer itself, from which they may read ``model``, ``optimizer``, ``epoch``, ``step``, ``history``,
``device``, the last batch (``last_batch``, ``last_outputs``, ``last_loss``; under data-parallel
training this rank's slice) and ``dist`` (:class:`~widthlab.train.distributed.DistContext`: a method
that decides structure on each rank checks the decision with ``trainer.dist.agree``).

Structural change: a hook that changed the model's parameters returns a
:class:`~widthlab.nn.resize.ResizeEvent` (or a list of them); the trainer hands it to
``train.optim_surgery``, which alone edits optimizer state. A hook that returns None changed nothing.

Optional non-event members:

* ``extra_loss(model, outputs, targets) -> Tensor | None``: added to the data loss before backward
  (the adaptive method's prior terms).
* ``make_optimizer(model, default) -> Optimizer``: replaces the optimizer built from the training
  config; ``default(params)`` builds that one, so a method may only change the parameter set.
* ``uses_closure``: if True, the trainer calls ``optimizer.step(closure)`` with a closure that
  recomputes the loss (second-order optimizers).
* ``state_dict() / load_state_dict(d)``: saved in checkpoints for exact resume, and with the
  best-validation snapshot, so that selecting the best epoch also restores the method's state of that
  epoch (its architecture, say).
* ``run_totals``: if True, the callback's state counts the whole run (compute spent, events seen):
  it is checkpointed for resume but not rolled back when the best epoch's snapshot is restored.
* ``metrics() -> dict``: extra per-epoch numbers for the record (e.g. current widths).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

HOOKS = ("on_fit_start", "on_after_backward", "on_step_end", "on_epoch_end", "on_fit_end")


@runtime_checkable
class Callback(Protocol):
    """Documentation of the full protocol; callbacks need only define the members they use."""

    def on_fit_start(self, trainer: Any) -> Any: ...

    def on_after_backward(self, trainer: Any) -> Any: ...

    def on_step_end(self, trainer: Any) -> Any: ...

    def on_epoch_end(self, trainer: Any) -> Any: ...

    def on_fit_end(self, trainer: Any) -> Any: ...
