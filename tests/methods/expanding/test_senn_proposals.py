"""Proposal samplers (SENN, Mitchell et al. 2023): a correct MALA samples its target; the official variant's
sign bug is reproduced; ascent and MALA raise Δη′ over random candidates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rounding import assert_equal_up_to_rounding
from widthlab.methods.expanding import kfac, proposals, scores, unit_score
from widthlab.nn.rational import RationalActivation

DT = torch.float64


def test_correct_mala_samples_its_target():
    """s(θ) = a·θ₀ with prior N(0, I) and T = 1: π = N(a e₀, I). Mean and variance of 400 chains."""
    a = 1.5
    fn = lambda th: a * th[:, 0]  # noqa: E731
    theta0 = torch.zeros(300, 2, dtype=DT)
    g = torch.Generator().manual_seed(0)
    res = proposals.mala(fn, theta0, bursts=20, steps=10, step_size=0.5, generator=g)
    mean, var = res.theta.mean(0), res.theta.var(0)
    assert abs(mean[0] - a) < 0.2 and abs(mean[1]) < 0.2
    assert (var - 1).abs().max() < 0.3
    assert 0.3 < res.accept_rate < 0.95


def test_official_mala_has_the_sign_bug():
    """The official drift uses +½∇s as ∇U, so its proposals drift *down* the score; only its heuristic
    acceptance (biased toward higher scores) pulls the chains up. On s = 3θ₀ (target mean 3) the correct
    chains reach the target, the official ones stay far below it."""
    fn = lambda th: 3.0 * th[:, 0]  # noqa: E731
    theta0 = torch.zeros(200, 2, dtype=DT)
    correct = proposals.mala(fn, theta0, bursts=10, steps=10, generator=torch.Generator().manual_seed(1))
    official = proposals.mala(fn, theta0, bursts=10, steps=10, variant="official",
                              generator=torch.Generator().manual_seed(1))
    assert abs(correct.theta[:, 0].mean() - 3.0) < 0.3
    assert official.theta[:, 0].mean() < 0.5 * correct.theta[:, 0].mean()


def _score_setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 3), RationalActivation(3), nn.Linear(3, 1)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(50, 1, generator=g, dtype=DT)
    y = torch.sin(3 * x)
    obs = kfac.observe(net, x, y, "mse")
    lay = obs.layers["2"]
    a, e = lay.a_rows, lay.e_rows["grad"]
    A_pinv = scores.psd_pinv(lay.factors.A)
    gbar = a.T @ e / obs.n
    G_inv = scores.psd_pinv(scores.damp(lay.factors.G, 0.1))
    eta = scores.layer_eta(gbar, A_pinv, G_inv)
    r_perp = scores.residual_rows(a, e, A_pinv, gbar)
    layout = proposals.UnitLayout(1, 1)
    fn = proposals.unit_score_fn(lambda th: proposals.unit_features(layout, th, x), r_perp, G_inv, obs.n, eta)
    return layout, fn, x


def test_features_match_the_rational_activation_and_layout_round_trips():
    layout = proposals.UnitLayout(2, 3)
    theta = proposals.random_candidates(layout, 4, generator=torch.Generator().manual_seed(0))
    assert theta.shape == (4, layout.size)
    torch.testing.assert_close(layout.join(layout.split(theta)), theta)
    x = torch.randn(7, 3, dtype=DT)
    f = proposals.unit_features(layout, theta, x)
    p = layout.split(theta)
    act = RationalActivation(2, dtype=DT)
    with torch.no_grad():
        act.v.copy_(p["v"][1]), act.c.copy_(p["c"][1]), act.l.copy_(p["l"][1])
        torch.testing.assert_close(f[1], act(x @ p["W"][1].T + p["b"][1]))


@pytest.mark.numerics
@pytest.mark.parametrize("k", [1, 3])
def test_closed_form_score_gradient_matches_autograd(k):
    """UnitScore: the same s(θ) as the generic feature score, and ∂s/∂θ in closed form == autograd."""
    g = torch.Generator().manual_seed(k)
    n, d, m = 40, 3, 2
    h = torch.randn(n, d, generator=g, dtype=DT)
    r = torch.randn(n, m, generator=g, dtype=DT)
    G_inv = torch.linalg.inv(r.T @ r / n + 0.1 * torch.eye(m, dtype=DT))
    layout = proposals.UnitLayout(k, d)
    theta = proposals.random_candidates(layout, 5, generator=g)
    theta[0, -k:] = 0.0  # l = 0 on one candidate: the norm still involves v, c
    # no jitter: the closed form ignores how the jitter's trace term moves with f
    us = unit_score.UnitScore.single(layout, h, r, G_inv, n, norm=0.7, jitter=0.0)
    generic = proposals.unit_score_fn(lambda th: proposals.unit_features(layout, th, h), r, G_inv, n, 0.7,
                                      jitter=0.0)
    torch.testing.assert_close(us(theta), generic(theta), rtol=1e-10, atol=1e-14)
    s, grad = us.value_and_grad(theta)
    t = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(generic(t).sum(), t)
    # Two summation orders of sums over the n samples, through a solve against A_f (k x k), of terms
    # that cancel: ∂s/∂f_n = (2/N)(r_n − M f_n)G⁻¹Mᵀ/η. Magnitude: A_f's condition number (Higham,
    # eq. 7.2) times Σ_n (2/N)(|r_n| + |M||f_n|)|G⁻¹||M|ᵀ/η times the largest |∂f/∂θ| (|h| + 1 times
    # the rational's slope, at most 3); terms: the n samples of each sum, three sums deep.
    f = proposals.unit_features(layout, theta, h)  # (P, n, k)
    A_f = f.transpose(1, 2) @ f / n
    M = torch.linalg.solve(A_f, f.transpose(1, 2) @ r / n)  # (P, k, m)
    gf = (2 / n) * (r.abs() + f.abs() @ M.abs()) @ G_inv.abs() @ M.abs().transpose(1, 2) / 0.7
    slope = 3 * (float(h.abs().max()) + 1)
    mag = float(torch.linalg.cond(A_f).max()) * float(gf.sum(1).max()) * slope
    assert_equal_up_to_rounding(grad, want, terms=3 * n, magnitude=mag)


def _sites(g, n, dims):
    """Sites with fan-in d and consumer width m each, random residuals and G⁻¹."""
    out = []
    for d, m in dims:
        h = torch.randn(n, d, generator=g, dtype=DT)
        r = torch.randn(n, m, generator=g, dtype=DT)
        G_inv = torch.linalg.inv(r.T @ r / n + 0.1 * torch.eye(m, dtype=DT))
        out.append(unit_score.Site(h, r, G_inv, float(torch.rand((), generator=g, dtype=DT)) + 0.5))
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("k", [1, 3])
def test_batched_score_equals_the_per_candidate_formula(k):
    """One UnitScore over three sites of different fan-in d and consumer width m (rows padded to the
    largest): every row's score equals Δη′/η of that candidate alone (scores.delta_eta_lb on its own
    features), its gradient equals autograd of the per-candidate formula, and padding gets no gradient."""
    g = torch.Generator().manual_seed(10 + k)
    n, count, dims = 30, 4, [(2, 3), (5, 1), (3, 4)]
    sites = _sites(g, n, dims)
    us = unit_score.UnitScore(k, sites, n, jitter=0.0)
    assert us.layout.d == 5
    own = [proposals.random_candidates(lay, count, generator=g) for lay in us.layouts]
    theta = torch.cat([us.pad_rows(t, i) for i, t in enumerate(own)])
    s, grad = us.value_and_grad(theta)
    mask = us.mask(theta.shape[0])
    assert mask.sum(1).tolist() == [lay.size for lay in us.layouts for _ in range(count)]
    assert (grad[~mask] == 0).all()
    for i, (lay, site) in enumerate(zip(us.layouts, sites)):
        rows = slice(i * count, (i + 1) * count)
        want = unit_score.delta_eta_rows(lay, own[i], site, n)
        torch.testing.assert_close(s[rows], want, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(us.unpad_rows(theta[rows], i), own[i], rtol=0, atol=0)
        t = own[i].clone().requires_grad_(True)
        (g_want,) = torch.autograd.grad(unit_score.delta_eta_rows(lay, t, site, n).sum(), t)
        torch.testing.assert_close(us.unpad_rows(grad[rows], i), g_want, rtol=1e-9, atol=1e-12)


def test_masked_mala_keeps_padding_at_zero_and_rows_independent():
    """MALA over padded rows: padding stays exactly 0 and the real coordinates move."""
    g = torch.Generator().manual_seed(3)
    sites = _sites(g, 25, [(1, 2), (3, 2)])
    us = unit_score.UnitScore(1, sites, 25, jitter=1e-10)
    theta = torch.cat([us.pad_rows(proposals.random_candidates(lay, 6, generator=g), i)
                       for i, lay in enumerate(us.layouts)])
    mask = us.mask(theta.shape[0])
    for variant in proposals.MALA_VARIANTS:
        res = proposals.mala(us, theta, bursts=3, steps=5, variant=variant, generator=g, mask=mask)
        assert (res.theta[~mask] == 0).all() and not torch.equal(res.theta[mask], theta[mask])
        torch.testing.assert_close(res.score, us(res.theta))
    asc = proposals.ascent(us, theta, steps=5, lr=0.05, mask=mask)
    assert (asc.theta[~mask] == 0).all()


def test_refinement_raises_the_score():
    layout, fn, _ = _score_setup()
    g = torch.Generator().manual_seed(2)
    theta = proposals.random_candidates(layout, 16, generator=g)
    s0 = fn(theta)
    asc = proposals.ascent(fn, theta, steps=40, lr=0.05)
    assert (asc.score >= s0 - 1e-12).all() and asc.score.mean() > s0.mean()
    # T = 0.01: a target sharp enough that 60 steps raise the score for every seed tried (0-7); at
    # T = 0.05 one seed in eight of either sampler's random stream ends below 0.9 x the best start.
    mal = proposals.mala(fn, theta, bursts=6, steps=10, temperature=0.01, generator=g)
    torch.testing.assert_close(mal.score, fn(mal.theta))
    assert mal.score.max() >= s0.max() * 0.9 and mal.score.mean() > s0.mean()


def test_selection():
    s = torch.tensor([0.1, 3.0, 0.2], dtype=DT)
    assert proposals.select(s) == 1
    picks = [proposals.select(s, "sample", 0.1, torch.Generator().manual_seed(i)) for i in range(20)]
    assert picks.count(1) >= 18


@pytest.mark.numerics
def test_official_sampler_gradient_scales_the_residual_term_by_sqrt_eta():
    """Defect: the "official" variant followed half of ∂s/∂θ. The official code divides the correlation
    by √η, c = C/√η (so that s = tr(cᵀA_f⁻¹cG⁻¹) = Δη′/η), and back-propagates the cotangent
    A_f⁻¹ c G⁻¹ (r_⊥,n − cᵀ A_f⁻¹ f_n) per sample (batch mean): built here by autograd through the
    features, not from the closed-form gradient under test."""
    g = torch.Generator().manual_seed(11)
    n, d, m = 30, 3, 2
    h = torch.randn(n, d, generator=g, dtype=DT)
    r = torch.randn(n, m, generator=g, dtype=DT)
    b = torch.randn(m, m, generator=g, dtype=DT)
    G_inv = torch.linalg.inv(b @ b.T + torch.eye(m, dtype=DT))
    eta = 0.37  # far from 1, so √η and η differ
    us = unit_score.UnitScore(1, [unit_score.Site(h, r, G_inv, eta)], n, jitter=0.0)
    layout = us.layouts[0]
    theta = proposals.random_candidates(layout, 5, generator=g)
    s, got = us.official_value_and_grad(theta)
    t = theta.clone().requires_grad_(True)
    f = proposals.unit_features(layout, t, h)[..., 0]  # (P, N)
    with torch.no_grad():
        c = (f @ r / n) / eta ** 0.5  # (P, m)
        a_f = (f * f).sum(1, keepdim=True) / n  # (P, 1)
        resid = r[None] - (f / a_f)[..., None] * c[:, None, :]  # r_⊥,n − cᵀA_f⁻¹f_n, (P, N, m)
        cot = torch.einsum("pm,mk,pnk->pn", c / a_f, G_inv, resid) / n
        want_s = (c @ G_inv * c).sum(1) / a_f[:, 0]
    (want,) = torch.autograd.grad(f, t, cot)
    torch.testing.assert_close(s, want_s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
