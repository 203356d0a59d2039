"""The approximations of Golubeva et al. 2021 (App. F.1) and reference values for them.

Only the paper's own statements are asserted for eq. (4); we do NOT assert that eq. (4) matches the
exact D for p <~ 0.1 (an independent numerical check of Theorem 1 shows it does not).
"""

import math

import pytest
import torch

from widthlab.theory import (
    diagonal_distance_approx,
    eq4_distance,
    eq4_integer_minimiser,
    p_star,
    variance_only_distance,
)


def test_p_star_fig8_setting():
    """N = 8, d = 784: p* = sqrt(N/(4d)) = 0.0505 and n* = N/p* ~ 158."""
    assert round(p_star(784, 8), 4) == 0.0505
    assert round(8 / p_star(784, 8)) == 158


def test_p_star_is_a_connectivity():
    """sqrt(N/(4d)) exceeds 1 once N > 4d (d = 10, N = 100: 1.58); a connectivity is at most 1."""
    assert p_star(10, 100) == 1.0
    assert p_star(10, 40) == 1.0  # N = 4d: exactly 1
    got = p_star(784, torch.tensor([8.0, 4 * 784.0, 40_000.0], dtype=torch.float64))
    assert got[0].item() == pytest.approx(math.sqrt(8 / 3136), rel=1e-15)
    assert got[1:].tolist() == [1.0, 1.0]


def test_eq4_integer_minimiser_is_170():
    assert eq4_integer_minimiser(784, 8) == 170
    n = torch.arange(8, 6273, dtype=torch.float64)
    values = eq4_distance(784, n, 8 / n)
    assert values.argmin().item() + 8 == 170  # independent scan
    assert eq4_integer_minimiser(784, 8, n_max=100) == 100  # a capped scan ends on its boundary


def test_eq4_values_quoted_in_spec():
    """Reference values of eq. (4) at N = 8: n = 128 gives 2.47e-3 and n = 512 gives 4.3e-3."""
    assert eq4_distance(784, 128, 8 / 128) == pytest.approx(2.47e-3, abs=5e-6)  # as rounded in the reference
    assert eq4_distance(784, 512, 8 / 512) == pytest.approx(4.3e-3, abs=5e-5)


def test_dense_limits_and_diagonal_value():
    for n in (64, 1000):
        limit = (1 - 1 / math.pi**2) / (4 * n)
        assert eq4_distance(784, n, 1.0) == pytest.approx(limit, rel=1e-12)  # bias term vanishes at p = 1
        assert variance_only_distance(784, n, 1.0) == pytest.approx(limit, rel=1e-12)
    assert diagonal_distance_approx(784, 100, 0.1) == pytest.approx(0.0129, abs=5e-5)  # the paper's App. F.1


def test_elementwise_over_tensors():
    n = torch.tensor([100.0, 200.0])
    p = torch.tensor([0.1, 0.05])
    out = variance_only_distance(784, n, p)
    assert out.shape == (2,)
    assert out[1].item() == pytest.approx(variance_only_distance(784, 200.0, 0.05))
