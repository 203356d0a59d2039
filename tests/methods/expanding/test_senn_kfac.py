"""K-FAC statistics behind the SENN expansion scores (Mitchell et al. 2023), float64.

Identities checked:

* (A ⊗ G)⁻¹ vec(ḡ) = vec(A⁻¹ ḡ G⁻¹) (row-major vec, symmetric factors).
* Output layer with one output: its exact Gauss-Newton block is (1/N)Σ a aᵀ·H = A ⊗ G when G is the
  back-propagated metric square root (G = H), or with the identity metric and the unit-normalised
  cotangent of the official code (G ≡ 1).
* A one-layer linear model with squared error: F = A ⊗ (2/C)I exactly, so K-FAC's natural gradient is
  the exact F⁻¹g.
* Convolutions: the patch rows reproduce the autograd weight gradient, and a convolution whose kernel
  covers its whole input has the factors of the equivalent Linear layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widthlab.methods.expanding import fisher, kfac
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer
from widthlab.nn.rational import RationalActivation

DT = torch.float64
# Every test here compares two computations of one value (K-FAC against the exact Fisher, a closed form
# against autograd or a block inverse): their summation orders differ.
pytestmark = pytest.mark.numerics


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_vec_identity():
    g = _gen()
    d, m = 4, 3
    a = torch.randn(d, d, generator=g, dtype=DT)
    b = torch.randn(m, m, generator=g, dtype=DT)
    A, G = a @ a.T + torch.eye(d, dtype=DT), b @ b.T + torch.eye(m, dtype=DT)
    gbar = torch.randn(d, m, generator=g, dtype=DT)
    lhs = torch.linalg.solve(torch.kron(A, G), gbar.reshape(-1))
    rhs = (torch.linalg.inv(A) @ gbar @ torch.linalg.inv(G)).reshape(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-14)


def _net(c=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), RationalActivation(4), nn.Linear(4, c)).to(DT)


@pytest.mark.parametrize("loss, y_kind", [("half_sse", "reg"), ("mse", "reg"), ("cross_entropy", "cls")])
def test_output_layer_block_is_exact(loss, y_kind):
    """For a 1-output (or the output layer of any) net with a constant metric, A ⊗ G is the exact block."""
    c = 1 if y_kind == "reg" else 3
    net = _net(c)
    g = _gen(1)
    x = torch.randn(11, 3, generator=g, dtype=DT)
    if y_kind == "reg":
        y = torch.randn(11, c, generator=g, dtype=DT)
    else:
        y = torch.randint(0, c, (11,), generator=g)
    obs = kfac.observe(net, x, y, loss, metric="fisher", g_estimator="exact")
    f = obs.layers["2"].factors
    params = {"2.weight": net[2].weight, "2.bias": net[2].bias}
    F = fisher.gauss_newton(net, x, loss, "fisher", params)
    # Our coordinates: rows (inputs + bias) x columns (outputs), row-major -> Fisher order (out, in)+bias.
    perm = _fisher_order(4, c)
    kron = torch.kron(f.A, f.G)[perm][:, perm]
    if loss == "cross_entropy":
        # H_n varies with n: only E[a aᵀ ⊗ H_n] is exact; A ⊗ E[H] is the K-FAC approximation. Both
        # against an independent computation: a = [hidden outputs, 1], H_n = ∇²ℓ_n by torch.func.
        with torch.no_grad():
            a = torch.cat([net[1](net[0](x)), torch.ones(len(x), 1, dtype=DT)], 1)
            out = net(x)
        H = torch.stack([torch.func.hessian(lambda o, t=t: nn.functional.cross_entropy(o[None], t[None]))(o)
                         for o, t in zip(out, y)])
        A_ind, G_ind = a.T @ a / len(x), H.mean(0)
        torch.testing.assert_close(f.A, A_ind, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(f.G, G_ind, rtol=1e-12, atol=1e-14)
        exact = torch.stack([torch.kron(an[:, None] * an[None], hn) for an, hn in zip(a, H)]).mean(0)
        torch.testing.assert_close(F, exact[perm][:, perm], rtol=1e-10, atol=1e-12)
        gap = (kron - F).norm() / F.norm()
        print(f"cross-entropy output block, relative K-FAC gap {gap:.3e}")
        assert gap > 1e-3  # the approximation is a real one here (H_n varies over the batch)
    else:
        torch.testing.assert_close(kron, F, rtol=1e-10, atol=1e-12)


def test_official_normalised_cotangent_gives_g_one():
    """Identity metric, unit-normalised cotangent, one output: G ≡ 1 and A ⊗ G is the exact GN block."""
    net = _net(1)
    g = _gen(2)
    x = torch.randn(9, 3, generator=g, dtype=DT)
    y = torch.randn(9, 1, generator=g, dtype=DT)
    obs = kfac.observe(net, x, y, "mse", metric="identity", g_estimator="normalized")
    f = obs.layers["2"].factors
    torch.testing.assert_close(f.G, torch.ones(1, 1, dtype=DT))
    params = {"2.weight": net[2].weight, "2.bias": net[2].bias}
    F = fisher.gauss_newton(net, x, "mse", "identity", params)
    perm = _fisher_order(4, 1)
    torch.testing.assert_close(torch.kron(f.A, f.G)[perm][:, perm], F, rtol=1e-10, atol=1e-12)


def _fisher_order(d: int, m: int) -> torch.Tensor:
    """Index map from torch's parameter order (weight (m, d) row-major, then bias (m,)) to ours
    ((d+1) x m row-major, bias row last): perm[k] = our index of torch coordinate k."""
    idx = []
    for j in range(m):
        for i in range(d):
            idx.append(i * m + j)
    for j in range(m):
        idx.append(d * m + j)
    return torch.tensor(idx)


def test_hidden_layer_factors_against_the_exact_block():
    """Hidden layer: with B_n = J_nᵀ H_n J_n (J_n = ∂y_n/∂s_n of the layer's pre-activation, H_n = ∇²ℓ_n,
    both by torch.func), the exact Gauss-Newton block is E[a aᵀ ⊗ B_n] and K-FAC's is E[a aᵀ] ⊗ E[B_n]
    (G as the exact expectation over the metric square root): both asserted; the gap of the damped
    inverses is reported."""
    net = _net(2)
    g = _gen(3)
    x = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (40,), generator=g)
    obs = kfac.observe(net, x, y, "cross_entropy")
    f = obs.layers["0"].factors
    block = {"0.weight": net[0].weight, "0.bias": net[0].bias}
    F = fisher.gauss_newton(net, x, "cross_entropy", "fisher", block)
    perm = _fisher_order(3, 4)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    with torch.no_grad():
        s = net[0](x)
    tail = lambda si: net[2](net[1](si[None]))[0]  # noqa: E731
    B = []
    for si, yi in zip(s, y):
        J = torch.func.jacrev(tail)(si)  # (C, 4)
        ce = lambda o, t=yi: nn.functional.cross_entropy(o[None], t[None])  # noqa: E731
        H = torch.func.hessian(ce)(tail(si).detach())
        B.append(J.T @ H @ J)
    B = torch.stack(B).detach()
    torch.testing.assert_close(f.A, a.T @ a / len(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G, B.mean(0), rtol=1e-10, atol=1e-13)
    exact = torch.stack([torch.kron(an[:, None] * an[None], bn) for an, bn in zip(a, B)]).mean(0)
    torch.testing.assert_close(F, exact[perm][:, perm], rtol=1e-10, atol=1e-12)
    lam = 1e-3
    exact = torch.linalg.inv(F + lam * torch.eye(F.shape[0], dtype=DT))
    approx = torch.linalg.inv(torch.kron(f.A, f.G)[perm][:, perm] + lam * torch.eye(F.shape[0], dtype=DT))
    print(f"hidden layer: relative gap of the damped inverse {((approx - exact).norm() / exact.norm()):.3e}")


def test_linear_model_kfac_natural_gradient_is_exact():
    """1-layer linear model, squared error: F = A ⊗ G, so K-FAC's F⁻¹g (and the optimizer step) is exact."""
    g = _gen(4)
    lin = nn.Linear(3, 2).to(DT)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, 2, generator=g, dtype=DT)
    F = fisher.gauss_newton(lin, x, "mse", "fisher")
    grad = fisher.loss_gradient(lin, x, y, "mse")
    obs = kfac.observe(lin, x, y, "mse")
    f = obs.layers[""].factors
    perm = _fisher_order(3, 2)
    torch.testing.assert_close(torch.kron(f.A, f.G)[perm][:, perm], F, rtol=1e-12, atol=1e-14)
    want = torch.linalg.solve(F, grad)
    # K-FAC optimizer with negligible damping: one step is θ − lr·F⁻¹g
    theta = fisher.flatten([lin.weight.detach(), lin.bias.detach()]).clone()
    opt = KFACOptimizer(lin.parameters(), lin, "mse", lr=0.5, damping=1e-20, stat_every=1, inv_every=1,
                        ema_decay=0.0, g_estimator="exact")
    fisher.per_sample_loss("mse", lin(x), y).mean().backward()
    opt.set_batch(x, y)
    opt.step()
    after = fisher.flatten([lin.weight.detach(), lin.bias.detach()])
    torch.testing.assert_close(after, theta - 0.5 * want, rtol=1e-7, atol=1e-9)


