"""What the self-expanding method computes besides the trainer's passes is charged to the run
(``summary["method_flops"]``): natural-gradient solves (CG Gauss-Newton products, K-FAC statistics,
inverses and preconditioning) and expansion scoring (every score evaluation of every proposal search).

Checked against independent counts: the closed-form FLOPs of the batched candidate score (its matrix
products, written out here), and a direct ``FlopCounterMode`` count of whole optimizer steps (the
meter measures each computation once per shape and reuses the count; the totals must agree).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widthlab.data.registry import load_dataset
from widthlab.methods.expanding import cost, proposals, unit_score
from widthlab.methods.expanding.fisher import per_sample_loss
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer
from widthlab.methods.expanding.natural_gradient import NaturalGradientCG, natural_gradient
from widthlab.methods.expanding.plan import build
from widthlab.nn.rational import RationalActivation
from widthlab.train.config import OptimConfig, TrainConfig
from widthlab.train.trainer import Trainer

DT = torch.float64


def _sites(g, n, shapes):
    out = []
    for d, m in shapes:
        b = torch.randn(m, m, generator=g, dtype=DT)
        out.append(unit_score.Site(torch.randn(n, d, generator=g, dtype=DT),
                                   torch.randn(n, m, generator=g, dtype=DT),
                                   torch.linalg.inv(b @ b.T + torch.eye(m, dtype=DT)), 0.5))
    return out


def test_score_evaluations_are_charged_their_matrix_products():
    """k = 1 units at two sites (fan-in 3 and 5, consumers of width 2 and 4, padded to d = 5, m = 4),
    P = 6 candidates each, N = 20: a value costs the products h·Wᵀ (2·L·P·d·N), fᵀr (2·L·P·N·m) and
    M·G⁻¹ (2·L·P·m²); a gradient adds MGMᵀ (2·L·P·m), MG⁻¹·rᵀ (2·L·P·m·N) and the weight gradient
    (2·L·P·N·d)."""
    g = torch.Generator().manual_seed(0)
    L, P, N, d, m = 2, 6, 20, 5, 4
    us = unit_score.UnitScore(1, _sites(g, N, [(3, 2), (5, 4)]), N)
    theta = torch.cat([us.pad_rows(proposals.random_candidates(lay, P, generator=g), i)
                       for i, lay in enumerate(us.layouts)])
    value = 2 * L * P * (d * N + N * m + m * m)
    grad = value + 2 * L * P * (m + m * N + N * d)
    meter = cost.FlopCache()
    fn = cost.MeteredScore(us, meter, ("test",))
    for _ in range(3):
        fn(theta)
    assert meter.total == 3 * value
    for _ in range(4):
        fn.value_and_grad(theta)
    assert meter.total == 3 * value + 4 * grad


def test_decomposition_counts():
    a = torch.randn(7, 7, dtype=DT)
    a = a @ a.T + torch.eye(7, dtype=DT)
    assert cost.counted(torch.linalg.cholesky, a)[1] == 7 ** 3 // 3
    assert cost.counted(lambda t: torch.linalg.pinv(t, hermitian=True), a)[1] == 11 * 7 ** 3
    assert cost.counted(torch.linalg.solve, a, a[:, :2])[1] == 2 * 7 ** 3 // 3 + 2 * 7 * 7 * 2
    L = torch.linalg.cholesky(a)
    assert cost.counted(torch.cholesky_solve, a[:, :3], L)[1] == 2 * 7 * 7 * 3  # two triangular solves
    assert cost.counted(torch.linalg.inv, a)[1] == 2 * 7 ** 3
    v = torch.ones(7, dtype=DT)
    assert cost.counted(torch.addmv, v[:5], a[:5], v)[1] == 2 * 5 * 7  # a matrix-vector product
    assert cost.counted(torch.addr, a, v, v)[1] == 0  # a rank-one update: elementwise


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), RationalActivation(6), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    return net, torch.randn(24, 4, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)


@pytest.mark.parametrize("mode", ["jacobian", "autograd"])
def test_cg_solve_flops_equal_a_direct_count(mode):
    """Three CG steps: the meter (operator and products measured once, products × iterations, the dot
    products of CG) against FlopCounterMode over each whole solve."""
    net, x, y = _net()
    opt = NaturalGradientCG(net.parameters(), net, "cross_entropy", maxiter=15, mode=mode)
    twin, _, _ = _net()
    direct = 0
    for _ in range(3):
        for model in (net, twin):
            model.zero_grad()
            per_sample_loss("cross_entropy", model(x), y).mean().backward()
        params = dict(twin.named_parameters())
        g = torch.cat([p.grad.reshape(-1) for p in params.values()])
        res, flops = cost.counted(natural_gradient, twin, x, g, "cross_entropy", maxiter=15, mode=mode,
                                  params=params)
        direct += flops
        with torch.no_grad():
            for p, dx in zip(params.values(), torch.split(res.x, [p.numel() for p in params.values()])):
                p.sub_(0.1 * dx.view_as(p))
        opt.set_batch(x)
        opt.step()
        assert opt.last_iterations == res.iterations
    assert opt.method_flops == direct > 0


def test_kfac_step_flops_equal_a_direct_count():
    """Five K-FAC steps (statistics and inverses every 2 steps, rational diagonals): metered vs direct."""
    net, x, y = _net(3)
    twin, _, _ = _net(3)
    kw = dict(lr=0.1, stat_every=2, inv_every=2, g_estimator="exact")
    opt, ref = KFACOptimizer(net.parameters(), net, "cross_entropy", **kw), \
        KFACOptimizer(twin.parameters(), twin, "cross_entropy", **kw)
    direct = 0
    for _ in range(5):
        for model, o in ((net, opt), (twin, ref)):
            model.zero_grad()
            per_sample_loss("cross_entropy", model(x), y).mean().backward()
            o.set_batch(x, y)
        opt.step()
        direct += cost.counted(ref.step)[1]
    assert opt.method_flops == direct > 0
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # metering does not change the arithmetic


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", n_train=64, n_val=32, n_test=64)


@pytest.mark.parametrize("optimizer", ["cg", "kfac", "default"])
def test_run_summary_charges_solves_and_scoring(moons, optimizer):
    """The summary's method_flops = solve_flops + expansion_flops; a CG run's solves cost more than its
    training passes (each step is tens of Gauss-Newton products); an Adam run charges scoring only."""
    from widthlab.train.compute import ComputeMeter

    plan = build(None, moons, seed=0, optimizer=optimizer, start_widths=[2], max_widths=(4,), tau=0.0,
                 alpha=0.0, cooldown=2, proposals=8, mala_bursts=2, mala_steps=3, cg_maxiter=20,
                 eta_maxiter=20)
    meter = ComputeMeter()
    cfg = TrainConfig(epochs=3, batch_size=32, progress="none", select_best=False, checkpoint_every=0,
                      optimizer=OptimConfig(name="adam", lr=0.01))
    res = Trainer(plan.model, moons, cfg, [*plan.callbacks, meter]).fit()
    assert res.status == "done", res.error
    s = plan.summary
    assert s["method_flops"] == s["solve_flops"] + s["expansion_flops"]
    assert s["expansion_flops"] > 0 and s["neurons_added"] >= 1
    if optimizer == "default":
        assert s["solve_flops"] == 0
    else:
        assert s["solve_flops"] > 0
    if optimizer == "cg":
        assert s["solve_flops"] > meter.train_flops


@pytest.mark.parametrize("g_estimator", ["exact", "normalized"])
def test_observation_flops_measured_on_two_samples_equal_the_full_count(moons, g_estimator):
    """The event's observation (forward, back-propagated cotangents, factors) is measured on two samples
    and scaled by the batch: every product has one sample dimension, so this equals a direct count on
    the whole batch."""
    from widthlab.methods.expanding import kfac
    from widthlab.methods.expanding.controller import ExpansionConfig, ExpansionController
    from widthlab.methods.expanding.model import ExpandableMLP

    model = ExpandableMLP(2, 2, [3, 4], generator=torch.Generator().manual_seed(0)).to(DT)
    x, y = moons.train.tensors
    x = x.to(DT)
    ctrl = ExpansionController(model, ExpansionConfig(g_estimator=g_estimator), "cross_entropy")
    before = ctrl.flops.total
    ctrl.flops.run_per_sample(("obs",), len(x), lambda: (2, lambda: kfac.observe(
        model, x[:2], y[:2], "cross_entropy", g_estimator=g_estimator)), lambda: None)
    _, direct = cost.counted(kfac.observe, model, x, y, "cross_entropy", g_estimator=g_estimator)
    assert ctrl.flops.total - before == direct > 0


@pytest.mark.parametrize("g_estimator, bias", [("exact", True), ("normalized", False), ("sampled", True)])
def test_mlp_observation_flops_in_closed_form_equal_a_direct_count(moons, g_estimator, bias):
    """The MLP's observation (with a second residual, as the depth score back-propagates) counted in
    closed form by ``linear_observe_flops`` equals FlopCounterMode's count of ``kfac.observe``."""
    from widthlab.methods.expanding import kfac
    from widthlab.methods.expanding.model import ExpandableMLP

    model = ExpandableMLP(2, 2, [3, 5, 4], generator=torch.Generator().manual_seed(1)).to(DT)
    x, y = moons.train.tensors
    x = x.to(DT)
    res = {"natural": torch.randn(len(x), 2, dtype=DT)}
    _, direct = cost.counted(kfac.observe, model, x, y, "cross_entropy", g_estimator=g_estimator, bias=bias,
                             residuals=res)
    cot = 2 if g_estimator == "exact" else 1
    layers = list(kfac.kfac_layers(model).values())
    assert cost.linear_observe_flops(layers, len(x), 2 + cot, cot, bias) == direct


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("normaliser, g_damping", [("room", 0.1), ("metric", 0.1), ("room", 0.0)])
def test_statistics_flops_in_closed_form_equal_a_direct_count(moons, arch, subset, normaliser, g_damping):
    """The per-layer statistics of an event (pseudo-inverses, ḡ, r_⊥, η_layer), with a second residual:
    ``statistics_flops`` plus what the ``metric`` normaliser charges itself equals FlopCounterMode's
    count of ``ModelObserver._statistics``."""
    from widthlab.methods.expanding import kfac
    from widthlab.methods.expanding.controller import ExpansionConfig, ExpansionController
    from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
    from widthlab.methods.expanding.observation import statistics_flops

    gen = torch.Generator().manual_seed(2)
    if arch == "mlp":
        model = ExpandableMLP(2, 2, [3, 5], generator=gen).to(DT)
        x, y = moons.train.tensors
        x = x.to(DT)
    else:
        model = ExpandableCNN((2, 5, 5), 2, [3, 4], generator=gen).to(DT)
        x, y = torch.randn(6, 2, 5, 5, generator=gen, dtype=DT), torch.randint(0, 2, (6,), generator=gen)
    obs = kfac.observe(model, x, y, "cross_entropy", residuals={"natural": torch.randn(len(x), 2, dtype=DT)})
    names = set(list(obs.layers)[1:]) if subset else None  # as after a commit: some layers only
    ctrl = ExpansionController(model, ExpansionConfig(abs_normalizer=normaliser, g_damping=g_damping),
                               "cross_entropy")
    before = ctrl.flops.total
    _, direct = cost.counted(ctrl._statistics, obs, y, 0.0, names)
    charged = ctrl.flops.total - before
    assert (charged > 0) == (normaliser == "metric")
    assert statistics_flops(obs, names, g_damping=g_damping) + charged == direct > 0


