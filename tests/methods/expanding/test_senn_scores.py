"""Expansion scores of SENN (Mitchell et al. 2023): the increase Δη and its lower bound Δη′, float64.

The Schur identity: with candidate rows f appended to a layer's inputs a (zero outgoing weights, so the
back-propagated e and G do not change), the block inverse of Â = [[A, A_af], [A_fa, A_f]] gives

    η(augmented) − η = tr(Cᵀ S⁻¹ C G⁻¹) = Δη,    C = fᵀ r_⊥ / N,  S = A_f − A_fa A⁻¹ A_af,

and Δη′ = tr(Cᵀ A_f⁻¹ C G⁻¹) ≤ Δη because A_f ⪰ S. Both are invariant to any invertible mixing
f → f M of the candidates (C → MᵀC, A_f → MᵀA_fM), in particular to f → c f, and vanish when f lies in
the span of a (then r_⊥ ⟂ f).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widthlab.methods.expanding import kfac, scores
from widthlab.nn.rational import RationalActivation, rational

DT = torch.float64
# Every test here compares two computations of one value (K-FAC against the exact Fisher, a closed form
# against autograd or a block inverse): their summation orders differ.
pytestmark = pytest.mark.numerics


def _setup(seed=0, n=30, t=1):
    """Rows of a consuming layer (a with bias column, e) and a damped G⁻¹, from a real network pass."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), RationalActivation(4), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    obs = kfac.observe(net, x, y, "cross_entropy")
    lay = obs.layers["2"]
    G_inv = torch.linalg.inv(scores.damp(lay.factors.G, 0.1))
    return net, x, obs, lay, G_inv


def _eta(a_rows, e_rows, G_inv, n, t=1):
    A = a_rows.T @ a_rows / (n * t)
    gbar = a_rows.T @ e_rows / n
    return scores.layer_eta(gbar, torch.linalg.inv(A), G_inv)


def _candidates(x, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, k, generator=g, dtype=DT)
    b = torch.randn(k, generator=g, dtype=DT)
    v, c, l = (torch.randn(k, generator=g, dtype=DT) for _ in range(3))
    return rational(x @ w + b, v, c, l)


@pytest.mark.parametrize("k", [1, 3])
def test_schur_identity_and_lower_bound(k):
    net, x, obs, lay, G_inv = _setup()
    n = obs.n
    a, e = lay.a_rows, lay.e_rows["grad"]
    f = _candidates(x, k)
    A_pinv = torch.linalg.inv(lay.factors.A)
    gbar = a.T @ e / n
    r_perp = scores.residual_rows(a, e, A_pinv, gbar)
    zero = torch.zeros(a.shape[1], e.shape[1], dtype=DT)
    torch.testing.assert_close(a.T @ r_perp, zero, atol=1e-12, rtol=0)
    st = scores.candidate_stats(f, r_perp, n, a)
    S = scores.schur_complement(st.A_f, st.A_fa, A_pinv)
    d_exact = scores.delta_eta(st.C, S, G_inv)
    d_lb = scores.delta_eta_lb(st.C, st.A_f, G_inv)
    eta = _eta(a, e, G_inv, n)
    eta_aug = _eta(torch.cat([a, f], 1), e, G_inv, n)
    torch.testing.assert_close(eta_aug - eta, d_exact, rtol=1e-9, atol=1e-13)
    assert 0 <= d_lb <= d_exact * (1 + 1e-10)
    print(f"k={k}: Δη′={float(d_lb):.4g} ≤ Δη={float(d_exact):.4g}")


def test_schur_identity_with_convolution_conventions():
    """T > 1 locations per sample (KFC scaling): the same identity holds with r_⊥ = e − a A⁻¹ḡ/T."""
    g = torch.Generator().manual_seed(7)
    n, t, d, m, k = 6, 5, 4, 3, 2
    a = torch.randn(n * t, d, generator=g, dtype=DT)
    e = torch.randn(n * t, m, generator=g, dtype=DT)
    f = torch.randn(n * t, k, generator=g, dtype=DT)
    G_inv = torch.linalg.inv(e.T @ e / n + 0.1 * torch.eye(m, dtype=DT))
    A = a.T @ a / (n * t)
    gbar = a.T @ e / n
    r_perp = scores.residual_rows(a, e, torch.linalg.inv(A), gbar, t)
    st = scores.candidate_stats(f, r_perp, n, a)
    S = scores.schur_complement(st.A_f, st.A_fa, torch.linalg.inv(A))
    torch.testing.assert_close(_eta(torch.cat([a, f], 1), e, G_inv, n, t) - _eta(a, e, G_inv, n, t),
                               scores.delta_eta(st.C, S, G_inv), rtol=1e-9, atol=1e-13)


