"""Importance distributions and D(lam) of AWNN (Errica et al. 2025): exact widths and importance vectors,
the softplus parametrisation of lam and its boundary projection."""

import math

import numpy as np
import pytest
import torch

from widthlab.methods.adaptive.distributions import (
    EPS,
    Exponential,
    PowerLaw,
    Sigmoid,
    Uniform,
    exponential_width,
    make_distribution,
    softplus_inv,
)

# The width at the 0.9-quantile of the importance distribution: D(lam) = floor(-ln(0.1) / lam) + 2.
D_TABLE = {0.1: 25, 0.05: 48, 0.02: 117, 0.01: 232, 0.005: 462, 0.004: 577, 0.001: 2304, 5e-4: 4607,
           1e-4: 23027, math.log(2): 5}


@pytest.mark.parametrize("lam, D", sorted(D_TABLE.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_width_table(lam, D, dtype):
    assert exponential_width(lam) == D
    dist = Exponential(lam).to(dtype)
    assert dist.width(0.9) == D
    t = dist.width_tensor(0.9)
    assert t.dtype == torch.int64 and t.dim() == 0


def test_width_host_and_device_agree_at_integer_boundaries():
    """lam = c/n puts -ln(0.1)/lam on an integer: host and device must take the same floor."""
    c = -math.log(0.1)
    for n in (3, 10, 117, 230, 231, 4605):
        for lam in (c / n, math.nextafter(c / n, 0), math.nextafter(c / n, 1)):
            dist = Exponential(1.0).double()
            with torch.no_grad():
                dist.r.fill_(softplus_inv(lam))
            lam_seen = float(dist.lam.detach())  # what the model computes from r
            assert dist.width(0.9) == exponential_width(lam_seen)
            f32 = Exponential(1.0)
            with torch.no_grad():
                f32.r.fill_(softplus_inv(lam))
            assert f32.width(0.9) == exponential_width(float(f32.lam.detach()))


def test_importance_vector_lambda_001(cpu_path):
    p = Exponential(0.01).double().importance(232).detach()
    assert p.shape == (232,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert bool((p[1:] < p[:-1]).all())
    assert p[0].item() == pytest.approx(0.011033, abs=5e-7)
    assert p[231].item() == pytest.approx(0.001096, abs=5e-7)
    s2 = (p**2).sum().item()
    assert s2 == pytest.approx(0.006089, abs=5e-7)
    assert math.sqrt(2 / s2) == pytest.approx(18.12, abs=5e-3)  # Kaiming+ std
    assert (p[-1] / p[0]).item() == pytest.approx(0.1, abs=0.005)
    # exponential importance: sum p^2 ≈ tanh(lam/2)(2 - k)/k ≈ 0.611 lam
    assert s2 == pytest.approx(math.tanh(0.005) * 1.1 / 0.9, rel=0.01)


def test_importance_vector_lambda_05(cpu_path):
    p = Exponential(0.5).double().importance(6).detach()
    want = torch.tensor([.414084, .251155, .152334, .092395, .056041, .033991], dtype=torch.float64)
    assert torch.allclose(p, want, atol=5e-7)


def test_importance_follows_the_epsilon_formula(cpu_path):
    dist = Exponential(0.3).double()
    i = torch.arange(9, dtype=torch.float64)
    lam = 0.3
    f = torch.exp(-lam * i) - torch.exp(-lam * (i + 1)) + EPS
    assert torch.allclose(dist.importance(9).detach(), f / f.sum(), atol=1e-15)


def test_softplus_round_trip_and_boundary_projection():
    assert softplus_inv(0.01) == pytest.approx(-4.600166, abs=5e-7)
    assert softplus_inv(0.5) == pytest.approx(-0.43275, abs=5e-6)
    for lam in (1e-4, 0.01, 0.5, 3.0, 50.0):
        assert float(torch.nn.functional.softplus(torch.tensor(softplus_inv(lam), dtype=torch.float64))) == \
            pytest.approx(lam, rel=1e-9)
    b = 5e-4
    dist = Exponential(0.01, boundary=b).double()
    with torch.no_grad():
        dist.r.fill_(softplus_inv(1e-5))  # lam below the boundary
    dist.project_()
    assert float(dist.lam.detach()) == pytest.approx(b, rel=1e-12)
    assert dist.width(0.9) == exponential_width(b) == 4607
    before = dist.r.detach().clone()
    with torch.no_grad():
        dist.r.fill_(softplus_inv(0.02))  # above: untouched
    dist.project_()
    assert float(dist.lam.detach()) == pytest.approx(0.02) and not torch.equal(before, dist.r.detach())


@pytest.mark.parametrize("dist", [Exponential(0.05), PowerLaw(2.0), PowerLaw(3.0, shift=2.0), Uniform(16),
                                  Sigmoid(40.0, slope=1.0), Sigmoid(40.0, slope=5.0)],
                         ids=["exp", "pow", "pow-s2", "uniform", "sig1", "sig5"])
def test_families_share_the_interface(dist):
    dist = dist.double()
    D = dist.width(0.9)
    assert D >= 2
    i = torch.arange(4 * D, dtype=torch.float64)
    F = dist.cdf(i).detach()
    assert F[0].item() == pytest.approx(0.0, abs=1e-12)
    assert bool((F[1:] >= F[:-1] - 1e-15).all()) and F[-1] <= 1 + 1e-12
    assert torch.allclose(dist.pmf(i).detach(), dist.cdf(i + 1).detach() - F, atol=1e-12)
    p = dist.importance(D)
    assert p.shape == (D,) and p.sum().item() == pytest.approx(1.0)
    assert bool((p[1:] <= p[:-1] + 1e-15).all())
    # Width is floor(q) + 2 and the continuous CDF reaches about k at q.
    q = float(dist.quantile(0.9))
    assert math.floor(q) + 2 == D
    params = list(dist.parameters())
    if params:  # learnable families: p depends differentiably on the parameter
        p.pow(2).sum().backward()
        assert params[0].grad is not None and params[0].grad.abs().item() > 0


def test_quantiles_match_the_cdfs():
    k = 0.9
    for dist in (Exponential(0.03).double(), Sigmoid(128.0).double(), Sigmoid(60.0, slope=5.0).double()):
        q = dist.quantile(k)
        assert float(dist.cdf(q.clone()).detach()) == pytest.approx(k, abs=1e-9)
    # Power law: the official quantile sits x_min above the CDF's (one harmless extra unit).
    pl = PowerLaw(2.0).double()
    q = pl.quantile(k)
    assert float(pl.cdf(q - pl.x_min).detach()) == pytest.approx(k, abs=1e-9)
    assert Sigmoid(128.0).width(0.9) == 117  # the worked example of the module docstring
    assert Uniform(64).width(0.9) == 66


def test_power_law_projection_and_factory():
    pl = PowerLaw(2.0)
    with torch.no_grad():
        pl.g.fill_(0.5)
    pl.project_()
    assert float(pl.gamma.detach()) == pytest.approx(1.3)
    assert isinstance(make_distribution("sigmoid", options={"b0": 64}), Sigmoid)
    with pytest.raises(ValueError, match="unknown importance distribution"):
        make_distribution("gauss")
    with pytest.raises(ValueError, match="boundary applies"):
        make_distribution("uniform", boundary=1e-3)
    with pytest.raises(ValueError, match="distribution 'power_law'"):
        make_distribution("power_law", options={"rate": 2})


@pytest.mark.parametrize("D, support", [(7, None), (7, 12), (1, 3)])
def test_fused_exponential_importance_matches_autograd(D, support):
    """The one-node p(r) equals the generic CDF-difference path, values and gradients (gradcheck)."""
    from widthlab.methods.adaptive.distributions import ImportanceDistribution, _ExponentialImportance

    dist = Exponential(0.3).double()
    generic = ImportanceDistribution.importance(dist, D, support)
    fused = dist.importance(D, support)
    assert torch.allclose(fused, generic, atol=1e-15)
    w = torch.randn(D, dtype=torch.float64)
    (g1,) = torch.autograd.grad((generic * w).sum(), dist.r)
    (g2,) = torch.autograd.grad((fused * w).sum(), dist.r)
    assert torch.allclose(g1, g2, atol=1e-13)
    n = D if support is None else support
    r = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: _ExponentialImportance.apply(r, D, n), (r,))


def test_fused_sum_of_squares():
    from widthlab.methods.adaptive.loss import theta_sq_sum

    ps = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(5, dtype=torch.float64, requires_grad=True)]
    assert torch.allclose(theta_sq_sum(ps), sum((p**2).sum() for p in ps))
    assert torch.autograd.gradcheck(lambda a, b: theta_sq_sum([a, b]), tuple(ps))
    assert torch.allclose(theta_sq_sum(ps, 0.25), 0.25 * sum((p**2).sum() for p in ps))
    assert torch.autograd.gradcheck(lambda a, b: theta_sq_sum([a, b], 0.25), tuple(ps))


@pytest.mark.parametrize("r0, D, support", [(-4.6, 232, None), (-4.6, 200, 232), (0.4, 6, None),
                                            (3.0, 2, 5), (25.0, 2, None), (-9.0, 300, None)])
def test_host_importance_matches_device_path(r0, D, support, monkeypatch, cpu_path):
    """The CPU path (p and dp/dr from r's value, from the compiled kernel or numpy) equals the device
    path (the graph node _ExponentialImportance): values, gradients, and gradcheck through the
    linearisation."""
    from widthlab.methods.adaptive import distributions

    dist = Exponential(0.3).double()
    with torch.no_grad():
        dist.r.fill_(r0)
    w = torch.randn(D, dtype=torch.float64)
    host = dist.importance(D, support)
    (g_host,) = torch.autograd.grad((host * w).sum(), dist.r)
    with monkeypatch.context() as m:
        m.setattr(distributions, "_values_on_host", lambda t: False)
        dev = dist.importance(D, support)
        (g_dev,) = torch.autograd.grad((dev * w).sum(), dist.r)
    assert torch.allclose(host, dev, rtol=1e-12, atol=1e-15)
    assert torch.allclose(g_host, g_dev, rtol=1e-9, atol=1e-15)
    assert torch.autograd.gradcheck(lambda r: (dist.importance(D, support) * w).sum(), (dist.r,))
    # float32 model: the host values (float64, rounded once) agree with the float32 device path.
    d32 = Exponential(0.3)
    with torch.no_grad():
        d32.r.fill_(r0)
    with monkeypatch.context() as m:
        m.setattr(distributions, "_values_on_host", lambda t: False)
        dev32 = d32.importance(D, support).detach()
    assert torch.allclose(d32.importance(D, support).detach(), dev32, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_host_importance_rounds_float64_once_into_narrow_outputs(dtype):
    """A float32/float16 ``out`` holds exactly the float64 values rounded once (the work runs in
    float64 scratch), and the scratch left behind does not leak into the next float64 call."""
    from widthlab.methods.adaptive.distributions import _host_importance

    for r, D, n in ((-4.6, 232, 232), (-4.6, 200, 232), (0.4, 6, 6)):
        ref = _host_importance(r, D, n)
        out = np.empty((2, D), dtype=dtype)
        _host_importance(r, D, n, out=out)
        assert np.array_equal(out, ref.astype(dtype))
        assert np.array_equal(_host_importance(r, D, n), ref)


def test_host_importance_is_cached_per_value_of_r():
    dist = Exponential(0.01)
    p1 = dist.importance(232)
    p2 = dist.importance(232)
    assert torch.equal(p1, p2) and p1.grad_fn is not None
    with torch.no_grad():
        assert dist.importance(232) is dist.importance(232)  # same r, D: no recomputation
        dist.r.add_(1e-3)  # an optimizer step: new value, new p
        assert not torch.equal(dist.importance(232), p1.detach())


def test_host_importance_in_two_threads_matches_one():
    """The host closed form keeps its work arrays per thread: two threads never mix their values."""
    import threading

    from widthlab.methods.adaptive.distributions import _host_importance

    values = {r: _host_importance(r, 300, 300).copy() for r in (-4.6, -1.0)}
    bad = []

    def work(r):
        for _ in range(300):
            if not np.array_equal(_host_importance(r, 300, 300), values[r]):
                bad.append(r)

    threads = [threading.Thread(target=work, args=(r,)) for r in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