def test_conv_rows_reproduce_the_weight_gradient():
    g = _gen(5)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(DT)
    x = torch.randn(4, 2, 7, 7, generator=g, dtype=DT, requires_grad=False)
    with kfac.capture({"c": conv}) as cap:
        s = conv(x)
    u = torch.randn(s.shape, generator=g, dtype=DT)
    (s * u).sum().div(4).backward()
    e = kfac.backprop(s, cap, u)["c"]
    a_rows = kfac.input_rows(conv, cap["c"].a)
    gbar = kfac.gradient_from_rows(a_rows, kfac.output_rows(e), 4)
    torch.testing.assert_close(gbar, kfac.weight_gradient_matrix(conv), rtol=1e-12, atol=1e-14)
    f = kfac.factors_from_rows(a_rows, [kfac.output_rows(e)], 4)
    assert f.t == 16 and f.A.shape == (19, 19) and f.G.shape == (3, 3)


def test_conv_covering_its_input_has_linear_factors():
    """A k×k conv on a k×k input (T = 1) is a Linear layer on the flattened input: same A, G, ḡ."""
    g = _gen(6)
    conv = nn.Conv2d(2, 3, 3).to(DT)
    lin = nn.Linear(18, 3).to(DT)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(3, -1))
        lin.bias.copy_(conv.bias)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=DT)
    y = torch.randn(5, 3, generator=g, dtype=DT)
    conv_net = nn.Sequential(conv, nn.Flatten())
    lin_net = nn.Sequential(nn.Flatten(), lin)
    oc = kfac.observe(conv_net, x, y, "mse")
    ol = kfac.observe(lin_net, x, y, "mse")
    fc, fl = oc.layers["0"].factors, ol.layers["1"].factors
    torch.testing.assert_close(fc.A, fl.A)
    torch.testing.assert_close(fc.G, fl.G)
    torch.testing.assert_close(oc.layers["0"].e_rows["grad"], ol.layers["1"].e_rows["grad"])


