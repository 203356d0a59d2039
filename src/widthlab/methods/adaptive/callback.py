"""The adaptive-width method as a trainer callback: a thin wrapper of :class:`.controller.AdaptiveWidth`.

The controller holds the whole method (ELBO loss terms, per-step width checks with their sync budget,
resizing, annealing; Errica et al. 2025, Sec. 3-4); the same object serves a plain PyTorch loop. This
callback adapts it to the Trainer's protocol: ``extra_loss`` returns the controller's loss terms, the
step-end hook returns its resize events (the Trainer hands them to the optimizer surgery), data-parallel
runs compare the target widths across ranks (``trainer.dist.agree``), and the end of the fit records the
final widths, lam per layer and, optionally, truncation curves (Sec. 5).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from widthlab.methods.adaptive.controller import SYNC_MODES, AdaptiveWidth, LinearAnneal
from widthlab.methods.adaptive.layer import collect_sites
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.truncation import dataset_batches, removable_fraction, truncation_curve
from widthlab.nn.resize import ResizeEvent

__all__ = ["SYNC_MODES", "AdaptiveWidthCallback", "LinearAnneal"]


def _agree(trainer):
    ctx = getattr(trainer, "dist", None)
    return ctx.agree if getattr(ctx, "active", False) else None


class AdaptiveWidthCallback:
    """Trainer callback of the adaptive-width method.

    Args:
        prior: the ELBO prior terms (added to the data loss by ``extra_loss``), or a ready
            :class:`~.controller.AdaptiveWidth` (then the options below must be left at their defaults).
        optimizer_mode: ``"reset"`` (faithful) or ``"keep"`` optimizer state after a resize.
        anneal: optional lam-prior annealing (needs ``prior.sigma_lambda``).
        check_every: compare widths every this many optimizer steps (1: the paper's schedule).
        sync: ``"step"`` (one blocking read per check) or ``"async"`` (non-blocking copy on CUDA; equal
            to ``"step"`` on the CPU).
        seed: seed of the generator that draws new units.
        summary: a dict the callback fills at the end of the fit (final lam per layer, widths); the plan
            builder passes the run's summary extras here.
        truncation_fractions: kept fractions at which, at the end of the fit, test accuracy is measured
            after removing the tail or random units (``summary["truncation"]``, Sec. 5).
    """

    def __init__(self, prior: ElboPrior | AdaptiveWidth, *, optimizer_mode: str = "reset",
                 anneal: LinearAnneal | None = None, check_every: int = 1, sync: str = "step", seed: int = 0,
                 summary: dict[str, Any] | None = None, truncation_fractions: list[float] | None = None):
        if isinstance(prior, AdaptiveWidth):
            self.controller = prior
        else:
            self.controller = AdaptiveWidth(prior=prior, optimizer_mode=optimizer_mode, anneal=anneal,
                                            check_every=check_every, sync=sync, seed=seed)
        self.summary = summary if summary is not None else {}
        self.truncation_fractions = sorted({float(f) for f in truncation_fractions or ()} - {1.0},
                                           reverse=True)
        self.truncation_seed = int(seed)

    # The controller's state, read by records and tests.
    @property
    def prior(self) -> ElboPrior:
        return self.controller.prior

    @property
    def resizes(self) -> int:
        return self.controller.resizes

    @property
    def _fast(self):
        return self.controller._fast

    # ------------------------------------------------------------------ loss

    def extra_loss(self, model: nn.Module, outputs, targets):
        return self.controller.prior(model)

    # ------------------------------------------------------------------ width updates

    def update_widths(self, model: nn.Module, targets: list[int] | None = None) -> list[ResizeEvent]:
        """Project lam and resize every site whose target width differs (see the controller)."""
        return self.controller.update_widths(model, targets)

    def on_fit_start(self, trainer) -> list[ResizeEvent]:
        # A model built at another width (or a boundary below lam0) is brought to D(lam) before step 1.
        c = self.controller
        return c.update_widths(trainer.model, c.agreed_targets(trainer.model, _agree(trainer)))

    def on_step_end(self, trainer) -> list[ResizeEvent] | None:
        return self.controller.check(trainer.model, agree=_agree(trainer))

    # ------------------------------------------------------------------ schedule, record, resume

    def on_epoch_end(self, trainer) -> None:
        # trainer.epoch counts finished epochs: the next one's index
        self.controller.set_epoch(trainer.epoch)

    def metrics(self, trainer) -> dict[str, Any]:
        sites = collect_sites(trainer.model)
        out: dict[str, Any] = {"adaptive_params": {s.name: s.scale.dist.describe() for s in sites},
                               "resizes": self.resizes}
        if self.prior.sigma_lambda is not None:
            out["sigma_lambda"] = self.prior.sigma_lambda if self.prior.active else None
        return out

    def on_fit_end(self, trainer) -> None:
        if self.truncation_fractions:
            self.summary["truncation"] = self.truncation_report(trainer.model, trainer.data, trainer.device)
        sites = collect_sites(trainer.model)
        self.summary["adaptive_widths"] = {s.name: s.width for s in sites}
        self.summary["adaptive_total_width"] = sum(s.width for s in sites)
        self.summary["adaptive_params"] = {s.name: s.scale.dist.describe() for s in sites}
        self.summary["resizes"] = self.resizes

    def truncation_report(self, model: nn.Module, data, device=None) -> dict[str, Any]:
        """Test accuracy against the kept fraction, tail vs random removal, without renormalisation
        (Errica et al. 2025, Sec. 5); plus the largest fraction each removes with no accuracy loss."""
        batches = dataset_batches(data.test, data.collate, device=device)
        out: dict[str, Any] = {"renormalize": False}
        for mode in ("tail", "random"):
            curve = truncation_curve(model, None, batches, [1.0, *self.truncation_fractions], mode=mode,
                                     seed=self.truncation_seed)
            out[mode] = curve
            out[f"removable_{mode}"] = removable_fraction(curve)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        # Widths come back with the weights (the checkpoint loader re-shapes tensors by name).
        self.controller.load_state_dict(state)
