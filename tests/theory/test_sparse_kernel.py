"""Sparse kernels K~_{l,p} (Golubeva et al. 2021, Theorem 1) by mask Monte Carlo.

In small d the mask sum has 2^d terms and is computed exactly; the mask-MC estimate must agree within
4 of its own standard errors, and so must a plain Monte-Carlo integral over spike-and-slab weights
w_i = s_i g_i / sqrt(p), which uses neither masks nor the closed form.
"""

import itertools

import pytest
import torch

from widthlab.theory import arccos_kernel, sparse_kernel
from widthlab.theory.sparse_kernel import masked_kernel_samples

F64 = torch.float64


def _exact_sparse_kernels(x, y, p):
    """sum_s p^|s| (1 - p)^(d - |s|) sigma^2l K_l(x_s, y_s) over all 2^d masks, for l = 1, 2."""
    d = x.shape[1]
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=F64)  # (2^d, d)
    k = masked_kernel_samples(x, y, masks, p)  # (2^d, 2P)
    size = masks.sum(1, keepdim=True)
    weight = p**size * (1 - p) ** (d - size)
    z = (weight * k).sum(0)
    P = x.shape[0]
    return z[:P], z[P:]


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_mask_mc_matches_exact_mask_sum_and_weight_mc(p):
    g = torch.Generator().manual_seed(0)
    d, P = 10, 6
    x = torch.randn(P, d, generator=g, dtype=F64)
    y = torch.randn(P, d, generator=g, dtype=F64)
    y[0] = x[0]  # diagonal pair
    y[1] = -x[1] + 0.1 * torch.randn(d, generator=g, dtype=F64)
    k1_exact, k2_exact = _exact_sparse_kernels(x, y, p)

    est = sparse_kernel(x, y, p, num_masks=20_000, seed=1)
    assert (est.k1 - k1_exact).abs().le(4 * est.k1_se).all()
    assert (est.k2 - k2_exact).abs().le(4 * est.k2_se).all()

    # Plain MC over spike-and-slab weights, no masks and no closed form.
    M = 200_000
    w = torch.randn(M, d, generator=g, dtype=F64) * (torch.rand(M, d, generator=g, dtype=F64) < p) / p**0.5
    hx, hy = (w @ x.T).clamp_min(0), (w @ y.T).clamp_min(0)  # (M, P)
    for l, exact in ((1, k1_exact), (2, k2_exact)):
        f = (hx * hy) ** l
        assert (f.mean(0) - exact).abs().le(4 * f.std(0) / M**0.5).all()


def test_p_one_is_exact_dense_kernel():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 5, 784, generator=g, dtype=F64)
    est = sparse_kernel(x, y, 1.0)
    assert est.num_masks == 1 and torch.count_nonzero(est.cov) == 0
    torch.testing.assert_close(est.k1, arccos_kernel(x, y, 1), rtol=1e-13, atol=0)
    torch.testing.assert_close(est.k2, arccos_kernel(x, y, 2), rtol=1e-13, atol=0)


def test_diagonal_mean_is_unbiased_and_chunking_is_invisible():
    """On x = y, K~_{1,p} = sigma^2 E_s|x_s|^2 / 2 = |x|^2 / 2 exactly; and the chunked running
    covariance equals the covariance of all samples at once."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 784, generator=g, dtype=F64)
    est = sparse_kernel(x, x, 0.1, num_masks=6000, seed=5)  # > one chunk (5190 masks at d = 784, P = 3)
    assert ((est.k1 - (x * x).sum(1) / 2).abs() <= 4 * est.k1_se).all()

    gen = torch.Generator().manual_seed(6)
    est_a = sparse_kernel(x, x, 0.1, num_masks=6000, seed=gen)
    gen = torch.Generator().manual_seed(6)
    masks = (torch.rand(6000, 784, generator=gen, dtype=F64) < 0.1).to(F64)
    z = masked_kernel_samples(x, x, masks, 0.1)
    torch.testing.assert_close(est_a.k1, z[:, :3].mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(est_a.cov, torch.cov(z.T), rtol=1e-9, atol=1e-9 * z.var(0).max().item())


def test_rejects_bad_connectivity():
    x = torch.randn(2, 4, dtype=F64)
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            sparse_kernel(x, x, p)
