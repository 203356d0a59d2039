"""The closed forms that make expansion events cheap, against independent computations (float64).

* ``unit_score.ChannelScore`` (CNN channel candidates, gradient in closed form through the consumer's
  patches, the max-pool, the rational activation and the convolution) against autograd through
  ``proposals.conv_unit_features`` and ``scores.delta_eta_lb`` (``proposals.unit_score_fn``).
* ``cost.counted`` (a lean dispatch mode) against ``FlopCounterMode`` with the same formulas.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from widthlab.methods.expanding import cost, proposals, unit_score

DT = torch.float64


def _autograd(fn, theta):
    t = theta.detach().clone().requires_grad_(True)
    s = fn(t)
    (g,) = torch.autograd.grad(s.sum(), t)
    return s.detach(), g


@pytest.mark.parametrize("consumer,pool,k,c_in,hw,N", [
    ("conv", True, 1, 1, (6, 5), 7),  # odd width: the ceil-mode window
    ("conv", False, 2, 3, (5, 5), 7),
    ("conv", True, 2, 2, (8, 7), 40),  # A_f from the maps' Gram (enough samples for it to be cheaper)
    ("conv", False, 1, 1, (4, 4), 40),
    ("conv_stride2", True, 1, 2, (8, 8), 7),  # the F.unfold / F.fold path
    ("head", True, 1, 2, (6, 6), 7),
    ("head", False, 3, 2, (4, 4), 7),  # k > 1 (a stage candidate): A_f is solved
])
@pytest.mark.parametrize("patch_matrix", [True, False])  # patches by a 0/1 product, or by slices / unfold
def test_channel_score_and_gradient_equal_autograd(consumer, pool, k, c_in, hw, N, patch_matrix, monkeypatch):
    if not patch_matrix:
        monkeypatch.setattr(unit_score.ChannelScore, "SMALL_PATCH_MATRIX", 0)
    g = torch.Generator().manual_seed(3)
    m = 4
    h = torch.randn(N, c_in, *hw, generator=g, dtype=DT)
    if consumer == "head":
        module = nn.Linear(k, m).to(DT)
    else:
        stride = 2 if consumer == "conv_stride2" else 1
        module = nn.Conv2d(k + 2, m, 3, padding=1, stride=stride).to(DT)
    layout = proposals.UnitLayout(k, c_in, (3, 3))
    theta = proposals.random_candidates(layout, 5, generator=g, dtype=DT)
    feats0 = proposals.conv_unit_features(layout, theta, h, pool=pool, consumer=module)
    rows = feats0.shape[1]
    r = torch.randn(rows, m, generator=g, dtype=DT)
    B = torch.randn(m, m, generator=g, dtype=DT)
    G_inv = torch.linalg.inv(B @ B.T + torch.eye(m, dtype=DT))
    jitter = 0.0 if k == 1 and consumer == "head" else 1e-13  # the closed form treats the jitter as constant

    def feats(th):
        return proposals.conv_unit_features(layout, th, h, pool=pool, consumer=module)

    ref = proposals.unit_score_fn(feats, r, G_inv, N, 0.7, jitter=jitter)
    fast = unit_score.ChannelScore(layout, h, module, pool, r, G_inv, N, 0.7, jitter=jitter, dtype=DT)
    assert (fast.U is not None) == (patch_matrix and consumer != "head")
    assert (fast.V is not None) == (fast.U is not None and N == 40)
    # the closed-form FLOP charge equals what the counting mode measures
    assert fast.flops(theta.shape[0]) == cost.counted(fast, theta)[1]
    assert fast.flops(theta.shape[0], grad=True) == cost.counted(fast.value_and_grad, theta)[1]
    s_ref, g_ref = _autograd(ref, theta)
    s, grad = fast.value_and_grad(theta)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(fast(theta), s_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, g_ref, rtol=1e-7, atol=1e-9 * g_ref.abs().max().item())


def test_lean_flop_count_equals_flop_counter_mode():
    """Products, convolutions, their backward passes, decompositions (with the method's own formulas)
    and composite operations decomposed under inference mode: the same total."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.randn(2, 3, 5, 5)

    def work():
        loss = net(x).square().sum()
        torch.autograd.grad(loss, list(net.parameters()))
        A = torch.randn(5, 5, dtype=DT)
        A = A @ A.T + torch.eye(5, dtype=DT)
        torch.linalg.pinv(A, hermitian=True)
        torch.linalg.solve(A, A[:, :2])
        torch.cholesky_inverse(torch.linalg.cholesky(A))
        torch.linalg.eigh(A)
        torch.einsum("ij,jk->ik", A, A)
        with torch.no_grad():
            torch.baddbmm(torch.randn(2, 3, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
        with torch.inference_mode():
            torch.matmul(torch.randn(7, 3, 4), torch.randn(4, 2))
            torch.linalg.pinv(torch.randn(4, 4))

    with FlopCounterMode(display=False, custom_mapping=cost.EXTRA_FORMULAS) as mode:
        work()
    expected = mode.get_total_flops()
    assert expected > 0
    assert cost.counted(work)[1] == expected


def test_fused_mala_burst_is_the_metropolis_hastings_chain():
    """``proposals._correct_burst`` (noise drawn per burst, log q from the noise, carried log-target)
    against a plain Metropolis-adjusted Langevin chain written out here from its definition, fed the
    same normal and uniform draws: the same states and acceptance probabilities."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 3, generator=g, dtype=DT)

    def score(th):  # a smooth non-quadratic score, gradient by autograd
        return torch.tanh(th @ W).pow(2).sum(1) + 0.3 * th[:, 0]

    P, D, steps, T, var = 40, 3, 7, 0.2, 1.0
    theta = torch.randn(P, D, generator=g, dtype=DT)
    h = torch.rand(P, generator=g, dtype=DT) * 0.5 + 0.05
    temp = torch.full((P,), T, dtype=DT)
    s0, g0 = _autograd(score, theta)
    state = proposals._State(theta.clone(), s0, g0)
    lt0 = s0 / T - 0.5 * (theta * theta).sum(1) / var
    gen = torch.Generator().manual_seed(11)
    got, lt, acc = proposals._correct_burst(score, state, lt0, h, temp, var, gen, None, steps)

    gen = torch.Generator().manual_seed(11)
    xis = torch.randn(steps, P, D, generator=gen, dtype=DT)
    us = torch.rand(steps, P, generator=gen, dtype=DT)

    def log_pi(th):
        return score(th) / T - 0.5 * (th * th).sum(1) / var

    def grad_log_pi(th):
        return _autograd(log_pi, th)[1]

    x, total = theta.clone(), torch.zeros(P, dtype=DT)
    for j in range(steps):
        hh = h[:, None]
        y = x + hh * grad_log_pi(x) + (2 * hh).sqrt() * xis[j]
        log_q_fwd = -((y - x - hh * grad_log_pi(x)) ** 2).sum(1) / (4 * h)
        log_q_bwd = -((x - y - hh * grad_log_pi(y)) ** 2).sum(1) / (4 * h)
        alpha = (log_pi(y) + log_q_bwd - log_pi(x) - log_q_fwd).clamp(max=0).exp()
        x = torch.where((us[j] < alpha)[:, None], y, x)
        total += alpha
    torch.testing.assert_close(got.theta, x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc, total, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got.s, score(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lt, log_pi(x), rtol=1e-10, atol=1e-12)
