"""The densely connected self-expanding CNN (Mitchell et al. 2023, CNN experiments): function-preserving
edits, masked rows, the thaw score against the dense Δη′ closed form, the curvature-propagation sampler
against the exact curvature from torch.func, checkpoints, and the study path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from rounding import assert_equal_up_to_rounding
from widthlab.methods.expanding.connection_controller import ConnectionConfig, ConnectionController
from widthlab.methods.expanding.connection_scores import connection_scores
from widthlab.methods.expanding.curvature_sampler import curvature_sample, silu_second_derivative
from widthlab.methods.expanding.dense_cnn import ExpandableDense
from widthlab.nn.optim_surgery import apply_events


def _net(widths=((4,), (4,)), dtype=torch.float64, seed=0, **kw):
    kw = {"bud_width": 2, "init_active": 3, "max_width": 32, **kw}
    gen = torch.Generator().manual_seed(seed)
    net = ExpandableDense((1, 6, 6), 3, [list(b) for b in widths], generator=gen, **kw)
    return net.to(dtype)


def _data(n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _magnitude(net, x):
    """Bound on any pre-activation's sum of |products| (weights and activations are O(1) here)."""
    with torch.no_grad():
        w = max(float(p.abs().max()) for p in net.parameters())
    return w * max(float(x.abs().max()), 1.0) * 10.0


def test_zero_padding_channels_keeps_logits():
    net, (x, _) = _net(), _data()
    with torch.no_grad():
        before = net(x)
    for b, j in [(0, 0), (1, 0)]:
        ev = net.add_channels(b, j, 3)
        assert ev and all(pr.n_new == 3 for pr in ev.params)
    with torch.no_grad():
        after = net(x)
    assert net.block_widths() == [[7], [7]]
    # the sums over input channels gain zero terms only: equal up to rounding of the longer sums
    assert_equal_up_to_rounding(after, before, terms=9 * 16, magnitude=_magnitude(net, x))


def test_bud_promotion_keeps_logits_and_makes_bud_a_layer():
    net, (x, _) = _net(widths=((4, 4), (4,))), _data()
    bud_w = net.blocks[0][1].bud.chunks[0].weight
    with torch.no_grad():
        before = net(x)
    ev = net.promote_bud(0, 1, torch.Generator().manual_seed(3))
    with torch.no_grad():
        after = net(x)
    assert net.block_widths() == [[4, 2, 4], [4]]
    assert net.blocks[0][1].chunks[0].weight is bud_w  # the bud's weights are the new layer's
    assert all(bool(c.mask.all()) for c in net.blocks[0][1].chunks)
    assert ev.added and not ev.params
    assert_equal_up_to_rounding(after, before, terms=9 * 16, magnitude=_magnitude(net, x))
    # the old layer reads the new one through zero, inactive but thawable rows
    rows = net.blocks[0][2].chunks[2]
    assert rows.weight.abs().max() == 0 and not rows.mask.any() and not rows.frozen


def test_thaw_score_equals_dense_delta_eta_prime():
    """thaw_i = tr(Cᵀ A_f⁻¹ C) with f = a_i, C = E[f r_⊥ᵀ], r_⊥ = e − ḡ_actᵀ A_act⁻¹ a_act (G whitened to I),
    computed from per-sample (a, e); and it lower-bounds the exact Schur-complement Δη."""
    g = torch.Generator().manual_seed(0)
    N, d, K = 200, 6, 4
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = torch.randn(N, d, generator=g, dtype=torch.float64) @ mix
    e = torch.randn(N, K, generator=g, dtype=torch.float64)
    A, gbar = a.T @ a / N, a.T @ e / N
    active = torch.tensor([True, True, False, True, False, False])
    sc = connection_scores(A, gbar, torch.zeros(d, K, dtype=torch.float64), active)
    act = active.nonzero().flatten()
    r = e - a[:, act] @ torch.linalg.solve(A[act][:, act], gbar[act])
    for i in (~active).nonzero().flatten().tolist():
        f = a[:, i:i + 1]
        C = f.T @ r / N
        A_f = f.T @ f / N
        dense = float(torch.trace(C.T @ torch.linalg.solve(A_f, C)))
        assert float(sc.thaw[i]) == pytest.approx(dense, rel=1e-10)
        schur = A_f - A[i:i + 1, act] @ torch.linalg.solve(A[act][:, act], A[act, i:i + 1])
        exact = float(torch.trace(C.T @ torch.linalg.solve(schur, C)))
        assert dense <= exact * (1 + 1e-12)


