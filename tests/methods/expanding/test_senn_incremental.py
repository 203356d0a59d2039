"""Within one expansion event the controller follows width commits incrementally (float64).

A unit added with zero outgoing weights changes neither the function nor any back-propagated e, so the
K-FAC observation of the grown network is the old one with the consumer's inputs refreshed and the
producer's e and G padded with zeros (``kfac.grown_observation``). These tests compare it with a fresh
``kfac.observe`` of the grown network, and the controller's statistics built from it with those built
from a fresh observation; both are equal in exact arithmetic, so up to rounding (tests/rounding.py).
Warm-started ascent searches (``warm_start`` with ``refine="ascent"``) are checked to run the shorter
budget from the previous proposals, padded with zero weights on a grown input.
"""

from __future__ import annotations

import pytest
import torch

from expanding_nets import EventTrainer, small_cnn
from rounding import assert_equal_up_to_rounding
from widthlab.methods.expanding import kfac, proposals
from widthlab.methods.expanding.controller import Candidate, ExpansionConfig, ExpansionController
from widthlab.methods.expanding.insertion import insert_units
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP

DT = torch.float64


def _mlp(seed=0):
    model = ExpandableMLP(3, 4, (5, 6), generator=torch.Generator().manual_seed(seed)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (40,), generator=g)
    return model, x, y


def _grow(model, index, seed=5):
    """Insert one unit with random incoming weights and rational coefficients at hidden layer ``index``."""
    producer = model.get_submodule(model.site_layers(index)[0])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, *producer.weight.shape[1:], generator=g, dtype=DT)
    b = torch.randn(1, generator=g, dtype=DT)
    rat = {n: torch.randn(1, generator=g, dtype=DT) for n in "vcl"}
    insert_units(model, index, w, b, rat)


def _close(actual, expected, terms):
    """Equal up to rounding; the magnitude is the largest entry of either (no cancellation in these
    sums of products beyond what the entries themselves show), at least 1 for near-zero blocks."""
    mag = max(1.0, float(expected.abs().max()), float(actual.abs().max()))
    assert_equal_up_to_rounding(actual, expected, terms=terms, magnitude=mag)


