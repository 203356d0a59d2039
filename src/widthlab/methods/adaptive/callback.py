"""The adaptive-width method as a trainer callback: loss terms, per-step width updates, annealing.

Width dynamics (specs/awnn.md §3). The official code checks every adaptive layer before *every*
forward call: project lam onto its boundary, compute D(lam) with ``.item()``, resize if the live width
differs. Forward t + 1 therefore sees the lam of optimizer step t. We get the same schedule with one
check per optimizer step, in ``on_step_end``:

1. project every distribution's parameters (a device ``clamp_``, no sync);
2. cheap check: compare every layer's raw parameter with cached thresholds of its current width (for
   the exponential, c/(D - 1) < lam <= c/(D - 2) mapped to r and shrunk by a 1e-5 safety margin),
   reading the L raw parameters to the host in one transfer (L scalars: cheaper than comparing on
   the device and reading a flag, and on the CPU no synchronisation at all);
3. only when flagged, exact check: compute every target width D(lam) on the device (float64 floor,
   ``width_tensor``), read the L targets in one transfer, and resize the layers whose target differs
   through ``resizing.set_width``; the returned event makes the trainer remap the optimizer (mode
   ``reset`` or ``keep``).

Sync budget: 0 host-device synchronisations per forward pass (the forward reads D from tensor shapes);
1 per optimizer step (the parameters), plus a second one on the steps where some lam crossed, or came within
the margin of, a threshold; families without closed-form thresholds take the exact check every step
(still 1 read). ``check_every=n`` checks every n steps; ``sync="async"`` on CUDA blocks never: the
exact targets travel by a non-blocking copy and are applied at the first step end after they arrive,
usually one step late. Plus one read per epoch for the record (``metrics``). Evaluation never changes
widths, because lam only moves in optimizer steps.

Data-parallel runs (``trainer.dist.active``) take the exact check at every check, with the targets
compared across ranks (``_agreed_targets``); ``sync="async"`` does not apply there.

:class:`LinearAnneal` is the official LinearAlphaScheduler for online compression (§3 "Schedulers").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite, collect_sites
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.resizing import OPTIMIZER_MODES, set_width
from widthlab.methods.adaptive.truncation import dataset_batches, removable_fraction, truncation_curve
from widthlab.nn.resize import ResizeEvent

SYNC_MODES = ("step", "async")


@dataclass(frozen=True)
class LinearAnneal:
    """Linear annealing of the lam prior's sigma for online compression (§3, LinearAlphaScheduler).

    The lam prior is off for epochs ``< start``; from ``start`` on it is on, and its sigma falls by
    sigma_0 · alpha / (end - start + 1) per epoch until ``end``, then stays at
    sigma_0 (1 - alpha (end - start) / (end - start + 1)) ≈ (1 - alpha) sigma_0. The paper's
    compression run uses start 1000, end 2500, alpha 0.9.
    """

    start: int
    end: int
    alpha: float = 0.9

    def __post_init__(self):
        if not 0 <= self.start <= self.end:
            raise ValueError(f"anneal needs 0 <= start <= end, got start={self.start}, end={self.end}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"anneal alpha must lie in [0, 1), got {self.alpha}")

    def at(self, epoch: int, sigma0: float) -> tuple[bool, float]:
        """(prior on?, sigma) for 0-based ``epoch``."""
        if epoch < self.start:
            return False, sigma0
        steps = min(epoch, self.end) - self.start
        return True, sigma0 * (1 - self.alpha * steps / (self.end - self.start + 1))


def _inside(entries: list[tuple]) -> bool:
    """The lean per-step check on the CPU: every layer's weight object unchanged and its raw parameter
    at or above its projection floor and strictly inside its cached width interval."""
    for p, lo, hi, floor, producer, weight in entries:
        v = p.item()
        if producer.weight is not weight or v < floor or not lo < v < hi:
            return False
    return True


class AdaptiveWidthCallback:
    """Trainer callback of the adaptive-width method.

    Args:
        prior: the ELBO prior terms (added to the data loss by ``extra_loss``).
        optimizer_mode: ``"reset"`` (faithful) or ``"keep"`` optimizer state after a resize.
        anneal: optional lam-prior annealing (needs ``prior.sigma_lambda``).
        check_every: compare widths every this many optimizer steps (1: the paper's schedule).
        sync: ``"step"`` (one blocking read per check) or ``"async"`` (non-blocking copy on CUDA; equal
            to ``"step"`` on the CPU).
        seed: seed of the generator that draws new units.
        summary: a dict the callback fills at the end of the fit (final lam per layer, widths); the plan
            builder passes the run's summary extras here.
        truncation_fractions: kept fractions at which, at the end of the fit, test accuracy is measured
            after removing the tail or random units (``summary["truncation"]``, §5).
    """

    def __init__(self, prior: ElboPrior, *, optimizer_mode: str = "reset", anneal: LinearAnneal | None = None,
                 check_every: int = 1, sync: str = "step", seed: int = 0,
                 summary: dict[str, Any] | None = None, truncation_fractions: list[float] | None = None):
        if optimizer_mode not in OPTIMIZER_MODES:
            raise ValueError(f"optimizer_mode must be one of {OPTIMIZER_MODES}, got {optimizer_mode!r}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if anneal is not None and prior.sigma_lambda is None:
            raise ValueError("anneal needs a lambda prior (prior_lambda: [mu, sigma])")
        self.prior = prior
        self.sigma0 = prior.sigma_lambda
        self.optimizer_mode = optimizer_mode
        self.anneal = anneal
        self.check_every = check_every
        self.sync = sync
        self.generator = torch.Generator().manual_seed(int(seed))
        self.summary = summary if summary is not None else {}
        self.truncation_fractions = sorted({float(f) for f in truncation_fractions or ()} - {1.0},
                                           reverse=True)
        self.truncation_seed = int(seed)
        self.steps = 0
        self.resizes = 0
        self._pending: tuple[torch.Tensor, Any] | None = None  # (pinned host targets, CUDA event)
        self._threshold_key: tuple | None = None
        self._sites_cache: tuple[nn.Module, list[AdaptiveSite]] | None = None
        self._fast: tuple[nn.Module, list[tuple]] | None = None  # see _surely_unchanged
        self._thresholds: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        if anneal is not None:
            self._set_epoch(0)

    # ------------------------------------------------------------------ loss

    def extra_loss(self, model: nn.Module, outputs: torch.Tensor, targets: torch.Tensor):
        return self.prior(model)

    # ------------------------------------------------------------------ width updates

    def update_widths(self, model: nn.Module, targets: list[int] | None = None) -> list[ResizeEvent]:
        """Project lam and resize every site whose target width differs from its live width.

        Args:
            model: the adaptive model.
            targets: target widths already read from the device (one per site); None reads them now.

        Returns:
            The resize events (empty when nothing changed).
        """
        sites = collect_sites(model)
        self._sites_cache = self._fast = None
        if targets is None:
            targets = self._targets(sites).tolist()  # the one host read of this step
        events = []
        for asite, D in zip(sites, targets):
            if asite.width != D:
                events.append(set_width(asite, int(D), model=model, generator=self.generator,
                                        optimizer_mode=self.optimizer_mode))
        self.resizes += len(events)
        return events

    @staticmethod
    def _targets(sites: list[AdaptiveSite]) -> torch.Tensor:
        with torch.no_grad():
            for s in sites:
                s.scale.dist.project_()
            return torch.stack([s.scale.target_width() for s in sites])

    def on_fit_start(self, trainer) -> list[ResizeEvent]:
        # A model built at another width (or a boundary below lam0) is brought to D(lam) before step 1.
        sites = collect_sites(trainer.model)
        return self.update_widths(trainer.model, self._agreed_targets(trainer, sites) if sites else None)

    def on_step_end(self, trainer) -> list[ResizeEvent] | None:
        self.steps += 1
        if self.steps % self.check_every:
            return None
        model = trainer.model
        fast = self._fast
        if fast is not None and fast[0] is model and _inside(fast[1]):
            return None  # the common step: nothing moved across a threshold (see _surely_unchanged)
        sites = self._step_sites(model)
        if not sites or not any(s.scale.adapt for s in sites):
            return None
        if getattr(getattr(trainer, "dist", None), "active", False):
            return self.update_widths(model, self._agreed_targets(trainer, sites))
        if self.sync == "async" and sites[0].scale.dist._like().device.type == "cuda":
            return self._async_update(model, self._targets(sites))
        if self._surely_unchanged(sites):
            return None
        return self.update_widths(model, self._targets(sites).tolist())

    @classmethod
    def _agreed_targets(cls, trainer, sites: list[AdaptiveSite]) -> list[int]:
        """Exact targets, checked equal on every rank of a data-parallel run (``trainer.dist``).

        All ranks must resize at the same step to the same widths: each then rebuilds its DDP view, a
        collective. lam is a parameter, so DDP all-reduces its gradient and every rank holds the same
        lam; the targets are compared anyway (one small all-gather per check, in place of the cheap
        check, whose flag would need a collective too), and a disagreement stops every rank with a
        clear error instead of a hang. Single process: no communication.
        """
        targets = cls._targets(sites)
        ctx = getattr(trainer, "dist", None)
        if ctx is not None:
            targets = ctx.agree(targets, "adaptive target widths")
        return targets.tolist()

    def _step_sites(self, model: nn.Module) -> list[AdaptiveSite]:
        """``collect_sites(model)``, rebuilt only for a new model object or after a resize or a restore
        (a Transformer has a dozen prefixed sites: rebuilding them every step costs more than the check).
        """
        if self._sites_cache is None or self._sites_cache[0] is not model:
            self._sites_cache = (model, collect_sites(model))
        return self._sites_cache[1]

    def _surely_unchanged(self, sites: list[AdaptiveSite]) -> bool:
        """The cheap check: is every raw parameter strictly inside its cached width thresholds?

        One host read of all layers' raw parameters (a single transfer; on the CPU, where the values are
        host memory, plain reads), compared on the host with the (lo, hi) intervals of their current
        widths (``stable_interval``). False (go to the exact check) when some parameter left its
        interval, came within the safety margin of a threshold, or a family has no thresholds. The
        intervals are rebuilt when a width or a parameter object changes.
        """
        with torch.no_grad():
            for s in sites:
                s.scale.dist.project_()
        # Direct parameters only (the distributions have no submodules): cheaper than parameters().
        key = tuple((s.width, *map(id, s.scale.dist._parameters.values())) for s in sites)
        if key != self._threshold_key:
            self._threshold_key = key
            intervals = [s.scale.dist.stable_interval(s.width, s.scale.k) for s in sites]
            self._thresholds = None
            if all(iv is not None for iv in intervals):
                self._thresholds = tuple(list(x) for x in zip(*intervals))  # (params, lo, hi)
        if self._thresholds is None:
            return False
        params, lo, hi = self._thresholds
        if all(p.device.type == "cpu" for p in params):
            values = [p.item() for p in params]
            # CPU: later steps take the lean path of on_step_end (_inside) until a value leaves its
            # interval or falls below its projection floor, a weight is replaced (a resize), or a
            # restore; the work per step is then a few attribute reads and comparisons.
            self._fast = (self._sites_cache[0], [
                (p, a, b, s.scale.dist.raw_floor(), s.site.producer, s.site.producer.weight)
                for s, p, a, b in zip(sites, params, lo, hi)])
        else:
            with torch.no_grad():
                values = torch.stack(params).tolist()  # the one host read of a step that changes nothing
        inside = all(a < v < b for v, a, b in zip(values, lo, hi))
        if not inside:
            self._fast = None
        return inside

    def _async_update(self, model: nn.Module, targets: torch.Tensor) -> list[ResizeEvent] | None:
        events = None
        if self._pending is not None and self._pending[1].query():
            host, _ = self._pending
            events = self.update_widths(model, host.tolist())  # already on the host: no device wait
            self._pending = None
        self._threshold_key = None
        if self._pending is None:
            host = torch.empty(targets.shape, dtype=targets.dtype, pin_memory=True)
            host.copy_(targets, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending = (host, ev)
        return events

    # ------------------------------------------------------------------ schedule, record, resume

    def _set_epoch(self, epoch: int) -> None:
        if self.anneal is not None:
            self.prior.active, self.prior.sigma_lambda = self.anneal.at(epoch, self.sigma0)

    def on_epoch_end(self, trainer) -> None:
        self._set_epoch(trainer.epoch)  # trainer.epoch counts finished epochs: the next one's index

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
        (§5); plus the largest fraction each removes with no accuracy loss."""
        batches = dataset_batches(data.test, data.collate, device=device)
        out: dict[str, Any] = {"renormalize": False}
        for mode in ("tail", "random"):
            curve = truncation_curve(model, None, batches, [1.0, *self.truncation_fractions], mode=mode,
                                     seed=self.truncation_seed)
            out[mode] = curve
            out[f"removable_{mode}"] = removable_fraction(curve)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "steps": self.steps, "resizes": self.resizes,
                "prior_active": self.prior.active, "sigma_lambda": self.prior.sigma_lambda}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        # Widths come back with the weights (the checkpoint loader re-shapes tensors by name).
        self.generator.set_state(state["generator"])
        self.steps, self.resizes = int(state["steps"]), int(state["resizes"])
        self.prior.active, self.prior.sigma_lambda = bool(state["prior_active"]), state["sigma_lambda"]
        self._pending = None
        self._threshold_key = None
        self._sites_cache = self._fast = None
