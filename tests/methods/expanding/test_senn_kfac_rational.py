"""K-FAC optimizer: the rational activations' coefficients (Mitchell et al. 2023, §2) step by a diagonal
Gauss-Newton natural gradient, checked against the exact Gauss-Newton matrix (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widthlab.methods.expanding import fisher
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer
from widthlab.nn.rational import RationalActivation

DT = torch.float64
pytestmark = pytest.mark.numerics  # the optimizer's diagonal and the dense Gauss-Newton sum differently


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_rational_coefficients_take_a_diagonal_natural_gradient_step(loss):
    """Defect: the rational coefficients (v, c, l) took plain gradient steps at the natural-gradient
    rate. They now step by g_i / (F_ii + λ), F_ii the diagonal of the exact Gauss-Newton matrix
    (1/N) Σ_n J_nᵀ H_n J_n, here computed independently from per-sample Jacobians (torch.func)."""
    g = _gen(7)
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(2, 3), RationalActivation(3, generator=g), nn.Linear(3, 2)).to(DT)
    x = torch.randn(9, 2, generator=g, dtype=DT)
    y = torch.randn(9, 2, generator=g, dtype=DT) if loss == "mse" else torch.randint(0, 2, (9,), generator=g)
    act = net[1]
    params = {"1.v": act.v, "1.c": act.c, "1.l": act.l}
    F = fisher.gauss_newton(net, x, loss, "fisher", params=params)  # (9, 9) over v, c, l
    lam, lr = 0.05, 0.3
    grad = fisher.loss_gradient(net, x, y, loss, params=params)
    want = torch.cat([p.detach() for p in params.values()]) - lr * grad / (F.diagonal() + lam)
    opt = KFACOptimizer(net.parameters(), net, loss, lr=lr, damping=lam, stat_every=1, inv_every=1,
                        ema_decay=0.0, g_estimator="exact")
    fisher.per_sample_loss(loss, net(x), y).mean().backward()
    opt.set_batch(x, y)
    opt.step()
    got = torch.cat([p.detach() for p in params.values()])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
