"""Channel growth of the expandable CNN scored with convolution K-FAC factors (SENN CNNs), float64.

A candidate channel's rows at the consumer are its k·kh·kw patches (Conv2d consumer) or its pooled mean
(Linear head). After inserting the channel for real (zero outgoing weights), the consumer's K-FAC η rises
by exactly the Schur-complement Δη computed beforehand from those rows, and the logits do not change
(up to rounding: the consumer's sums get longer, so BLAS may block them differently).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from expanding_nets import small_cnn
from rounding import assert_equal_up_to_rounding, forward_magnitude
from widthlab.data.base import TaskData
from widthlab.methods.expanding import kfac, proposals, scores
from widthlab.methods.expanding.insertion import insert_units
from widthlab.methods.expanding.plan import build
from widthlab.train.config import TrainConfig
from widthlab.train.trainer import Trainer

DT = torch.float64


def _backward_gain(model, stage: int) -> float:
    """How much the back-propagated e at the consumer of ``stage`` can amplify an error in the logits:
    the product of the ℓ1 operator norms |Wᵀ| of the layers after the consumer (rational slopes <= 1
    on the range seen, softmax Jacobian <= 1)."""
    gain = max(1.0, float(model.head.weight.detach().abs().sum(0).max()))
    for conv in model.convs[stage + 2:]:
        gain *= max(1.0, float(conv.weight.abs().sum((0, 2, 3)).max()))
    return gain


@pytest.mark.numerics
@pytest.mark.parametrize("stage", [0, 1])
def test_channel_score_is_the_exact_eta_increase(stage):
    model, x, y = small_cnn()
    producer, consumer = model.site_layers(stage)
    obs = kfac.observe(model, x, y, "cross_entropy")
    lay = obs.layers[consumer]
    a, e, n, t = lay.a_rows, lay.e_rows["grad"], obs.n, lay.factors.t
    A_inv = scores.psd_pinv(lay.factors.A)
    G_inv = torch.linalg.inv(scores.damp(lay.factors.G, 0.1))
    gbar = kfac.gradient_from_rows(a, e, n)
    eta0 = scores.layer_eta(gbar, A_inv, G_inv)
    layout = proposals.UnitLayout(1, model.convs[stage].in_channels, (3, 3))
    theta = proposals.random_candidates(layout, 1, generator=torch.Generator().manual_seed(4))
    f = proposals.conv_unit_features(layout, theta, obs.layers[producer].a, pool=True,
                                     consumer=model.get_submodule(consumer))[0]
    r_perp = scores.residual_rows(a, e, A_inv, gbar, t)
    st = scores.candidate_stats(f, r_perp, n, a)
    d_exact = scores.delta_eta(st.C, scores.schur_complement(st.A_f, st.A_fa, A_inv), G_inv)
    d_lb = scores.delta_eta_lb(st.C, st.A_f, G_inv)
    assert 0 <= d_lb <= d_exact * (1 + 1e-9)

    with torch.no_grad():
        before = model(x)
    parts = layout.split(theta)
    insert_units(model, stage, parts["W"][0], parts["b"][0], {k: parts[k][0] for k in "vcl"})
    # up to rounding: the consumer sums 9 more (zero) terms per new channel, in another BLAS blocking
    terms = sum(c.in_channels * 9 + 1 for c in model.convs) + 6 * 6 + model.head.in_features + 1
    fwd = forward_magnitude(model, x)
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), before, terms=terms, magnitude=fwd)
    obs1 = kfac.observe(model, x, y, "cross_entropy")
    l1 = obs1.layers[consumer]
    assert_equal_up_to_rounding(l1.e_rows["grad"], e, terms=2 * terms,
                                magnitude=fwd * _backward_gain(model, stage))
    eta1 = scores.layer_eta(kfac.gradient_from_rows(l1.a_rows, e, n), scores.psd_pinv(l1.factors.A), G_inv)
    torch.testing.assert_close(eta1 - eta0, d_exact, rtol=1e-7, atol=1e-12)


def test_cnn_grows_channels_in_training():
    """The method on a tiny image task: channels are added, the optimizer follows, logits stay finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()
    ds = torch.utils.data.TensorDataset(x, y)
    data = TaskData("toy", "classification", ds, ds, ds, (1, 6, 6), 2)
    plan = build(None, data, seed=0, architecture="cnn", start_widths=[2, 2], max_widths=[3, 4],
                 optimizer="default", tau=0.0, alpha=0.0, proposals=2, mala_bursts=1, mala_steps=1,
                 cooldown=1)
    cfg = TrainConfig(epochs=1, batch_size=16, progress="none", select_best=False, checkpoint_every=0)
    res = Trainer(plan.model, data, cfg, plan.callbacks).fit()
    assert res.status == "done", res.error
    assert plan.model.hidden_widths() == [3, 4]  # grown to the caps by the event at the start
    assert res.history[-1]["neurons"] == 7