@pytest.mark.numerics
@pytest.mark.parametrize("make,index", [(_mlp, 0), (_mlp, 1), (small_cnn, 0), (small_cnn, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_grown_observation_equals_a_fresh_observation(make, index, with_residual):
    model, x, y = make()
    before = kfac.observe(model, x, y, "cross_entropy")
    _grow(model, index)
    producer, consumer = model.site_layers(index)
    rho = torch.randn(before.out.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    residuals = {"natural": rho} if with_residual else None
    got = kfac.grown_observation(before, model, x, producer, consumer, 1, residuals=residuals)
    fresh = kfac.observe(model, x, y, "cross_entropy", residuals=residuals)
    assert set(got.layers) == set(fresh.layers)
    # e rows pass through every layer; A and G add N·T products: a generous chain length
    terms = 64 * (x[0].numel() + sum(p.numel() for p in model.parameters()))
    for name, lay in fresh.layers.items():
        mine = got.layers[name]
        assert set(mine.e_rows) == set(lay.e_rows)
        _close(mine.a_rows, lay.a_rows, terms)
        _close(mine.factors.A, lay.factors.A, terms)
        _close(mine.factors.G, lay.factors.G, terms)
        assert (mine.factors.n, mine.factors.t) == (lay.factors.n, lay.factors.t)
        for k in lay.e_rows:
            _close(mine.e_rows[k], lay.e_rows[k], terms)
    # the new unit reaches the output through zero weights only: in a fresh observation too, its e and
    # G entries are exact zeros
    g_new = fresh.layers[producer].factors.G[-1]
    assert torch.equal(g_new, torch.zeros_like(g_new))


@pytest.mark.numerics
@pytest.mark.parametrize("make,index", [(_mlp, 0), (_mlp, 1), (small_cnn, 0), (small_cnn, 1)])
@pytest.mark.parametrize("natural", [False, True])
def test_grown_statistics_equal_fresh_statistics(make, index, natural):
    model, x, y = make()
    ctrl = ExpansionController(model, ExpansionConfig(), "cross_entropy")
    ctx = ctrl._observe(model, x, y, natural=True)
    _grow(model, index)
    layout = proposals.UnitLayout(1, 1)
    cand = Candidate("width", index, 0.0, 0.0, 0.0, torch.zeros(layout.size), layout)
    grown = ctrl._grown_layers(model, cand)
    assert grown == (*model.site_layers(index), 1)
    got = ctrl._observe_grown(model, x, y, ctx, grown, natural)
    fresh = ctrl._observe(model, x, y, natural)
    terms = 64 * (x[0].numel() + sum(p.numel() for p in model.parameters()))
    assert set(got.per_layer) == set(fresh.per_layer)
    for name, info in fresh.per_layer.items():
        mine = got.per_layer[name]
        assert set(mine["r_perp"]) == set(info["r_perp"])
        # pseudo-inverses of the same PSD matrices: agreement to a relative 1e-8 (their conditioning)
        torch.testing.assert_close(mine["G_inv"], info["G_inv"], rtol=1e-8, atol=1e-10)
        assert mine["eta"] == pytest.approx(info["eta"], rel=1e-8, abs=1e-14)
        for k, r in info["r_perp"].items():
            torch.testing.assert_close(mine["r_perp"][k], r, rtol=1e-8, atol=1e-10)
    _close(torch.tensor(got.bound, dtype=DT), torch.tensor(fresh.bound, dtype=DT), terms)
    if natural:
        assert got.eta_global == pytest.approx(fresh.eta_global, rel=1e-8)


def test_grown_layers_only_for_width_commits_of_expandable_networks():
    model, x, y = _mlp()
    ctrl = ExpansionController(model, ExpansionConfig(), "cross_entropy")
    layout = proposals.UnitLayout(1, 1)
    depth = Candidate("depth", 1, 0.0, 0.0, 0.0, torch.zeros(layout.size), layout)
    assert ctrl._grown_layers(model, depth) is None
    other = torch.nn.Sequential(torch.nn.Linear(3, 4))
    width = Candidate("width", 0, 0.0, 0.0, 0.0, torch.zeros(layout.size), layout)
    assert ctrl._grown_layers(other, width) is None


@pytest.mark.parametrize("make", [_mlp, small_cnn])
def test_warm_ascent_continues_the_neighbours_proposals_for_the_shorter_budget(make, monkeypatch):
    """After a width commit at site i the grown site is searched afresh (``ascent_steps``: ascent is
    greedy and its proposals sit where the committed unit was) and site i + 1, whose input gained a
    unit, continues its refined proposals with zero weights on the new input (the same scores to start
    from) for ``ascent_warm_steps``. MLP sites are searched in one batch, so with the grown site in it
    every search starts afresh."""
    model, x, y = make()
    cfg = ExpansionConfig(refine="ascent", ascent_steps=8, ascent_warm_steps=3, proposals=4, tau=0.0,
                          alpha=0.0, max_additions=4, max_widths=(64, 64, 64), layer_cooldown=99,
                          score_batch=None)
    ctrl = ExpansionController(model, cfg, "cross_entropy")
    ctrl.layer_cd = 99  # widths only
    calls = []
    real = proposals.refine

    def spy(fn, theta, method, **kw):
        calls.append((theta.detach().clone(), kw["ascent_steps"]))
        res = real(fn, theta, method, **kw)
        calls[-1] += (res.theta.detach().clone(),)
        return res

    monkeypatch.setattr(proposals, "refine", spy)
    events = ctrl.expand(EventTrainer(model, x, y))
    assert len(events) == 4
    grown = [a["index"] for a in ctrl.log[-1]["additions"]]
    depth = model.depth
    if isinstance(model, ExpandableCNN):  # one search per site: round 0 all, then site i fresh, i + 1 warm
        want = [8] * depth + [s for i in grown[:-1] for s in [8] + ([3] if i + 1 < depth else [])]
    else:
        want = [8] * len(grown)
    steps = [c[1] for c in calls]
    assert steps == want
    ends = [c[2] for c in calls]
    for n, (theta0, k, _) in enumerate(calls):
        continued = any(_padded_equal(e, theta0, model)
                        or (e.shape == theta0.shape and torch.equal(e, theta0)) for e in ends[:n])
        assert continued == (k == 3)


def _padded_equal(end, start, model):
    """``start`` is ``end`` with zero weights on one more input (site layouts of ``model``)."""
    k_kernel = (3, 3) if isinstance(model, ExpandableCNN) else ()
    per = 1
    for s in k_kernel:
        per *= s
    d_old = (end.shape[1] - 4) // per
    if start.shape[1] != end.shape[1] + per:
        return False
    old = proposals.UnitLayout(1, d_old, k_kernel).split(end)
    new = proposals.UnitLayout(1, d_old + 1, k_kernel).split(start)
    return (torch.equal(new["W"][:, :, :d_old], old["W"].to(start.dtype))
            and bool((new["W"][:, :, d_old:] == 0).all())
            and all(torch.equal(new[n], old[n].to(start.dtype)) for n in "bvcl"))


def test_the_preservation_check_reuses_the_last_commits_loss_within_an_event(monkeypatch):
    """Within an event the loss after one commit is the loss before the next (nothing else changes the
    model), so an event of c commits runs c + 1 checking forward passes, not 2c; outside an event every
    commit measures its own before and after."""
    model, x, y = _mlp()
    cfg = ExpansionConfig(tau=0.0, alpha=0.0, max_additions=3, max_widths=(64, 64, 64), mala_bursts=2,
                          proposals=4, layer_proposals=4)
    ctrl = ExpansionController(model, cfg, "cross_entropy")
    checks = []
    real = ctrl.flops.run

    def run(key, fn, *a, **kw):
        if key[0] == "check":
            checks.append(key)
        return real(key, fn, *a, **kw)

    monkeypatch.setattr(ctrl.flops, "run", run)
    events = ctrl.expand(EventTrainer(model, x, y))
    assert len(events) == 3 and len(checks) == 4
    checks.clear()
    layout = proposals.UnitLayout(1, model.layers[0].in_features)
    cand = Candidate("width", 0, 0.0, 0.0, 0.0, torch.zeros(layout.size, dtype=DT), layout)
    ctrl._commit(model, cand, x, y)
    ctrl._commit(model, cand, x, y)
    assert len(checks) == 4


def test_the_reused_check_still_catches_an_insertion_that_changes_the_function():
    model, x, y = _mlp()
    ctrl = ExpansionController(model, ExpansionConfig(), "cross_entropy")
    ctrl._in_event = True  # as inside expand(): the first check's after-loss is kept for the next
    event = type("Ev", (), {"description": "test insertion"})()
    ctrl._preserving(model, lambda: event, x, y)
    assert ctrl._event_loss is not None and ctrl._event_loss[0] is x

    def bad():
        with torch.no_grad():
            model.layers[-1].weight.mul_(2.0)
        return event

    with pytest.raises(RuntimeError, match="changed the loss"):
        ctrl._preserving(model, bad, x, y)
