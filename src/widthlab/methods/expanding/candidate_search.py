"""Steps 2 and 3 of an expansion event (Mitchell et al. 2023, the expansion loop): propose candidate
units, refine them and decide on them.

For every place that may grow, ``proposals`` random candidates (one unit for width, k units for a layer)
are refined by MALA or ascent on s = Δη′/η_layer (``proposals.refine`` over ``unit_score.UnitScore``
or ``unit_score.ChannelScore``), re-scored in float64, and one :class:`Candidate` per place is kept and
decided on against τ and α (:meth:`CandidateSearch._candidate`), or on held-out rows
(``ExpansionConfig.holdout``, ``held_out.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from widthlab.methods.expanding import cost, held_out, proposals, scores, unit_score
from widthlab.methods.expanding.observation import Context


@dataclass
class Candidate:
    """The best proposal of one kind at one place, evaluated (propose -> evaluate)."""

    kind: str  # "width" | "depth"
    index: int  # hidden layer (width) or insertion position (depth)
    delta: float  # the decision's Δη′ (depth: divided by layer_cost_mul; a block of width units: per unit)
    rel: float  # delta / η_layer, compared with τ
    abs: float  # delta / the absolute normaliser, compared with α or α_layer
    theta: torch.Tensor = field(repr=False)
    layout: proposals.UnitLayout = field(repr=False)
    passes: bool = False


def subset_units(layout: proposals.UnitLayout, theta: torch.Tensor, units: list[int]
                 ) -> tuple[torch.Tensor, proposals.UnitLayout]:
    """The parameters (one row) and layout of the given units of a k-unit candidate, in that order."""
    parts = layout.split(theta[None])
    idx = torch.as_tensor(units, dtype=torch.long, device=theta.device)
    sub = proposals.UnitLayout(len(units), layout.d, layout.kernel)
    return sub.join({name: t.index_select(1, idx) for name, t in parts.items()})[0], sub


class CandidateSearch:
    """Proposal, refinement and decision for :class:`~.controller.ExpansionController` (a mixin: it
    reads the controller's ``cfg``, ``flops``, ``generator``, ``seed``, its counters and its per-event
    ``_rooms`` and ``_warm`` caches)."""

    def _site(self, ctx: Context, consumer: str, h: torch.Tensor, residual: str) -> unit_score.Site:
        info = ctx.per_layer[consumer]
        # A layer with (almost) no gradient left would make s = Δη′/η explode: floor η on the loss scale.
        eta = max(info["eta"], 1e-8 * float(ctx.obs.loss_sqnorm), 1e-30)
        r_perp = info["r_perp"][residual]
        if (consumer, residual) not in self._rooms:  # measured once per event (see _room)
            self._rooms[(consumer, residual)] = self.flops.run(
                ("room", cost.shapes_key(r_perp, info["G_inv"])), scores.room, r_perp, info["G_inv"],
                ctx.obs.n, info["t"])
        return unit_score.Site(h.reshape(h.shape[0], -1), r_perp, info["G_inv"], eta)

    def _abs_norm(self, ctx: Context, consumer: str, residual: str) -> float:
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

    def _evaluate_units(self, ctx: Context, kind: str, places: list[tuple[int, str, torch.Tensor]], k: int,
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
            out.append(self._decide(ctx, kind, index, cost.MeteredScore(one, self.flops, one_tag), thetas,
                                    res.score[rows], site.norm, fn.layouts[i],
                                    self._abs_norm(ctx, consumer, residual)))
        return out

    def _decide(self, ctx: Context, kind: str, index: int, rescorer: cost.MeteredScore,
                thetas: torch.Tensor, searched: torch.Tensor, eta: float, layout: proposals.UnitLayout,
                abs_norm: float) -> Candidate:
        """Re-score the refined proposals in float64 (``rescorer``, charged to the FLOP meter) and decide
        (:meth:`_candidate`); a block of width units (k > 1) also gets its units' scores and gains."""
        if not (kind == "width" and layout.k > 1):
            exact = rescorer(thetas)
            exact = torch.where(torch.isfinite(exact), exact, searched.to(torch.float64))
            return self._candidate(ctx, kind, index, exact, eta, thetas, layout, abs_norm)
        mo = rescorer.moments(thetas)
        cols, m = mo.cols, mo.G_inv.shape[0]
        self.flops.add(unit_score.single_unit_flops(thetas.shape[0], layout.k, cols, m))
        exact = torch.where(torch.isfinite(mo.score), mo.score, searched.to(torch.float64))
        single = mo.single()
        best_unit = torch.where(torch.isfinite(single), single, torch.zeros_like(single)).amax(1)

        def gains(row: int):  # the subset solves are many tiny operations: charged in closed form
            self.flops.add(unit_score.greedy_gains_flops(layout.k, cols, m))
            return mo.gains(row)

        return self._candidate(ctx, kind, index, exact, eta, thetas, layout, abs_norm, unit_scores=best_unit,
                               gains=gains)

    def _evaluate_channels(self, ctx: Context, index: int, consumer: str, module: nn.Module, pool: bool,
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
        rescorer = cost.MeteredScore(make(torch.float64, 1e-10), self.flops, ("rescore", *tag))
        return self._decide(ctx, kind, index, rescorer, thetas, res.score, site.norm, layout,
                            self._abs_norm(ctx, consumer, residual))

    def _held_out_candidate(self, ctx: Context, kind: str, index: int, site: unit_score.Site,
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

    def _candidate(self, ctx: Context, kind: str, index: int, score: torch.Tensor, eta: float,
                   thetas: torch.Tensor, layout: proposals.UnitLayout, abs_norm: float, *,
                   decide: float | None = None, n: int | None = None, chosen: int | None = None,
                   unit_scores: torch.Tensor | None = None, gains=None) -> Candidate:
        """Choose one of the refined proposals and decide on it (Mitchell et al. 2023, the expansion loop).

        ``score`` (P,) holds every proposal's Δη′/η_layer, re-scored in float64. The proposal kept is the
        best or a softmax(s/T) draw (``selection``); the decision score is, by default
        (``decision="softmax_mean"``, as the official code does for every selection rule), the
        softmax(s/T)-weighted mean of all proposals' scores, else (``"chosen"``) the kept one's own.
        It passes if Δη′/η_layer > τ and Δη′/N > α, N the absolute normaliser (depth: Δη′/layer_cost_mul
        against τ and α_layer); with ``chance_correction`` Δη′ first loses its chance level k·ρ/N.
        ``decide``, ``n``, ``chosen``: a decision score, its number of examples and the kept proposal
        given by the caller (held-out decisions).

        A block of k width units (``width_block``) is kept by its joint ``score`` but decided like a
        one-unit candidate on ``unit_scores`` (P,), each proposal's best unit scored alone (the same
        rule for k = 1), the chance level that of one unit; a passing block keeps the prefix, in greedy
        order, of the kept proposal's units whose marginal gains (``gains(row)``:
        ``unit_score.greedy_gains``) pass τ and α themselves, and fails if none does. Its ``delta``
        is then, as for one unit, the decision's Δη′ per unit.
        """
        cfg = self.cfg
        j = chosen if chosen is not None else proposals.select(score, cfg.selection, cfg.temperature,
                                                               self.generator)
        decision = score if unit_scores is None else unit_scores
        if decide is not None:
            s = decide
        elif cfg.decision == "softmax_mean":
            s = proposals.decision_score(decision, cfg.temperature)
        else:
            s = decision[j]
        delta = float(s) * eta
        units = getattr(layout, "k", 1) if unit_scores is None else 1  # whose chance level is taken
        chance = abs_norm / (n or ctx.obs.n) if cfg.chance_correction else 0.0
        delta -= units * chance  # E[Δη′] of k units unrelated to the residual: k·ρ/N (ρ = abs_norm)
        if kind == "depth":
            delta /= cfg.layer_cost_mul
        alpha = cfg.alpha_layer if kind == "depth" else cfg.alpha
        rel = delta / eta
        ab = delta / max(abs_norm, 1e-30)
        passes = bool(rel > cfg.tau and ab > alpha and math.isfinite(delta))
        theta = thetas[j]
        if passes and gains is not None:
            order, g = gains(j)
            g = g * eta - chance  # what each unit adds to the block's Δη′, given those before it
            ok = (g / eta > cfg.tau) & (g / max(abs_norm, 1e-30) > alpha)
            kept = len(order) if bool(ok.all()) else int(ok.to(torch.int64).argmin())
            if kept == 0:
                passes = False
            else:
                theta, layout = subset_units(layout, theta, order[:kept])
        return Candidate(kind, index, delta, rel, ab, theta, layout, passes=passes)

    def _width_candidates(self, model: nn.Module, ctx: Context, layers: list[int]) -> dict[int, Candidate]:
        """The evaluated width candidate of each hidden layer in ``layers``: ``width_block`` units, or what
        fits below the layer's cap (MLP: one batched search per block size)."""
        out: dict[int, Candidate] = {}
        places: dict[int, list] = {}
        widths = model.hidden_widths()
        for i in layers:
            k = max(1, min(self.cfg.width_block, self._cap(i) - self._cap_stop() - widths[i]))
            producer, consumer = model.site_layers(i)
            h = ctx.obs.layers[producer].a
            if h.dim() == 4:  # channels of a CNN stage
                out[i] = self._evaluate_channels(ctx, i, consumer, model.get_submodule(consumer),
                                                 bool(model.pools[i]),
                                                 tuple(model.get_submodule(producer).kernel_size), h, k=k)
            else:
                places.setdefault(k, []).append((i, consumer, h))
        for k, group in places.items():
            cands = self._evaluate_units(ctx, "width", group, k, self.cfg.proposals, self.cfg.width_residual)
            out.update({c.index: c for c in cands})
        return out

    def _depth_candidate(self, model: nn.Module, ctx: Context) -> Candidate:
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
    def _candidate_metrics(ctx: Context, cands: list[Candidate | None]) -> dict[str, float]:
        out = {"loss_sqnorm": float(ctx.obs.loss_sqnorm), "score_bound": ctx.bound}
        for c in cands:
            if c is not None:
                key = f"{c.kind}{'' if c.kind == 'depth' else c.index}"
                out[f"score_rel.{key}"] = c.rel
                out[f"score_abs.{key}"] = c.abs
        return out
