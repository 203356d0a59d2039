"""Output-space geometry of the losses, and the exact Gauss-Newton / Fisher matrix as a test oracle.

Everything in the self-expanding method measures progress with the damped Gauss-Newton matrix
(Mitchell et al. 2023). With the batch-mean loss L = (1/N) Σ_n ℓ(y_n, t_n) and J_n = ∂y_n/∂θ,

    g = (1/N) Σ_n J_nᵀ ∇_y ℓ_n,        F = (1/N) Σ_n J_nᵀ H_n J_n,

where H_n is the *output metric*. Two choices (the ``metric`` argument everywhere):

* ``"fisher"`` (default, correct): H_n = ∇²_y ℓ_n, the Gauss-Newton matrix of the loss actually trained.
  For softmax cross-entropy this is diag(p) − p pᵀ, which is also the Fisher information of the
  categorical likelihood; for the trainer's ``mse`` (mean over the C outputs) it is (2/C)·I; for
  ``half_sse`` it is I.
* ``"identity"`` (official senn_mlp code): H_n = I for every loss, i.e. F = E[JᵀJ] even for
  cross-entropy (a deviation of the official code).

Losses are named as in the trainer (``cross_entropy``, ``mse``, ``half_sse``); the per-sample losses here
average to exactly the trainer's batch loss, so gradients agree with what ``backward`` produces.

The dense oracle (:func:`output_jacobian`, :func:`gauss_newton`) builds per-sample Jacobians with
``torch.func`` and is meant for tiny networks (a few hundred parameters) in float64 tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

LOSSES = ("cross_entropy", "mse", "half_sse")
METRICS = ("fisher", "identity")


def check_loss(kind: str) -> str:
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    return kind


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"output_metric must be one of {METRICS}, got {metric!r}")
    return metric


def _targets_like(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.reshape(out.shape).to(out.dtype)


def per_sample_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_n for each sample, shape (N,); its mean is the trainer's ``data_loss``."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    diff = out - _targets_like(out, y)
    if kind == "mse":
        return diff.pow(2).mean(1)
    if kind == "half_sse":
        return 0.5 * diff.pow(2).sum(1)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def output_grad(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_y ℓ_n per sample, shape (N, C) (not divided by N)."""
    if kind == "cross_entropy":
        return torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(out.dtype)
    diff = out - _targets_like(out, y)
    if kind == "mse":
        return diff * (2.0 / out.shape[1])
    if kind == "half_sse":
        return diff
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def _metric_scale(kind: str, c: int) -> float:
    """H = scale·I for the squared-error losses."""
    return 2.0 / c if kind == "mse" else 1.0


def metric_apply(kind: str, out: torch.Tensor, u: torch.Tensor, metric: str = "fisher") -> torch.Tensor:
    """H_n u_n for each sample: u and the result have shape (N, C) (or (N, ..., C) broadcast)."""
    if metric == "identity":
        return u
    check_metric(metric)
    if kind == "cross_entropy":
        p = torch.softmax(out, -1)
        # (diag(p) − p pᵀ) u  without forming the C×C matrix
        return p * u - p * (p * u).sum(-1, keepdim=True)
    return u * _metric_scale(kind, out.shape[-1])


