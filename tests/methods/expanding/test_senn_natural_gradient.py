"""Damped Gauss-Newton natural gradient by CG (the SENN MLP optimiser, Mitchell et al. 2023), float64.

The dense oracle builds F = (1/N) Σ J_nᵀ H_n J_n from per-sample Jacobians (torch.func); the CG solver
only ever sees F through JVP/VJP products, so agreement checks both the operator and the solver.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widthlab.methods.expanding import fisher
from widthlab.methods.expanding.natural_gradient import (
    GaussNewtonOperator,
    NaturalGradientCG,
    conjugate_gradient,
    natural_gradient,
)
from widthlab.nn.rational import RationalActivation


def tiny_net(d=3, h=5, c=2, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), RationalActivation(h), nn.Linear(h, c)).double()
    return net


def batch(loss: str, n=7, d=3, c=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, c, (n,), generator=g)
    else:
        y = torch.randn(n, c, generator=g, dtype=torch.float64)
    return x, y


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "half_sse"])
@pytest.mark.parametrize("metric", ["fisher", "identity"])
@pytest.mark.parametrize("mode", ["jacobian", "autograd"])
def test_cg_matches_dense_solve(loss, metric, mode):
    """x_CG vs a dense solve of ((1/B)ΣJ_nᵀH_nJ_n + λI)x = g; rel. error < 1e-6 at convergence."""
    net = tiny_net(c=2)
    x, y = batch(loss)
    g = fisher.loss_gradient(net, x, y, loss)
    F = fisher.gauss_newton(net, x, loss, metric)
    want = fisher.natural_gradient_dense(F, g, 0.1)
    res = natural_gradient(net, x, g, loss, output_metric=metric, damping=0.1, maxiter=500, tol=1e-12,
                           mode=mode)
    assert res.converged
    assert (res.x - want).norm() / want.norm() < 1e-6
    # the operator itself is the dense matrix
    op = GaussNewtonOperator(net, x, loss, output_metric=metric, damping=0.0, mode=mode)
    v = torch.randn(g.numel(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op(v), F @ v, rtol=1e-10, atol=1e-12)


def test_cg_with_official_limits_is_close():
    """With the official maxiter=100, tol=1e-5 the solution is within the tolerance's reach."""
    net = tiny_net()
    x, y = batch("cross_entropy")
    g = fisher.loss_gradient(net, x, y, "cross_entropy")
    F = fisher.gauss_newton(net, x, "cross_entropy", "identity")
    want = fisher.natural_gradient_dense(F, g, 0.1)
    res = natural_gradient(net, x, g, "cross_entropy", output_metric="identity", damping=0.1)
    assert res.iterations <= 100
    # residual ≤ 1e-5‖g‖ and ‖(F+λI)⁻¹‖ ≤ 1/λ bound the error
    assert (res.x - want).norm() <= 1e-5 * g.norm() / 0.1 + 1e-12


def test_cg_on_a_plain_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=g)
    A = m @ m.T + 0.5 * torch.eye(20)
    b = torch.randn(20, generator=g)
    res = conjugate_gradient(lambda v: A @ v, b, maxiter=200, tol=1e-13)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize("loss", ["cross_entropy", "half_sse"])
