"""Damped Gauss-Newton natural gradient by conjugate gradient with Jacobian-vector products.

This is the optimiser of the official MLP code (Mitchell et al. 2023): on each mini-batch solve

    (F + λI) x = g,     F v = (1/B) Σ_n J_nᵀ H_n J_n v,

with Jacobian-vector products only (explicit per-sample Jacobians for small problems, else two backward
passes per CG iteration; see :class:`GaussNewtonOperator`), then step
θ ← θ − lr·t with t = x/(1+wd) + wd·θ/(1+wd). The global natural expansion score of the batch is
η = gᵀx (Mitchell et al. 2023, the natural expansion score), a by-product of every step.

Defaults follow the official code (λ = 0.1 absolute, 100 CG iterations, relative tolerance 1e-5, x₀ = 0,
lr = 0.1); the output metric H defaults to the loss's Gauss-Newton matrix (``"fisher"``), the official
code's identity metric is ``output_metric="identity"`` (see ``fisher.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from widthlab.methods.expanding.cost import FlopCache, shapes_key
from widthlab.methods.expanding.fisher import (
    check_loss,
    check_metric,
    flatten,
    metric_apply,
    named_trainable,
    output_jacobian,
    unflatten,
)


@dataclass
class CGResult:
    """Solution of a CG solve and how it ended."""

    x: torch.Tensor
    iterations: int
    residual_norm: float
    converged: bool


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       x0: torch.Tensor | None = None, maxiter: int = 100, tol: float = 1e-5,
                       atol: float = 0.0) -> CGResult:
    """Solve A x = b for symmetric positive definite A given only ``matvec(v) = A v``.

    Stops when ‖r‖ ≤ max(tol·‖b‖, atol), as ``jax.scipy.sparse.linalg.cg`` does, or after ``maxiter``
    iterations. One ``.item()`` per iteration reads the residual: CG is a host-driven loop anyway.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = r @ r
    bound = max(tol * float(b.norm()), atol)
    it = 0
    if float(rs) ** 0.5 <= bound:
        return CGResult(x, 0, float(rs) ** 0.5, True)
    while it < maxiter:
        ap = matvec(p)
        pap = p @ ap
        if pap <= 0:  # not positive definite along p (or breakdown): stop with what we have
            break
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        it += 1
        if float(rs_new) ** 0.5 <= bound:
            return CGResult(x, it, float(rs_new) ** 0.5, True)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return CGResult(x, it, float(rs) ** 0.5, False)


GN_MODES = ("auto", "jacobian", "autograd")  # the routes of GaussNewtonOperator


class GaussNewtonOperator:
    """v ↦ (F + λI) v on a fixed batch (Mitchell et al. 2023), by one of two equivalent routes.

    * ``"jacobian"``: the per-sample Jacobians J (N, C, P) are built once (``torch.func`` vmap of
      jacrev); every product is then two small matrix products. Far cheaper per CG iteration when
      N·C·P is small (the SENN MLPs on small data).
    * ``"autograd"``: matrix-free. One forward keeps its graph; J v comes from the double-backward
      trick (Jᵀu is linear in a dummy u, so ∂⟨Jᵀu, v⟩/∂u = J v) and Jᵀw from an ordinary backward,
      i.e. two backward passes and no forward per CG iteration.

    ``"auto"`` picks ``"jacobian"`` when N·C·P ≤ ``max_jacobian`` entries.

    Args:
        model: the network; parameters not in ``params`` are held fixed.
        x: the batch inputs.
        loss: ``cross_entropy``, ``mse`` or ``half_sse``.
        output_metric: ``"fisher"`` (loss Gauss-Newton) or ``"identity"`` (official code).
        damping: λ, added as λI.
        params: name -> parameter of the coordinates θ (default: every trainable parameter).
        mode: ``"auto"``, ``"jacobian"`` or ``"autograd"``.
        max_jacobian: size limit of the explicit Jacobian for ``"auto"``.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, loss: str, *, output_metric: str = "fisher",
                 damping: float = 0.1, params: dict[str, torch.Tensor] | None = None, mode: str = "auto",
                 max_jacobian: int = 10_000_000):
        self.model, self.x, self.loss = model, x, check_loss(loss)
        self.metric, self.damping = check_metric(output_metric), damping
        self.params = dict(params or named_trainable(model))
        self.n = x.shape[0]
        p_count = sum(p.numel() for p in self.params.values())
        with torch.enable_grad():
            out = model(x)
        if mode == "auto":
            mode = "jacobian" if self.n * out.shape[1] * p_count <= max_jacobian else "autograd"
        if mode not in GN_MODES[1:]:
            raise ValueError(f"mode must be one of {GN_MODES}, got {mode!r}")
        self.mode = mode
        if mode == "jacobian":
            self.out = out.detach()
            # (N·C, P): products as plain matrix-vector products (an einsum over (N, C, P) is far slower)
            self.J = output_jacobian(model, x, self.params).detach().reshape(-1, p_count)
        else:
            self.out = out
            self._plist = list(self.params.values())
            with torch.enable_grad():
                self._u = torch.zeros_like(out, requires_grad=True)
                self._jt_u = torch.autograd.grad(out, self._plist, self._u, create_graph=True)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v for every sample, shape (N, C)."""
        if self.mode == "jacobian":
            return (self.J @ v).view(self.n, -1)
        with torch.enable_grad():
            vs = list(unflatten(v, self.params).values())
            return torch.autograd.grad(self._jt_u, self._u, vs, retain_graph=True)[0]

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        """Jᵀ w summed over samples, flattened (P,)."""
        if self.mode == "jacobian":
            return self.J.T @ w.reshape(-1)
        with torch.enable_grad():
            return flatten(torch.autograd.grad(self.out, self._plist, w, retain_graph=True))

    def gn(self, v: torch.Tensor) -> torch.Tensor:
        """F v without damping."""
        return self.vjp(metric_apply(self.loss, self.out.detach(), self.jvp(v), self.metric) / self.n)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.gn(v) + self.damping * v