def metric_matrix(kind: str, out: torch.Tensor, metric: str = "fisher") -> torch.Tensor:
    """H_n as dense matrices, shape (N, C, C)."""
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device).expand(n, c, c)
    if metric == "identity":
        return eye.clone()
    check_metric(metric)
    if kind == "cross_entropy":
        p = torch.softmax(out, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return eye * _metric_scale(kind, c)


def metric_sqrt(kind: str, out: torch.Tensor, metric: str = "fisher") -> torch.Tensor:
    """Vectors u_{n,k} with Σ_k u_{n,k} u_{n,k}ᵀ = H_n; shape (N, K, C) with K = C.

    Back-propagating each u_{n,k} gives the exact expectation of K-FAC's G factor under the metric
    (no Monte-Carlo sampling). For softmax cross-entropy u_{n,k} = √p_k (e_k − p):
    Σ_k p_k (e_k − p)(e_k − p)ᵀ = diag(p) − p pᵀ since Σ_k p_k = 1.
    """
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    if metric == "identity":
        return eye.expand(n, c, c).clone()
    check_metric(metric)
    if kind == "cross_entropy":
        p = torch.softmax(out, 1)  # (N, C)
        return p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
    return eye.expand(n, c, c) * _metric_scale(kind, c) ** 0.5


def metric_pinv_norm(kind: str, out: torch.Tensor, y: torch.Tensor, metric: str = "fisher") -> torch.Tensor:
    """E_n[∇ℓ_nᵀ H_n⁺ ∇ℓ_n]: the largest value η can take under the metric (identity: E‖∇_y ℓ‖²).

    Logged next to E‖∇_y ℓ‖² so that the absolute score can be read on either scale.
    """
    r = output_grad(kind, out, y)
    if metric == "identity":
        return r.pow(2).sum(1).mean()
    h = metric_matrix(kind, out, metric)
    return torch.einsum("nc,ncd,nd->n", r, torch.linalg.pinv(h, hermitian=True), r).mean()


# --------------------------------------------------------------------------- parameters as vectors


def named_trainable(model: nn.Module, params: Iterable[nn.Parameter] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Name -> parameter for ``params`` (default: every parameter that requires grad), model order."""
    if params is None:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    wanted = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, t in like.items():
        out[name] = vec[i:i + t.numel()].view_as(t)
        i += t.numel()
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, parameters {i}")
    return out


# --------------------------------------------------------------------------- dense oracle


def output_jacobian(model: nn.Module, x: torch.Tensor,
                    params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample Jacobians J_n = ∂y_n/∂θ stacked as (N, C, P), θ = ``params`` flattened in order."""
    params = {n: p.detach() for n, p in (params or named_trainable(model)).items()}

    def one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)  # name -> (N, C, *shape)
    n, c = x.shape[0], next(iter(jac.values())).shape[1]
    return torch.cat([jac[k].reshape(n, c, -1) for k in params], dim=2)


def gauss_newton(model: nn.Module, x: torch.Tensor, kind: str, metric: str = "fisher",
                 params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """F = (1/N) Σ_n J_nᵀ H_n J_n as a dense (P, P) matrix."""
    jac = output_jacobian(model, x, params)
    with torch.no_grad():
        out = model(x)
    h = metric_matrix(kind, out, metric)
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / x.shape[0]


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
                  params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """g = ∇_θ (1/N) Σ ℓ_n, flattened like :func:`output_jacobian`."""
    params = params or named_trainable(model)
    loss = per_sample_loss(kind, model(x), y).mean()
    return flatten(torch.autograd.grad(loss, list(params.values())))


def natural_gradient_dense(F_: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """x = (F + λI)⁻¹ g by a dense solve (the reference for the CG solver)."""
    eye = torch.eye(F_.shape[0], dtype=F_.dtype, device=F_.device)
    return torch.linalg.solve(F_ + damping * eye, g)


def eta_dense(F_: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """η = gᵀ (F + λI)⁻¹ g (Mitchell et al. 2023, the natural expansion score; the score bound)."""
    return g @ natural_gradient_dense(F_, g, damping)


def eta_output_space(jac: torch.Tensor, r: torch.Tensor, damping: float) -> torch.Tensor:
    """η with the identity metric computed in output space (push-through identity).

    With J stacked over samples (NC × P), E the stacked output gradients, g = JᵀE/N and F = JᵀJ/N:
    gᵀ(F + λI)⁻¹g = (1/N) Eᵀ K (K + λN·I)⁻¹ E with K = JJᵀ.

    Args:
        jac: (N, C, P) per-sample Jacobians.
        r: (N, C) output gradients ∇_y ℓ_n.
    """
    n = jac.shape[0]
    j = jac.reshape(-1, jac.shape[2])
    e = r.reshape(-1)
    k = j @ j.T
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return e @ (k @ torch.linalg.solve(k + damping * n * eye, e)) / n
