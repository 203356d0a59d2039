"""The adaptive-width method as one controller object, for a plain PyTorch loop and for the Trainer.

Adaptive Width Neural Networks (Errica et al., 2025) let every adaptive layer learn its width: a
learned importance distribution f_l with parameter lam_l weighs the layer's units (Sec. 3, the
rescaling h_j = act(W h + b)_j f_l(j)), the width is its k-quantile D_l = floor(q_k) + 2, lam_l is trained
with the weights by maximising the first-order ELBO of Sec. 3 (MAP with Gaussian priors on the weights
and on lam), and when lam moves the quantile, units are appended to or cut from the tail. ::

    aw = widthlab.AdaptiveWidth(model, optimizer, example_inputs, n_observations=len(train_set))
    for x, y in loader:
        loss = aw.loss(F.cross_entropy(model(x), y))    # data loss + ELBO prior terms / N
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        aw.step()                                       # resize where D(lam) moved; remaps optimizer

:class:`AdaptiveWidth` inserts the importance rescaling into any model (``any_model.make_adaptive``:
at every width site ``torch.fx`` discovers, or the sites named) or takes one of widthlab's adaptive
architectures as it is; the Trainer's :class:`~widthlab.methods.adaptive.callback.AdaptiveWidthCallback`
wraps the same object.

Width dynamics. The paper's code checks every adaptive layer before every forward call; forward t + 1
therefore sees the lam of optimizer step t. :meth:`AdaptiveWidth.step` gives the same schedule with one
check per optimizer step:

1. project every distribution's parameters (a device ``clamp_``, no sync);
2. cheap check: compare every layer's raw parameter with cached thresholds of its current width (for
   the exponential, c/(D - 1) < lam <= c/(D - 2) mapped to r and shrunk by a 1e-5 safety margin),
   reading the L raw parameters to the host in one transfer;
3. only when flagged, exact check: compute every target width D(lam) on the device, read the L targets
   in one transfer, and resize the layers whose target differs (``resizing.set_width``).

Sync budget: none per forward pass (the forward reads D from tensor shapes); one per optimizer step,
plus a second one on the steps where some lam crossed (or came within the margin of) a threshold;
families without closed-form thresholds take the exact check every step. ``check_every=n`` checks every
n steps; ``sync="async"`` on CUDA never blocks: the exact targets travel by a non-blocking copy and are
applied at the first step after they arrive, usually one step late. Evaluation never changes widths.

:class:`LinearAnneal` anneals the lam prior for online compression (Sec. 4, Fig. 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite, collect_sites
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.resizing import OPTIMIZER_MODES, set_width
from widthlab.nn.optim_surgery import apply_events
from widthlab.nn.resize import ResizeEvent

SYNC_MODES = ("step", "async")
# agree(targets, what) -> targets: checks a decision is the same on every data-parallel rank.
Agree = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class LinearAnneal:
    """Linear annealing of the lam prior's sigma for online compression (Errica et al. 2025, Sec. 4).

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


