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
   ``recursive`` (always in the official code), observe again and repeat, one candidate at a time (one
   unit, or a block of ``width_block`` units), until no candidate passes. A layer insertion sets the
   layer cooldown, which counts down once per event.
   After a width commit the observation is brought up to date rather than redone (the new units have
   zero outgoing weights: only their consumer's inputs change, ``kfac.grown_observation``), only the
   grown site and the one reading it are searched again, and with ``warm_start`` their searches
   continue from where they ended for a shorter budget (MALA chains; with ascent only the site whose
   input grew).

Step 1 lives in ``observation.py`` (:class:`~.observation.ModelObserver`), step 2 and the decision in
``candidate_search.py`` (:class:`~.candidate_search.CandidateSearch`); this module runs the loop and
commits. The hook returns the resize events, which the trainer hands to the optimizer surgery. The
time spent in events is measured and reported (``expansion_seconds``, and its share of the fit in the
run summary).
Under data parallelism rank 0 alone searches and broadcasts what it inserted (:meth:`expand`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from widthlab.methods.expanding import cost
from widthlab.methods.expanding.candidate_search import Candidate, CandidateSearch
from widthlab.methods.expanding.expansion_config import ExpansionConfig
from widthlab.methods.expanding.fisher import per_sample_loss
from widthlab.methods.expanding.insertion import full_rank, insert_conv_stage, insert_layer, insert_units
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.methods.expanding.observation import Context, ModelObserver
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


class ExpansionController(ModelObserver, CandidateSearch):
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
        if config.width_block > 1 and not isinstance(model, (ExpandableMLP, ExpandableCNN)):
            raise ValueError(f"width_block > 1 (several units per width candidate) is implemented for the "
                             f"expandable MLP and CNN (architecture: mlp or cnn), not for "
                             f"{type(model).__name__}")
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
        # a resumed fit: the trainer's wall time of the earlier sessions, whose expansion seconds the
        # checkpoint carried
        wall = (getattr(trainer, "wall_before", 0.0) + time.perf_counter() - self._fit_t0
                if self._fit_t0 is not None else float("nan"))
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
        ctx: Context | None = None
        grown = None  # (producer, consumer, units) of the last width commit, if _observe_grown follows it
        while len(events) < self.cfg.max_additions:
            # The CG solve is needed for the depth (and "natural" width) residual; η_global is logged once
            # (unless log_eta_global is off: then an event without those scores skips the solve).
            natural = ((not events and self.cfg.log_eta_global) or self._depth_allowed(model)
                       or self.cfg.width_residual == "natural")
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
                                        "rel": best.rel, "abs": best.abs,
                                        "units": int(getattr(best.layout, "k", 1))})
            if best.kind == "depth":
                self.layer_cd = self.cfg.layer_cooldown  # no further layer in this event unless 0
                self.layers_added += 1
                cache.clear()  # layer indices shifted
                self._rooms = {}  # new sites: their room is measured afresh
                self._warm = {}
            else:
                self.neurons_added += int(getattr(best.layout, "k", 1))  # a place's candidate: one unit
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
