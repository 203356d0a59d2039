"""The self-expansion controller: a trainer callback that grows neurons and layers (Mitchell et al. 2023, the
expansion loop).

Every ``cooldown`` epochs (and before the first epoch) it runs an *expansion event* on the scoring data
(the full training set, or a fixed "addition batch" of ``score_batch`` examples):

1. Observe (``kfac.observe``): per-layer inputs a, back-propagated residuals, K-FAC factors A, G, the
   loss-gradient norm E‖∇_y ℓ‖², and the global natural gradient x with η = gᵀx by CG.
2. Propose and evaluate: for every hidden layer below its cap, ``proposals`` random one-neuron
   candidates refined by MALA (or ascent) on Δη′/η_layer, the best (or a softmax draw) kept; if the
   layer cooldown allows, the same for a new layer before the output (k = its fan-in units), with the
   residual ρ = ∇_y ℓ − c·Jx that removes what the current natural-gradient step already does.
   A width candidate passes if Δη′/η_layer > τ and Δη′/E‖∇_yℓ‖² > α; a layer candidate uses
   Δη′/``layer_cost_mul`` and α_layer. The width candidates of all MLP layers are refined together in
   one batched search (``unit_score.UnitScore``), so an event costs about two searches per addition.
3. Commit the passing candidate with the largest (cost-adjusted) Δη′ (``insertion.py``) and, with
   ``recursive`` (always in the official code), observe again and repeat, one unit at a time, until no
   candidate passes. A layer insertion sets the layer cooldown, which counts down once per event.
   After a width commit the observation is brought up to date rather than redone (the new units have
   zero outgoing weights: only their consumer's inputs change, ``kfac.grown_observation``), only the
   grown site and the one reading it are searched again, and with ``warm_start`` their searches
   continue from where they ended for a shorter budget (MALA chains; with ascent only the site whose
   input grew).

The hook returns the resize events, which the trainer hands to the optimizer surgery. The time spent in
events is measured and reported (``expansion_seconds``, and its share of the fit in the run summary).
Under data parallelism rank 0 alone searches and broadcasts what it inserted (:meth:`expand`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from widthlab.methods.expanding import cost, held_out, kfac, proposals, scores, unit_score
from widthlab.methods.expanding.expansion_config import ExpansionConfig
from widthlab.methods.expanding.fisher import metric_pinv_norm, named_trainable, output_grad, per_sample_loss
from widthlab.methods.expanding.insertion import full_rank, insert_conv_stage, insert_layer, insert_units
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.methods.expanding.natural_gradient import cg_dot_flops, conjugate_gradient, metered_operator
from widthlab.nn.resize import ResizeEvent

__all__ = ["Candidate", "ExpansionConfig", "ExpansionController", "ExpansionEvent"]


# Adam's second moment of new units starts at 1, as the official self-expanding (CNN) code does: with
# v = 0 the first update of a unit with a small gradient g is lr·(1−β1)g/√((1−β2)g²) ≈ 3.2·lr, a jump no
# old weight makes; with v = 1 it is about lr·(1−β1)|g| and grows as v adapts.
NEW_UNIT_FILL = {"exp_avg_sq": 1.0, "max_exp_avg_sq": 1.0}


@dataclass(frozen=True)
class ExpansionEvent(ResizeEvent):
    """A resize event that also says what optimizer state new units start from (``remap_optimizer``'s
    ``fill``, read by the trainer): first moments 0, second moments 1."""

    optimizer_fill: dict[str, float] = field(default_factory=lambda: dict(NEW_UNIT_FILL))


@dataclass
class Candidate:
    """The best proposal of one kind at one place, evaluated (propose -> evaluate)."""

    kind: str  # "width" | "depth"
    index: int  # hidden layer (width) or insertion position (depth)
    delta: float  # Δη′ of the chosen candidate (depth: divided by layer_cost_mul)
    rel: float  # delta / η_layer, compared with τ
    abs: float  # delta / E‖∇_yℓ‖², compared with α or α_layer
    theta: torch.Tensor = field(repr=False)
    layout: proposals.UnitLayout = field(repr=False)
    passes: bool = False


@dataclass
class _Context:
    """One observation of the model on the scoring data (step 1 of an event)."""

    obs: kfac.Observation
    eta_global: float
    per_layer: dict[str, dict[str, Any]]
    bound: float = float("nan")  # normaliser of the absolute score (ExpansionConfig.abs_normalizer)


class ExpansionController:
    """Trainer callback growing an :class:`~.model.ExpandableMLP` by the natural expansion score.

    Args:
        model: the expandable model the trainer will fit (its architecture goes into checkpoints).
        config: the :class:`ExpansionConfig`.
        loss: the trainer's loss name (re-read from the trainer at fit start).
        seed: seeds the proposal generator and the addition batch.
        summary: a dict the controller fills at the end of the fit (the method plan's summary).
    """

    def __init__(self, model: nn.Module, config: ExpansionConfig, loss: str, seed: int = 0,
                 summary: dict | None = None):
        self.model, self.cfg, self.loss, self.seed = model, config, loss, seed
        if config.holdout and not isinstance(model, ExpandableMLP):
            raise ValueError(f"holdout (deciding on held-out examples) is implemented for the expandable MLP "
                             f"(architecture: mlp), not for {type(model).__name__}")
        self.summary = summary if summary is not None else {}
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.layer_cd = 0
        self.events = 0
        self.neurons_added = 0
        self.layers_added = 0
        self.seconds = 0.0
        self.log: list[dict[str, Any]] = []
        self._fit_t0: float | None = None
        self._last: dict[str, float] = {}
        self._epochs_seen = 0  # epochs finished in this fit (tells a resume from a select_best restore)
        self._commits: list[Candidate] = []  # what the last event inserted (broadcast under DDP)
        self._rooms: dict[tuple[str, str], float] = {}  # absolute-score normaliser per site, per event
        self._warm: dict[tuple[str, int], tuple] = {}
        self._in_event, self._event_loss = False, None  # see _preserving
        self.flops = cost.FlopCache()  # FLOPs of the expansion events (observations, solves, scoring)

    # ------------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer) -> list[ResizeEvent] | None:
        self.model = trainer.model
        self._epochs_seen = 0
        self.loss = getattr(trainer, "loss_kind", self.loss)
        self._fit_t0 = time.perf_counter()
        if self.cfg.expand_at_start and trainer.epoch == 0:
            return self.expand(trainer)
        return None

    def on_epoch_end(self, trainer) -> list[ResizeEvent] | None:
        self._epochs_seen += 1
        e, last = trainer.epoch, trainer.cfg.epochs
        if (e < last and e % self.cfg.cooldown == 0) or (e == last and self.cfg.expand_at_end):
            return self.expand(trainer)
        return None

    def on_fit_end(self, trainer) -> None:
        model = trainer.model
        wall = time.perf_counter() - self._fit_t0 if self._fit_t0 is not None else float("nan")
        opt_flops = float(getattr(trainer.optimizer, "method_flops", 0.0) or 0.0)
        dist = getattr(trainer, "dist", None)
        opt_flops *= dist.world if dist is not None and dist.active else 1  # every rank solves its slice
        self.summary.update(
            method_flops=self.flops.total + opt_flops, solve_flops=opt_flops,
            expansion_flops=self.flops.total,
            expansion_seconds=self.seconds, expansion_share=self.seconds / wall if wall > 0 else None,
            expansion_events=self.events, neurons_added=self.neurons_added, layers_added=self.layers_added,
            final_layers=int(model.depth), final_widths=list(model.hidden_widths()),
            final_neurons=int(sum(model.hidden_widths())))
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None and getattr(model, "in_features", None) == 1 and model.out_features == 1:
            self._save_figure(trainer, run_dir)

    def _save_figure(self, trainer, run_dir) -> None:
        """The 1-D regression figure (experiment 1); a plotting problem never fails the run."""
        from widthlab.methods.expanding.figures import save_regression1d

        try:
            tr, te = trainer.data.train.tensors, trainer.data.test.tensors
            path = save_regression1d(trainer.model, tr[0], tr[1], te[0], te[1], run_dir, self.log)
            self.summary["figure"] = str(path) if path else None
        except Exception as e:  # noqa: BLE001 - a figure is a by-product
            self.summary["figure_error"] = f"{type(e).__name__}: {e}"

    def metrics(self, trainer) -> dict[str, Any]:
        model = trainer.model
        out = {"layers": int(model.depth), "neurons": int(sum(model.hidden_widths())),
               "expansion_seconds": self.seconds, "expansion_events": self.events,
               "neurons_added": self.neurons_added, "layers_added": self.layers_added,
               "expansion_flops": self.flops.total}
        out.update(self._last)
        return out

    def _counters(self) -> dict[str, Any]:
        """Everything of the controller except the architecture: counters, log, proposal RNG."""
        return {"layer_cd": self.layer_cd, "events": self.events, "neurons_added": self.neurons_added,
                "layers_added": self.layers_added, "seconds": self.seconds, "log": list(self.log),
                "generator": self.generator.get_state(), "last": dict(self._last), "flops": self.flops.total}

    def _set_counters(self, state: dict[str, Any]) -> None:
        self.layer_cd = int(state["layer_cd"])
        self.events, self.seconds = int(state["events"]), float(state["seconds"])
        self.neurons_added, self.layers_added = int(state["neurons_added"]), int(state["layers_added"])
        self.log = list(state["log"])
        self._last = dict(state.get("last", {}))
        self.flops.total = float(state.get("flops", 0.0))
        self.generator.set_state(state["generator"])

    def state_dict(self) -> dict[str, Any]:
        return {**self._counters(), "arch": self.model.architecture()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Rebuild the model's architecture from ``state`` (the trainer then loads the weights into modules
        of the right shapes) and restore the controller.

        Two uses, told apart by whether this fit has finished an epoch yet:

        * resume (a checkpoint loaded before training goes on): everything comes back exactly, counters,
          log and proposal RNG, so the resumed run continues as if never interrupted (the expansion event
          that ``on_fit_start`` may have run on the fresh model is discarded with it);
        * ``select_best`` (the trainer goes back to the best epoch's snapshot at the end): only the
          architecture goes back; the totals of the run (events, additions, seconds, log) stay the whole
          fit's, so the summary reports the selected network next to everything the run did.
        """
        if model is not None and state.get("arch") is not None:
            model.set_architecture(state["arch"])
        if self._epochs_seen == 0:
            self._set_counters(state)

    # ------------------------------------------------------------------------------- one event

    def expand(self, trainer) -> list[ResizeEvent]:
        """Run one expansion event on the trainer's model; returns the committed resize events.

        Under data parallelism (``trainer.dist.active``) rank 0 alone searches, on the whole scoring data
        as a single process would; it broadcasts the units it committed (kind, place, parameters) and its
        counters, and every other rank inserts exactly the same units. All ranks then return the same
        resize events, so the trainer remaps every optimizer and rebuilds the DDP wrapper together.
        """
        dist = getattr(trainer, "dist", None)
        if dist is None or not dist.active:
            return self._expand(trainer)
        events = self._expand(trainer) if dist.is_main else []
        msg = dist.broadcast_object({"commits": self._commits, "counters": self._counters()}
                                    if dist.is_main else None)
        if dist.is_main:
            return events
        self._set_counters(msg["counters"])
        return [self._commit(trainer.model, c) for c in msg["commits"]]

    def _expand(self, trainer) -> list[ResizeEvent]:
        t0 = time.perf_counter()
        model = trainer.model
        x, y = self._scoring_data(trainer)
        self._x = x
        was_training = model.training
        model.eval()
        events: list[ResizeEvent] = []
        cache: dict[int, Candidate] = {}  # evaluated width candidates by hidden layer
        record: dict[str, Any] = {"epoch": int(trainer.epoch), "additions": []}
        self._commits = []
        self._in_event, self._event_loss = True, None  # the preservation check's last loss (_preserving)
        self._rooms = {}
        self._warm = {}  # (kind, index) -> the site's last MALA chains in this event (warm_start)
        ctx: _Context | None = None
        grown = None  # (producer, consumer, units) of the last width commit, if _observe_grown follows it
        while len(events) < self.cfg.max_additions:
            # The CG solve is needed for the depth (and "natural" width) residual; η_global is logged once.
            natural = not events or self._depth_allowed(model) or self.cfg.width_residual == "natural"
            if ctx is not None and grown is not None:
                ctx = self._observe_grown(model, x, y, ctx, grown, natural)
            else:
                ctx = self._observe(model, x, y, natural)
            if not events:
                record.update(eta_global=ctx.eta_global, loss_sqnorm=float(ctx.obs.loss_sqnorm))
            # A neuron with zero outgoing weights changes neither e nor G anywhere: only the layer that got
            # it (its consumer's A) and the next one (its input) need new width candidates; the others'
            # scores are unchanged, so their evaluated candidates are kept (the "natural" residual moves
            # with the natural gradient, so it is always re-scored).
            todo = []
            stop = self._cap_stop()
            for i in range(model.depth):
                if model.hidden_widths()[i] >= self._cap(i) - stop:
                    cache.pop(i, None)
                elif i not in cache or self.cfg.width_residual == "natural":
                    todo.append(i)
            if todo:
                cache.update(self._width_candidates(model, ctx, todo))
            cands = list(cache.values())
            if self._depth_allowed(model):
                cands.append(self._depth_candidate(model, ctx))
            passing = [c for c in cands if c is not None and c.passes]
            self._last = {"eta_global": record["eta_global"], **self._candidate_metrics(ctx, cands)}
            if not passing:
                break
            best = max(passing, key=lambda c: c.delta)
            events.append(self._commit(model, best, x, y))
            grown = self._grown_layers(model, best)
            self._commits.append(replace(best, theta=best.theta.detach().cpu()))
            record["additions"].append({"kind": best.kind, "index": best.index, "delta": best.delta,
                                        "rel": best.rel, "abs": best.abs})
            if best.kind == "depth":
                self.layer_cd = self.cfg.layer_cooldown  # no further layer in this event unless 0
                self.layers_added += 1
                cache.clear()  # layer indices shifted
                self._rooms = {}  # new sites: their room is measured afresh
                self._warm = {}
            else:
                self.neurons_added += 1
                for j in self._changed_by(model, best.index):
                    cache.pop(j, None)
                if self.cfg.refine == "ascent":  # the grown site's target lost its best direction: ascent
                    self._warm.pop(("width", best.index), None)  # (greedy) starts it afresh
            if not self.cfg.recursive:
                break
        # The official loop sets the cooldown when it inserts a layer and counts it down at the end of
        # every event, the inserting one included: L = layer_cooldown blocks the next L - 1 events.
        if self.layer_cd > 0:
            self.layer_cd -= 1
        model.train(was_training)
        self._in_event, self._event_loss = False, None
        self.events += 1
        dt = time.perf_counter() - t0
        self.seconds += dt
        record.update(seconds=dt, widths=list(model.hidden_widths()))
        self.log.append(record)
        return events

    def _changed_by(self, model: nn.Module, index: int) -> list[int]:
        """The sites whose candidates a unit added at site ``index`` invalidates: that site (its consumer's
        A) and, in a chain, the next one (its producer reads the grown layer)."""
        return [index, index + 1]

    def _depth_allowed(self, model: nn.Module) -> bool:
        """A layer may be added after the cooldown, below the depth cap, if its width k (the output
        layer's fan-in) fits the cap of its position."""
        p = model.depth
        return (getattr(model, "supports_depth", False) and self.layer_cd <= 0
                and p < len(self.cfg.max_widths) and model.depth_fan_in <= self._cap(p))

    def _cap_stop(self) -> int:
        """1 with ``stop_below_cap`` (the official loop proposes width only while content < capacity − 1)."""
        return 1 if self.cfg.stop_below_cap else 0

    def _cap(self, i: int) -> int:
        caps = self.cfg.max_widths
        return caps[i] if i < len(caps) else caps[-1]

    def _scoring_data(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        ds = trainer.data.train
        n = len(ds)
        if self.cfg.score_batch is None or self.cfg.score_batch >= n:
            idx = torch.arange(n)
        else:  # a fixed "addition batch": the same examples at every event
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:self.cfg.score_batch]
        if hasattr(ds, "tensors"):
            x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        else:
            items = [ds[int(i)] for i in idx]
            x = torch.stack([torch.as_tensor(a) for a, _ in items])
            y = torch.stack([torch.as_tensor(b) for _, b in items])
        return x.to(trainer.device), y.to(trainer.device)

    # ------------------------------------------------------------------------------- observe

    def _natural(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, float]:
        """The natural-gradient residual ρ = ∇_yℓ − c·Jx of the depth (and "natural" width) scores, and
        η_global = gᵀx (x by CG)."""
        cfg = self.cfg
        with torch.enable_grad():
            params = named_trainable(model)
            g = self.flops.run(("gradient", cost.shapes_key(x, list(params.values()))),
                               self._gradient, model, params, x, y)
            op, matvec = metered_operator(self.flops, model, x, self.loss,
                                          output_metric=cfg.output_metric, damping=cfg.eta_damping,
                                          params=params)
            res = conjugate_gradient(matvec, g, maxiter=cfg.eta_maxiter, tol=cfg.eta_tol)
            self.flops.add(cg_dot_flops(g.numel(), res.iterations))
            nat = res.x
            jx = self.flops.run(("jvp", cost.shapes_key(x, nat)), op.jvp, nat).detach()
        eta_global = float(g @ nat)
        r = output_grad(self.loss, op.out.detach(), y)
        c = (jx * r).sum() / (jx * jx).sum().clamp_min(1e-30)
        return {"natural": r - c * jx}, eta_global  # what the current natural-gradient step leaves

    def _observe(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, natural: bool = True) -> _Context:
        cfg = self.cfg
        residuals, eta_global = self._natural(model, x, y) if natural else ({}, float("nan"))
        arch = cost.shapes_key(x, list(model.parameters()), tuple(residuals))
        kw = dict(metric=cfg.output_metric, g_estimator=cfg.g_estimator, bias=cfg.bias)
        layers = list(kfac.kfac_layers(model).values())
        if isinstance(model, ExpandableMLP):  # a Linear chain: counted in closed form
            obs = kfac.observe(model, x, y, self.loss, residuals=residuals, **kw)
            cot = obs.out.shape[1] if cfg.g_estimator == "exact" else 1
            self.flops.add(cost.linear_observe_flops(layers, x.shape[0], 1 + len(residuals) + cot, cot,
                                                     cfg.bias))
        else:  # measured on two samples, scaled to the batch
            m = min(2, x.shape[0])
            probe = lambda: (m, lambda: kfac.observe(model, x[:m], y[:m], self.loss, **kw,  # noqa: E731
                                                     residuals={k: r[:m] for k, r in residuals.items()}))
            obs = self.flops.run_per_sample(("observe", arch[1:]), x.shape[0], probe, kfac.observe, model,
                                            x, y, self.loss, residuals=residuals, **kw)
        return self.flops.run(("statistics", arch), self._statistics, obs, y, eta_global)

    def _grown_layers(self, model: nn.Module, cand: Candidate) -> tuple[str, str, int] | None:
        """(producer, consumer, units added) of a width commit that :meth:`_observe_grown` can follow:
        an expandable MLP or CNN, where a site's producer feeds its consumer alone; else None."""
        if cand.kind != "width" or not isinstance(model, (ExpandableMLP, ExpandableCNN)):
            return None
        return (*model.site_layers(cand.index), int(cand.layout.k))

    def _observe_grown(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: _Context,
                       grown: tuple[str, str, int], natural: bool) -> _Context:
        """The observation after a width commit, from the one before it (``kfac.grown_observation``: the
        new units have zero outgoing weights, so only the consumer's inputs and the producer's size
        change): one forward pass instead of a backward pass per G cotangent, statistics for the two
        changed layers only. Equal to :meth:`_observe` of the grown model up to rounding."""
        cfg = self.cfg
        producer, consumer, added = grown
        residuals, eta_global = self._natural(model, x, y) if natural else ({}, float("nan"))
        modules = kfac.kfac_layers(model)
        n = x.shape[0]
        obs = kfac.grown_observation(ctx.obs, model, x, producer, consumer, added, bias=cfg.bias,
                                     residuals=residuals, modules=modules)
        cot = len(residuals)
        if isinstance(model, ExpandableMLP):  # forward, backprops of the new residuals, the consumer's A
            lin = list(modules.values())
            self.flops.add(cost.linear_observe_flops(lin, n, cot, 0, cfg.bias)
                           - cost.linear_observe_flops(lin, n, 0, 0, cfg.bias)
                           + sum(2 * n * m.in_features * m.out_features for m in lin))
        else:  # the forward (and backward) passes measured on two samples, scaled to the batch
            m = min(2, n)
            sub = {k: r[:m] for k, r in residuals.items()}
            probe = lambda: (m, lambda: kfac.grown_passes(model, x[:m], consumer, bias=cfg.bias,  # noqa: E731
                                                          residuals=sub, modules=modules))
            self.flops.run_per_sample(("grown", consumer, cost.shapes_key(x, list(model.parameters()),
                                                                          tuple(residuals))),
                                      n, probe, lambda: None)
        changed = {producer, consumer} | ({name for name in obs.layers} if residuals else set())
        key = ("statistics-grown", cost.shapes_key({k: obs.layers[k].a_rows for k in sorted(changed)},
                                                   tuple(residuals)))
        fresh = self.flops.run(key, self._statistics, obs, y, eta_global, changed)
        per_layer = {}
        for name in obs.layers:
            if name in changed:
                per_layer[name] = fresh.per_layer[name]
            else:
                old = ctx.per_layer[name]
                per_layer[name] = {**old, "r_perp": {k: old["r_perp"][k] for k in obs.layers[name].e_rows}}
        return _Context(obs, eta_global, per_layer, fresh.bound)

    def _gradient(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
        loss = per_sample_loss(self.loss, model(x), y).mean()
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params.values()))])

    def _statistics(self, obs: kfac.Observation, y: torch.Tensor, eta_global: float,
                    names: set[str] | None = None) -> _Context:
        """Per consuming layer (those in ``names``, default all): pseudo-inverses of A and the damped G,
        η_layer and the residuals r_⊥."""
        cfg = self.cfg
        if cfg.abs_normalizer == "metric":
            bound = float(metric_pinv_norm(self.loss, obs.out, y, cfg.output_metric))
        else:
            bound = float(obs.loss_sqnorm)
        per_layer = {}
        for name, lay in obs.layers.items():
            if names is not None and name not in names:
                continue
            f = lay.factors
            A_pinv = scores.psd_pinv(f.A)
            G_inv = scores.psd_pinv(scores.damp(f.G, cfg.g_damping))
            gbar = kfac.gradient_from_rows(lay.a_rows, lay.e_rows["grad"], obs.n)
            r_perp = {k: scores.residual_rows(lay.a_rows, e, A_pinv,
                                              kfac.gradient_from_rows(lay.a_rows, e, obs.n), f.t)
                      for k, e in lay.e_rows.items()}
            # η_layer inverts G undamped, as the official layer_baseline does; only Δη′ uses the damped G.
            eta = scores.layer_eta(gbar, A_pinv, scores.psd_pinv(f.G))
            per_layer[name] = {"G_inv": G_inv, "eta": float(eta), "r_perp": r_perp, "t": f.t}
        return _Context(obs, eta_global, per_layer, bound)

    # ------------------------------------------------------------------------------- propose/evaluate

    def _site(self, ctx: _Context, consumer: str, h: torch.Tensor, residual: str) -> unit_score.Site:
        info = ctx.per_layer[consumer]
        # A layer with (almost) no gradient left would make s = Δη′/η explode: floor η on the loss scale.
        eta = max(info["eta"], 1e-8 * float(ctx.obs.loss_sqnorm), 1e-30)
        r_perp = info["r_perp"][residual]
        if (consumer, residual) not in self._rooms:  # measured once per event (see _room)
            self._rooms[(consumer, residual)] = self.flops.run(
                ("room", cost.shapes_key(r_perp, info["G_inv"])), scores.room, r_perp, info["G_inv"],
                ctx.obs.n, info["t"])
        return unit_score.Site(h.reshape(h.shape[0], -1), r_perp, info["G_inv"], eta)

    def _abs_norm(self, ctx: _Context, consumer: str, residual: str) -> float:
        """Denominator of the absolute score (``ExpansionConfig.abs_normalizer``)."""
        if self.cfg.abs_normalizer == "room":
            return float(self._rooms[(consumer, residual)])
        return ctx.bound

    def _search(self, fn, theta0: torch.Tensor, mask: torch.Tensor | None = None, groups: int = 1,
                tag: tuple = (), warm: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> proposals.RefineResult:
        """Refine ``theta0``; every evaluation of ``fn`` is charged to the FLOP meter under ``tag`` (the
        shapes its cost depends on). ``warm``: (step sizes, temperatures) of MALA chains that ``theta0``
        continues (``ExpansionConfig.warm_start``; an empty tuple for ascent), run for the shorter warm
        budget."""
        cfg = self.cfg
        fn = cost.MeteredScore(fn, self.flops, ("search", *tag))
        temperature: float | torch.Tensor = cfg.temperature
        step_size: float | torch.Tensor = cfg.mala_step_size
        bursts = cfg.mala_bursts
        ascent_steps = cfg.warm_ascent_steps if warm is not None else cfg.ascent_steps
        if cfg.refine == "mala":
            temperature = cfg.mala_temperature
            if warm is not None:
                step_size, temperature = warm
                bursts = cfg.warm_bursts
            elif temperature is None:
                s0 = fn(theta0).detach()
                temperature = proposals.auto_temperature(s0, groups, cfg.mala_temperature_ratio)
        res = proposals.refine(fn, theta0, cfg.refine, generator=self.generator,
                               mala_variant=cfg.mala_variant, bursts=bursts, steps=cfg.mala_steps,
                               step_size=step_size, temperature=temperature,
                               ascent_steps=ascent_steps, ascent_lr=cfg.ascent_lr, mask=mask)
        res.score = torch.where(torch.isfinite(res.score), res.score, torch.zeros_like(res.score))
        if cfg.refine == "mala":
            res.temperature = torch.as_tensor(temperature, dtype=theta0.dtype).expand(theta0.shape[0])
        return res

    def _warm_rows(self, key: tuple, layout: proposals.UnitLayout, count: int):
        """The chains (MALA) or refined proposals (ascent) a site's last search in this event ended with,
        in ``layout`` (a site whose input gained units gets zero weights on them: the same function), as
        (θ, step sizes, temperatures), the last two None for ascent; or None."""
        got = self._warm.get(key)
        if got is None or not self.cfg.warm_start or self.cfg.refine not in ("mala", "ascent"):
            return None
        old, theta, h, temp = got
        if old.k != layout.k or old.kernel != layout.kernel or old.d > layout.d or theta.shape[0] != count:
            return None
        if old.d < layout.d:  # zero weights on the new inputs (W is (P, k, d, *kernel))
            parts = old.split(theta)
            pad = (0, 0) * len(layout.kernel) + (0, layout.d - old.d)
            parts["W"] = torch.nn.functional.pad(parts["W"], pad)
            theta = layout.join(parts)
        return theta, h, temp

    def _evaluate_units(self, ctx: _Context, kind: str, places: list[tuple[int, str, torch.Tensor]], k: int,
                        count: int, residual: str) -> list[Candidate]:
        """Refine ``count`` k-unit MLP candidates at every place (index, consumer, h) in ONE batched search
        (``unit_score.UnitScore``), then pick one per place and re-score it in float64 for the decision."""
        cfg = self.cfg
        dtype = getattr(torch, cfg.search_dtype)
        jitter = 1e-6 if dtype == torch.float32 else 1e-10
        sites = [self._site(ctx, consumer, h, residual) for _, consumer, h in places]
        split = held_out.split_rows(ctx.obs.n, cfg.holdout, self.seed) if cfg.holdout else None
        if split is None:
            fn = unit_score.UnitScore(k, sites, ctx.obs.n, jitter=jitter, dtype=dtype)
        else:  # the search sees only the search rows; the decision the held-out ones (held_out.py)
            fn = unit_score.UnitScore(k, [held_out.restrict(s, split.search) for s in sites],
                                      len(split.search), jitter=jitter, dtype=dtype)
        device = sites[0].h.device
        warm = [self._warm_rows((kind, index), lay, count) for (index, _, _), lay in zip(places, fn.layouts)]
        if all(w is not None for w in warm):  # every site continues its chains (warm_start)
            theta0 = torch.cat([fn.pad_rows(w[0].to(dtype=dtype, device=device), i)
                                for i, w in enumerate(warm)])
            cont = (tuple(torch.cat([w[j] for w in warm]).to(dtype) for j in (1, 2))
                    if self.cfg.refine == "mala" else ())
        else:
            theta0 = torch.cat([fn.pad_rows(proposals.random_candidates(lay, count, generator=self.generator,
                                                                        dtype=dtype, device=device), i)
                                for i, lay in enumerate(fn.layouts)])
            cont = None
        tag = ("units", k, cost.shapes_key(fn.hT, fn.r, fn.G_inv))
        res = self._search(fn, theta0, fn.mask(theta0.shape[0]), groups=len(places), tag=tag, warm=cont)
        out = []
        for i, ((index, consumer, _), site) in enumerate(zip(places, sites)):
            rows = slice(i * count, (i + 1) * count)
            if res.step_size is not None:
                self._warm[(kind, index)] = (fn.layouts[i], fn.unpad_rows(res.theta[rows].detach(), i),
                                             res.step_size[rows].detach(), res.temperature[rows].detach())
            elif self.cfg.refine == "ascent":
                self._warm[(kind, index)] = (fn.layouts[i], fn.unpad_rows(res.theta[rows].detach(), i),
                                             None, None)
            thetas = fn.unpad_rows(res.theta[rows].detach().to(torch.float64), i)
            if split is not None:
                out.append(self._held_out_candidate(ctx, kind, index, site, thetas, fn.layouts[i], split,
                                                    self._abs_norm(ctx, consumer, residual)))
                continue
            one = unit_score.UnitScore(k, [site], ctx.obs.n, jitter=1e-10)
            one_tag = ("rescore", k, cost.shapes_key(one.hT, one.r))
            exact = cost.MeteredScore(one, self.flops, one_tag)(thetas)
            exact = torch.where(torch.isfinite(exact), exact, res.score[rows].to(torch.float64))
            out.append(self._candidate(ctx, kind, index, exact, site.norm, thetas, fn.layouts[i],
                                       self._abs_norm(ctx, consumer, residual)))
        return out

    def _evaluate_channels(self, ctx: _Context, index: int, consumer: str, module: nn.Module, pool: bool,
                           kernel: tuple[int, ...], h: torch.Tensor, *, kind: str = "width", k: int = 1,
                           count: int | None = None, residual: str | None = None) -> Candidate:
        """Channel candidates of a CNN stage (``unit_score.ChannelScore``: the convolution features as
        ``module``, the consumer, reads them; ``kernel`` of the producing convolution), ``k`` channels
        each (a whole stage for ``kind="depth"``)."""
        cfg = self.cfg
        residual = residual or cfg.width_residual
        count = count or cfg.proposals
        site = self._site(ctx, consumer, h, residual)
        layout = proposals.UnitLayout(k, h.shape[1], kernel)

        def make(dt, jit):  # closed-form gradient (unit_score.ChannelScore: the same score as
            # proposals.unit_score_fn over proposals.conv_unit_features, without autograd)
            return unit_score.ChannelScore(layout, h, module, pool, site.r_perp, site.G_inv, ctx.obs.n,
                                           site.norm, jitter=jit, dtype=dt)

        dtype = getattr(torch, cfg.search_dtype)
        fn = make(dtype, 1e-6 if dtype == torch.float32 else 1e-10)
        warm = self._warm_rows((kind, index), layout, count)
        if warm is not None:  # the site's refined proposals continue (warm_start)
            theta0 = warm[0].to(dtype=dtype, device=h.device)
            cont = (warm[1].to(dtype), warm[2].to(dtype)) if cfg.refine == "mala" else ()
        else:
            theta0 = proposals.random_candidates(layout, count, generator=self.generator, dtype=dtype,
                                                 device=h.device)
            cont = None
        tag = ("channels", k, kernel, pool,
               cost.shapes_key(h, site.r_perp, site.G_inv, list(module.parameters())))
        res = self._search(fn, theta0, tag=tag, warm=cont)
        if res.step_size is not None:
            self._warm[(kind, index)] = (layout, res.theta.detach(), res.step_size.detach(),
                                         res.temperature.detach())
        elif cfg.refine == "ascent":
            self._warm[(kind, index)] = (layout, res.theta.detach(), None, None)
        thetas = res.theta.detach().to(torch.float64)
        exact = cost.MeteredScore(make(torch.float64, 1e-10), self.flops, ("rescore", *tag))(thetas)
        exact = torch.where(torch.isfinite(exact), exact, res.score.to(torch.float64))
        return self._candidate(ctx, kind, index, exact, site.norm, thetas, layout,
                               self._abs_norm(ctx, consumer, residual))

    def _held_out_candidate(self, ctx: _Context, kind: str, index: int, site: unit_score.Site,
                            thetas: torch.Tensor, layout: proposals.UnitLayout, split: held_out.Split,
                            abs_norm: float) -> Candidate:
        """Decide on held-out rows (``ExpansionConfig.holdout``, ``held_out.py``): the proposals' float64
        scores on the search rows choose (selection and softmax weights), their scores on the held-out
        rows decide, at the bootstrap lower bound D − z·SE."""
        cfg, k = self.cfg, layout.k

        def score(s: unit_score.Site, n: int) -> torch.Tensor:
            one = unit_score.UnitScore(k, [s], n, jitter=1e-10)
            return cost.MeteredScore(one, self.flops, ("held_out", k, cost.shapes_key(one.hT, one.r)))(thetas)

        finite = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
        search, held = held_out.restrict(site, split.search), held_out.restrict(site, split.held)
        s_search = finite(score(search, len(split.search)))
        j = proposals.select(s_search, cfg.selection, cfg.temperature, self.generator)
        stat = held_out.weighted_statistic(s_search, cfg.temperature, cfg.decision, j)
        d = float(stat(finite(score(held, len(split.held)))))
        se = 0.0
        if cfg.holdout_z > 0 and cfg.holdout_bootstrap > 1:  # resamples seeded by the run's counters, so
            # that a resumed run draws the same ones
            key = (self.seed, self.events, self.neurons_added, self.layers_added, index, kind == "depth")
            f = proposals.unit_features(layout, thetas, held.h.to(thetas.dtype))  # (P, N_B, k)
            P, nb, draws = f.shape[0], f.shape[1], cfg.holdout_bootstrap
            self.flops.add(draws * P * nb * k * (2 * held.r_perp.shape[1] + 2 * k))  # the C and A_f sums
            gen = torch.Generator().manual_seed(held_out.seed_of(key))
            se = held_out.bootstrap_se(f, held, stat, draws, gen)
        return self._candidate(ctx, kind, index, s_search, site.norm, thetas, layout, abs_norm,
                               decide=d - cfg.holdout_z * se, n=len(split.held), chosen=j)

    def _candidate(self, ctx: _Context, kind: str, index: int, score: torch.Tensor, eta: float,
                   thetas: torch.Tensor, layout: proposals.UnitLayout, abs_norm: float, *,
                   decide: float | None = None, n: int | None = None, chosen: int | None = None) -> Candidate:
        """Choose one of the refined proposals and decide on it (Mitchell et al. 2023, the expansion loop).

        ``score`` (P,) holds every proposal's Δη′/η_layer, re-scored in float64. The proposal kept is the
        best or a softmax(s/T) draw (``selection``); the decision score is, by default
        (``decision="softmax_mean"``, as the official code does for every selection rule), the
        softmax(s/T)-weighted mean of all proposals' scores, else (``"chosen"``) the kept one's own.
        It passes if Δη′/η_layer > τ and Δη′/N > α, N the absolute normaliser (depth: Δη′/layer_cost_mul
        against τ and α_layer); with ``chance_correction`` Δη′ first loses its chance level k·ρ/N.
        ``decide``, ``n``, ``chosen``: a decision score, its number of examples and the kept proposal
        given by the caller (held-out decisions).
        """
        cfg = self.cfg
        j = chosen if chosen is not None else proposals.select(score, cfg.selection, cfg.temperature,
                                                               self.generator)
        if decide is not None:
            s = decide
        elif cfg.decision == "softmax_mean":
            s = proposals.decision_score(score, cfg.temperature)
        else:
            s = score[j]
        delta = float(s) * eta
        if cfg.chance_correction:  # E[Δη′] of k units unrelated to the residual: k·ρ/N (ρ = abs_norm)
            delta -= getattr(layout, "k", 1) * abs_norm / (n or ctx.obs.n)
        if kind == "depth":
            delta /= cfg.layer_cost_mul
        alpha = cfg.alpha_layer if kind == "depth" else cfg.alpha
        rel = delta / eta
        ab = delta / max(abs_norm, 1e-30)
        return Candidate(kind, index, delta, rel, ab, thetas[j], layout,
                         passes=bool(rel > cfg.tau and ab > alpha and math.isfinite(delta)))

    def _width_candidates(self, model: nn.Module, ctx: _Context, layers: list[int]) -> dict[int, Candidate]:
        """The evaluated one-unit candidate of each hidden layer in ``layers`` (MLP: one batched search)."""
        out: dict[int, Candidate] = {}
        places = []
        for i in layers:
            producer, consumer = model.site_layers(i)
            h = ctx.obs.layers[producer].a
            if h.dim() == 4:  # channels of a CNN stage
                out[i] = self._evaluate_channels(ctx, i, consumer, model.get_submodule(consumer),
                                                 bool(model.pools[i]),
                                                 tuple(model.get_submodule(producer).kernel_size), h)
            else:
                places.append((i, consumer, h))
        if places:
            cands = self._evaluate_units(ctx, "width", places, 1, self.cfg.proposals, self.cfg.width_residual)
            out.update({c.index: c for c in cands})
        return out

    def _depth_candidate(self, model: nn.Module, ctx: _Context) -> Candidate:
        p = model.depth
        if hasattr(model, "convs"):  # a new CNN stage before the head, reading the last feature map
            with torch.no_grad():
                h = model.features(self._x)
            return self._evaluate_channels(ctx, p, "head", model.head, False, (3, 3), h, kind="depth",
                                           k=model.depth_fan_in, count=self.cfg.layer_proposals,
                                           residual="natural")
        h = ctx.obs.layers[f"layers.{p}"].a
        k = h[0].numel()
        (cand,) = self._evaluate_units(ctx, "depth", [(p, f"layers.{p}", h)], k, self.cfg.layer_proposals,
                                       "natural")
        return cand

    @staticmethod
    def _candidate_metrics(ctx: _Context, cands: list[Candidate | None]) -> dict[str, float]:
        out = {"loss_sqnorm": float(ctx.obs.loss_sqnorm), "score_bound": ctx.bound}
        for c in cands:
            if c is not None:
                key = f"{c.kind}{'' if c.kind == 'depth' else c.index}"
                out[f"score_rel.{key}"] = c.rel
                out[f"score_abs.{key}"] = c.abs
        return out

    # ------------------------------------------------------------------------------- commit

    def _commit(self, model: nn.Module, cand: Candidate, x: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> ResizeEvent:
        """Insert the candidate; with scoring data (x, y), check that the loss did not change."""
        ref = next(model.parameters())
        parts = {k: v.to(dtype=ref.dtype, device=ref.device)
                 for k, v in cand.layout.split(cand.theta[None]).items()}

        def insert() -> ResizeEvent:
            if cand.kind == "width":
                return insert_units(model, cand.index, parts["W"][0], parts["b"][0],
                                    {n: parts[n][0] for n in "vcl"})
            if hasattr(model, "convs"):
                return insert_conv_stage(model)
            if self.cfg.layer_init == "basis":
                B = full_rank(parts["W"][0].double()).to(ref.dtype)
                return insert_layer(model, cand.index, basis=B, shift=parts["b"][0])
            return insert_layer(model, cand.index)

        ev = self._preserving(model, insert, x, y)
        return ExpansionEvent(ev.params, ev.added, ev.removed, ev.description, ev.widths,
                              optimizer_mode=self.cfg.optimizer_mode)

    def _preserving(self, model: nn.Module, insert, x: torch.Tensor | None, y: torch.Tensor | None
                    ) -> ResizeEvent:
        """Run ``insert()``; with scoring data (x, y), raise if it changed the loss by more than
        ``check_tol`` (relative): an insertion must preserve the function."""
        def loss() -> torch.Tensor:
            with torch.no_grad():
                out = self.flops.run(("check", cost.shapes_key(x, list(model.parameters()))), model, x)
                return per_sample_loss(self.loss, out, y).mean()

        # Within an event nothing but insertions changes the model, so the loss after one commit is the
        # loss before the next: it is kept (for these scoring data) until the event ends.
        last = getattr(self, "_event_loss", None)
        before = (last[1] if last is not None and last[0] is x else loss()) if x is not None else None
        ev = insert()
        if x is not None:
            after = loss()
            self._event_loss = (x, after) if getattr(self, "_in_event", False) else None
            change = float((after - before).abs() / before.abs().clamp_min(1e-12))
            if not change <= self.cfg.check_tol:
                raise RuntimeError(f"self-expansion: {ev.description} changed the loss by {change:.3g} "
                                   "(relative); insertion should preserve the function")
        return ev

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)
