"""Curvature propagation: random parameter-space vectors h whose outer product is unbiased for the
Gauss-Newton matrix plus the activations' curvature (Martens, Sutskever & Swersky 2012, "Estimating the
Hessian by back-propagating curvature"; the sampler of Mitchell et al. 2023, CNN experiments).

For a batch with summed loss Σ_n ℓ(f_n), one sample is a single backward pass of

    Φ = Σ_n (S_n ε_n)·f_n  +  Σ_layers Σ (ξ ⊙ sqrt(|g ⊙ σ''(z)|)) · z,

with S_n a square root of the loss Hessian in the outputs (cross-entropy: H = diag(p) − ppᵀ =
S Sᵀ with S = diag(√p) − p √pᵀ), z the pre-activations of every swish σ, g = ∂ℓ/∂σ(z), and ε, ξ
independent Rademacher vectors (the coefficients are constants: no gradient flows through them). Then
h = ∂Φ/∂θ satisfies

    E[h hᵀ] = Σ_n J_nᵀ H_n J_n + Σ_layers J_zᵀ diag(|g ⊙ σ''(z)|) J_z,

the generalised Gauss-Newton matrix plus the absolute value of the activations' second-order term (the
official code's positive-definite choice; ``nonlinearity=False`` leaves it out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["curvature_sample", "silu_second_derivative"]


def silu_second_derivative(z: torch.Tensor) -> torch.Tensor:
    """σ''(z) of swish σ(z) = z·sigmoid(z): s(1 − s)(2 + z(1 − 2s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _rademacher(shape, like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64)
    return (2 * r - 1).to(dtype=like.dtype, device=like.device)


def curvature_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator=None,
                     nonlinearity: bool = True, params: list[torch.Tensor] | None = None
                     ) -> list[torch.Tensor]:
    """One curvature-propagation vector h (a list shaped like ``params``, default all trainable
    parameters) for cross-entropy on the batch ``(x, y)``, loss summed over the batch (module docstring).

    ``model``'s swish layers must expose ``activation_hook`` (as :class:`~.dense_cnn.ConnLayer` does).
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    layers = [m for m in model.modules() if hasattr(m, "activation_hook")]
    acts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(z):
        a = F.silu(z)
        acts.append((z, a))
        return a

    for m in layers:
        m.activation_hook = hook
    try:
        logits = model(x)
    finally:
        for m in layers:
            m.activation_hook = None
    with torch.no_grad():
        p = torch.softmax(logits.detach(), -1)
        eps = _rademacher(p.shape, p, generator)
        sq = p.sqrt()
        # (S ε)_k = √p_k ε_k − p_k (√p·ε)
        s_eps = sq * eps - p * (sq * eps).sum(-1, keepdim=True)
    phi = (s_eps * logits).sum()
    if nonlinearity and acts:
        loss = F.cross_entropy(logits, y, reduction="sum")
        gs = torch.autograd.grad(loss, [a for _, a in acts], retain_graph=True, allow_unused=True)
        for (z, _), g in zip(acts, gs):
            if g is None:
                continue
            with torch.no_grad():
                c = (g * silu_second_derivative(z.detach())).abs().sqrt() * _rademacher(z.shape, z, generator)
            phi = phi + (c * z).sum()
    hs = torch.autograd.grad(phi, params, allow_unused=True)
    return [torch.zeros_like(q) if h is None else h for q, h in zip(params, hs)]
