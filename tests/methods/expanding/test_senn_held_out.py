"""Deciding on held-out examples (``ExpansionConfig.holdout``): the winner's curse of a searched score,
removed by cross-fitting; the resampled scores and their bootstrap standard error; the controller path."""

from __future__ import annotations

import pytest
import torch

from widthlab.data.registry import load_dataset
from widthlab.methods.expanding import held_out, proposals, scores
from widthlab.methods.expanding.expansion_config import ExpansionConfig
from widthlab.methods.expanding.plan import build
from widthlab.methods.expanding.unit_score import Site, UnitScore
from widthlab.train.config import TrainConfig
from widthlab.train.trainer import Trainer, seed_everything

F64 = torch.float64


def _site(n, d, m, g, signal=0.0):
    """Inputs h ~ N(0, I); residual rows = signal · tanh(h w*) (a direction one unit can explain) +
    independent noise; G⁻¹ a random SPD matrix."""
    h = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, generator=g, dtype=F64) / d ** 0.5
    r = torch.randn(n, m, generator=g, dtype=F64) + signal * torch.tanh(h @ w)[:, None]
    B = torch.randn(m, m, generator=g, dtype=F64)
    return Site(h, r, B @ B.T / m + torch.eye(m, dtype=F64), 1.0)


def test_split_is_a_fixed_partition():
    s = held_out.split_rows(10, 0.3, seed=4)
    assert len(s.held) == 3 and len(s.search) == 7
    assert sorted(torch.cat([s.search, s.held]).tolist()) == list(range(10))
    again = held_out.split_rows(10, 0.3, seed=4)
    assert torch.equal(s.held, again.held) and torch.equal(s.search, again.search)
    assert not torch.equal(held_out.split_rows(10, 0.3, seed=5).held, s.held)
    assert len(held_out.split_rows(3, 0.01, seed=0).held) == 1  # at least one row on each side
    with pytest.raises(ValueError, match="fraction"):
        held_out.split_rows(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        held_out.split_rows(1, 0.5, seed=0)


@pytest.mark.parametrize("k", [1, 3])
def test_resampled_scores_are_the_unit_score_on_the_resampled_rows(k):
    """Weights 1 give UnitScore on the rows; integer counts give UnitScore on the rows repeated that
    many times (an independent computation: features recomputed on the duplicated rows)."""
    g = torch.Generator().manual_seed(0)
    site = _site(40, 5, 3, g)
    lay = proposals.UnitLayout(k, 5)
    theta = proposals.random_candidates(lay, 6, generator=g, dtype=F64)
    f = proposals.unit_features(lay, theta, site.h)
    rows = torch.randint(40, (40,), generator=g)
    counts = torch.bincount(rows, minlength=40).to(F64)
    got = held_out.resampled_scores(f, site, torch.stack([torch.ones(40, dtype=F64), counts]))
    torch.testing.assert_close(got[0], UnitScore(k, [site], 40, jitter=1e-10)(theta), rtol=1e-9, atol=1e-12)
    dup = held_out.restrict(site, rows)
    torch.testing.assert_close(got[1], UnitScore(k, [dup], 40, jitter=1e-10)(theta), rtol=1e-9, atol=1e-12)


def test_holdout_removes_the_winners_curse():
    """Residual unrelated to the inputs: units refined (gradient ascent) on half of the rows score far
    above the chance level ρ/N on those rows, while on the other half they score the chance level of a
    fixed unit, E[Δη′] = ρ_B/N_B (test_senn_chance.py), within Monte-Carlo error (40 data draws)."""
    g = torch.Generator().manual_seed(1)
    n, d, m, P = 160, 8, 3, 16
    fit_ratio, held_ratio = [], []
    lay = proposals.UnitLayout(1, d)
    for _ in range(40):
        site = _site(n, d, m, g)
        split = held_out.split_rows(n, 0.5, seed=int(torch.randint(10 ** 6, (1,), generator=g)))
        a, b = held_out.restrict(site, split.search), held_out.restrict(site, split.held)
        fn = UnitScore(1, [a], len(split.search), jitter=1e-10)
        res = proposals.refine(fn, proposals.random_candidates(lay, P, generator=g, dtype=F64), "ascent",
                               generator=g, ascent_steps=100, ascent_lr=0.05)
        theta = res.theta.detach()
        chance_a = scores.room(a.r_perp, a.G_inv, len(split.search)) / len(split.search)
        chance_b = scores.room(b.r_perp, b.G_inv, len(split.held)) / len(split.held)
        fit_ratio.append(float(fn(theta).mean() / chance_a))
        held_ratio.append(float(UnitScore(1, [b], len(split.held), jitter=1e-10)(theta).mean() / chance_b))
    fit, held = torch.tensor(fit_ratio), torch.tensor(held_ratio)
    assert fit.mean() > 3  # the searched score on its own rows: several times the chance level
    se = held.std() / len(held) ** 0.5
    assert abs(held.mean() - 1) < 3 * se + 0.05, (held.mean(), se)


def test_bootstrap_se_estimates_the_spread_over_fresh_data():
    """The bootstrap standard error of the softmax-weighted held-out score, from one sample, agrees
    (within 35%, averaged over 10 samples) with the standard deviation over 300 fresh samples of the
    same population (fixed candidates)."""
    g = torch.Generator().manual_seed(2)
    d, m, n = 6, 2, 120
    pop = _site(300 * n, d, m, g, signal=0.7)
    lay = proposals.UnitLayout(1, d)
    theta = proposals.random_candidates(lay, 8, generator=g, dtype=F64)
    w = torch.softmax(torch.randn(8, generator=g, dtype=F64), 0)
    stat = lambda s: (w * s).sum(-1)  # noqa: E731
    chunks = [held_out.restrict(pop, torch.arange(i * n, (i + 1) * n)) for i in range(300)]
    fresh = torch.stack([stat(UnitScore(1, [c], n, jitter=1e-10)(theta)) for c in chunks])
    boot = [held_out.bootstrap_se(proposals.unit_features(lay, theta, c.h), c, stat, 200, g)
            for c in chunks[:10]]
    ratio = sum(boot) / len(boot) / float(fresh.std())
    assert 0.65 < ratio < 1.35, ratio


def test_config_and_architecture_checks():
    with pytest.raises(ValueError, match="holdout must be in"):
        ExpansionConfig(holdout=1.0)
    with pytest.raises(ValueError, match="holdout_z"):
        ExpansionConfig(holdout=0.5, holdout_z=-1.0)
    digits = load_dataset("digits", as_image=True)
    with pytest.raises(ValueError, match="holdout .* expandable MLP"):
        build(None, digits, seed=0, architecture="cnn", start_widths=[4], holdout=0.5)


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", n_train=96, n_val=32, n_test=64)


def test_holdout_run_grows_and_resumes_exactly(moons, tmp_path):
    """The held-out decision end to end in the trainer, with thresholds at zero so that units are added,
    and a run stopped after epoch 2 and resumed equal to an uninterrupted one (the bootstrap draws are
    seeded by the run's counters)."""
    opts = dict(start_widths=[2], tau=0.0, alpha=0.0, holdout=0.5, chance_correction=True, proposals=6,
                mala_bursts=2, mala_steps=3, cg_maxiter=10, eta_maxiter=10, cooldown=1, max_widths=(8,))

    def run(run_dir, resume=False, upto=None):
        seed_everything(3)
        plan = build(None, moons, seed=3, **opts)
        cfg = TrainConfig(epochs=4, batch_size=48, progress="none", select_best=False, checkpoint_every=1,
                          max_steps=upto)
        res = Trainer(plan.model, moons, cfg, plan.callbacks, run_dir=run_dir).fit(resume=resume)
        assert res.status == "done", res.error
        return plan

    full = run(tmp_path / "a")
    assert full.summary["neurons_added"] >= 1
    run(tmp_path / "b", upto=2 * 2)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.model.hidden_widths() == full.model.hidden_widths()
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_layer_candidates_are_decided_on_held_out_rows_too(moons):
    """From a linear start with thresholds below any score, held-out decisions insert layers and units
    (the k-unit layer candidates go through the same held-out path, bootstrap included)."""
    seed_everything(0)
    plan = build(None, moons, seed=0, start_widths=[], tau=-1.0, alpha=-1.0, alpha_layer=-1.0, holdout=0.5,
                 proposals=6, layer_proposals=6, mala_bursts=2, mala_steps=3, cg_maxiter=10, eta_maxiter=10,
                 cooldown=1, layer_cooldown=1, max_widths=(4, 4))
    cfg = TrainConfig(epochs=3, batch_size=48, progress="none", select_best=False, checkpoint_every=0)
    res = Trainer(plan.model, moons, cfg, plan.callbacks).fit()
    assert res.status == "done", res.error
    assert plan.summary["layers_added"] == 2 and plan.model.hidden_widths() == [4, 4]