def _controller(net, **kw):
    cfg = ConnectionConfig(**{"ema_rate": 0.2, "min_active": 1, **kw})
    ctl = ConnectionController(net, cfg, seed=0)

    class T:
        model = net
    ctl.on_fit_start(T)
    return ctl


def _train(net, ctl, x, y, steps, opt=None):
    opt = opt or torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        ctl.on_after_backward()
        opt.step()
        ctl.on_step_end()
    return opt


def test_thaw_keeps_function_and_masked_rows_stay_zero():
    net, (x, y) = _net(), _data()
    ctl = _controller(net, adapt=False)
    _train(net, ctl, x, y, 5)
    for layer in net.kernels():
        w, m = layer.rows(), layer.mask()
        assert w[~m].abs().max() == 0  # exactly zero after Adam steps
    with torch.no_grad():
        before = net(x)
    ctl.cfg.thaw_prob, ctl.cfg.rel_threshold, ctl.cfg.freeze_prob = 1.0, 0.0, 0.0
    n0 = net.active_connections()
    ctl.decide()
    assert net.active_connections() > n0 and ctl.counts["thawed"] > 0
    with torch.no_grad():
        assert torch.equal(net(x), before)  # thawed rows start at zero
    # bud rows are never thawed
    assert all(not layer.bud_rows.mask.any() for b in net.blocks for layer in b)


def test_prune_compensates_and_rows_stay_zero():
    net, (x, y) = _net(), _data()
    ctl = _controller(net, adapt=False, thaw_prob=1.0, rel_threshold=0.0)
    opt = _train(net, ctl, x, y, 3)
    ctl.decide()  # thaw everything it can
    ctl.cfg.thaw_prob, ctl.cfg.freeze_prob, ctl.cfg.rel_threshold = 0.0, 1.0, 1e9
    ctl.decide()
    assert ctl.counts["pruned"] > 0
    _train(net, ctl, x, y, 3, opt)
    for layer in net.kernels():
        assert layer.rows()[~layer.mask()].abs().max() == 0


def test_epoch_growth_is_function_preserving_and_remaps_adam():
    net, (x, y) = _net(widths=((4,), (4,))), _data()
    ctl = _controller(net, adapt=True, thaw_prob=1.0, rel_threshold=0.0, depth_threshold=0.0)
    opt = _train(net, ctl, x, y, 4)
    with torch.no_grad():
        before = net(x)
    events = ctl.on_epoch_end()
    assert events
    apply_events(opt, events)
    with torch.no_grad():
        after = net(x)
    assert_equal_up_to_rounding(after, before, terms=9 * 32, magnitude=_magnitude(net, x))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in net.parameters()}
    alive = {id(p) for p in net.parameters()}
    checked = 0
    for pr in [pr for ev in events for pr in ev.params if id(pr.new) in alive]:  # new entries: m = 0, v = 1
        st = opt.state[pr.new]
        checked += 1
        idx = [slice(None)] * pr.new.dim()
        idx[pr.dim] = slice(pr.new.shape[pr.dim] - pr.n_new, None)
        assert st["exp_avg"][tuple(idx)].abs().max() == 0 and torch.all(st["exp_avg_sq"][tuple(idx)] == 1)
    assert checked >= 2
    _train(net, ctl, x, y, 2, opt)


