"""The expansion controller with the trainer: growth, optimizer consistency, records, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from widthlab.data.registry import load_dataset
from widthlab.methods.expanding.controller import ExpansionConfig
from widthlab.methods.expanding.plan import build
from widthlab.nn.optim_surgery import assert_optimizer_matches
from widthlab.studies.methods import METHODS
from widthlab.train.config import TrainConfig
from widthlab.train.trainer import Trainer, seed_everything

# Cheap proposals: the point here is the plumbing, not the quality of the candidates.
CHEAP = dict(proposals=8, layer_proposals=8, mala_bursts=2, mala_steps=3, cg_maxiter=20, eta_maxiter=20,
             cooldown=2, layer_cooldown=1, max_widths=(3, 4))


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", n_train=64, n_val=32, n_test=64)


def _cfg(epochs, **kw):
    return TrainConfig(epochs=epochs, batch_size=32, progress="none", select_best=False, checkpoint_every=0,
                       **kw)


class _OptimizerCheck:
    """Asserts after every event that the optimizer holds exactly the model's parameters."""

    def __init__(self):
        self.checked = 0

    def on_epoch_end(self, trainer):
        assert_optimizer_matches(trainer.optimizer, trainer.model)
        self.checked += 1


@pytest.mark.parametrize("optimizer", ["cg", "kfac", "default"])
def test_zero_thresholds_grow_to_the_caps(moons, optimizer):
    """τ = α = 0: every candidate passes, so the network grows one unit at a time up to its caps.

    Events at epochs 0, 2, 4: a layer (width 2 = the input) then a neuron at 0; a second layer (width 3)
    and a neuron at 2 (layer_cooldown 1 blocks no later event: the official loop counts the inserting
    event); nothing at 4 (caps reached)."""
    plan = build(None, moons, seed=0, start_widths=[], tau=0.0, alpha=0.0, alpha_layer=0.0,
                 optimizer=optimizer, kfac_stat_every=2, **CHEAP)
    check = _OptimizerCheck()
    tr = Trainer(plan.model, moons, _cfg(5, optimizer=_adam()), [*plan.callbacks, check])
    res = tr.fit()
    assert res.status == "done", res.error
    assert plan.model.hidden_widths() == [3, 4]
    assert [r["widths"] for r in plan.callbacks[-1].log] == [[3], [3, 4], [3, 4]]
    assert check.checked == 5
    rec = res.history[-1]
    assert rec["layers"] == 2 and rec["neurons"] == 7 and rec["expansion_seconds"] > 0
    s = plan.summary
    assert s["final_widths"] == [3, 4] and s["layers_added"] == 2 and s["neurons_added"] == 2
    assert 0 < s["expansion_share"] < 1
    assert plan.model.widths() == {"hidden.0": 3, "hidden.1": 4}


def _adam():
    from widthlab.train.config import OptimConfig

    return OptimConfig(name="adam", lr=0.01)


def test_official_switches_run(moons):
    """All official-code behaviours at once (identity metric, official MALA, normalised G, no bias in A,
    basis-change layers) still give a working, function-preserving run."""
    plan = build(None, moons, seed=0, start_widths=[], tau=0.0, alpha=0.0, alpha_layer=0.0,
                 output_metric="identity", mala_variant="official", g_estimator="normalized",
                 bias_in_factors=False, layer_init="basis", selection="sample", **CHEAP)
    res = Trainer(plan.model, moons, _cfg(3), plan.callbacks).fit()
    assert res.status == "done", res.error
    assert plan.summary["layers_added"] >= 1


def test_select_best_restores_the_architecture_of_the_best_epoch(moons):
    """With select_best, the trainer goes back to the best-validation snapshot: the controller rebuilds
    that epoch's architecture before the weights load, and the totals of the run are kept."""
    plan = build(None, moons, seed=0, start_widths=[], tau=0.0, alpha=0.0, alpha_layer=0.0,
                 optimizer="default", **CHEAP)
    cfg = TrainConfig(epochs=5, batch_size=32, progress="none", select_best=True, checkpoint_every=0,
                      optimizer=_adam(), monitor="epoch")  # "epoch", minimised: epoch 1 is the best
    res = Trainer(plan.model, moons, cfg, plan.callbacks).fit()
    assert res.status == "done", res.error
    best = res.history[res.best_epoch - 1]
    assert res.best_epoch == 1 and best["neurons"] < res.history[-1]["neurons"]
    assert plan.model.depth == best["layers"] and sum(plan.model.hidden_widths()) == best["neurons"]
    assert plan.summary["final_widths"] == plan.model.hidden_widths()
    assert Trainer(plan.model, moons, cfg).evaluate("test")["test_accuracy"] == best["test_accuracy"]
    s = plan.summary  # the whole run's totals, not the snapshot's
    assert s["layers_added"] == 2 and s["neurons_added"] == 2 and s["expansion_events"] == 3