@pytest.mark.numerics
def test_inserted_identity_stage_preserves_the_logits():
    """A stage added in depth (3×3 identity kernel, bias 0, identity rational, no pooling) maps the
    feature map to itself: logits equal up to the rounding of its 9·c-term sums of exact zeros."""
    from widthlab.methods.expanding.insertion import insert_conv_stage

    model, x, _ = small_cnn(3)
    with torch.no_grad():
        before, feats = model(x), model.features(x)
    ev = insert_conv_stage(model)
    assert model.depth == 3 and model.hidden_widths() == [3, 4, 4] and model.pools == [True, True, False]
    assert {n for n, _ in ev.added} == {"convs.2.weight", "convs.2.bias", "acts.2.v", "acts.2.c", "acts.2.l"}
    terms = 9 * 4 + 1
    with torch.no_grad():
        assert_equal_up_to_rounding(model.features(x), feats, terms=terms, magnitude=float(feats.abs().max()))
        assert_equal_up_to_rounding(model(x), before, terms=terms + model.head.in_features + 1,
                                    magnitude=forward_magnitude(model, x))
    # the architecture (with the new stage's pooling flag) round-trips through set_architecture
    fresh, _, _ = small_cnn(4)
    fresh.set_architecture(model.architecture())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_cnn_adds_depth_in_training():
    """Zero thresholds and a depth cap of 3 stages: the event at the start inserts a stage before the
    head (after the channel growth), the loss check of every insertion passes, training goes on."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()
    ds = torch.utils.data.TensorDataset(x, y)
    data = TaskData("toy", "classification", ds, ds, ds, (1, 6, 6), 2)
    plan = build(None, data, seed=0, architecture="cnn", start_widths=[2], max_widths=[3, 3, 3],
                 optimizer="default", tau=0.0, alpha=0.0, alpha_layer=0.0, proposals=2, layer_proposals=2,
                 mala_bursts=1, mala_steps=1, cooldown=1, layer_cooldown=1)
    cfg = TrainConfig(epochs=2, batch_size=16, progress="none", select_best=False, checkpoint_every=0)
    res = Trainer(plan.model, data, cfg, plan.callbacks).fit()
    assert res.status == "done", res.error
    assert plan.summary["layers_added"] >= 1 and plan.model.depth >= 2
    assert plan.model.pools[0] and not any(plan.model.pools[1:])


def test_eta_mode_picks_the_route_of_the_natural_gradient_solve(monkeypatch):
    """``eta_mode`` reaches the events' CG solve (the Gauss-Newton route it builds), and both routes solve
    to the dense reference gᵀ(F + λI)⁻¹g (``fisher.eta_dense``) and give the same natural-gradient
    residual, up to rounding (CG run to convergence: 60 iterations on 104 parameters, tolerance 0)."""
    from widthlab.methods.expanding import observation
    from widthlab.methods.expanding.fisher import eta_dense, gauss_newton, loss_gradient

    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    data = TaskData("toy", "classification", ds, ds, ds, (1, 6, 6), 3)
    routes = []
    real = observation.metered_operator

    def spy(*args, **kw):
        op, matvec = real(*args, **kw)
        routes.append(op.mode)
        return op, matvec

    monkeypatch.setattr(observation, "metered_operator", spy)
    out = {}
    for mode in ("jacobian", "autograd", "auto"):
        plan = build(None, data, seed=0, architecture="cnn", start_widths=[2, 3], max_widths=[3, 4],
                     eta_mode=mode, eta_maxiter=60)
        plan.model.double()
        ctrl = next(c for c in plan.callbacks if hasattr(c, "_natural"))
        ctrl.cfg = dataclasses.replace(ctrl.cfg, eta_tol=0.0)
        out[mode] = ctrl._natural(plan.model, x, y)
    assert routes == ["jacobian", "autograd", "jacobian"]  # auto: 24·3·P entries, far below 10⁷
    (res_j, eta_j), (res_a, eta_a) = out["jacobian"], out["autograd"]
    F = gauss_newton(plan.model, x, "cross_entropy", ctrl.cfg.output_metric)
    eta = float(eta_dense(F, loss_gradient(plan.model, x, y, "cross_entropy"), ctrl.cfg.eta_damping))
    # a converged solve's error: the products' rounding amplified by up to κ(F + λI)
    ev = torch.linalg.eigvalsh(F) + ctrl.cfg.eta_damping
    bound = 100 * float(ev[-1] / ev[0]) * torch.finfo(DT).eps
    assert eta > 0 and bound < 1e-9
    assert abs(eta_j - eta) <= bound * eta and abs(eta_a - eta) <= bound * eta
    torch.testing.assert_close(res_a["natural"], res_j["natural"], rtol=bound, atol=bound)
    with pytest.raises(ValueError, match="eta_mode"):
        build(None, data, seed=0, architecture="cnn", start_widths=[2], eta_mode="dense")