def test_the_controller_charges_exactly_the_flops_its_hooks_compute():
    # method_flops comes from closed forms (connection_scores.*_flops); the dispatcher's count of every
    # product and decomposition the hooks run (cost.counted) is the independent reference, over steps
    # that thaw, freeze, prune (one of them through the LU fallback) and an epoch's growth.
    from widthlab.methods.expanding import connection_scores as cs
    from widthlab.methods.expanding import cost

    net, (x, y) = _net(), _data()
    ctl = _controller(net, thaw_prob=0.5, freeze_prob=0.3, rel_threshold=1e-3, depth_threshold=0.0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    counted = 0
    real = cs.natural_gradient
    lu = {"left": 1}

    def sometimes_lu(A, g, act, w=None):  # one indefinite block: the LU path of every score
        if lu["left"] and act.numel() > 1:
            lu["left"] = 0
            bad = A.clone()
            bad[act[0], act[0]] = -1.0
            return real(bad, g, act, w)
        return real(A, g, act, w)

    import widthlab.methods.expanding.connection_controller as cc
    cc.natural_gradient = sometimes_lu
    try:
        for step in range(12):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            counted += cost.counted(ctl.on_after_backward)[1]
            opt.step()
            counted += cost.counted(ctl.on_step_end)[1]
            if step in (5, 9):  # growth: width at the first, depth (all rows scored) at the second
                ctl.cfg.width = step == 5
                events, flops = cost.counted(ctl.on_epoch_end)
                counted += flops
                apply_events(opt, events or [])
    finally:
        cc.natural_gradient = real
    assert lu["left"] == 0 and ctl.counts["thawed"] > 0 and ctl.counts["pruned"] > 0
    assert ctl.counts["channels_added"] > 0 and ctl.counts["layers_added"] == 1
    assert ctl.events == 2 and counted > 0
    assert ctl.flops == counted


def test_expansion_share_of_a_resumed_fit_counts_the_earlier_sessions():
    # The checkpoint carries the method's seconds of the earlier sessions; the share must divide them by
    # the whole fit's wall time (the trainer's wall_before plus this session), not this session's alone.
    import time

    net = _net()
    ctl = _controller(net)
    ctl.seconds = 3.0

    class Resumed:
        wall_before = 10.0
    ctl._fit_t0 = time.perf_counter() - 2.0
    ctl.on_fit_end(Resumed)
    assert 3.0 / 13.0 < ctl.summary["expansion_share"] <= 3.0 / 12.0


def test_checkpoint_round_trip():
    net, (x, y) = _net(), _data()
    ctl = _controller(net, thaw_prob=0.5, rel_threshold=0.0, depth_threshold=0.0)
    opt = _train(net, ctl, x, y, 3)
    apply_events(opt, ctl.on_epoch_end())
    apply_events(opt, ctl.on_epoch_end())
    state, weights = ctl.state_dict(), {k: v.clone() for k, v in net.state_dict().items()}
    net2 = _net(seed=5)
    ctl2 = ConnectionController(net2, ConnectionConfig(**state["config"]), seed=0)
    ctl2.load_state_dict(state, net2)
    net2.load_state_dict(weights)
    assert ctl.events == 2 and ctl.flops > 0  # the cost counters travel too
    assert (ctl2.events, ctl2.flops, ctl2.seconds) == (ctl.events, ctl.flops, ctl.seconds)
    assert net2.block_widths() == net.block_widths()
    with torch.no_grad():
        assert torch.equal(net2(x), net(x))
    ctl.decide()
    ctl2.decide()
    assert all(torch.equal(a.mask(), b.mask()) for a, b in zip(net.kernels(), net2.kernels()))
    assert ctl2.counts == ctl.counts


def test_curvature_sampler_matches_exact_curvature():
    """mean h hᵀ over samples vs J_fᵀ H J_f + Σ J_zᵀ |g σ''(z)| J_z computed with torch.func jacobians."""
    torch.manual_seed(0)
    net = ExpandableDense((1, 3, 3), 3, [[2]], bud_width=1, init_active=8, max_width=8,
                          generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # give the bud rows weight so every parameter has curvature
        net.blocks[0][0].bud_rows.weight.normal_()
    x, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    names = [n for n, _ in net.named_parameters()]
    params = dict(net.named_parameters())
    flat = torch.cat([p.detach().flatten() for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = v[i:i + k].view(s)
            i += k
        return out

    zs = []

    def record(z):
        zs.append(z)
        return F.silu(z)

    def pre_acts(v):
        zs.clear()
        layers = [m for m in net.modules() if hasattr(m, "activation_hook")]
        for m in layers:
            m.activation_hook = record
        try:
            functional_call(net, unflat(v), (x,))
        finally:
            for m in layers:
                m.activation_hook = None
        return tuple(z.flatten() for z in zs)

    logits_fn = lambda v: functional_call(net, unflat(v), (x,))  # noqa: E731
    J = jacrev(logits_fn)(flat)  # (B, K, P)
    logits = logits_fn(flat)
    H = torch.stack([torch.func.hessian(lambda f, t=t: F.cross_entropy(f, t, reduction="sum"))(f0)
                     for f0, t in zip(logits, y)])
    exact = torch.einsum("bkp,bkl,blq->pq", J, H, J)
    Jz = jacrev(pre_acts)(flat)
    z_vals = pre_acts(flat)
    # g = ∂ℓ/∂σ(z) for each activation, by autograd on the recorded graph
    zs.clear()
    layers = [m for m in net.modules() if hasattr(m, "activation_hook")]
    acts = []

    def keep(z):
        a = F.silu(z)
        acts.append(a)
        return a
    for m in layers:
        m.activation_hook = keep
    loss = F.cross_entropy(net(x), y, reduction="sum")
    for m in layers:
        m.activation_hook = None
    gs = torch.autograd.grad(loss, acts)
    for Jl, z, g in zip(Jz, z_vals, gs):
        d2 = torch.vmap(torch.func.grad(torch.func.grad(F.silu)))(z)  # σ'' by autodiff
        assert torch.allclose(silu_second_derivative(z), d2, rtol=1e-12, atol=1e-14)
        w = (g.flatten() * d2).abs()
        exact = exact + torch.einsum("ip,i,iq->pq", Jl, w, Jl)
    gen = torch.Generator().manual_seed(0)
    M = 4000
    est = torch.zeros_like(exact)
    for _ in range(M):
        h = torch.cat([t.flatten() for t in curvature_sample(net, x, y, generator=gen)])
        est += torch.outer(h, h) / M
    rel = float((est - exact).norm() / exact.norm())
    # Monte-Carlo error of a Rademacher outer-product mean: ~ sqrt(2/M) relative (≈ 0.022 at M = 4000)
    assert rel < 0.1, rel
    assert float(exact.norm()) > 0


def test_unknown_dense_option_is_an_error():
    from widthlab.data.base import TaskData  # noqa: F401
    from widthlab.methods.expanding.plan import build_dense

    class D:
        input_shape, num_outputs, task = (1, 8, 8), 10, "classification"
    with pytest.raises(ValueError, match="frobnicate"):
        build_dense(D(), seed=0, options={"frobnicate": 1})
    with pytest.raises(ValueError, match="dense.widths"):
        build_dense(D(), seed=0, options={"widths": [8, 8]})


def _digits_fit(run_dir=None, select_best=False, upto=None, resume=False, epochs=4):
    from widthlab.data.registry import load_dataset
    from widthlab.methods.expanding.plan import build
    from widthlab.train.config import TrainConfig
    from widthlab.train.trainer import Trainer, seed_everything

    data = load_dataset("digits", as_image=True, subset=96)
    dense = {"widths": [[4], [4]], "bud_width": 2, "max_width": 16, "ema_rate": 0.2, "thaw_prob": 0.2,
             "freeze_prob": 0.05, "depth_threshold": 0.0, "min_active": 2}
    seed_everything(3)
    plan = build(None, data, seed=3, architecture="dense_cnn", dense=dense)
    cfg = TrainConfig(epochs=epochs, batch_size=32, progress="none", select_best=select_best,
                      checkpoint_every=1, max_steps=upto)
    trainer = Trainer(plan.model, data, cfg, plan.callbacks, run_dir=run_dir)
    res = trainer.fit(resume=resume)
    assert res.status == "done", res.error
    return plan, res, len(data.train)


def test_select_best_restore_keeps_the_whole_fits_counts_and_costs():
    # Going back to the best epoch's snapshot restores the architecture, not the run's totals: the
    # summary must report every thaw, event and FLOP of the fit, as a run without select_best does.
    plain, _, _ = _digits_fit(select_best=False, epochs=6)
    best, res, _ = _digits_fit(select_best=True, epochs=6)
    assert res.best_epoch < 6  # the snapshot restore did happen
    keys = ("thawed", "pruned", "reinit", "channels_added", "layers_added", "expansion_events",
            "method_flops")
    assert {k: best.summary[k] for k in keys} == {k: plain.summary[k] for k in keys}
    assert plain.summary["expansion_events"] == 6
    assert best.model.block_widths() == best.summary["final_widths"]


def test_resume_from_a_checkpoint_without_cost_counters_reports_them_unknown():
    net = _net()
    ctl = _controller(net)
    state = ctl.state_dict()
    for k in ("seconds", "events", "flops"):
        del state[k]
    ctl2 = ConnectionController(_net(), ConnectionConfig(**state["config"]), seed=0)
    ctl2.load_state_dict(state, _net())
    ctl2._fit_t0 = 0.0
    ctl2.on_fit_end()
    s = ctl2.summary
    assert s["method_flops"] is None and s["expansion_events"] is None and s["expansion_share"] is None
    assert "cost counters" in s["cost_note"]


def test_trainer_resume_is_exact_across_growth(tmp_path):
    """A digits run stopped after epoch 2 and resumed ends with the same architecture, masks and
    bit-identical weights as an uninterrupted one (controller statistics and RNG travel in checkpoints)."""
    full, _, n_train = _digits_fit(tmp_path / "a")
    _digits_fit(tmp_path / "b", upto=2 * -(-n_train // 32))
    resumed, _, _ = _digits_fit(tmp_path / "b", resume=True)
    s_full, s_res = full.summary, resumed.summary
    assert resumed.model.block_widths() == full.model.block_widths()
    assert s_full["layers_added"] + s_full["channels_added"] > 0
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n
    keys = ("thawed", "pruned", "reinit", "expansion_events", "method_flops")
    assert {k: s_res[k] for k in keys} == {k: s_full[k] for k in keys}
    assert s_full["expansion_events"] == 4 and s_full["method_flops"] > 0
