"""Arc-cosine kernels K_l of Cho & Saul (2009), the dense infinite-width kernels of a ReLU layer.

Golubeva et al. 2021, App. F and Theorem 1:

    K_l(a, b) = E_{w ~ N(0, I)} [ (w.a)^l (w.b)^l H(w.a) H(w.b) ]
              = (1 / 2pi) |a|^l |b|^l J_l(theta),      theta = arccos( a.b / (|a| |b|) ),

    J_0(theta) = pi - theta
    J_1(theta) = sin(theta) + (pi - theta) cos(theta)
    J_2(theta) = 3 sin(theta) cos(theta) + (pi - theta) (1 + 2 cos^2(theta)).

K_l depends on a and b only through the Gram entries |a|^2, |b|^2 and a.b, so the general function
is :func:`arccos_kernel_from_gram`; :func:`arccos_kernel` is the special case that first forms the
Gram entries from vectors. The sparse kernels of ``sparse_kernel.py`` reuse the Gram form on masked
inputs x_s = x * s, whose Gram entries are one matrix product away.

Convention: K_l = 0 when either vector is 0 (the integrand vanishes, since w.0 = 0 and (w.0)^l = 0
for l >= 1; for l = 0 we follow the same convention because H(0) is taken as 0). This is the case
the mask Monte Carlo hits when a mask removes every nonzero entry of x or y.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ORDERS = (0, 1, 2)


def arccos_j(theta: Tensor, l: int) -> Tensor:
    """Angular part J_l(theta) of the arc-cosine kernel (Golubeva et al. 2021, Theorem 1; Cho & Saul 2009,
    eq. 6).

    Args:
        theta: angles in [0, pi], any shape.
        l: kernel order, 0, 1 or 2.

    Returns:
        J_l(theta), same shape as ``theta``. J_0(0) = pi, J_1(0) = pi, J_2(0) = 3 pi.
    """
    cos, sin = torch.cos(theta), torch.sin(theta)
    if l == 0:
        return math.pi - theta
    if l == 1:
        return sin + (math.pi - theta) * cos
    if l == 2:
        return 3.0 * sin * cos + (math.pi - theta) * (1.0 + 2.0 * cos * cos)
    raise ValueError(f"arc-cosine kernel order must be one of {ORDERS}, got {l}")


def arccos_kernel_from_gram(aa: Tensor, bb: Tensor, ab: Tensor, l: int) -> Tensor:
    """K_l(a, b) from the Gram entries |a|^2, |b|^2 and a.b (Golubeva et al. 2021, Theorem 1, closed form).

    K_l = (1/2pi) (|a|^2 |b|^2)^{l/2} J_l(theta), with K_l = 0 where |a| |b| = 0.

    Args:
        aa: squared norms |a|^2, any shape broadcastable with ``bb`` and ``ab``.
        bb: squared norms |b|^2.
        ab: inner products a.b.
        l: kernel order, 0, 1 or 2.

    Returns:
        K_l(a, b), the broadcast shape of the inputs.
    """
    aa, bb, ab = torch.broadcast_tensors(aa, bb, ab)
    norm2 = aa * bb  # |a|^2 |b|^2
    zero = norm2 <= 0
    # Divide by 1 where a vector is 0 so the masked-out entries stay finite (no NaN in autograd either).
    safe = torch.where(zero, torch.ones_like(norm2), norm2)
    cos = (ab / safe.sqrt()).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    k = safe ** (0.5 * l) * arccos_j(theta, l) / (2.0 * math.pi)
    return torch.where(zero, torch.zeros_like(k), k)


def arccos_kernel(a: Tensor, b: Tensor, l: int = 1) -> Tensor:
    """K_l(a, b) for batches of vectors (Golubeva et al. 2021, Theorem 1, closed form), batched over pairs.

    Args:
        a: vectors, shape (..., d).
        b: vectors, shape (..., d), broadcastable with ``a``.
        l: kernel order, 0, 1 or 2.

    Returns:
        K_l(a, b), shape (...). Checks: K_1(a, a) = |a|^2 / 2 and K_2(a, a) = 3 |a|^4 / 2.
    """
    return arccos_kernel_from_gram((a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1), l)


def infinite_width_theta(x: Tensor, y: Tensor) -> Tensor:
    """Dense infinite-width kernel Theta_inf(x, y) = K_1(x, y) / d (Golubeva et al. 2021, Theorem 1).

    The last-layer (GP) kernel of f(x) = (n d)^{-1/2} v^T [u x]_+ as n -> infinity with dense
    u ~ N(0, I); it is deterministic.

    Args:
        x: inputs, shape (..., d).
        y: inputs, shape (..., d).

    Returns:
        Theta_inf, shape (...).
    """
    return arccos_kernel(x, y, 1) / x.shape[-1]
