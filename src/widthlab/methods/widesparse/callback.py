"""The trainer callback of the wide & sparse method: masks stay exact, connectivity is recorded.

Masked layers already compute with W ⊙ M and get exactly zero gradients off the mask from autograd
(:mod:`widthlab.nn.masked`); this callback adds the two cheap guards of Golubeva et al. 2021, §2.3:

* ``on_after_backward``: zero the gradient off the mask, so that no term added to ``.grad`` by other
  code reaches the optimizer's state (with fp16 AMP this runs on the scaled gradient, before any
  ``unscale_``; zero stays zero under scaling);
* ``on_step_end``: re-zero the stored weight off the mask, so that no optimizer update that fails to
  vanish at w = 0 can leave a nonzero weight there.

The masks are buffers in the model's state dict, so checkpoints carry them; the callback's own state
is the record of what was removed, checked on resume against the rebuilt model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from widthlab.models.counting import count_nonzero_weights, count_weights
from widthlab.nn.masked import MaskedMixin, masked_layers


class MaskCallback:
    """Keeps every masked layer's weight exactly zero off its mask during training.

    Args:
        removals: k_l per layer as sparsified, recorded in the checkpoint and checked on resume.
    """

    def __init__(self, removals: dict[str, int] | None = None):
        self.removals = {str(k): int(v) for k, v in (removals or {}).items()}
        self._layers: list[MaskedMixin] | None = None

    def _masked(self, model: nn.Module) -> list[MaskedMixin]:
        if self._layers is None:
            self._layers = [m for _, m in masked_layers(model)]
        return self._layers

    def on_fit_start(self, trainer: Any) -> None:
        self._layers = None  # the trainer may have moved the model; look the layers up afresh
        for m in self._masked(trainer.model):
            m.apply_mask_()

    def on_after_backward(self, trainer: Any) -> None:
        for m in self._masked(trainer.model):
            m.mask_grad_()

    def on_step_end(self, trainer: Any) -> None:
        for m in self._masked(trainer.model):
            m.apply_mask_()

    def metrics(self, trainer: Any) -> dict[str, Any]:
        """Per-epoch record: c = nonzero / dense counted weights of the whole model."""
        counted = count_weights(trainer.model)
        return {"connectivity": count_nonzero_weights(trainer.model) / counted if counted else None}

    def state_dict(self) -> dict[str, Any]:
        return {"removals": dict(self.removals)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Check that the model being resumed was sparsified like the one that was saved.

        Raises:
            ValueError: the checkpoint removed weights from other layers or in other numbers (the
                masks themselves come back with the model's state dict).
        """
        saved = {str(k): int(v) for k, v in state.get("removals", {}).items()}
        if self.removals and saved != self.removals:
            diff = sorted(set(saved.items()) ^ set(self.removals.items()))[:3]
            raise ValueError(f"checkpoint was sparsified differently from this run (e.g. {diff})")
        self._layers = None