def test_running_average_and_reset():
    st = kfac.KFACStatistics(decay=0.5)
    one = kfac.LayerFactors(torch.eye(2, dtype=DT), torch.eye(1, dtype=DT), 1)
    three = kfac.LayerFactors(3 * torch.eye(2, dtype=DT), 3 * torch.eye(1, dtype=DT), 1)
    st.update("l", one)
    st.update("l", three)
    torch.testing.assert_close(st.A["l"], 2 * torch.eye(2, dtype=DT))
    # a layer that changed shape starts afresh
    st.update("l", kfac.LayerFactors(torch.eye(3, dtype=DT), torch.eye(1, dtype=DT), 1))
    assert st.A["l"].shape == (3, 3) and st.updates["l"] == 1
    a_inv, g_inv = st.damped_inverses("l", 0.04)
    # π = 1, so each factor gets √λ = 0.2
    torch.testing.assert_close(a_inv, torch.eye(3, dtype=DT) / 1.2)
    torch.testing.assert_close(g_inv, torch.eye(1, dtype=DT) / 1.2)


def _kfac_step(opt, net, x, y):
    opt.zero_grad()
    fisher.per_sample_loss("mse", net(x), y).mean().backward()
    opt.set_batch(x, y)
    opt.step()


def test_optimizer_statistics_use_evenly_spaced_samples_of_a_large_batch():
    """stat_batch = 4 of a 10-sample batch, running average 0.5: the first (fresh) factors come from the
    whole batch, the next refresh from samples round(i·9/3) = 0, 3, 6, 9 only."""
    net = _net(2)
    g = _gen(7)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, 2, generator=g, dtype=DT)
    keep = [0, 3, 6, 9]
    opt = KFACOptimizer(net.parameters(), net, "mse", lr=0.1, stat_every=1, inv_every=1, ema_decay=0.5,
                        g_estimator="exact", stat_batch=4)
    first = kfac.observe(net, x, y, "mse")  # at the parameters of the first step
    _kfac_step(opt, net, x, y)
    second = kfac.observe(net, x[keep], y[keep], "mse")  # the second step's subsample
    _kfac_step(opt, net, x, y)
    # the first layer's input is x itself: A in closed form
    a = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    closed = 0.5 * a.T @ a / 10 + 0.5 * a[keep].T @ a[keep] / 4
    torch.testing.assert_close(opt.state[net[0].weight]["A"], closed, rtol=1e-12, atol=1e-14)
    for name, layer in (("0", net[0]), ("2", net[2])):
        for f in ("A", "G"):
            old, new = (getattr(o.layers[name].factors, f) for o in (first, second))
            want = 0.5 * old + 0.5 * new
            torch.testing.assert_close(opt.state[layer.weight][f], want, rtol=1e-12, atol=1e-14)


