"""Arc-cosine kernels: closed form (Cho & Saul 2009; Theorem 1 of Golubeva et al. 2021) against plain
Monte-Carlo integration.

K_l(a, b) = E_{w ~ N(0, I)}[(w.a)^l (w.b)^l H(w.a) H(w.b)] is estimated by averaging the integrand
over w draws; the closed form must lie within 4 standard errors, as neural-tangents tests its
kernels against ``monte_carlo_kernel_fn``.
"""

import math

import pytest
import torch

from widthlab.theory import arccos_j, arccos_kernel, arccos_kernel_from_gram, infinite_width_theta

F64 = torch.float64  # explicit everywhere: a global default dtype would leak into other test modules


def _pairs(d=6, seed=0):
    """Random, near-parallel, anti-parallel, near-anti-parallel and orthogonal pairs, shape (P, d)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, d, generator=g, dtype=F64)
    b = torch.randn(8, d, generator=g, dtype=F64)
    b[2] = 3.0 * a[2] + 1e-3 * torch.randn(d, generator=g, dtype=F64)  # near-parallel
    b[3] = 2.0 * a[3]  # parallel
    b[4] = -0.5 * a[4]  # anti-parallel: K_l = 0
    b[5] = -a[5] + 0.05 * torch.randn(d, generator=g, dtype=F64)  # near-anti-parallel
    b[6] = b[6] - (b[6] @ a[6]) / (a[6] @ a[6]) * a[6]  # orthogonal
    return a, b


def test_diagonal_values_exact():
    """K_1(a, a) = |a|^2/2 and K_2(a, a) = 3|a|^4/2 (arc-cosine closed form), and K_0(a, a) = 1/2."""
    a = torch.randn(50, 784, generator=torch.Generator().manual_seed(1), dtype=F64)
    sq = (a * a).sum(-1)
    torch.testing.assert_close(arccos_kernel(a, a, 1), sq / 2, rtol=1e-13, atol=0)
    torch.testing.assert_close(arccos_kernel(a, a, 2), 1.5 * sq**2, rtol=1e-13, atol=0)
    torch.testing.assert_close(arccos_kernel(a, a, 0), torch.full_like(sq, 0.5), rtol=1e-13, atol=0)


@pytest.mark.parametrize("l", [0, 1, 2])
def test_closed_form_matches_monte_carlo_integration(l):
    a, b = _pairs()
    # One set of draws for every pair (common random numbers).
    w = torch.randn(400_000, a.shape[1], generator=torch.Generator().manual_seed(2), dtype=F64)
    wa, wb = w @ a.T, w @ b.T  # (M, P)
    integrand = (wa.clamp_min(0) * wb.clamp_min(0)) ** l * ((wa > 0) & (wb > 0))
    mc, se = integrand.mean(0), integrand.std(0) / w.shape[0] ** 0.5
    closed = arccos_kernel(a, b, l)
    assert (closed - mc).abs().le(4 * se + 1e-12 * closed.abs().max()).all(), (closed, mc, se)
    assert closed[4].abs() < 1e-12 * closed.abs().max()  # anti-parallel


def test_zero_vector_gives_zero_and_no_nan():
    a = torch.zeros(3, 5, dtype=F64)
    b = torch.randn(3, 5, dtype=F64)
    for l in (0, 1, 2):
        assert torch.equal(arccos_kernel(a, b, l), torch.zeros(3, dtype=F64))
        assert torch.equal(arccos_kernel(b, a, l), torch.zeros(3, dtype=F64))
    aa = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    arccos_kernel_from_gram(aa, torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), 1).sum().backward()
    assert torch.isfinite(aa.grad).all()


def test_j_endpoints_and_homogeneity():
    theta = torch.tensor([0.0, math.pi / 2, math.pi], dtype=F64)
    j1 = torch.tensor([math.pi, 1.0, 0.0], dtype=F64)
    j2 = torch.tensor([3 * math.pi, math.pi / 2, 0.0], dtype=F64)
    torch.testing.assert_close(arccos_j(theta, 1), j1, atol=1e-15, rtol=0)
    torch.testing.assert_close(arccos_j(theta, 2), j2, atol=1e-15, rtol=0)
    a, b = _pairs()
    # K_l(s a, t b) = s^l t^l K_l(a, b): the identity the sparse kernel uses to absorb sigma^2 = 1/p.
    torch.testing.assert_close(arccos_kernel(2.0 * a, 0.5 * b, 2), arccos_kernel(a, b, 2))
    torch.testing.assert_close(arccos_kernel(3.0 * a, b, 1), 3.0 * arccos_kernel(a, b, 1))
    with pytest.raises(ValueError):
        arccos_j(theta, 3)


def test_batched_broadcast_and_theta_inf():
    a = torch.randn(4, 1, 7, dtype=F64)
    b = torch.randn(1, 5, 7, dtype=F64)
    out = arccos_kernel(a, b, 1)
    assert out.shape == (4, 5)
    torch.testing.assert_close(out[2, 3], arccos_kernel(a[2, 0], b[0, 3], 1))
    torch.testing.assert_close(infinite_width_theta(a[:, 0], a[:, 0]), (a[:, 0] ** 2).sum(-1) / (2 * 7))
