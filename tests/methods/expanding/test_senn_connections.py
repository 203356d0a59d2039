"""Connection-level scores of the convolutional self-expanding network (Mitchell et al. 2023, CNN
experiments; float64), each against an independent computation on K-FAC statistics of real rows:

* thaw score of an inactive row = the natural expansion lower bound Δη′ = C G⁻¹ Cᵀ / A_f of its feature
  (C = E[f r_⊥ᵀ] with the residual r_⊥ left by the active rows), computed by ``scores.delta_eta_lb``;
* freeze score = η(active rows) − η(active rows without i), each η = tr(ḡᵀ A⁻¹ ḡ (sG)⁻¹) recomputed;
* prune compensation = the argmin of the A-weighted quadratic with the row held at 0 (least squares on
  the Cholesky factor), and the prune score = twice the quadratic model's rise at that argmin.
"""

from __future__ import annotations

import pytest
import torch

from widthlab.methods.expanding import scores
from widthlab.methods.expanding.connection_scores import (
    connection_scores,
    freeze_prune_scores,
    natural_gradient,
    prune_row,
    thaw_scores,
    whiten,
)

DT = torch.float64
pytestmark = pytest.mark.numerics  # closed forms against other solves of the same systems


def _stats(seed=0, n=50, c_in=6, k=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c_in, generator=g, dtype=DT) @ torch.randn(c_in, c_in, generator=g, dtype=DT)
    e = torch.randn(n, k, generator=g, dtype=DT)
    A, G = a.T @ a / n, e.T @ e / n + 0.1 * torch.eye(k, dtype=DT)
    gbar = a.T @ e / n
    theta = torch.randn(c_in, k, generator=g, dtype=DT)
    active = torch.tensor([True, True, False, True, False, True])
    theta[~active] = 0
    return a, e, A, G, gbar, theta, active


def _eta(gbar, A, G_s, rows):
    gs = gbar[rows]
    return torch.trace(gs.T @ torch.linalg.inv(A[rows][:, rows]) @ gs @ torch.linalg.inv(G_s))


@pytest.mark.parametrize("s", [1.0, 2.5])
def test_thaw_score_is_the_expansion_lower_bound_of_the_row(s):
    a, e, A, G, gbar, theta, active = _stats()
    g_w, t_w = whiten(gbar, theta, G, s)
    sc = connection_scores(A, g_w, t_w, active)
    act = active.nonzero().flatten()
    G_s_inv = torch.linalg.inv(s * G)
    r_perp = e - a[:, act] @ torch.linalg.solve(A[act][:, act], gbar[act])
    torch.testing.assert_close(sc.eta, _eta(gbar, A, s * G, act), rtol=1e-10, atol=0)
    for i in (~active).nonzero().flatten().tolist():
        f = a[:, i:i + 1]
        C = f.T @ r_perp / len(a)
        want = scores.delta_eta_lb(C, f.T @ f / len(a), G_s_inv)
        torch.testing.assert_close(sc.thaw[i], want, rtol=1e-10, atol=1e-14)
    assert torch.isnan(sc.thaw[active]).all()


def test_freeze_score_is_what_eta_loses_without_the_row():
    a, e, A, G, gbar, theta, active = _stats(1)
    s = 1.7
    sc = connection_scores(A, *whiten(gbar, theta, G, s), active)
    act = active.nonzero().flatten().tolist()
    full = _eta(gbar, A, s * G, act)
    for i in act:
        rest = [j for j in act if j != i]
        torch.testing.assert_close(sc.freeze[i], full - _eta(gbar, A, s * G, rest), rtol=1e-9, atol=1e-13)
    assert torch.isnan(sc.freeze[~active]).all()


def test_prune_compensation_is_the_argmin_of_the_a_weighted_quadratic():
    a, e, A, G, gbar, theta, active = _stats(2)
    i = 3
    new, keep = prune_row(theta, A, active, i)
    assert new[i].abs().max() == 0 and not keep[i] and keep.sum() == active.sum() - 1
    assert (new[~active] == 0).all()
    # min over the kept rows of ||R (θ' − θ)||², R the Cholesky factor of A, θ'_i = 0
    R = torch.linalg.cholesky(A).T
    r = keep.nonzero().flatten()
    c = torch.zeros_like(theta)
    c[i] = -theta[i]
    x = torch.linalg.lstsq(R[:, r], -R @ c).solution
    want = theta.clone()
    want[r] += x
    want[i] = 0
    torch.testing.assert_close(new, want, rtol=1e-9, atol=1e-12)


def test_prune_score_is_twice_the_rise_of_the_quadratic_model():
    """q(y) = ⟨g̃, y⟩ + ½ tr(yᵀ A y) over changes y of the active rows (whitened: G = I) has minimum
    −η/2; with row i held at 0 (y_i = −θ̃_i) its minimum rises by prune_i / 2."""
    a, e, A, G, gbar, theta, active = _stats(3)
    g_w, t_w = whiten(gbar, theta, G, 0.8)
    sc = connection_scores(A, g_w, t_w, active)
    for i in active.nonzero().flatten().tolist():
        r = [j for j in active.nonzero().flatten().tolist() if j != i]
        y = torch.zeros_like(g_w)
        y[i] = -t_w[i]
        y[r] = torch.linalg.solve(A[r][:, r], -g_w[r] - A[r][:, [i]] @ y[[i]])
        q = (g_w * y).sum() + 0.5 * torch.trace(y.T @ A @ y)
        torch.testing.assert_close(2 * q + sc.eta, sc.prune[i], rtol=1e-9, atol=1e-12)