class AdaptiveWidth:
    """The adaptive-width method on a model: ELBO loss terms and per-step width updates.

    Args:
        model: any ``nn.Module``. One of widthlab's adaptive architectures (it has ``adaptive_sites()``)
            is used as it is; any other model gets the importance rescaling inserted in place at its
            discovered width sites (``any_model.make_adaptive``, which the keyword options below after
            ``sites`` configure). None: an unbound controller whose methods take the model (the
            Trainer's callback).
        optimizer: the optimizer training ``model``; :meth:`step` remaps it after every resize. The
            distributions' parameters (lam's) it does not hold join its first param group, as the
            paper trains them (same learning rate). None: :meth:`step` returns the events only.
        example_inputs: one batch (a tensor or a tuple of the forward's inputs) for site discovery.
        sites: names of the widths to adapt (discovered sites, or group names such as ``"conv1+2"`` for
            a residual stream); None: every discovered single site.
        n_observations: N, the training-set size that scales the priors (Sec. 3's ELBO sums the data
            term over N examples); may instead be given to :meth:`loss`.
        sigma_theta: std of the Gaussian prior on every parameter; None: no weight prior.
        prior_lambda: ``(mu, sigma)`` of the Gaussian prior on each lam, or None (flat).
        prior: a ready :class:`~widthlab.methods.adaptive.loss.ElboPrior` instead of the three above.
        optimizer_mode: ``"keep"`` (surviving units keep their optimizer state exactly; new units
            start at zero) or ``"reset"`` (the state of every resized tensor restarts, as the paper's
            code does).
        anneal: optional lam-prior annealing (needs ``prior_lambda``); :meth:`set_epoch` moves it.
        check_every: compare widths every this many steps (1: the paper's schedule).
        sync: ``"step"`` or ``"async"`` (non-blocking width read on CUDA).
        seed: seeds the draws of new units.
        **insert: options of ``any_model.make_adaptive`` (``lambda0``, ``k``, ``distribution``,
            ``distribution_options``, ``boundary``, ``consumer_init``, ``grow_init``, ``leaf_modules``).
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 example_inputs: torch.Tensor | tuple | None = None, *, sites: Sequence[str] | None = None,
                 n_observations: int | None = None, sigma_theta: float | None = 1.0,
                 prior_lambda: tuple[float, float] | None = None, prior: ElboPrior | None = None,
                 optimizer_mode: str = "keep", anneal: LinearAnneal | None = None, check_every: int = 1,
                 sync: str = "step", seed: int = 0, **insert: Any):
        if optimizer_mode not in OPTIMIZER_MODES:
            raise ValueError(f"optimizer_mode must be one of {OPTIMIZER_MODES}, got {optimizer_mode!r}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if prior is None:
            mu, sigma = prior_lambda if prior_lambda is not None else (0.01, None)
            prior = ElboPrior(sigma_theta=sigma_theta, mu_lambda=float(mu),
                              sigma_lambda=None if sigma is None else float(sigma),
                              n_observations=int(n_observations or 1))
            self._n_given = n_observations is not None
        else:
            self._n_given = True
        if anneal is not None and prior.sigma_lambda is None:
            raise ValueError("anneal needs a lambda prior (prior_lambda: (mu, sigma))")
        self.prior = prior
        self.sigma0 = prior.sigma_lambda
        self.optimizer_mode = optimizer_mode
        self.anneal = anneal
        self.check_every = check_every
        self.sync = sync
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps = 0
        self.resizes = 0
        self.model = model
        self.optimizer = optimizer
        self._pending: tuple[torch.Tensor, Any] | None = None  # (pinned host targets, CUDA event)
        self._threshold_key: tuple | None = None
        self._sites_cache: tuple[nn.Module, list[AdaptiveSite]] | None = None
        self._fast: tuple[nn.Module, list[tuple]] | None = None  # see _surely_unchanged
        self._thresholds: tuple[list[torch.Tensor], list[float], list[float]] | None = None
        if anneal is not None:
            self.set_epoch(0)
        if model is not None:
            self._bind(model, optimizer, example_inputs, sites, insert)
        elif insert or sites is not None or optimizer is not None:
            raise ValueError("AdaptiveWidth: sites, optimizer and insertion options need a model")

    def _bind(self, model, optimizer, example_inputs, sites, insert) -> None:
        from widthlab.methods.adaptive.any_model import make_adaptive

        adaptive = callable(getattr(model, "adaptive_sites", None))
        if adaptive and (insert or sites is not None):
            raise ValueError(f"{type(model).__name__} is already adaptive: its sites and distributions are "
                             "its own; sites and insertion options do not apply")
        events: list[ResizeEvent] = []
        if not adaptive:
            _, events = make_adaptive(model, example_inputs, sites=sites, generator=self.generator,
                                      optimizer_mode=self.optimizer_mode, **insert)
        # A model built at another width (or a boundary below lam0) is brought to D(lam) at once.
        events += self.update_widths(model)
        self._remap(events)
        if optimizer is not None:
            from widthlab.methods.adaptive.any_model import add_missing_parameters

            add_missing_parameters(optimizer, model)
        self.initial_events = events

    # ------------------------------------------------------------------ loss

    def loss_terms(self, model: nn.Module | None = None, n_observations: int | None = None):
        """The ELBO's prior terms divided by N (Sec. 3): sum theta^2 / (2 sigma_theta^2 N) over every
        parameter but lam's, plus the lam prior / N when it is on; None when both priors are off.

        Add it to the mean data loss of a batch (cross-entropy, or 1/2 ||o - y||^2 for regression).
        """
        if n_observations is not None:
            self.prior.n_observations = int(n_observations)
            self._n_given = True
        if not self._n_given:
            raise ValueError("AdaptiveWidth needs n_observations (the training-set size N that scales the "
                             "priors): pass it to AdaptiveWidth(...) or to loss(data_loss, n_observations)")
        return self.prior(self._model(model))

    def loss(self, data_loss: torch.Tensor, n_observations: int | None = None) -> torch.Tensor:
        """``data_loss`` (the batch mean) plus :meth:`loss_terms`: the negative ELBO per example."""
        extra = self.loss_terms(None, n_observations)
        return data_loss if extra is None else data_loss + extra

    # ------------------------------------------------------------------ width updates

    def step(self) -> list[ResizeEvent]:
        """Call after ``optimizer.step()``: resize every width whose D(lam) moved and remap the optimizer
        (``optimizer_mode``). Returns the resize events (empty on most steps)."""
        events = self.check() or []
        self._remap(events)
        return events

    def widths(self, model: nn.Module | None = None) -> dict[str, int]:
        """The live adaptive widths by site name."""
        return {s.name: s.width for s in collect_sites(self._model(model))}

    def sites(self, model: nn.Module | None = None) -> list[AdaptiveSite]:
        return collect_sites(self._model(model))

    def _model(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("this AdaptiveWidth is not bound to a model: pass the model")
        return model

    def _remap(self, events: list[ResizeEvent]) -> None:
        apply_events(self.optimizer, events, self.optimizer_mode)

    def update_widths(self, model: nn.Module | None = None, targets: list[int] | None = None
                      ) -> list[ResizeEvent]:
        """Project lam and resize every site whose target width differs from its live width.

        Args:
            model: the adaptive model (default: the bound one).
            targets: target widths already read from the device (one per site); None reads them now.

        Returns:
            The resize events (empty when nothing changed); the optimizer is not touched here.
        """
        model = self._model(model)
        sites = collect_sites(model)
        self._sites_cache = self._fast = None
        if targets is None:
            targets = self._targets(sites).tolist() if sites else []  # the one host read of this step
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

    def agreed_targets(self, model: nn.Module, agree: Agree | None) -> list[int]:
        """Exact targets, checked equal on every rank of a data-parallel run by ``agree``.

        All ranks must resize at the same step to the same widths. lam is a parameter, so DDP
        all-reduces its gradient and every rank holds the same lam; the targets are compared anyway (one
        small all-gather per check), so that a disagreement stops every rank with a clear error instead
        of a hang.
        """
        sites = collect_sites(model)
        if not sites:
            return []
        targets = self._targets(sites)
        if agree is not None:
            targets = agree(targets, "adaptive target widths")
        return targets.tolist()

    def check(self, model: nn.Module | None = None, *, agree: Agree | None = None
              ) -> list[ResizeEvent] | None:
        """One optimizer step's width check (counted); the events, or None when nothing changed.

        ``agree`` (data-parallel runs) takes the exact check with targets compared across ranks.
        """
        self.steps += 1
        if self.steps % self.check_every:
            return None
        model = self._model(model)
        fast = self._fast
        if fast is not None and fast[0] is model and _inside(fast[1]):
            return None  # the common step: nothing moved across a threshold (see _surely_unchanged)
        sites = self._step_sites(model)
        if not sites or not any(s.scale.adapt for s in sites):
            return None
        if agree is not None:
            return self.update_widths(model, self.agreed_targets(model, agree))
        if self.sync == "async" and sites[0].scale.dist._like().device.type == "cuda":
            return self._async_update(model, self._targets(sites))
        if self._surely_unchanged(sites):
            return None
        return self.update_widths(model, self._targets(sites).tolist())

    def _step_sites(self, model: nn.Module) -> list[AdaptiveSite]:
        """``collect_sites(model)``, rebuilt only for a new model object or after a resize or a restore
        (a Transformer has a dozen prefixed sites: rebuilding them every step costs more than the check).
        """
        if self._sites_cache is None or self._sites_cache[0] is not model:
            self._sites_cache = (model, collect_sites(model))
        return self._sites_cache[1]

    def _surely_unchanged(self, sites: list[AdaptiveSite]) -> bool:
        """The cheap check: is every raw parameter strictly inside its cached width thresholds?

        One host read of all layers' raw parameters (a single transfer; on the CPU plain reads),
        compared on the host with the (lo, hi) intervals of their current widths (``stable_interval``).
        False (go to the exact check) when some parameter left its interval, came within the safety
        margin of a threshold, or a family has no thresholds. The intervals are rebuilt when a width or
        a parameter object changes.
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
            # CPU: later steps take the lean path of check (_inside) until a value leaves its interval
            # or falls below its projection floor, a weight is replaced (a resize), or a restore.
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

    # ------------------------------------------------------------------ schedule, resume

    def set_epoch(self, epoch: int) -> None:
        """Move the lam-prior annealing to 0-based ``epoch`` (no-op without ``anneal``)."""
        if self.anneal is not None:
            self.prior.active, self.prior.sigma_lambda = self.anneal.at(epoch, self.sigma0)

    def state_dict(self) -> dict[str, Any]:
        """The controller's own state (widths and lam come back with the model's weights)."""
        return {"generator": self.generator.get_state(), "steps": self.steps, "resizes": self.resizes,
                "prior_active": self.prior.active, "sigma_lambda": self.prior.sigma_lambda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.steps, self.resizes = int(state["steps"]), int(state["resizes"])
        self.prior.active, self.prior.sigma_lambda = bool(state["prior_active"]), state["sigma_lambda"]
        self._pending = None
        self._threshold_key = None
        self._sites_cache = self._fast = None
