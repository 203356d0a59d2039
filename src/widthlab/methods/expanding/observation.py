"""Step 1 of an expansion event (Mitchell et al. 2023, the expansion loop): observe the model on the
scoring data.

:meth:`ModelObserver._observe` records, per Linear/Conv2d layer, its inputs a and back-propagated
residual rows, the K-FAC factors A and G (``kfac.observe``), E‖∇_yℓ‖², and, where the event needs it,
the global natural gradient x by CG with η_global = gᵀx and the natural residual ρ = ∇_yℓ − c·Jx of the
depth scores. :meth:`ModelObserver._statistics` turns this into what the scores read per consuming
layer: pseudo-inverses of A and the damped G, η_layer and the residuals r_⊥ its inputs cannot explain.
After a width commit :meth:`ModelObserver._observe_grown` brings the observation up to date instead of
redoing it (new units have zero outgoing weights: only their consumer's inputs change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from widthlab.methods.expanding import cost, kfac, scores
from widthlab.methods.expanding.fisher import metric_pinv_norm, named_trainable, output_grad, per_sample_loss
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.methods.expanding.natural_gradient import cg_dot_flops, conjugate_gradient, metered_operator

if TYPE_CHECKING:
    from widthlab.methods.expanding.candidate_search import Candidate


@dataclass
class Context:
    """One observation of the model on the scoring data (step 1 of an event)."""

    obs: kfac.Observation
    eta_global: float
    per_layer: dict[str, dict[str, Any]]
    bound: float = float("nan")  # normaliser of the absolute score (ExpansionConfig.abs_normalizer)


class ModelObserver:
    """The observation step of :class:`~.controller.ExpansionController` (a mixin: it reads the
    controller's ``cfg``, ``loss`` and ``flops``)."""

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
                                          params=params, mode=cfg.eta_mode)
            res = conjugate_gradient(matvec, g, maxiter=cfg.eta_maxiter, tol=cfg.eta_tol)
            self.flops.add(cg_dot_flops(g.numel(), res.iterations))
            nat = res.x
            jx = self.flops.run(("jvp", cost.shapes_key(x, nat)), op.jvp, nat).detach()
        eta_global = float(g @ nat)
        r = output_grad(self.loss, op.out.detach(), y)
        c = (jx * r).sum() / (jx * jx).sum().clamp_min(1e-30)
        return {"natural": r - c * jx}, eta_global  # what the current natural-gradient step leaves

    def _observe(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, natural: bool = True) -> Context:
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
        return self._metered_statistics(obs, y, eta_global)

    def _grown_layers(self, model: nn.Module, cand: Candidate) -> tuple[str, str, int] | None:
        """(producer, consumer, units added) of a width commit that :meth:`_observe_grown` can follow:
        an expandable MLP or CNN, where a site's producer feeds its consumer alone; else None."""
        if cand.kind != "width" or not isinstance(model, (ExpandableMLP, ExpandableCNN)):
            return None
        return (*model.site_layers(cand.index), int(cand.layout.k))

    def _observe_grown(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Context,
                       grown: tuple[str, str, int], natural: bool) -> Context:
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
        fresh = self._metered_statistics(obs, y, eta_global, changed)
        per_layer = {}
        for name in obs.layers:
            if name in changed:
                per_layer[name] = fresh.per_layer[name]
            else:
                old = ctx.per_layer[name]
                per_layer[name] = {**old, "r_perp": {k: old["r_perp"][k] for k in obs.layers[name].e_rows}}
        return Context(obs, eta_global, per_layer, fresh.bound)

    def _gradient(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
        loss = per_sample_loss(self.loss, model(x), y).mean()
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params.values()))])

    def _metered_statistics(self, obs: kfac.Observation, y: torch.Tensor, eta_global: float,
                            names: set[str] | None = None) -> Context:
        """:meth:`_statistics`, charged in closed form (:func:`statistics_flops`)."""
        self.flops.add(statistics_flops(obs, names, g_damping=self.cfg.g_damping))
        return self._statistics(obs, y, eta_global, names)

    def _statistics(self, obs: kfac.Observation, y: torch.Tensor, eta_global: float,
                    names: set[str] | None = None) -> Context:
        """Per consuming layer (those in ``names``, default all): pseudo-inverses of A and the damped G,
        η_layer and the residuals r_⊥; the ``metric`` normaliser's products are charged to ``flops`` here,
        the rest by the caller (:func:`statistics_flops`)."""
        cfg = self.cfg
        if cfg.abs_normalizer == "metric":
            key = ("metric-normaliser", cost.shapes_key(obs.out, y), cfg.output_metric)  # once per shape
            bound = float(self.flops.run(key, metric_pinv_norm, self.loss, obs.out, y, cfg.output_metric))
        else:
            bound = float(obs.loss_sqnorm)
        per_layer = {}
        for name, lay in obs.layers.items():
            if names is not None and name not in names:
                continue
            f = lay.factors
            A_pinv = scores.psd_pinv(f.A)
            # η_layer inverts G undamped, as the official layer_baseline does; only Δη′ uses the damped G.
            G_pinv = scores.psd_pinv(f.G)
            G_inv = G_pinv if cfg.g_damping == 0 else scores.psd_pinv(scores.damp(f.G, cfg.g_damping))
            # per residual (ḡ is the one of "grad") its gradient and A⁺ḡ, each computed once
            grads = {k: kfac.gradient_from_rows(lay.a_rows, e, obs.n) for k, e in lay.e_rows.items()}
            solved = {k: A_pinv @ g for k, g in grads.items()}
            r_perp = {k: scores.residual_rows(lay.a_rows, e, A_pinv, grads[k], f.t, A_pinv_gbar=solved[k])
                      for k, e in lay.e_rows.items()}
            eta = scores.layer_eta(grads["grad"], A_pinv, G_pinv, A_inv_gbar=solved["grad"])
            per_layer[name] = {"G_inv": G_inv, "eta": float(eta), "r_perp": r_perp, "t": f.t}
        return Context(obs, eta_global, per_layer, bound)


def statistics_flops(obs: kfac.Observation, names: set[str] | None = None, *, g_damping: float) -> int:
    """FLOPs of :meth:`ModelObserver._statistics` (but for its ``metric`` normaliser) on the layers in
    ``names`` (default all), per layer with R rows, a D×D factor A, an m×m factor G and K residuals:
    the symmetric pseudo-inverses of A and G, and of the damped G unless ``g_damping`` is 0 (11n³
    each, the ``cost.py`` convention); per residual its gradient aᵀe (2RDm), A⁺ḡ (2D²m) and
    r_⊥ = e − a(A⁺ḡ) (2RDm); η_layer = Σ ḡ ⊙ ((A⁺ḡ)G⁺) (2Dm²). In closed form because an event's
    shapes are new at every event, and measuring them by dispatch costs several times the computation
    (a test checks it against the count)."""
    total = 0
    for name, lay in obs.layers.items():
        if names is not None and name not in names:
            continue
        R, D = lay.a_rows.shape
        m = lay.factors.G.shape[0]
        K = len(lay.e_rows)
        inverses = 11 * D ** 3 + 11 * m ** 3 * (1 if g_damping == 0 else 2)
        total += inverses + K * (4 * R * D * m + 2 * D * D * m) + 2 * D * m * m
    return total