def natural_gradient(model: nn.Module, x: torch.Tensor, g: torch.Tensor, loss: str, *,
                     output_metric: str = "fisher", damping: float = 0.1, maxiter: int = 100,
                     tol: float = 1e-5, params: dict[str, torch.Tensor] | None = None,
                     mode: str = "auto", reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     meter: FlopCache | None = None) -> CGResult:
    """x = (F + λI)⁻¹ g on the batch ``x`` by CG; η = gᵀx.

    ``reduce`` turns this batch's F v into the global batch's under data parallelism (a weighted sum over
    ranks); every rank then runs the same CG iterations on the same vectors. ``meter`` is charged with
    the solve's FLOPs (:func:`metered_operator`).
    """
    op, matvec = metered_operator(meter, model, x, loss, output_metric=output_metric, damping=damping,
                                  params=params, mode=mode)
    if reduce is not None:
        gn = op.gn if meter is None else meter.wrap(("gn", _op_key(op)), op.gn)
        matvec = lambda v: reduce(gn(v)) + damping * v  # noqa: E731
    res = conjugate_gradient(matvec, g, maxiter=maxiter, tol=tol)
    if meter is not None:
        meter.add(cg_dot_flops(g.numel(), res.iterations))
    return res


def cg_dot_flops(size: int, iterations: int) -> int:
    """The dot products of :func:`conjugate_gradient`: r·r once, then p·Ap and r·r per iteration."""
    return 2 * size * (2 * iterations + 1)


def _op_key(op: GaussNewtonOperator) -> tuple:
    return (op.mode, op.metric, shapes_key(op.x, list(op.params.values())))


def metered_operator(meter: FlopCache | None, model: nn.Module, x: torch.Tensor, loss: str, **kw
                     ) -> tuple[GaussNewtonOperator, Callable[[torch.Tensor], torch.Tensor]]:
    """A :class:`GaussNewtonOperator` and its product v ↦ (F + λI)v, both charged to ``meter`` (its
    construction: the forward pass and, for ``"jacobian"``, the per-sample Jacobians; every product)."""
    if meter is None:
        op = GaussNewtonOperator(model, x, loss, **kw)
        return op, op
    op = GaussNewtonOperator(model, x, loss, **kw)
    # Its forward pass and per-sample Jacobians are per sample: measured on two samples (same route).
    small = {**kw, "mode": op.mode}
    m = min(2, x.shape[0])
    key = ("gn-build", op.mode, op.metric, loss, shapes_key(x[0], list(op.params.values())))
    probe = lambda: (m, lambda: GaussNewtonOperator(model, x[:m], loss, **small))  # noqa: E731
    meter.run_per_sample(key, x.shape[0], probe, lambda: None)
    return op, meter.wrap(("gn-product", _op_key(op)), op)


