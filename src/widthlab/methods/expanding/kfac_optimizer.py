"""K-FAC preconditioned natural-gradient optimizer: the fast alternative to the CG solver.

For every Linear/Conv2d layer with K-FAC factors A, G (``kfac.py``) the gradient matrix ḡ (inputs ×
outputs, bias as the last input row) is replaced by the damped natural gradient

    Δ = (A + π√λ I)⁻¹ ḡ (G + √λ/π I)⁻¹        (Martens & Grosse 2015, factored Tikhonov damping)

and the parameters step θ ← θ − lr·Δ (optionally with heavy-ball momentum and KL clipping, Ba et al.
2017). The rational activations' coefficients (v, c, l) (Mitchell et al. 2023, §2: trainable per unit)
are not in any Kronecker factor; their Gauss-Newton curvature is taken diagonal, from the same
cotangents that make G: F_ii = (1/N) Σ_n Σ_u (∂(uᵀy_n)/∂θ_i)², and they step by g_i / (F_ii + λ) at the
same rate, so that every coordinate takes a natural-gradient step (a plain gradient step at a rate
tuned for natural-gradient steps is orders of magnitude off in either direction). Any other parameter
takes a plain gradient step.

Statistics are refreshed every ``stat_every`` steps from an extra forward pass on the step's batch with
sampled (default) or exact output-metric cotangents, and inverted every ``inv_every`` steps, so their
cost is amortised (K-FAC's T₁, T₃). That pass sees at most ``stat_batch`` samples of the batch, evenly
spaced through it: the factors are running averages of unbiased estimates of E[ããᵀ] and E[ggᵀ], and
past a few hundred samples a larger batch buys a little less noise in one of ~1/(1 − ema_decay)
averaged estimates at a cost linear in the batch (ãᵀã alone is 2·B·D² FLOPs: 1.26 GFLOP at
B = 1024, D = 785, three times that layer's whole training step). A fresh estimate (the first, one
after a resize, or every one with ``ema_decay=0``) is the factor itself, so it takes the whole batch.
The pass runs the model in its current mode: a BatchNorm layer in training mode updates its running
statistics from it. Like
:class:`~.natural_gradient.NaturalGradientCG` the batch is handed over by a callback with
:meth:`set_batch` between the trainer's backward and step.

Two exact forms of the preconditioning. For a layer with m outputs and a D×D factor A (D = d inputs,
+1 with the bias folded in) the product G⁻¹ ḡᵀ A⁻¹ (weight layout) costs 2·m·D·(d + m) FLOPs. But a
Linear layer's gradient on R rows is ḡᵀ = gᵀã, with g the (R, m) output-gradient rows and ã the
(R, D) input rows (tokens of an (..., d) input are rows; the bias is a ones column) of the trainer's
own backward passes, so that G⁻¹ ḡᵀ A⁻¹ = (G⁻¹ gᵀ)(ã A⁻¹), at 2·R·(m² + d·D + m·D) FLOPs: cheaper
whenever the batch is small next to the layer (784 → 512 at R = 256: 0.66 against 1.04 GFLOP). The
optimizer records those rows (``gradient_rows.py``) and, per layer and step, takes the cheaper form
(:func:`precondition_flops`). The factored form is used only where the rows provably make ``.grad``:
nn.Linear layers, no weight decay in their group, no data parallelism (rows are local to a rank), and
a probe ``.grad``·v = gᵀ(ã v) for a fixed random v, to a relative 1e-4, that catches gradients edited
after the backward (clipping, a user's changes, grads zeroed in between); otherwise, or once a layer's
rows (several forward/backward passes before a step) make it no cheaper, the full product. The two
forms agree up to rounding: no approximation beyond K-FAC's.

State. The factors, their inverses and momentum live in ``optimizer.state[layer.weight]`` so that the
trainer's checkpoints (saved by parameter name) resume them exactly. They are not shaped like the
parameter, so a resize event must remap this optimizer with ``optimizer_mode="reset"``: the factors of
a resized layer are dropped and re-estimated on the next step (which then collects statistics even
between the ``stat_every`` steps). The recorded rows are transient: cleared at every step and by
:meth:`~KFACOptimizer.zero_grad`, never in a checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from widthlab.methods.expanding import cost, kfac
from widthlab.methods.expanding.fisher import check_loss, check_metric
from widthlab.methods.expanding.gradient_rows import GradientRows
from widthlab.methods.expanding.natural_gradient import rank_weighted_sum
from widthlab.nn.rational import RationalActivation


def rational_derivatives(act: RationalActivation, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """∂σ/∂v, ∂σ/∂c, ∂σ/∂l at every element of the pre-activation ``x`` (units along ``act.dim``).

    σ = N/r with N = l·x + (2v·x + c)/(1 + x²), r = ‖(v, c, l)‖: ∂σ/∂v = (2x/(1 + x²))/r − N·v/r³, and
    likewise for c (basis 1/(1 + x²)) and l (basis x); the norm's term vanishes where it is floored.
    """
    shape = [1] * x.dim()
    shape[act.dim] = -1
    v, c, l = (t.detach().view(shape) for t in (act.v, act.c, act.l))
    q = v * v + c * c + l * l
    if act.eps_mode == "floor":
        r, live = q.clamp_min(act.eps).sqrt(), (q > act.eps).to(x.dtype)
    else:
        r, live = (q + act.eps).sqrt(), torch.ones_like(q)
    den = 1 / (1 + x * x)
    num = l * x + (2 * v * x + c) * den
    k = num * live / (r * r * r)
    return (2 * x * den / r - k * v, den / r - k * c, x / r - k * l)


def precondition_flops(m: int, d: int, D: int, rows: int | None = None) -> int:
    """FLOPs of one layer's preconditioned gradient G⁻¹ ḡᵀ A⁻¹ ((m, d) weight, D×D factor A, D = d or
    d + 1): 2·m·d·D + 2·m²·D as the product of the full gradient, 2·R·(m² + d·D + m·D) from R rows."""
    if rows is None:
        return 2 * m * d * D + 2 * m * m * D
    return 2 * rows * (m * m + d * D + m * D)


def max_rows(m: int, d: int, D: int) -> int:
    """The most rows for which the factored form is cheaper than the full one (0: never)."""
    return (precondition_flops(m, d, D) - 1) // precondition_flops(m, d, D, 1)


PROBE_RTOL = 1e-4  # rows vs .grad: far above rounding, far below any real mismatch


class KFACOptimizer(torch.optim.Optimizer):
    """K-FAC natural-gradient descent over a model's Linear/Conv2d layers.

    Args:
        params: the parameters to optimise (all belong to ``model``).
        model: the network; its Linear/Conv2d layers are preconditioned.
        loss: the trainer's loss name.
        lr: step size.
        damping: λ of the factored Tikhonov damping.
        ema_decay: running-average decay of the factors (0: the latest batch only).
        stat_every, inv_every: refresh the factors / their inverses every this many steps.
        stat_batch: refresh the running factors from at most this many samples of the step's batch,
            evenly spaced through it (None: all of them). Applies where inputs and targets are tensors
            with the same first (sample) dimension; other batches, and fresh factors, are used whole.
        output_metric: ``"fisher"`` or ``"identity"`` (see ``fisher.py``).
        g_estimator: ``"sampled"`` (one Monte-Carlo cotangent, default) or ``"exact"`` (C cotangents).
        momentum: heavy-ball momentum on the preconditioned update (0: none).
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        kl_clip: if given, scale the update so that lr²·Δᵀg ≤ kl_clip (Ba et al. 2017).
        bias: fold each layer's bias into its A factor (homogeneous coordinate).
    """

    def __init__(self, params, model: nn.Module, loss: str, *, lr: float = 0.1, damping: float = 1e-2,
                 ema_decay: float = 0.95, stat_every: int = 10, inv_every: int = 10,
                 output_metric: str = "fisher", g_estimator: str = "sampled", momentum: float = 0.0,
                 weight_decay: float = 0.0, kl_clip: float | None = None, bias: bool = True,
                 stat_batch: int | None = 256):
        if lr <= 0 or damping < 0 or stat_every < 1 or inv_every < 1 or not 0 <= momentum < 1:
            raise ValueError("KFACOptimizer needs lr > 0, damping >= 0, stat_every, inv_every >= 1 and "
                             "momentum in [0, 1)")
        if stat_batch is not None and (isinstance(stat_batch, bool) or not isinstance(stat_batch, int)
                                       or stat_batch < 1):
            raise ValueError(f"KFACOptimizer stat_batch must be a positive integer or None, "
                             f"got {stat_batch!r}")
        if g_estimator not in kfac.G_ESTIMATORS:
            raise ValueError(f"g_estimator must be one of {kfac.G_ESTIMATORS}, got {g_estimator!r}")
        # The step counter decides when statistics are refreshed; kept in the param groups because the
        # trainer's checkpoints save group hyper-parameters (and per-parameter state) by name.
        # method_flops (group 0): FLOPs this optimizer computed besides the trainer's passes (cost.py)
        super().__init__(params, {"lr": lr, "damping": damping, "momentum": momentum,
                                  "weight_decay": weight_decay, "kfac_step": 0, "method_flops": 0.0})
        self.meter = cost.FlopCache()
        self.model, self.loss, self.metric = model, check_loss(loss), check_metric(output_metric)
        self.ema_decay, self.stat_every, self.inv_every = ema_decay, stat_every, inv_every
        self.g_estimator, self.kl_clip, self.bias, self.stat_batch = g_estimator, kl_clip, bias, stat_batch
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dist = None  # a DistContext under data parallelism (set by plan.OptimizerHook), else None
        # Input/output-gradient rows of the passes behind .grad (the factored form); not state.
        self._rows, self._lowrank, self._probe_vectors = GradientRows(), True, {}
        self.last_forms: dict[str, str] = {}  # layer name -> "factored" or "full", of the last step
        self._sync_rows(self._layers())

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._batch = (x, y)

    def _statistics_batch(self, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch, or (unless ``whole``) ``stat_batch`` of its samples evenly spaced through it,
        so that a batch laid out in blocks, e.g. by class, is still sampled across its blocks; the indices
        i·(N − 1)/(n − 1) rounded half up, in integer arithmetic (the same on every device)."""
        if self._batch is None:
            raise RuntimeError("KFACOptimizer.step needs set_batch(x, y) first (add plan.OptimizerHook)")
        x, y = self._batch
        n = self.stat_batch
        if (whole or n is None or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor)
                or x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] <= n):
            return x, y
        N = x.shape[0]
        i = torch.arange(n, device=x.device)
        idx = torch.zeros_like(i) if n == 1 else (i * (N - 1) + (n - 1) // 2) // (n - 1)
        return x[idx], y[idx.to(y.device)]

    # --------------------------------------------------------------------- statistics

    def _layers(self) -> dict[str, nn.Module]:
        held = {id(p) for g in self.param_groups for p in g["params"]}
        return {n: m for n, m in kfac.kfac_layers(self.model).items() if id(m.weight) in held}

    def _activations(self) -> dict[str, RationalActivation]:
        held = {id(p) for g in self.param_groups for p in g["params"]}
        return {n: m for n, m in self.model.named_modules()
                if isinstance(m, RationalActivation) and id(m.v) in held}

    def _update_factors(self, layers: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        was_training = self.model.training
        acts = self._activations()
        with torch.enable_grad(), self._rows.paused(), kfac.capture({**layers, **acts}) as cap:
            out = self.model(x)
            grad_out = kfac.output_grad(self.loss, out.detach(), y)
            us = kfac.g_cotangents(self.loss, out.detach(), grad_out, self.metric, self.g_estimator)
            es = [kfac.backprop(out, cap, u.to(out.dtype), list(cap)) for u in us]
        self.model.train(was_training)
        n = x.shape[0]
        batch = {}
        for name, m in layers.items():
            if name in cap:
                a_rows = kfac.input_rows(m, cap[name].a, self.bias)
                batch[name] = kfac.factors_from_rows(a_rows, [kfac.output_rows(e[name]) for e in es], n)
        diags = {name: self._rational_diagonal(m, cap[name].a, [e[name] for e in es], n)
                 for name, m in acts.items() if name in cap}
        if self.dist is not None and self.dist.active:
            self._all_reduce_factors(batch, n)
            self._all_reduce_diagonals(diags, n)
        for name, d in diags.items():
            m = acts[name]
            for p, dp in zip((m.v, m.c, m.l), d):
                st = self.state[p]
                old = st.get("F_diag")
                if old is None or old.shape != dp.shape or self.ema_decay == 0:
                    st["F_diag"] = dp.detach().clone()
                else:
                    kfac.ema_(old, dp.detach(), self.ema_decay)
        for name, f in batch.items():
            m = layers[name]
            st = self.state[m.weight]
            old = st.get("A")
            if old is None or old.shape != f.A.shape or st["G"].shape != f.G.shape or self.ema_decay == 0:
                st["A"], st["G"] = f.A.detach().clone(), f.G.detach().clone()
                st.pop("A_inv", None)
            else:
                kfac.ema_(st["A"], f.A.detach(), self.ema_decay)
                kfac.ema_(st["G"], f.G.detach(), self.ema_decay)

    def _all_reduce_factors(self, batch: dict[str, kfac.LayerFactors], n: int) -> None:
        """Data parallelism: each rank's factors are means over its slice; the global batch's are their
        n_r/n-weighted sum, taken in one all-reduce of all layers' A and G."""
        if not batch:
            return
        mats = [t for f in batch.values() for t in (f.A, f.G)]
        reduce = rank_weighted_sum(self.dist, n, mats[0])
        parts = reduce(torch.cat([t.reshape(-1) for t in mats])).split([t.numel() for t in mats])
        for i, f in enumerate(batch.values()):
            f.A, f.G = parts[2 * i].view_as(f.A), parts[2 * i + 1].view_as(f.G)

    @staticmethod
    def _rational_diagonal(act: RationalActivation, x: torch.Tensor, deltas: list[torch.Tensor], n: int
                           ) -> tuple[torch.Tensor, ...]:
        """Diagonal Gauss-Newton of (v, c, l): (1/N) Σ_n Σ_u (Σ_t δ·∂σ/∂θ)², δ = ∂(uᵀy)/∂σ per element
        (t: the spatial positions of one unit in one sample)."""
        ders = rational_derivatives(act, x)
        dim = act.dim % x.dim()
        other = [i for i in range(1, x.dim()) if i != dim]
        out = []
        for der in ders:
            tot = 0
            for delta in deltas:
                g = delta * der
                g = g.sum(other) if other else g  # (N, units)
                tot = tot + (g * g).sum(0)
            out.append(tot / n)
        return tuple(out)

    def _all_reduce_diagonals(self, diags: dict[str, tuple[torch.Tensor, ...]], n: int) -> None:
        if not diags:
            return
        flat = [t for d in diags.values() for t in d]
        reduce = rank_weighted_sum(self.dist, n, flat[0])
        parts = reduce(torch.cat(flat)).split([t.numel() for t in flat])
        for i, name in enumerate(list(diags)):
            diags[name] = tuple(parts[3 * i + j] for j in range(3))

    def _diag_ready(self, act: RationalActivation) -> bool:
        st = self.state.get(act.v, {})
        return "F_diag" in st and st["F_diag"].shape == act.v.shape

    def _ready(self, m: nn.Module) -> bool:
        st = self.state.get(m.weight, {})
        return "A" in st and st["A"].shape[0] == self._factor_dim(m) and st["G"].shape[0] == m.weight.shape[0]

    # --------------------------------------------------------------------- gradient rows

    def _factor_dim(self, m: nn.Module) -> int:
        return m.weight[0].numel() + (1 if self.bias and m.bias is not None else 0)

    def _sync_rows(self, layers: dict[str, nn.Module]) -> None:
        """Record the rows of the layers that may take the factored form (see the module docstring)."""
        limits = {}
        if self._lowrank and not (self.dist is not None and self.dist.active):
            group_of = {id(p): g for g in self.param_groups for p in g["params"]}
            for m in layers.values():
                if isinstance(m, nn.Linear) and not group_of[id(m.weight)]["weight_decay"]:
                    limit = max_rows(m.out_features, m.in_features, self._factor_dim(m))
                    if limit > 0:
                        limits[m] = limit
        self._rows.sync(limits)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._rows.clear()  # the rows of the zeroed gradients

    def _factored_rows(self, layers: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (a, g) of the layers whose .grad is gᵀa (the probe), where that form is cheaper."""
        found = {}
        for name, m in layers.items():
            rows = self._rows.rows(m) if m.weight.grad is not None else None
            if rows is not None:
                found[name] = rows
        if not found:
            return {}
        key = ("probe", tuple((n, layers[n].bias is not None) for n in found),
               cost.shapes_key(list(found.values())))
        ok = self.meter.run(key, self._probe, [(layers[n], *r) for n, r in found.items()])
        return {n: found[n] for n, good in zip(found, ok) if good}

    def _probe(self, items: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> list[bool]:
        """Whether ``W.grad @ v (+ b.grad·v_b) = gᵀ(ã v)`` for each layer's rows, to PROBE_RTOL of the
        value plus a rounding allowance √(R + D)·eps·‖g‖·‖ã v‖: rounding errors of random sign grow as
        √n·eps (Higham 2002, ch. 2), and norms bound the products without another pass over the rows."""
        good = []
        for m, a, g in items:
            gw = m.weight.grad
            a, g = a.to(gw.dtype), g.to(gw.dtype)
            D, d = self._factor_dim(m), a.shape[1]
            v = self._probe_vectors.get((D, gw.dtype, gw.device))
            if v is None:
                gen = torch.Generator().manual_seed(D)  # private: the global RNG stays untouched
                v = torch.randn(D, generator=gen, dtype=torch.float64).to(gw.dtype).to(gw.device)
                self._probe_vectors[(D, gw.dtype, gw.device)] = v
            av, got = a @ v[:d], gw.reshape(gw.shape[0], -1) @ v[:d]
            if d < D:
                gb = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
                av, got = av + v[d], got + gb * v[d]
            ref = g.T @ av
            eps = torch.finfo(gw.dtype).eps * math.sqrt(a.shape[0] + D)
            good.append((got - ref).norm() <= PROBE_RTOL * ref.norm() + eps * g.norm() * av.norm())
        return torch.stack(good).tolist()  # one host read for all layers

    # --------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers = self._layers()
        self._sync_rows(layers)
        step = self.param_groups[0]["kfac_step"]
        fresh = [n for n, m in layers.items() if not self._ready(m)]
        stale_diag = any(not self._diag_ready(a) for a in self._activations().values())
        before = self.meter.total
        if step % self.stat_every == 0 or fresh or stale_diag:
            todo = layers if step % self.stat_every == 0 else {n: layers[n] for n in fresh}
            # a fresh estimate is the factor itself, not one of the running average's terms: whole batch
            batch = self._statistics_batch(whole=bool(fresh) or stale_diag or self.ema_decay == 0)
            key = ("stats", tuple(todo), cost.shapes_key(batch, [m.weight for m in layers.values()],
                                                         [a.v for a in self._activations().values()]))
            self.meter.run(key, self._update_factors, todo, batch)
        invert = step % self.inv_every == 0
        inverting = tuple(n for n, m in layers.items() if m.weight.grad is not None
                          and (invert or "A_inv" not in self.state[m.weight]))
        factored = self._factored_rows(layers)
        self.last_forms = {n: "factored" if n in factored else "full" for n, m in layers.items()
                           if m.weight.grad is not None}
        key = ("update", inverting, tuple((n, r[0].shape[0]) for n, r in factored.items()),
               cost.shapes_key([p for g in self.param_groups for p in g["params"] if p.grad is not None]))
        self.meter.run(key, self._apply, layers, invert, factored)
        self.param_groups[0]["method_flops"] = self.param_groups[0].get("method_flops", 0.0) + (
            self.meter.total - before)
        for group in self.param_groups:
            group["kfac_step"] = step + 1
        self._batch = None
        self._rows.clear()
        return loss

    @property
    def method_flops(self) -> float:
        """FLOPs of the statistics, inverses and preconditioning so far (this process), see ``cost.py``
        (the extra forward and backward passes of the statistics included)."""
        return float(self.param_groups[0].get("method_flops", 0.0))

    def _apply(self, layers: dict[str, nn.Module], invert: bool,
               factored: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Invert the factors where due, precondition every gradient and step."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        updates: list[tuple[torch.Tensor, torch.Tensor, dict]] = []  # (param, Δ, group)
        done: set[int] = set()
        for name, m in layers.items():
            group = group_of[id(m.weight)]
            if m.weight.grad is None:
                continue
            st = self.state[m.weight]
            if invert or "A_inv" not in st:
                st["A_inv"], st["G_inv"] = kfac.damped_inverses(st["A"], st["G"], group["damping"])
            dw, db = self._precondition(m, st["A_inv"], st["G_inv"], group["weight_decay"],
                                        factored.get(name))
            updates.append((m.weight, dw, group))
            done.add(id(m.weight))
            if m.bias is not None:
                updates.append((m.bias, db, group))
                done.add(id(m.bias))
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in done or p.grad is None:
                    continue
                g = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
                diag = self.state[p].get("F_diag") if p in self.state else None
                if diag is not None and diag.shape == g.shape:  # a rational coefficient
                    g = g / (diag + group["damping"])
                updates.append((p, g, group))
        scale = self._kl_scale(updates)
        for p, d, group in updates:
            if group["momentum"]:
                buf = self.state[p].get("momentum_buffer")
                if buf is None or buf.shape != d.shape:
                    buf = torch.zeros_like(d)
                buf.mul_(group["momentum"]).add_(d)
                self.state[p]["momentum_buffer"] = buf
                d = buf
            p.add_(d, alpha=-group["lr"] * scale)

    def _precondition(self, m: nn.Module, A_inv: torch.Tensor, G_inv: torch.Tensor, wd: float,
                      rows: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δb) of one layer: Δᵀ = G⁻¹ ḡᵀ A⁻¹, the transpose of A⁻¹ ḡ G⁻¹ (both factors symmetric),
        computed in the weight's own (out, in) layout so that no transposed copies are made; the bias
        column enters as a rank-one term instead of being concatenated to the gradient. With ``rows``
        (a, g) whose gᵀa is the gradient (weight decay 0): the factored form (G⁻¹gᵀ)(ã A⁻¹), the bias
        as the ones column of ã (added as the bias row of A⁻¹), weight and bias columns apart so that
        ΔW comes out contiguous."""
        W = m.weight
        if rows is not None:
            a, g = (t.to(A_inv.dtype) for t in rows)
            left = G_inv @ g.T  # (m, R)
            d = a.shape[1]
            if A_inv.shape[0] == d:  # no bias in the factorisation
                dw = (left @ (a @ A_inv)).reshape(W.shape)
                if m.bias is None:
                    return dw, None
                return dw, m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
            right = torch.addmm(A_inv[d, :d], a, A_inv[:d, :d])  # weight columns of ãA⁻¹, (R, d)
            col = torch.addmv(A_inv[d, d], a, A_inv[:d, d])  # its bias column, (R,)
            return (left @ right).reshape(W.shape), left @ col
        gw = W.grad.reshape(W.shape[0], -1)  # (m, d)
        if wd:
            gw = gw + wd * W.reshape(W.shape[0], -1)
        if m.bias is None:
            return (G_inv @ (gw @ A_inv)).reshape(W.shape), None
        gb = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
        if wd:
            gb = gb + wd * m.bias
        if not self.bias:  # bias outside the factorisation: plain gradient
            return (G_inv @ (gw @ A_inv)).reshape(W.shape), gb
        d = gw.shape[1]
        delta = G_inv @ (gw @ A_inv[:d]).addr_(gb, A_inv[d])  # G⁻¹ [ḡ_W | ḡ_b] A⁻¹, (m, d + 1)
        return delta[:, :d].reshape(W.shape), delta[:, d]

    def _kl_scale(self, updates) -> float | torch.Tensor:
        if self.kl_clip is None:
            return 1.0
        vg = sum((d * p.grad).sum() * group["lr"] ** 2 for p, d, group in updates if p.grad is not None)
        return torch.clamp((self.kl_clip / vg.clamp_min(1e-30)).sqrt(), max=1.0)
