"""Bernoulli(p) masks of the theory's Monte Carlo keep each entry with probability p itself, down to
tiny p (paper §3: each first-layer weight is nonzero with probability p).

A uniform draw compared with p keeps an entry with probability ceil(p / q) q on a grid of step q.
float32 uniforms have q = 2^-24, so below p = 2^-24 every entry is kept with probability 2^-24 at
least, and at p ~ 4e-6 the rate is off by up to 1.5%. The tests take p = 2^-30 and 2^27 entries: the
right rate expects 0.125 kept entries (P(kept > 2) = 3e-4), a 2^-24 grid expects 8 (P(kept <= 2)
= 0.014).

The sparse kernel's mask count is read off the estimate itself: for x = y = (1, ..., 1),
K_1(x_s, x_s) = |x_s|^2 / 2 = |s| / 2 (Cho & Saul's J_1(0) = pi), so the mask mean of
sigma^2 K_1(x_s, x_s) is (kept entries) / (2 p M).
"""

import torch

from widthlab.theory import sample_sparse_weights, sparse_kernel

P_TINY = 2.0**-30
ENTRIES = 2**27


def test_sparse_kernel_masks_keep_with_probability_p_at_tiny_p():
    d = 2**14
    M = ENTRIES // d
    x = torch.ones(1, d, dtype=torch.float64)
    est = sparse_kernel(x, x, P_TINY, num_masks=M, seed=0)
    kept = est.k1.item() * 2 * P_TINY * M
    assert abs(kept - round(kept)) < 1e-6  # an integer count, as derived above
    assert round(kept) <= 2, kept


def test_network_weights_are_nonzero_with_probability_p_at_tiny_p():
    g = torch.Generator().manual_seed(0)
    kept = 0
    for _ in range(ENTRIES // 2**23):
        u = sample_sparse_weights(1, 2**11, 2**12, P_TINY, g)
        kept += int((u != 0).sum())
    assert kept <= 2, kept