@pytest.mark.parametrize("optimizer", ["cg", "kfac"])
def test_method_flops_resume_exactly(moons, tmp_path, optimizer):
    """A run stopped after epoch 2 and resumed records the same method_flops as an uninterrupted one
    (the optimizer's count travels in its param groups, the controller's in its counters)."""
    from widthlab.train.trainer import seed_everything

    def run(run_dir, resume=False, upto=None):
        seed_everything(1)
        plan = build(None, moons, seed=1, optimizer=optimizer, start_widths=[2], max_widths=(4,), tau=0.0,
                     alpha=0.0, cooldown=2, proposals=4, mala_bursts=1, mala_steps=2, cg_maxiter=10,
                     eta_maxiter=10, kfac_stat_every=3)
        cfg = TrainConfig(epochs=4, batch_size=32, progress="none", select_best=False, checkpoint_every=1,
                          max_steps=upto)
        res = Trainer(plan.model, moons, cfg, plan.callbacks, run_dir=run_dir).fit(resume=resume)
        assert res.status == "done", res.error
        return plan.summary

    full = run(tmp_path / "a")
    run(tmp_path / "b", upto=2 * 2)
    resumed = run(tmp_path / "b", resume=True)
    for key in ("method_flops", "solve_flops", "expansion_flops"):
        assert resumed[key] == full[key] > 0, key