def test_optimizer_statistics_without_a_running_average_use_the_whole_batch():
    """ema_decay = 0: every estimate is the factor itself, so stat_batch does not subsample it."""
    net = _net(2)
    g = _gen(9)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, 2, generator=g, dtype=DT)
    opt = KFACOptimizer(net.parameters(), net, "mse", lr=0.1, stat_every=1, inv_every=1, ema_decay=0.0,
                        g_estimator="exact", stat_batch=4)
    _kfac_step(opt, net, x, y)
    want = kfac.observe(net, x, y, "mse")
    _kfac_step(opt, net, x, y)
    for name, layer in (("0", net[0]), ("2", net[2])):
        torch.testing.assert_close(opt.state[layer.weight]["G"], want.layers[name].factors.G,
                                   rtol=1e-12, atol=1e-14)
    a = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    torch.testing.assert_close(opt.state[net[0].weight]["A"], a.T @ a / 10, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stat_batch", [10, 11, None])
def test_optimizer_statistics_of_a_batch_within_stat_batch_use_all_of_it(stat_batch):
    net = _net(2)
    g = _gen(8)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randn(10, 2, generator=g, dtype=DT)
    opt = KFACOptimizer(net.parameters(), net, "mse", lr=0.1, stat_every=1, inv_every=1, ema_decay=0.0,
                        g_estimator="exact", stat_batch=stat_batch)
    fisher.per_sample_loss("mse", net(x), y).mean().backward()
    opt.set_batch(x, y)
    opt.step()
    a = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    torch.testing.assert_close(opt.state[net[0].weight]["A"], a.T @ a / 10, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "all"])
def test_optimizer_rejects_a_bad_stat_batch(bad):
    net = _net()
    with pytest.raises(ValueError, match="stat_batch"):
        KFACOptimizer(net.parameters(), net, "mse", stat_batch=bad)
