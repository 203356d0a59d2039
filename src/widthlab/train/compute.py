"""A callback that meters training compute: estimated FLOPs at the widths in use at every step.

Generic instrumentation (it knows no method): after each optimizer step it adds
``3 x forward FLOPs per example x examples in the step`` (``models/flops.py``), with the model's widths
and sparsity as they are at that step, so growing, shrinking or sparse models are charged for what they
actually were. Cheap per step: per-layer weight counts are cached until a layer's shape changes.
"""

from __future__ import annotations

from typing import Any

from widthlab.models.counting import counted_layers
from widthlab.models.flops import TRAIN_FORWARD_RATIO, spatial_factors, weight_count


class ComputeMeter:
    """Accumulates ``train_flops`` (and the dense-equivalent ``train_flops_dense``) over a fit.

    A run total: selecting the best epoch at the end does not roll it back (the compute was spent).
    """

    run_totals = True

    def __init__(self) -> None:
        self.train_flops = 0.0
        self.train_flops_dense = 0.0
        self._factors: dict[str, int] = {}
        self._cache: dict[str, tuple[tuple, int, int]] = {}
        self._layer_names: tuple[str, ...] = ()

    def _per_example(self, trainer) -> tuple[int, int]:
        layers = list(counted_layers(trainer.model))
        names = tuple(n for n, _ in layers)
        if names != self._layer_names:  # first call, or a layer was inserted/removed
            x = trainer.last_batch[0][:1] if trainer.last_batch is not None else None
            if x is not None and hasattr(x, "shape"):
                self._factors = spatial_factors(trainer.model, x[0])
            self._layer_names = names
        sparse = dense = 0
        for name, mod in layers:
            w = getattr(mod, "weight", None)
            key = (tuple(w.shape) if w is not None else (), getattr(mod, "num_nonzero_weights", None) is None)
            hit = self._cache.get(name)
            if hit is None or hit[0] != key or getattr(mod, "num_nonzero_weights", None) is not None:
                hit = (key, weight_count(mod, True), weight_count(mod, False))
                self._cache[name] = hit
            f = 2 * self._factors.get(name, 1)
            sparse += f * hit[1]
            dense += f * hit[2]
        return sparse, dense

    def on_step_end(self, trainer) -> None:
        x, _ = trainer.last_batch
        n = x.shape[0] if hasattr(x, "shape") else len(x)
        n *= trainer.dist.world  # every rank trains its slice of the global batch
        sparse, dense = self._per_example(trainer)
        self.train_flops += TRAIN_FORWARD_RATIO * sparse * n
        self.train_flops_dense += TRAIN_FORWARD_RATIO * dense * n

    def metrics(self, trainer) -> dict[str, Any]:
        return {"train_flops": self.train_flops, "train_flops_dense": self.train_flops_dense}

    def state_dict(self) -> dict[str, float]:
        return {"train_flops": self.train_flops, "train_flops_dense": self.train_flops_dense}

    def load_state_dict(self, state: dict[str, float], model=None) -> None:
        self.train_flops = float(state["train_flops"])
        self.train_flops_dense = float(state["train_flops_dense"])