def test_high_thresholds_add_nothing(moons):
    plan = build(None, moons, seed=0, start_widths=[2], tau=1e30, **CHEAP)
    res = Trainer(plan.model, moons, _cfg(3), plan.callbacks).fit()
    assert res.status == "done"
    assert plan.model.hidden_widths() == [2] and plan.summary["expansion_events"] == 2


@pytest.mark.parametrize("optimizer", ["cg", "kfac"])
def test_resume_is_exact_across_growth(moons, tmp_path, optimizer):
    """A run stopped after epoch 3 and resumed ends with the same architecture and bit-identical weights
    (K-FAC: its factors, inverses and step counter travel in the checkpoint too)."""
    opts = dict(start_widths=[], tau=0.0, alpha=0.0, alpha_layer=0.0, optimizer=optimizer, kfac_stat_every=3,
                **CHEAP)

    def run(epochs, run_dir, resume=False, upto=None):
        seed_everything(1)  # as the study runner does: K-FAC samples its Fisher from the global RNG
        plan = build(None, moons, seed=1, **opts)
        cfg = TrainConfig(epochs=epochs, batch_size=32, progress="none", select_best=False,
                          checkpoint_every=1, max_steps=upto)
        res = Trainer(plan.model, moons, cfg, plan.callbacks, run_dir=run_dir).fit(resume=resume)
        assert res.status == "done", res.error
        return plan.model

    full = run(6, tmp_path / "a")
    run(6, tmp_path / "b", upto=3 * 2)  # 2 steps per epoch: stops after epoch 3
    resumed = run(6, tmp_path / "b", resume=True)
    assert resumed.hidden_widths() == full.hidden_widths()
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("select_best", [False, True])
def test_resumed_run_rebuilds_the_grown_architecture_and_keeps_the_totals(moons, tmp_path, select_best):
    """The checkpoint of a grown network is loaded into a fresh (linear) model: the controller rebuilds
    the architecture first, and the summary (totals, event log, final widths) equals an uninterrupted
    run's; with select_best the best snapshot (saved in the checkpoint) is restored the same way."""
    opts = dict(start_widths=[], tau=0.0, alpha=0.0, alpha_layer=0.0, optimizer="default", **CHEAP)

    def run(run_dir, resume=False, upto=None):
        seed_everything(2)
        plan = build(None, moons, seed=2, **opts)
        cfg = TrainConfig(epochs=6, batch_size=32, progress="none", select_best=select_best,
                          checkpoint_every=1, max_steps=upto, optimizer=_adam())
        res = Trainer(plan.model, moons, cfg, plan.callbacks, run_dir=run_dir).fit(resume=resume)
        assert res.status == "done", res.error
        return plan, res

    full, res_a = run(tmp_path / "a")
    run(tmp_path / "b", upto=3 * 2)
    resumed, res_b = run(tmp_path / "b", resume=True)
    assert res_b.best_epoch == res_a.best_epoch
    keys = ["final_widths", "layers_added", "neurons_added", "expansion_events", "final_layers"]
    assert {k: resumed.summary[k] for k in keys} == {k: full.summary[k] for k in keys}
    assert full.summary["layers_added"] == 2
    ctl_a, ctl_b = full.callbacks[-1], resumed.callbacks[-1]
    assert [r["widths"] for r in ctl_a.log] == [r["widths"] for r in ctl_b.log]
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n


def _decide(kind, score, eta=2.0, abs_norm=4.0, **cfg):
    """The controller's decision on one proposal of score s = Δη′/η_layer: rel = s (depth: s/cost),
    abs = s·η/abs_norm (depth: /cost)."""
    from widthlab.methods.expanding.controller import ExpansionController
    from widthlab.methods.expanding.proposals import UnitLayout

    ctrl = ExpansionController(None, ExpansionConfig(**cfg), "cross_entropy")
    return ctrl._candidate(None, kind, 0, torch.tensor([score], dtype=torch.float64), eta,
                           torch.zeros(1, 6, dtype=torch.float64), UnitLayout(1, 2), abs_norm)


@pytest.mark.parametrize("score, passes", [(0.6, True), (0.3, False)])
def test_width_thresholds_compare_the_relative_score_with_tau_and_the_absolute_with_alpha(score, passes):
    """τ = 0.5, α = 0.2, η/abs_norm = 0.5. s = 0.6: rel 0.6 > τ and abs 0.3 > α (swapping τ and α would
    reject: 0.3 < 0.5); s = 0.3 with η/abs_norm = 2: rel 0.3 < τ (swapped, 0.3 > 0.2 and abs 0.6 > 0.5
    would accept)."""
    c = _decide("width", score, abs_norm=4.0 if passes else 1.0, tau=0.5, alpha=0.2, alpha_layer=10.0)
    assert (c.rel, c.abs) == pytest.approx((score, score * 2.0 / (4.0 if passes else 1.0)))
    assert c.passes is passes