def test_zero_when_candidates_are_in_the_span_of_the_inputs():
    _, x, obs, lay, G_inv = _setup()
    a, e = lay.a_rows, lay.e_rows["grad"]
    A_pinv = torch.linalg.inv(lay.factors.A)
    r_perp = scores.residual_rows(a, e, A_pinv, a.T @ e / obs.n)
    mix = torch.randn(a.shape[1], 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    st = scores.candidate_stats(a @ mix, r_perp, obs.n)
    # scale: what a generic candidate scores
    generic = scores.delta_eta_lb(*_stats(_candidates(x, 2), r_perp, obs.n), G_inv)
    assert abs(scores.delta_eta_lb(st.C, st.A_f, G_inv)) <= 1e-10 * generic


def _stats(f, r_perp, n):
    st = scores.candidate_stats(f, r_perp, n)
    return st.C, st.A_f


def test_invariant_to_rescaling_and_mixing_candidates():
    _, x, obs, lay, G_inv = _setup()
    a, e = lay.a_rows, lay.e_rows["grad"]
    r_perp = scores.residual_rows(a, e, torch.linalg.inv(lay.factors.A), a.T @ e / obs.n)
    f = _candidates(x, 3)
    base = scores.delta_eta_lb(*_stats(f, r_perp, obs.n), G_inv)
    for c in (1e-3, -2.0, 1e3):
        torch.testing.assert_close(scores.delta_eta_lb(*_stats(c * f, r_perp, obs.n), G_inv), base, rtol=1e-9,
                                   atol=0)
    M = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=DT) + 3 * torch.eye(3, dtype=DT)
    mixed = scores.delta_eta_lb(*_stats(f @ M, r_perp, obs.n), G_inv)
    torch.testing.assert_close(mixed, base, rtol=1e-9, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_gradient_wrt_features_matches_closed_form(k):
    """autograd ∇_f Δη′ == (2/N) A_f⁻¹ C G⁻¹ (r_⊥,n − Cᵀ A_f⁻¹ f_n) (SENN's Δη′)."""
    _, x, obs, lay, G_inv = _setup()
    a, e = lay.a_rows, lay.e_rows["grad"]
    r_perp = scores.residual_rows(a, e, torch.linalg.inv(lay.factors.A), a.T @ e / obs.n)
    f = _candidates(x, k).requires_grad_(True)
    st = scores.candidate_stats(f, r_perp, obs.n)
    (grad,) = torch.autograd.grad(scores.delta_eta_lb(st.C, st.A_f, G_inv), f)
    torch.testing.assert_close(grad, scores.delta_eta_lb_grad_f(f.detach(), r_perp, G_inv, obs.n),
                               rtol=1e-9, atol=1e-14)


def test_batched_candidates_and_jitter():
    """Scores of P candidates at once equal the one-by-one scores; a tiny jitter changes nothing visible."""
    _, x, obs, lay, G_inv = _setup()
    a, e = lay.a_rows, lay.e_rows["grad"]
    r_perp = scores.residual_rows(a, e, torch.linalg.inv(lay.factors.A), a.T @ e / obs.n)
    fs = torch.stack([_candidates(x, 2, seed=s) for s in range(4)])  # (P, N, k)
    batched = scores.delta_eta_lb(*_stats(fs, r_perp, obs.n), G_inv, jitter=1e-12)
    single = torch.stack([scores.delta_eta_lb(*_stats(f, r_perp, obs.n), G_inv) for f in fs])
    torch.testing.assert_close(batched, single, rtol=1e-8, atol=0)


def test_absolute_score_is_at_most_one_for_the_output_layer_with_identity_metric():
    """Identity metric, exact G, undamped: Δη ≤ η_layer(aug) ≤ E‖∇_yℓ‖² for the output layer (one output),
    so Δη′/E‖∇_yℓ‖² ∈ [0, 1] (SENN's absolute, scale-free score)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), RationalActivation(4), nn.Linear(4, 1)).to(DT)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(25, 3, generator=g, dtype=DT)
    y = torch.randn(25, 1, generator=g, dtype=DT)
    obs = kfac.observe(net, x, y, "half_sse", metric="identity")
    lay = obs.layers["2"]
    a, e = lay.a_rows, lay.e_rows["grad"]
    G_inv = torch.linalg.inv(lay.factors.G)
    r_perp = scores.residual_rows(a, e, torch.linalg.inv(lay.factors.A), a.T @ e / obs.n)
    for s in range(5):
        d = scores.delta_eta_lb(*_stats(_candidates(x, 2, seed=s), r_perp, obs.n), G_inv)
        score = scores.absolute_score(d, obs.loss_sqnorm)
        assert 0 <= score <= 1