def test_eta_two_ways_and_bound(damping, loss):
    """η two ways: gᵀ(F+λI)⁻¹g == (1/B)EᵀK(K+λB·I)⁻¹E (identity metric) to 1e-10; 0 ≤ η ≤ E‖∇_yℓ‖²."""
    net = tiny_net()
    x, y = batch(loss, n=5)
    params = fisher.named_trainable(net)
    jac = fisher.output_jacobian(net, x, params)
    out = net(x)
    r = fisher.output_grad(loss, out, y)
    g = torch.einsum("ncp,nc->p", jac, r) / x.shape[0]
    torch.testing.assert_close(g, fisher.loss_gradient(net, x, y, loss), rtol=1e-12, atol=1e-14)
    F = fisher.gauss_newton(net, x, loss, "identity")
    sqnorm = r.pow(2).sum(1).mean()
    eta_out = fisher.eta_output_space(jac, r, damping)
    if damping > 0:
        eta_par = fisher.eta_dense(F, g, damping)
        assert abs(eta_par - eta_out) <= 1e-10 * max(1.0, abs(eta_par))
    # λ = 0: F is singular (P > NC), the output form is the limit
    assert -1e-12 <= eta_out <= sqnorm * (1 + 1e-10)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_eta_under_the_fisher_metric_is_bounded_by_its_pinv_norm(loss):
    """With the loss's Gauss-Newton metric H, η = gᵀ(F+λI)⁻¹g ≤ E[∇ℓᵀH⁺∇ℓ] (``metric_pinv_norm``, the
    normaliser of ``abs_normalizer: metric``), not by E‖∇_yℓ‖², which it can exceed; for softmax
    cross-entropy the bound is E[1/p_y − 1] = E[exp(ℓ) − 1]."""
    net = tiny_net(c=3)
    with torch.no_grad():
        net[2].weight.mul_(4.0)  # confident outputs: small H, large natural gradient
    x, y = batch(loss, n=6, c=3)
    out = net(x)
    r = fisher.output_grad(loss, out, y)
    g = fisher.loss_gradient(net, x, y, loss)
    F = fisher.gauss_newton(net, x, loss, "fisher")
    bound = fisher.metric_pinv_norm(loss, out, y, "fisher")
    etas = [fisher.eta_dense(F, g, lam) for lam in (1e-6, 1e-3, 0.1)]
    assert all(0 <= e <= bound * (1 + 1e-9) for e in etas)
    if loss == "cross_entropy":
        ell = fisher.per_sample_loss(loss, out, y)
        torch.testing.assert_close(bound, (ell.exp() - 1).mean())
        assert etas[0] > r.pow(2).sum(1).mean()  # the identity-metric bound does not hold here
    assert fisher.metric_pinv_norm(loss, out, y, "identity") == r.pow(2).sum(1).mean()


def test_fisher_metric_is_the_loss_hessian():
    """metric_sqrt and metric_matrix agree, and H is ∇²_y ℓ (autograd) for every loss."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, generator=g)
    targets = {"cross_entropy": torch.tensor([0, 2, 1, 1]), "mse": torch.randn(4, 3, generator=g),
               "half_sse": torch.randn(4, 3, generator=g)}
    for loss, y in targets.items():
        H = fisher.metric_matrix(loss, out, "fisher")
        U = fisher.metric_sqrt(loss, out, "fisher")
        torch.testing.assert_close(torch.einsum("nkc,nkd->ncd", U, U), H)
        for i in range(4):
            def ell(o, i=i, loss=loss, y=y):
                return fisher.per_sample_loss(loss, o[None], y[i:i + 1]).sum()

            hess = torch.autograd.functional.hessian(ell, out[i])
            torch.testing.assert_close(hess, H[i])
            grad = torch.func.grad(ell)(out[i])
            torch.testing.assert_close(grad, fisher.output_grad(loss, out[i:i + 1], y[i:i + 1])[0])


@pytest.mark.parametrize("wd, mode", [(0.0, "auto"), (1e-3, "autograd")])
def test_optimizer_step_equals_dense_update(wd, mode):
    """One NaturalGradientCG step: θ ← θ − lr·(x + wd·θ)/(1+wd), x = (F+λI)⁻¹g; η = gᵀx is recorded."""
    net = tiny_net()
    x, y = batch("cross_entropy")
    params = fisher.named_trainable(net)
    theta = fisher.flatten(p.detach() for p in params.values()).clone()
    g = fisher.loss_gradient(net, x, y, "cross_entropy")
    F = fisher.gauss_newton(net, x, "cross_entropy", "fisher")
    nat = fisher.natural_gradient_dense(F, g, 0.1)
    opt = NaturalGradientCG(net.parameters(), net, "cross_entropy", lr=0.1, maxiter=300, tol=1e-13,
                            weight_decay=wd, mode=mode)
    fisher.per_sample_loss("cross_entropy", net(x), y).mean().backward()
    opt.set_batch(x, y)
    opt.step()
    after = fisher.flatten(p.detach() for p in params.values())
    torch.testing.assert_close(after, theta - 0.1 * (nat + wd * theta) / (1 + wd), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(opt.last_eta, g @ nat, rtol=1e-8, atol=1e-12)


def test_optimizer_requires_the_batch():
    net = tiny_net()
    x, y = batch("cross_entropy")
    opt = NaturalGradientCG(net.parameters(), net, "cross_entropy")
    fisher.per_sample_loss("cross_entropy", net(x), y).mean().backward()
    with pytest.raises(RuntimeError, match="set_batch"):
        opt.step()
