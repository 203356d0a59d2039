"""Theorem 1 of Golubeva et al. 2021 (§3, App. F): mask Monte Carlo against network Monte Carlo.

The two estimators share nothing but the inputs: one evaluates D = (K~_1 - K_1)^2/d^2 +
(K~_2 - K~_1^2)/(d^2 n) with K~ averaged over masks in closed form; the other samples whole sparse
networks and averages (Theta - Theta_inf)^2. Both are unbiased for the same pair-averaged D, so
they must agree within 3 combined standard errors (the settings of an independent reference check:
d = 784, 30 Gaussian pairs).
"""

import math

import pytest
import torch

from widthlab.theory import (
    diagonal_distance,
    diagonal_distance_approx,
    network_distance_mc,
    sample_pairs,
    theorem1_distance,
    variance_only_distance,
)

D_IN = 784


@pytest.fixture(scope="module")
def pairs30():
    return sample_pairs(30, d=D_IN, seed=0)


@pytest.mark.parametrize(("n", "p", "networks"), [(200, 0.1, 200), (400, 0.02, 150), (64, 1.0, 400)])
def test_theorem1_matches_network_mc(pairs30, n, p, networks):
    x, y = pairs30
    exact = theorem1_distance(x, y, n, p, seed=1)
    net = network_distance_mc(x, y, n, p, num_networks=networks, seed=2)
    combined = math.hypot(exact.D_se, net.D_se)
    assert abs(exact.D - net.D) < 3 * combined, (exact, net)
    # The network estimate must be informative, not passing by a huge error bar.
    assert net.D_se < 0.04 * net.D
    assert abs(exact.D - (exact.bias_sq + exact.variance_term)) < 1e-15


def test_spec_value_at_n200_p01(pairs30):
    """Reference check: D ~ 1.2e-3 (network MC 1.24e-3, mask MC 1.18e-3, on other random pairs). Its
    pairs differ from ours, so the tolerance is our D's error as an estimate of the mean over
    Gaussian pairs (pairs_se), plus the mask error."""
    x, y = pairs30
    r = theorem1_distance(x, y, 200, 0.1, seed=1)
    assert 1.0e-3 < r.D < 1.4e-3
    assert abs(r.D - 1.2e-3) < 3 * math.hypot(r.D_se, r.pairs_se)
    assert r.D_se < 0.01 * r.D  # default masks resolve D far better than the 5% asked
    # The bias term is tiny (reference check: 1e-7 to 1e-5), nothing like eq. (4)'s ~1e-3.
    assert abs(r.bias_sq) < 1e-5
    assert r.variance_term > 0.99 * r.D


def test_dense_limit():
    """p = 1: no bias, and D -> (1 - 1/pi^2)/(4n) for Gaussian pairs up to O(1/d) (Theorem 1's dense limit).

    The mask average is exact at p = 1, so the only error is the pair sampling (pairs_se); the
    O(1/d) curvature of J_l around theta = pi/2 adds about 0.2%, allowed for by 2/d."""
    x, y = sample_pairs(400, d=D_IN, seed=3)
    for n in (64, 1000):
        r = theorem1_distance(x, y, n, 1.0)
        limit = (1 - 1 / math.pi**2) / (4 * n)
        assert r.D_se == 0 and abs(r.bias_sq) < 1e-20
        assert abs(r.D - limit) < 3 * r.pairs_se + 2 / D_IN * limit, (r.D, limit, r.pairs_se)


def test_diagonal_closed_form_mask_mc_network_mc_and_paper_approx():
    """x = y at n = 100, p = 0.1 (reference network MC 0.0133; the paper's App. F.1 formula 0.0129)."""
    x = sample_pairs(30, d=D_IN, seed=4)[0]
    exact = diagonal_distance(x, 100, 0.1)  # (P,) closed form
    mask = theorem1_distance(x, x, 100, 0.1, seed=5)
    net = network_distance_mc(x, x, 100, 0.1, num_networks=200, seed=6)
    assert abs(mask.D - exact.mean().item()) < 3 * mask.D_se
    assert abs(net.D - exact.mean().item()) < 3 * net.D_se
    assert abs(net.D - 0.013) < 0.1 * 0.013
    assert abs(diagonal_distance_approx(D_IN, 100, 0.1) - net.D) < 0.05 * net.D