def test_scores_of_a_subset_of_rows_are_those_rows_of_the_full_scores():
    # The controller scores only the rows it drew; that must equal reading them off the full scores.
    a, e, A, G, gbar, theta, active = _stats(2)
    g_w, t_w = whiten(gbar, theta, G, 1.3)
    full = connection_scores(A, g_w, t_w, active)
    act = active.nonzero().flatten()
    ng = natural_gradient(A, g_w[act], act)
    inact_sub, act_sub = torch.tensor([4]), act[[1, 3]]
    torch.testing.assert_close(thaw_scores(A, g_w[inact_sub], ng, inact_sub), full.thaw[inact_sub],
                               rtol=1e-12, atol=0)
    freeze, prune = freeze_prune_scores(ng, t_w[act_sub], act_sub)
    torch.testing.assert_close(freeze, full.freeze[act_sub], rtol=1e-12, atol=0)
    torch.testing.assert_close(prune, full.prune[act_sub], rtol=1e-12, atol=0)


def test_indefinite_active_block_falls_back_to_lu_and_matches_a_direct_inverse():
    # Rounding can leave A_act indefinite; Cholesky fails and the LU solve must give the same closed
    # forms: n = A_act⁻¹ g̃, freeze_i = Σ n_i² / (A_act⁻¹)_ii.
    A = torch.tensor([[2.0, 3.0, 0.0], [3.0, 1.0, 0.5], [0.0, 0.5, 4.0]], dtype=DT)  # eigenvalue < 0
    assert torch.linalg.eigvalsh(A).min() < 0
    g = torch.tensor([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]], dtype=DT)
    act = torch.arange(3)
    ng = natural_gradient(A, g, act)
    assert ng._chol is None
    inv = torch.linalg.inv(A)
    n = inv @ g
    torch.testing.assert_close(ng.n_act, n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ng.eta, (g * n).sum(), rtol=1e-12, atol=0)
    freeze, _ = freeze_prune_scores(ng, torch.zeros_like(g), act)
    torch.testing.assert_close(freeze, (n * n).sum(1) / inv.diagonal(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("indefinite", [False, True])
def test_closed_form_flop_counts_equal_the_counted_products(indefinite, weighted):
    # A run charges these closed forms as method_flops; the dispatcher's count of the products and
    # decompositions each function runs (cost.counted) is the independent reference, on both solve paths,
    # with the gradient whitened or raw with column weights (as the controller passes it).
    from widthlab.methods.expanding import connection_scores as cs
    from widthlab.methods.expanding import cost

    a, e, A, G, gbar, theta, active = _stats(3, k=5)
    w = torch.linspace(0.5, 2.0, gbar.shape[1], dtype=DT) if weighted else None
    if indefinite:
        A = A.clone()
        A[0, 0] = -1.0  # row 0 is active: Cholesky of A_act fails
    act = active.nonzero().flatten()
    n, k, c_in = act.numel(), gbar.shape[1], A.shape[0]
    ng, flops = cost.counted(natural_gradient, A, gbar[act], act, w)
    assert ng.cholesky is not indefinite
    assert flops == cs.natural_gradient_flops(n, k, ng.cholesky)
    rows = (~active).nonzero().flatten()
    assert cost.counted(thaw_scores, A, gbar[rows], ng, rows)[1] == \
        cs.thaw_flops(rows.numel(), n, k, ng.cholesky)
    assert cost.counted(freeze_prune_scores, ng, theta[act[:2]], act[:2])[1] == \
        cs.freeze_prune_flops(n, k, ng.cholesky)
    sc, flops = cost.counted(connection_scores, A, gbar, theta, active, w)
    assert sc.cholesky is not indefinite and flops == cs.connection_scores_flops(c_in, n, k, sc.cholesky)
    if not indefinite:
        assert cost.counted(prune_row, theta, A, active, int(act[1]))[1] == cs.prune_row_flops(n, k)


def test_column_weights_are_the_whitening():
    # Passing the raw gradient with column weights w must give the scores of the whitened g̃ = ĝ·diag(w)
    # (the controller's diagonal whitening), on the Cholesky path and on the LU path.
    a, e, A, G, gbar, theta, active = _stats(4)
    w = torch.linspace(0.3, 3.0, gbar.shape[1], dtype=DT)
    for M in (A, A - 2 * torch.eye(A.shape[0], dtype=DT) * A.diagonal().max()):
        ref = connection_scores(M, gbar * w, theta, active)
        got = connection_scores(M, gbar, theta, active, w)
        for name in ("eta", "n", "thaw", "freeze", "prune"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-10, atol=1e-12,
                                       equal_nan=True)
