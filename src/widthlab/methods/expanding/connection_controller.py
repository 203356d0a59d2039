"""Per-step connection decisions and per-epoch growth of :class:`~.dense_cnn.ExpandableDense`
(Mitchell et al. 2023, the CNN experiments).

The updates are an ordinary torch optimizer (the study's ``train.optimizer``, e.g. Adam): this controller
masks the gradients of inactive rows after backward and re-zeroes those rows after every step, so an
inactive row is exactly zero whatever the optimizer does. The curvature is used only for scores.

Per kernel (seen as [C_in, k·k·C_out]) it keeps, as exponential moving averages (rate ``ema_rate``):

* ``A`` (C_in x C_in): the second moment of the kernel's input channels (over batch and positions),
  starting from the identity (prior precision 1);
* ``G`` (diagonal, k·k·C_out) times the scalar ``s``: the mean squared gradient of each output column;
* the slow gradient ĝ (debiased EMA of the kernel's gradient, rows of inactive connections included).

Deviation from the official code (documented): the official code builds A, G and s from curvature-
propagation samples (``curvature_sampler``) projected on random unit vectors and keeps inverse square
roots by rank-n updates; here A is the exact outer-product EMA of the inputs and G a diagonal EMA of the
gradient's columns, which are deterministic and need no extra backward pass. In FLOPs the exact A (one
2·C_in²·N·H·W product per kernel and step, every input row included) is not small: where layers read
many input channels and write few, as in ``expanding-densecnn-digits``, it exceeds the training passes
(the run's ``method_flops`` are 1.5x its ``train_flops``), though as one large product it takes a small
part of the wall time.

Every ``decide_every`` steps, per kernel, with the scores of :mod:`.connection_scores` and
η_global = Σ_layers η_l:

* thaw an inactive, non-bud row w.p. ``thaw_prob``·(rows/inactive)·decide_every if its thaw score
  exceeds ``rel_threshold``·η_global (it starts at zero: the function is unchanged);
* freeze and prune an active row w.p. ``freeze_prob``·decide_every if both its freeze and prune scores
  are below ``rel_threshold``·η_global and more than ``min_active`` rows stay active; pruning adds the
  K-FAC-optimal compensation to the remaining rows.

Every epoch: (a) output columns whose gradient has been exactly zero for ``dead_steps`` steps are
redrawn (active rows, init distribution) w.p. ``reinit_prob``; (b) a kernel with fewer than half of its
output channels free (read by no active row downstream) gets ⌊``width_factor``·C_out⌋ zero channels
(capped at ``max_width``); (c) if no width was added, the layer with the largest depth score
(Σ top-8 bud-row thaw scores / (Σ top-8 other thaw scores + 1)) gets its bud promoted to a new layer if
the score is positive and above ``depth_threshold``·η_global (official 8·3e-4). Blocks already holding
``max_layers`` layers and the first layer of the first block are skipped.

Cost accounting, as for the other architectures: the wall time of all of this (statistics, decisions,
growth) is ``expansion_seconds``, the epoch-end growth rounds are ``expansion_events``, and the FLOPs of
its products and decompositions (the A statistics, the natural-gradient solves, the scores and the
prune compensations, in the closed forms of :mod:`.connection_scores`) are ``method_flops``, which a
comparison adds to the trainer's ``train_flops``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from widthlab.methods.expanding.connection_scores import (
    connection_scores,
    connection_scores_flops,
    freeze_prune_flops,
    freeze_prune_scores,
    natural_gradient,
    natural_gradient_flops,
    prune_row,
    prune_row_flops,
    thaw_flops,
    thaw_scores,
)
from widthlab.methods.expanding.dense_cnn import ConnLayer, ExpandableDense, _init_rows
from widthlab.nn.resize import ResizeEvent

__all__ = ["ConnectionConfig", "ConnectionController", "DenseEvent"]

NEW_FILL = {"exp_avg": 0.0, "exp_avg_sq": 1.0}


@dataclass(frozen=True)
class DenseEvent(ResizeEvent):
    """A resize event whose new optimizer entries start at m = 0, v = 1 (as the official code)."""

    optimizer_fill: dict[str, float] = field(default_factory=lambda: dict(NEW_FILL))


@dataclass
class ConnectionConfig:
    """Thresholds and rates of the connection controller (defaults: the official CIFAR-10 run)."""

    ema_rate: float = 1e-3
    rel_threshold: float = 3e-4
    thaw_prob: float = 1e-3
    freeze_prob: float = 1e-3
    min_active: int = 8
    decide_every: int = 1
    dead_steps: int = 10
    reinit_prob: float = 0.1
    width_factor: float = 0.5
    free_fraction: float = 0.5
    max_width: int = 512
    depth: bool = True
    depth_threshold: float = 8 * 3e-4
    depth_top: int = 8
    max_layers: int = 4
    width: bool = True
    reinit: bool = True
    adapt: bool = True  # thaw/freeze/prune

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ConnectionConfig:
        names = {f.name for f in fields(cls)}
        bad = sorted(set(options) - names)
        if bad:
            raise ValueError(f"unknown dense_cnn option(s) {bad}; known: {sorted(names)}")
        return cls(**options)


class _Stats:
    def __init__(self, layer: ConnLayer):
        n, k = layer.mask().numel(), layer.k * layer.k * layer.c_out
        dev = layer.chunks[0].weight.device  # statistics live where the model does
        self.A = torch.eye(n, dtype=torch.float64, device=dev)
        self.G = torch.ones(k, dtype=torch.float64, device=dev)
        self.g = torch.zeros(n, k, dtype=torch.float64, device=dev)
        self.g_mass = 0.0
        self.dead = torch.zeros(layer.c_out, dtype=torch.long, device=dev)
        self.layout, o = [], 0
        for c in layer.all_chunks():
            self.layout.append((id(c), o, c.weight.shape[1]))
            o += c.weight.shape[1]

    def state(self) -> dict:
        return {"A": self.A, "G": self.G, "g": self.g, "g_mass": self.g_mass, "dead": self.dead}


class ConnectionController:
    """Trainer callback (also usable from a plain loop) implementing the module docstring."""

    def __init__(self, model: ExpandableDense, config: ConnectionConfig, seed: int = 0,
                 summary: dict | None = None):
        self.model, self.cfg = model, config
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.summary = summary if summary is not None else {}
        self.stats: dict[int, _Stats] = {}
        self.counts = {"thawed": 0, "frozen": 0, "pruned": 0, "reinit": 0, "channels_added": 0,
                       "layers_added": 0}
        self.eta_global = 0.0
        self.steps = 0
        # wall time of the method's own work in this fit (statistics, decisions, growth), against the
        # fit's: expansion_seconds and expansion_share, as the expansion controller reports its events
        self.seconds = 0.0
        self.events = 0  # epoch-end growth rounds
        self.flops = 0.0  # FLOPs of the method's own work (module docstring), for ``method_flops``
        self._fit_t0: float | None = None
        self._epochs_seen = 0  # epochs finished in this fit (tells a resume from a select_best restore)
        self._partial_costs = False  # resumed from a checkpoint without the cost counters

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer) -> None:
        self.model = trainer.model
        self._fit_t0 = time.perf_counter()
        self._epochs_seen = 0
        self.model.set_record(True)
        self._apply_masks()

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Count the wall time of the block in ``seconds`` (the method's own work)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def on_after_backward(self, trainer=None) -> None:
        """Update the statistics from this batch, then mask the gradients of inactive rows."""
        with self._timed():
            self._update_statistics()

    def _update_statistics(self) -> None:
        r = self.cfg.ema_rate
        for layer in self.model.kernels():
            st = self._stat(layer)
            grad = layer.rows("grad", torch.float64)
            x = layer.input_rows()  # (C_in, N·H·W)
            if x is not None:
                # the batch moment in the model's precision, accumulated in float64
                st.A.mul_(1 - r).add_((x @ x.T).double() / x.shape[1], alpha=r)
                self.flops += 2 * x.shape[0] ** 2 * x.shape[1]
            sq_mean = (grad * grad).mean(0)
            st.G.mul_(1 - r).add_(sq_mean, alpha=r)
            st.g.mul_(1 - r).add_(grad, alpha=r)
            st.g_mass = st.g_mass * (1 - r) + r
            # output channels whose gradient is exactly zero in every row have a zero mean square (a
            # nonzero float32 value squared is never 0 in float64); the columns are channel-major
            col_zero = sq_mean.view(layer.c_out, -1).eq(0).all(1)
            st.dead.add_(1).masked_fill_(~col_zero, 0)
        self._mask_grads()

    def on_step_end(self, trainer=None) -> None:
        with self._timed():
            self._apply_masks()
            self.steps += 1
            if self.cfg.adapt and self.steps % self.cfg.decide_every == 0:
                self.decide()

    def on_epoch_end(self, trainer=None) -> list[ResizeEvent] | None:
        self._epochs_seen += 1
        with self._timed():
            return self._grow()

    def _grow(self) -> list[ResizeEvent] | None:
        self.events += 1
        events: list[ResizeEvent] = []
        if self.cfg.reinit:
            self.reinit_dead()
        if self.cfg.width:
            events += self.add_width()
        if self.cfg.depth and not events:
            ev = self.add_depth()
            if ev is not None:
                events.append(ev)
        return events or None

    def on_fit_end(self, trainer=None) -> None:
        # a resumed fit: the trainer's wall time of the earlier sessions, whose expansion seconds the
        # checkpoint carried
        wall = (getattr(trainer, "wall_before", 0.0) + time.perf_counter() - self._fit_t0
                if self._fit_t0 is not None else float("nan"))
        share = self.seconds / wall if wall > 0 else None
        costs = dict(expansion_seconds=self.seconds, expansion_share=share, expansion_events=self.events,
                     method_flops=self.flops, expansion_flops=self.flops)
        if self._partial_costs:  # unknown, rather than the later sessions' part passed off as the whole
            costs = dict.fromkeys(costs)
            costs["cost_note"] = ("resumed from a checkpoint written before the method's cost counters "
                                  "were kept: its seconds, events and FLOPs are unknown")
        self.summary.update(**costs,
                            final_widths=self.model.block_widths(), final_layers=self.model.depth,
                            active_connections=self.model.active_connections(), **self.counts)

    def metrics(self, trainer=None) -> dict[str, Any]:
        return {"layers": self.model.depth, "block_widths": self.model.block_widths(),
                "active_connections": self.model.active_connections(), "eta_global": self.eta_global,
                "expansion_seconds": self.seconds, "expansion_flops": self.flops, **self.counts}

    # ------------------------------------------------------------------ masks

    def _mask_grads(self) -> None:
        for layer in self.model.kernels():
            for c in layer.all_chunks():
                if c.weight.grad is not None:
                    c.weight.grad.mul_(c.mask.view(1, -1, 1, 1).to(c.weight.grad.dtype))

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for layer in self.model.kernels():
                for c in layer.all_chunks():
                    c.weight.mul_(c.mask.view(1, -1, 1, 1).to(c.weight.dtype))

    def _rand(self, n: int, device) -> torch.Tensor:
        """Uniform draws from the controller's own (CPU) generator, so decisions replay exactly."""
        return torch.rand(n, generator=self.generator, dtype=torch.float64).to(device)

    def _stat(self, layer: ConnLayer) -> _Stats:
        st = self.stats.get(id(layer))
        chunks = layer.all_chunks()
        n, k = sum(c.mask.numel() for c in chunks), layer.k * layer.k * layer.c_out
        layout = [id(c) for c in chunks]
        if st is None or st.A.shape[0] != n or st.G.shape[0] != k or [t[0] for t in st.layout] != layout:
            st = self._resize_stat(layer, st)
            self.stats[id(layer)] = st
        return st

    def _resize_stat(self, layer: ConnLayer, old: _Stats | None) -> _Stats:
        """New statistics after an edit. Rows are mapped chunk by chunk (a chunk keeps its rows and may
        append new ones; inserted chunks are new), columns by prefix (new output channels are appended);
        new entries start as after initialisation: identity in A, ones in G, zero slow gradient."""
        new = _Stats(layer)
        if old is None:
            return new
        src, dst = [], []
        off_old = dict((cid, (o, n)) for cid, o, n in old.layout)
        for cid, o, n in new.layout:
            if cid in off_old:
                oo, on = off_old[cid]
                m = min(n, on)
                src.append(torch.arange(oo, oo + m))
                dst.append(torch.arange(o, o + m))
        if src:
            si, di = torch.cat(src), torch.cat(dst)
            new.A[di.view(-1, 1), di.view(1, -1)] = old.A[si.view(-1, 1), si.view(1, -1)]
            kc = min(old.G.numel(), new.G.numel())
            new.G[:kc] = old.G[:kc]
            new.g[di, :kc] = old.g[si, :kc]
        new.g_mass = old.g_mass
        nd = min(old.dead.numel(), new.dead.numel())
        new.dead[:nd] = old.dead[:nd]
        return new

    # ------------------------------------------------------------------ scores

    @staticmethod
    def _whitening(st: _Stats) -> tuple[torch.Tensor, torch.Tensor]:
        """(G^{1/2}, w) with θ̃ = θ·G^{1/2} and g̃ = ĝ·diag(w), w = 1 / (G^{1/2}·mass): the slow gradient
        debiased by its mass and whitened, as the column weights the scores take."""
        sq = (st.G + 1e-30).sqrt()
        return sq, 1.0 / (sq * max(st.g_mass, 1e-12))

    def scores(self) -> list[tuple[ConnLayer, Any]]:
        """Every row's thaw, freeze and prune scores, per layer with active rows (sets ``eta_global``)."""
        out = []
        for layer in self.model.kernels():
            st = self._stat(layer)
            mask = layer.mask()
            if not bool(mask.any()):
                continue
            sq, w = self._whitening(st)
            sc = connection_scores(st.A, st.g, layer.rows(dtype=torch.float64) * sq, mask, w)
            self.flops += connection_scores_flops(mask.numel(), int(mask.sum()), st.g.shape[1], sc.cholesky)
            out.append((layer, sc))
        self.eta_global = float(sum(float(sc.eta) for _, sc in out))
        return out

    def decide(self) -> None:
        """One round of thaw / freeze+prune decisions (module docstring).

        The draws come first and only the drawn rows are scored (a few per step at the official
        probabilities), which decides as scoring every row would (the same scores up to rounding: the
        product for one row can take another kernel than the product for all): the natural gradient of
        each layer's active rows is solved for first, since the threshold needs η_global."""
        cfg = self.cfg
        layers = []
        for layer in self.model.kernels():
            mask = layer.mask()
            if bool(mask.any()):
                st = self._stat(layer)
                sq, w = self._whitening(st)
                act = mask.nonzero().flatten()
                ng = natural_gradient(st.A, st.g[act], act, w)
                self.flops += natural_gradient_flops(act.numel(), st.g.shape[1], ng.cholesky)
                layers.append((layer, st, mask, sq, ng))
        self.eta_global = float(sum(float(ng.eta) for *_, ng in layers))  # as ``scores``
        thr = cfg.rel_threshold * self.eta_global
        for layer, st, active, sq, ng in layers:
            mask = active.clone()
            thawable = layer.thawable() & ~mask
            n_inact = int(thawable.sum())
            changed = False
            if n_inact > 0:
                p = min(1.0, cfg.thaw_prob * mask.numel() / n_inact * cfg.decide_every)
                rows = (thawable & (self._rand(mask.numel(), mask.device) < p)).nonzero().flatten()
                if rows.numel():
                    score = thaw_scores(st.A, st.g[rows], ng, rows)
                    self.flops += thaw_flops(rows.numel(), ng.act.numel(), st.g.shape[1], ng.cholesky)
                    thaw = rows[torch.nan_to_num(score, nan=-1.0) > thr]
                    if thaw.numel():
                        mask[thaw] = True
                        self.counts["thawed"] += int(thaw.numel())
                        changed = True
            p = min(1.0, cfg.freeze_prob * cfg.decide_every)
            rows = (active & (self._rand(mask.numel(), mask.device) < p)).nonzero().flatten()
            theta = None
            if rows.numel():
                theta = layer.rows(dtype=torch.float64)
                freeze, prune = freeze_prune_scores(ng, theta[rows] * sq, rows)
                self.flops += freeze_prune_flops(ng.act.numel(), theta.shape[1], ng.cholesky)
                low = (torch.nan_to_num(freeze, nan=float("inf")) < thr) & \
                    (torch.nan_to_num(prune, nan=float("inf")) < thr)
                for i in rows[low].tolist():
                    if int(mask.sum()) <= cfg.min_active:
                        break
                    self.flops += prune_row_flops(int(mask.sum()), theta.shape[1])
                    theta, mask = prune_row(theta, st.A, mask, i)
                    self.counts["frozen"] += 1
                    self.counts["pruned"] += 1
                    changed = True
            if changed:
                theta = layer.rows(dtype=torch.float64) if theta is None else theta
                layer.set_rows(theta.to(layer.chunks[0].weight.dtype), mask)

    # ------------------------------------------------------------------ per epoch

    def reinit_dead(self) -> None:
        for layer in self.model.kernels()[:-1]:
            st = self._stat(layer)
            dead = (st.dead >= self.cfg.dead_steps)
            draw = self._rand(layer.c_out, dead.device) < self.cfg.reinit_prob
            cols = (dead & draw).nonzero().flatten()
            if cols.numel() == 0:
                continue
            for c in layer.chunks:
                _init_rows(c.weight, c.mask, self.generator, cols)
            kk = layer.k * layer.k
            idx = (cols.view(-1, 1) * kk + torch.arange(kk, device=cols.device)).flatten()
            st.g[:, idx] = 0
            st.dead[cols] = 0
            self.counts["reinit"] += int(cols.numel())

    def add_width(self) -> list[ResizeEvent]:
        events = []
        m = self.model
        for b, block in enumerate(m.blocks):
            for j, layer in enumerate(block):
                used = m.used_channels(b, j)
                free = (~used).float().mean().item()
                n = min(int(self.cfg.width_factor * layer.c_out), self.cfg.max_width - layer.c_out)
                if free < self.cfg.free_fraction and n > 0:
                    ev = m.add_channels(b, j, n)
                    events.append(DenseEvent(ev.params, ev.added, ev.removed, ev.description, ev.widths))
                    self.counts["channels_added"] += n
        if events:
            self._remap_after_width()
        return events

    def _remap_after_width(self) -> None:
        for layer in self.model.kernels():
            self._stat(layer)

    def depth_scores(self) -> dict[tuple[int, int], float]:
        allsc = {id(layer): sc for layer, sc in self.scores()}
        out = {}
        for b, block in enumerate(self.model.blocks):
            if len(block) >= self.cfg.max_layers:
                continue
            for j, layer in enumerate(block):
                if (b, j) == (0, 0) or id(layer) not in allsc:
                    continue
                thaw = torch.nan_to_num(allsc[id(layer)].thaw, nan=0.0)
                bud = ~layer.thawable()
                top = self.cfg.depth_top
                s_bud = thaw[bud].topk(min(top, int(bud.sum()))).values.sum()
                other = thaw[~bud]
                s_other = other.topk(min(top, other.numel())).values.sum() if other.numel() else 0.0
                out[(b, j)] = float(s_bud / (s_other + 1.0))
        return out

    def add_depth(self) -> ResizeEvent | None:
        ds = self.depth_scores()
        if not ds:
            return None
        (b, j), score = max(ds.items(), key=lambda kv: kv[1])
        if not (score > 0 and score > self.cfg.depth_threshold * self.eta_global):
            return None
        ev = self.model.promote_bud(b, j, self.generator)
        for layer in self.model.kernels():
            self._stat(layer)
        self.counts["layers_added"] += 1
        self.model.set_record(True)
        return DenseEvent(ev.params, ev.added, ev.removed, ev.description, ev.widths)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        kern = self.model.kernels()
        return {"arch": self.model.architecture(), "counts": dict(self.counts), "steps": self.steps,
                "eta_global": self.eta_global, "generator": self.generator.get_state(),
                "seconds": self.seconds, "events": self.events, "flops": self.flops,
                "stats": [self.stats[id(k)].state() if id(k) in self.stats else None for k in kern],
                "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Restore the architecture and statistics of ``state`` (the weights and masks load next), and,
        when this fit has not finished an epoch yet (a resume), the counters and draw RNG as well. The
        other use, ``select_best`` going back to the best epoch's snapshot at the end of the fit, keeps
        the whole fit's counts, seconds, events and FLOPs, so the summary reports what the run did."""
        if model is not None:
            self.model = model
        self.model.set_architecture(state["arch"])
        self.model.set_record(True)
        if self._epochs_seen == 0:
            self.counts = dict(state["counts"])
            self.steps, self.eta_global = int(state["steps"]), float(state["eta_global"])
            self.generator.set_state(state["generator"])
            self._partial_costs = "flops" not in state  # a checkpoint from before the cost counters
            self.seconds, self.events = float(state.get("seconds", 0.0)), int(state.get("events", 0))
            self.flops = float(state.get("flops", 0.0))
        self.stats = {}
        for layer, st in zip(self.model.kernels(), state["stats"]):
            if st is None:
                continue
            s = _Stats(layer)
            s.A, s.G, s.g = st["A"].clone(), st["G"].clone(), st["g"].clone()
            s.g_mass, s.dead = float(st["g_mass"]), st["dead"].clone()
            self.stats[id(layer)] = s