def rank_weighted_sum(dist, n_local: int, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """u ↦ Σ_ranks (n_r / n) u_r: the global batch mean of per-rank batch means (``dist`` a
    ``train.distributed.DistContext``; one all-reduce for n here, one per call)."""
    n = like.new_tensor(float(n_local))
    w = n / dist.all_reduce_(n.clone())
    return lambda u: dist.all_reduce_(u * w)


class NaturalGradientCG(torch.optim.Optimizer):
    """The official senn_mlp optimiser as a ``torch.optim.Optimizer``.

    The trainer's backward leaves g in ``.grad``; the Gauss-Newton products need the batch inputs, which
    the trainer does not pass to ``step``, so a callback hands them over with :meth:`set_batch` between
    backward and step (``plan.OptimizerHook.on_after_backward``). Parameters are matched to the model
    by identity at every step, so width surgery that swaps parameters (and ``remap_optimizer``) needs
    no extra care: the optimizer keeps no per-parameter state.

    Args:
        params: the parameters to optimise (all of them belong to ``model``).
        model: the network evaluated by the Gauss-Newton products.
        loss: the trainer's loss name (``cross_entropy``, ``mse``, ``half_sse``).
        lr: step size (official 0.1).
        damping: λ of (F + λI) (official 0.1, absolute).
        maxiter, tol: CG limits (official 100, 1e-5 relative).
        weight_decay: wd of t = x/(1+wd) + wd·θ/(1+wd) (official 0 for exp1/2, 1e-3 for exp3/4).
        output_metric: ``"fisher"`` (default) or ``"identity"`` (official).
        mode: how F v is computed (:class:`GaussNewtonOperator`): ``"auto"``, ``"jacobian"``, ``"autograd"``.
    """

    def __init__(self, params, model: nn.Module, loss: str, *, lr: float = 0.1, damping: float = 0.1,
                 maxiter: int = 100, tol: float = 1e-5, weight_decay: float = 0.0,
                 output_metric: str = "fisher", mode: str = "auto"):
        if lr <= 0 or damping < 0 or maxiter < 1 or weight_decay < 0:
            raise ValueError("NaturalGradientCG needs lr > 0, damping >= 0, maxiter >= 1, weight_decay >= 0")
        # method_flops (group 0): FLOPs of the solves so far, kept in the param groups so that the
        # trainer's checkpoints resume it (cost.py)
        super().__init__(params, {"lr": lr, "damping": damping, "maxiter": maxiter, "tol": tol,
                                  "weight_decay": weight_decay, "method_flops": 0.0})
        self.meter = FlopCache()
        self.model, self.loss, self.output_metric = model, check_loss(loss), check_metric(output_metric)
        self.mode = mode
        self._batch: torch.Tensor | None = None
        self.dist = None  # a DistContext under data parallelism (set by plan.OptimizerHook), else None
        self.last_eta: torch.Tensor | None = None  # gᵀx of the last step (a device tensor)
        self.last_iterations = 0

    @property
    def method_flops(self) -> float:
        """FLOPs of every natural-gradient solve so far (this process), see ``cost.py``."""
        return float(self.param_groups[0].get("method_flops", 0.0))

    def set_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """The inputs of the batch whose gradient is in ``.grad`` (targets are not needed: F ignores them)."""
        self._batch = x

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._batch is None:
            raise RuntimeError("NaturalGradientCG.step needs set_batch(x) first (add plan.OptimizerHook "
                               "to the callbacks)")
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.param_groups:
            params = {names[id(p)]: p for p in group["params"] if p.grad is not None}
            if not params:
                continue
            g = flatten(p.grad for p in params.values())  # the global mean gradient under DDP
            reduce = None
            if self.dist is not None and self.dist.active:  # F of the global batch from the ranks' slices
                reduce = rank_weighted_sum(self.dist, self._batch.shape[0], g)
            before = self.meter.total
            with torch.enable_grad():
                res = natural_gradient(self.model, self._batch, g, self.loss,
                                       output_metric=self.output_metric,
                                       damping=group["damping"], maxiter=group["maxiter"], tol=group["tol"],
                                       params=params, mode=self.mode, reduce=reduce, meter=self.meter)
            self.param_groups[0]["method_flops"] = (self.param_groups[0].get("method_flops", 0.0)
                                                    + self.meter.total - before)
            self.last_eta, self.last_iterations = g @ res.x, res.iterations
            wd, lr = group["weight_decay"], group["lr"]
            for p, xp in zip(params.values(), unflatten(res.x, params).values()):
                t = (xp + wd * p) / (1 + wd) if wd else xp
                p.add_(t, alpha=-lr)
        self._batch = None
        return loss