@pytest.mark.parametrize(("n", "p"), [(200, 0.1), (128, 8 / 128), (400, 0.02)])
def test_variance_only_approximation_within_5_percent(n, p):
    """A variance-only approximation (not the paper's): (1/4n)[(1 - 1/pi^2) + 3(1 - p)/(dp)] within a few %
    of exact D for dp >= 3. 300 pairs make the pair-sampling error (~0.6%) small next to the tolerance."""
    x, y = sample_pairs(300, d=D_IN, seed=7)
    r = theorem1_distance(x, y, n, p, num_masks=2048, seed=8)
    approx = variance_only_distance(D_IN, n, p)
    assert abs(r.D - approx) < 0.05 * r.D


def test_standard_errors_are_calibrated(pairs30):
    """The spread of D over independent mask seeds matches the reported SE (delta method plus the
    quadratic term), for D and for the near-zero bias term where the first-order term vanishes."""
    x, y = pairs30
    runs = [theorem1_distance(x, y, 200, 0.1, num_masks=256, seed=s) for s in range(40)]
    D = torch.tensor([r.D for r in runs])
    B = torch.tensor([r.bias_sq for r in runs])
    D_se = torch.tensor([r.D_se for r in runs]).mean()
    B_se = torch.tensor([r.bias_sq_se for r in runs]).mean()
    assert 0.6 < (D.std() / D_se).item() < 1.5
    assert 0.5 < (B.std() / B_se).item() < 2.0


def test_debiasing_removes_the_var_over_m_excess(pairs30):
    """With few masks the squared MC mean overstates the bias term by Var/M on average; the
    debiased estimator agrees with a 32x larger run, the plain one does not."""
    x, y = pairs30
    ref = theorem1_distance(x, y, 200, 0.1, num_masks=8192, seed=100).bias_sq
    deb = torch.tensor([theorem1_distance(x, y, 200, 0.1, num_masks=256, seed=s).bias_sq for s in range(20)])
    raw = torch.tensor([theorem1_distance(x, y, 200, 0.1, num_masks=256, seed=s, debias=False).bias_sq
                        for s in range(20)])
    excess = (raw - deb).mean()
    assert excess > 0
    assert abs(deb.mean() - ref) < 3 * deb.std() / 20**0.5 + 3e-7
    assert raw.mean() - ref > 3 * raw.std() / 20**0.5


def test_network_mc_seeds_and_shapes(pairs30):
    x, y = pairs30
    a = network_distance_mc(x[:3], y[:3], 16, 0.5, num_networks=4, seed=0)
    b = network_distance_mc(x[:3], y[:3], 16, 0.5, num_networks=4, seed=0)
    c = network_distance_mc(x[:3], y[:3], 16, 0.5, num_networks=4, seed=1)
    assert a.D == b.D and a.D != c.D and a.per_pair.shape == (3,)
    with pytest.raises(ValueError):
        network_distance_mc(x, y, 16, 0.5, num_networks=1)


def test_many_pairs_run_in_independent_blocks():
    """P = 1100 pairs span three blocks of masks; on x = y the exact closed form must still lie
    within 3 of the combined standard errors."""
    x = torch.randn(1100, 50, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = theorem1_distance(x, x, 30, 0.3, num_masks=512, seed=10)
    assert r.per_pair.shape == (1100,) and r.D_se > 0
    assert abs(r.D - diagonal_distance(x, 30, 0.3).mean().item()) < 3 * r.D_se
