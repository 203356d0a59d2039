"""Width candidates of several units (``ExpansionConfig.width_block``), float64.

A block of k units is refined on its joint lower-bound score, decided like one unit on each proposal's
best unit scored alone, and a passing block keeps the greedy prefix of its units whose marginal gains
pass. Single-unit scores and gains are checked against subset scores of the independent references
(``unit_score.delta_eta_rows`` for MLP units, ``proposals.unit_score_fn`` over
``proposals.conv_unit_features`` for CNN channels), their FLOP charges against the counting mode, the
decision and trimming against hand-made scores, and whole events on an MLP and a CNN: every commit is
at most one block, the function is preserved (the controller's check) and the counters count units.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expanding_nets import EventTrainer, small_cnn
from widthlab.methods.expanding import cost, proposals, unit_score
from widthlab.methods.expanding.candidate_search import CandidateSearch, subset_units
from widthlab.methods.expanding.controller import ExpansionConfig, ExpansionController
from widthlab.methods.expanding.model import ExpandableMLP

DT = torch.float64


def _spd_inverse(m, g):
    B = torch.randn(m, m, generator=g, dtype=DT)
    return torch.linalg.inv(B @ B.T + torch.eye(m, dtype=DT))


def _check_greedy(gains_of, reference, k):
    """``gains_of(θ)`` against ``reference(θ rows, layout)``: the order is greedy on the reference's
    subset scores and each gain is the difference of consecutive prefix scores."""
    order, gains = gains_of
    assert sorted(order) == list(range(k))
    last = 0.0
    for t in range(k):
        before = order[:t]
        best = max((reference(before + [u]), u) for u in range(k) if u not in before)
        assert order[t] == best[1]
        assert float(gains[t]) == pytest.approx(best[0] - last, rel=1e-9, abs=1e-12)
        last = best[0]
    assert float(gains.sum()) == pytest.approx(reference(list(range(k))), rel=1e-9)


def test_mlp_block_gains_are_greedy_differences_of_the_reference_subset_scores():
    g = torch.Generator().manual_seed(0)
    N, d, m, k = 30, 5, 4, 4
    site = unit_score.Site(torch.randn(N, d, generator=g, dtype=DT), torch.randn(N, m, generator=g, dtype=DT),
                           _spd_inverse(m, g), 0.7)
    layout = proposals.UnitLayout(k, d)
    theta = proposals.random_candidates(layout, 1, generator=g, dtype=DT)[0]
    scorer = unit_score.UnitScore(k, [site], N, jitter=0.0)

    def reference(units):
        th, lay = subset_units(layout, theta, units)
        return float(unit_score.delta_eta_rows(lay, th[None], site, N)[0])

    mo = scorer.moments(theta[None])
    assert float(mo.score[0]) == pytest.approx(reference(list(range(k))), rel=1e-10)
    _check_greedy(mo.gains(0), reference, k)
    single = mo.single()[0]
    for u in range(k):
        assert float(single[u]) == pytest.approx(reference([u]), rel=1e-10)
    assert float(mo.gains(0)[1][0]) == pytest.approx(float(single.max()), rel=1e-10)  # greedy starts there


@pytest.mark.parametrize("head", [False, True])
def test_cnn_block_gains_are_greedy_differences_of_the_reference_subset_scores(head):
    g = torch.Generator().manual_seed(1)
    N, c_in, m, k = 6, 2, 3, 3
    h = torch.randn(N, c_in, 6, 6, generator=g, dtype=DT)
    consumer = (nn.Linear(k, m) if head else nn.Conv2d(k + 2, m, 3, padding=1)).to(DT)
    layout = proposals.UnitLayout(k, c_in, (3, 3))
    theta = proposals.random_candidates(layout, 1, generator=g, dtype=DT)[0]
    rows = proposals.conv_unit_features(layout, theta[None], h, pool=True, consumer=consumer).shape[1]
    r = torch.randn(rows, m, generator=g, dtype=DT)
    G_inv = _spd_inverse(m, g)
    jitter = 1e-13
    scorer = unit_score.ChannelScore(layout, h, consumer, True, r, G_inv, N, 0.7, jitter=jitter, dtype=DT)

    def reference(units):
        th, lay = subset_units(layout, theta, units)

        def feats(t):  # (the consumer's geometry only is read)
            return proposals.conv_unit_features(lay, t, h, pool=True, consumer=consumer)

        return float(proposals.unit_score_fn(feats, r, G_inv, N, 0.7, jitter=jitter)(th[None])[0])

    mo = scorer.moments(theta[None])
    _check_greedy(mo.gains(0), reference, k)
    single = mo.single()[0]
    for u in range(k):
        assert float(single[u]) == pytest.approx(reference([u]), rel=1e-9)


@pytest.mark.parametrize("k,cols,m", [(1, 1, 3), (3, 1, 4), (3, 9, 5)])
def test_greedy_gains_flops_equal_the_counting_mode(k, cols, m):
    g = torch.Generator().manual_seed(2)
    K = k * cols
    f = torch.randn(K, 40, generator=g, dtype=DT)
    C, A = torch.randn(K, m, generator=g, dtype=DT), f @ f.T / 40
    G_inv = _spd_inverse(m, g)
    assert unit_score.greedy_gains_flops(k, cols, m) == cost.counted(
        unit_score.greedy_gains, C, A, G_inv, cols, 1.0, 1e-10)[1]


@pytest.mark.parametrize("k,cols,m", [(1, 1, 3), (4, 1, 4), (3, 9, 5)])
def test_single_unit_score_flops_equal_the_counting_mode(k, cols, m):
    g = torch.Generator().manual_seed(4)
    P, K = 5, k * cols
    f = torch.randn(P, K, 30, generator=g, dtype=DT)
    C, A = torch.randn(P, K, m, generator=g, dtype=DT), f @ f.transpose(1, 2) / 30
    assert unit_score.single_unit_flops(P, k, cols, m) == cost.counted(
        unit_score.single_unit_scores, C, A, _spd_inverse(m, g), cols, 1.0, 1e-10)[1]


def test_subset_units_takes_the_units_parameters_in_the_given_order():
    layout = proposals.UnitLayout(3, 2, (3, 3))
    theta = torch.arange(layout.size, dtype=DT)
    sub, lay = subset_units(layout, theta, [2, 0])
    parts, got = layout.split(theta[None]), lay.split(sub[None])
    assert lay == proposals.UnitLayout(2, 2, (3, 3))
    for name in parts:
        assert torch.equal(got[name][0], parts[name][0][[2, 0]])


class _Search(CandidateSearch):
    def __init__(self, **cfg):
        self.cfg = ExpansionConfig(**cfg)
        self.generator = torch.Generator().manual_seed(0)


def _decide(gains, *, unit_scores=(0.6, 0.55, 0.5), tau=0.01, alpha=0.0, chance=False, decision="chosen"):
    """A block of 4 units from 3 proposals; proposal 1 has the best joint score and is kept, and its
    (hand-made) greedy order and marginal gains are ``gains`` (in units of s; η = 2, ρ = 4, N = 50)."""
    layout = proposals.UnitLayout(4, 2)
    thetas = torch.randn(3, layout.size, generator=torch.Generator().manual_seed(3), dtype=DT)
    order, asked = [3, 1, 0, 2], []
    ctx = type("Ctx", (), {"obs": type("Obs", (), {"n": 50})()})()
    search = _Search(tau=tau, alpha=alpha, chance_correction=chance, decision=decision)
    score = torch.tensor([0.2, 1.0, 0.1], dtype=DT)  # joint scores: proposal 1 is kept (argmax)

    def gains_of(row):
        asked.append(row)
        return order, torch.tensor(gains, dtype=DT)

    cand = search._candidate(ctx, "width", 0, score, 2.0, thetas, layout, 4.0,
                             unit_scores=torch.tensor(unit_scores, dtype=DT), gains=gains_of)
    return cand, thetas[1], layout, order, asked


def test_a_block_keeps_the_prefix_of_the_kept_proposals_units_whose_gains_pass():
    cand, theta, layout, order, asked = _decide([0.5, 0.3, 0.001, 0.2])  # the third fails: so does the 4th
    assert asked == [1]  # the kept proposal's gains, not proposal 0's
    assert cand.passes and cand.layout.k == 2
    assert torch.equal(cand.theta, subset_units(layout, theta, order[:2])[0])
    # decided like one unit: the kept proposal's best unit alone (decision "chosen"), per unit
    assert cand.delta == pytest.approx(0.55 * 2.0) and cand.rel == pytest.approx(0.55)
    assert cand.abs == pytest.approx(0.55 * 2.0 / 4.0)


def test_a_block_is_decided_on_the_proposals_best_units_not_on_its_joint_score():
    # joint scores 0.2, 1.0, 0.1 would pass τ = 0.3 even per unit (1.0 / 4); the best units do not
    cand, *_ = _decide([0.5, 0.3, 0.3, 0.3], unit_scores=(0.25, 0.28, 0.2), tau=0.3)
    assert not cand.passes
    # and the softmax-weighted mean of the best units, the default rule, is below the kept one's
    cand, *_ = _decide([0.5, 0.3, 0.3, 0.3], unit_scores=(0.01, 0.3, 0.01), tau=0.2, decision="softmax_mean")
    assert not cand.passes
    cand, *_ = _decide([0.5, 0.3, 0.3, 0.3], unit_scores=(0.01, 0.3, 0.01), tau=0.2, decision="chosen")
    assert cand.passes


def test_a_block_whose_first_gain_fails_does_not_pass():
    cand, *_ = _decide([0.005, 0.5, 0.5, 0.5])
    assert not cand.passes


def test_the_chance_level_of_one_unit_is_taken_from_the_decision_and_every_gain():
    # chance_correction: ρ/N = 4/50 = 0.08 in Δη′ = 0.04 in units of s (η = 2), once per unit
    cand, *_ = _decide([0.5, 0.045, 0.5, 0.5], chance=True, tau=0.0)
    assert cand.passes and cand.layout.k == 4
    assert cand.delta == pytest.approx(0.55 * 2.0 - 0.08)
    cand, *_ = _decide([0.5, 0.035, 0.5, 0.5], chance=True, tau=0.0)
    assert cand.passes and cand.layout.k == 1
    cand, *_ = _decide([0.5, 0.5, 0.5, 0.5], unit_scores=(0.03, 0.035, 0.03), chance=True, tau=0.0)
    assert not cand.passes


def _mlp():
    model = ExpandableMLP(3, 4, (5,), generator=torch.Generator().manual_seed(0)).to(DT)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(40, 3, generator=g, dtype=DT), torch.randint(0, 4, (40,), generator=g)


@pytest.mark.parametrize("make", [_mlp, small_cnn])
def test_an_event_commits_blocks_of_at_most_width_block_units(make):
    model, x, y = make()
    before = list(model.hidden_widths())
    cfg = ExpansionConfig(tau=0.0, alpha=0.0, width_block=3, max_additions=3, max_widths=(12, 12),
                          proposals=3, layer_proposals=2, refine="ascent", ascent_steps=3, layer_cooldown=99)
    ctrl = ExpansionController(model, cfg, "cross_entropy")
    ctrl.layer_cd = 99  # width only
    events = ctrl.expand(EventTrainer(model, x, y))  # every commit is checked to preserve the loss
    adds = ctrl.log[-1]["additions"]
    assert len(events) == len(adds) >= 1
    assert all(a["kind"] == "width" and 1 <= a["units"] <= 3 for a in adds)
    grown = sum(w - b for w, b in zip(model.hidden_widths(), before))
    assert grown == sum(a["units"] for a in adds) == ctrl.neurons_added
    assert any(a["units"] > 1 for a in adds)  # zero thresholds: whole blocks pass


def test_block_size_is_capped_by_the_room_left():
    model, x, y = _mlp()
    cfg = ExpansionConfig(tau=0.0, alpha=0.0, width_block=8, max_additions=5, max_widths=(7,), proposals=2,
                          refine="ascent", ascent_steps=2)
    ctrl = ExpansionController(model, cfg, "cross_entropy")
    ctrl.expand(EventTrainer(model, x, y))
    assert model.hidden_widths() == [7]
    assert [a["units"] for a in ctrl.log[-1]["additions"] if a["kind"] == "width"] == [2]


@pytest.mark.parametrize("bad, message", [
    ({"width_block": 0}, "width_block must be >= 1"),
    ({"width_block": 2, "holdout": 0.5}, "holdout decides on one-unit width candidates"),
])
def test_bad_width_block_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ExpansionConfig(**bad)


def test_width_block_on_a_users_model_is_refused():
    from widthlab.methods.expanding.any_model import SiteNetwork

    net = SiteNetwork(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3))
    with pytest.raises(ValueError, match="width_block > 1 .* not for SiteNetwork"):
        ExpansionController(net, ExpansionConfig(width_block=2), "cross_entropy")


def test_moments_are_for_one_site():
    g = torch.Generator().manual_seed(0)
    def randn():
        return torch.randn(8, 2, generator=g, dtype=DT)

    rows = [(randn(), randn()) for _ in range(2)]
    sites = [unit_score.Site(h, r, torch.eye(2, dtype=DT)) for h, r in rows]
    scorer = unit_score.UnitScore(2, sites, 8)
    theta = proposals.random_candidates(proposals.UnitLayout(2, 2), 2, generator=g, dtype=DT)
    with pytest.raises(ValueError, match="one site"):
        scorer.moments(theta)