def test_depth_thresholds_divide_by_the_layer_cost_and_use_alpha_layer():
    """Depth: Δη′/layer_cost_mul against τ and α_layer. s = 1 with cost 4: rel 0.25 < τ = 0.5 (without
    the division it would pass); with cost 1 it passes against α_layer = 0.2 but not α_layer = 0.6
    (α = 10 would reject a width candidate, and is not used)."""
    c = _decide("depth", 1.0, tau=0.5, alpha=10.0, alpha_layer=0.2, layer_cost_mul=4.0)
    assert c.rel == pytest.approx(0.25) and c.delta == pytest.approx(0.5) and not c.passes
    assert _decide("depth", 1.0, tau=0.5, alpha=10.0, alpha_layer=0.2, layer_cost_mul=1.0).passes
    assert not _decide("depth", 1.0, tau=0.5, alpha=0.0, alpha_layer=0.6, layer_cost_mul=1.0).passes


def test_registered_and_validated(moons):
    plan = METHODS.get("expanding")(None, moons, seed=0, start_widths=[3])
    assert plan.model.hidden_widths() == [3]
    with pytest.raises(ValueError, match="refine"):
        ExpansionConfig(refine="gibbs")
    with pytest.raises(ValueError, match="optimizer"):
        build(None, moons, seed=0, optimizer="lbfgs")


@pytest.mark.parametrize("study, extra", [
    ("expanding-moons", []),
    ("expanding-moons-fixed", ["sweep.method.start_widths=[[2, 2]]"]),
    ("expanding-regression1d", []),
    ("expanding-digits-datasize", ["sweep.data.subset=[60]"]),
])
def test_shipped_cpu_studies_run_briefly(tmp_path, study, extra):
    """Each CPU study runs end to end through the study runner (tiny budget) and records the method's
    summary fields: final architecture and the time spent in expansion events."""
    from widthlab.studies.executor import run_study
    from widthlab.studies.load import load_study

    over = ["train.epochs=2", "seeds=[0]", "method.proposals=4", "method.mala_bursts=1", "method.cooldown=1",
            *extra]
    if study != "expanding-moons-fixed":
        over.append("method.layer_proposals=4" if study == "expanding-moons" else "method.mala_steps=2")
    (s,) = run_study(load_study(study, over), tmp_path, quiet=True).summaries
    assert s["status"] == "done", s["error"]
    assert s["method"] == "expanding" and s["final_widths"] == list(s["widths"].values())
    assert 0 <= s["expansion_share"] < 1 and s["expansion_events"] >= 1


def test_without_logging_eta_global_no_solve_runs_and_the_run_is_the_same(moons, monkeypatch):
    """log_eta_global=False on a width-only run: no CG solve during the events (the training optimizer
    still solves), η_global is logged as NaN, and widths and weights are bitwise those of the logging
    run (the solve only fed the log)."""
    from widthlab.methods.expanding import observation

    solves = []
    real = observation.conjugate_gradient
    monkeypatch.setattr(observation, "conjugate_gradient",
                        lambda *a, **kw: solves.append(1) or real(*a, **kw))

    def run(log):
        seed_everything(2)
        plan = build(None, moons, seed=2, start_widths=[2], tau=0.0, alpha=0.0, log_eta_global=log,
                     **{**CHEAP, "max_widths": (6,)})
        Trainer(plan.model, moons, _cfg(4), plan.callbacks).fit()
        return plan

    solves.clear()
    logged = run(True)
    assert len(solves) == logged.summary["expansion_events"]  # once per event, for the log
    solves.clear()
    quiet = run(False)
    assert solves == []
    events = [c for c in quiet.callbacks if hasattr(c, "log")][0].log
    assert all(math.isnan(e["eta_global"]) for e in events)
    assert quiet.model.hidden_widths() == logged.model.hidden_widths()
    assert logged.summary["neurons_added"] >= 1
    for (name, p), q in zip(logged.model.state_dict().items(), quiet.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_kfac_options_reach_the_optimizer(moons):
    def optimizer(**options):
        plan = build(None, moons, seed=0, start_widths=[3], optimizer="kfac", **options, **CHEAP)
        hook = next(c for c in plan.callbacks if hasattr(c, "make_optimizer"))
        return hook.make_optimizer(plan.model, None)

    opt = optimizer(kfac_stat_batch=5, kfac_stat_every=4)
    assert (opt.stat_batch, opt.stat_every) == (5, 4)
    assert optimizer().stat_batch == 256
