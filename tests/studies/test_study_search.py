"""The search arm of a comparison (Optuna): trials are ordinary runs, pruned trials are recorded and
charged up to their pruning epoch, and an interrupted search resumes the same Optuna study."""

import json

import pytest

from widthlab.data.registry import load_dataset
from widthlab.studies import executor
from widthlab.studies.executor import run_study
from widthlab.studies.load import StudyError, expand_runs, load_study
from widthlab.studies.store import ResultStore

optuna = pytest.importorskip("optuna")

SEARCH = """\
name: srch
kind: compare
seeds: [0]
train: {epochs: 6, batch_size: 32, optimizer: {name: adam, lr: 0.003}, num_threads: 1,
        checkpoint_every: 1}
tasks:
  iris:
    data: {name: iris}
    model: {name: mlp, width: 8}
methods:
  dense:
    sweep: {model.width: [4]}
  search:
    search: {width: [2, 64], trials: TRIALS, parallel: 2, startup_trials: 2, pruner: PRUNER,
             reduction_factor: 2}
"""


def _study(tmp_path, trials=6, pruner="successive_halving", name="s.yaml"):
    path = tmp_path / name
    path.write_text(SEARCH.replace("TRIALS", str(trials)).replace("PRUNER", pruner))
    return load_study(str(path))


def _trials(out):
    with ResultStore(out, create=False) as store:
        return [r for r in store.runs() if r["config"]["arm"] == "search"]


def _journal_trials(out):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "optuna.journal")))
    [summary] = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def test_search_arm_trials_are_runs_and_a_pruned_trial_is_recorded_and_charged(tmp_path):
    out = tmp_path / "out"
    spec = _study(tmp_path)
    # The search arm has no fixed runs: its trials are asked while the study runs.
    assert {r.tags["arm"] for r in expand_runs(spec)} == {"dense"}
    outcome = run_study(spec, out, quiet=True)
    assert not outcome.failed
    trials = _trials(out)
    assert len(trials) == 6 and sorted(r["config"]["trial"] for r in trials) == list(range(6))
    pruned = [r for r in trials if r["status"] == "pruned"]
    assert pruned, "successive halving (eta 2) pruned no trial of six"
    n_train = len(load_dataset("iris").train)
    for r in trials:
        s = r["summary"]
        assert s["cpu_seconds"] > 0 and s["wall_seconds"] > 0
        # Charged for the epochs it ran: 3 passes x 2 FLOPs per weight x training examples x epochs.
        assert s["train_flops"] == 6 * s["counted_weights"] * n_train * s["epochs"]
    for r in pruned:
        assert r["summary"]["epochs"] < 6 and r["summary"]["stop_reason"] == "pruned"
    # Optuna's study (in the output folder) knows the same trials in the same states.
    by_number = {t.number: t for t in _journal_trials(out)}
    for r in trials:
        t = by_number[r["config"]["trial"]]
        assert t.params["width"] == r["config"]["model"]["width"]
        assert t.state.name == {"done": "COMPLETE", "pruned": "PRUNED"}[r["status"]]
        assert len(t.intermediate_values) == r["summary"]["epochs"]
        if r["status"] == "done":
            assert t.value == pytest.approx(r["summary"]["val_accuracy"])
    # The report charges the search for every trial, pruned ones included, and never chooses one.
    from widthlab.report.compare import compare_results
    from widthlab.report.verdict import _load

    [arm] = [a for a in compare_results(*_load(out))["iris"] if a.arm == "search"]
    [choice] = arm.choices
    assert choice.members == 6 and choice.pruned_members == len(pruned)
    assert choice.flops == pytest.approx(sum(r["summary"]["train_flops"] for r in trials))
    assert choice.run_id not in {r["run_id"] for r in pruned}
    assert arm.name == "search (Optuna TPE + successive halving)"


class _Interrupt(Exception):
    pass


def test_interrupted_search_resumes_the_same_optuna_study(tmp_path, monkeypatch):
    """A driver that dies while a round is in flight; --resume runs only the trials not yet finished,
    with the same parameters, and ends as an uninterrupted search run by two workers."""
    whole = tmp_path / "whole"
    run_study(_study(tmp_path, trials=4, pruner="hyperband"), whole, workers=2, quiet=True)
    real = executor.execute_run
    started = []

    def dies_at_trial_2(run, *args, **kw):
        started.append(run.tags.get("trial"))
        if run.tags.get("trial") == 2:
            raise _Interrupt  # the driver process is killed with trials 2 and 3 asked, not run
        return real(run, *args, **kw)

    part = tmp_path / "part"
    spec = _study(tmp_path, trials=4, pruner="hyperband")
    monkeypatch.setattr(executor, "execute_run", dies_at_trial_2)
    with pytest.raises(_Interrupt):
        run_study(spec, part, quiet=True)
    assert [t.state.name for t in _journal_trials(part)][2:] == ["RUNNING", "RUNNING"]
    monkeypatch.setattr(executor, "execute_run", lambda run, *a, **kw: started.append(
        ("again", run.tags.get("trial"), run.tags.get("arm"))) or real(run, *a, **kw))
    with pytest.raises(StudyError, match="--resume"):
        run_study(spec, part, quiet=True)  # finished trials are results: not without --resume
    run_study(spec, part, resume=True, quiet=True)
    again = [s for s in started if isinstance(s, tuple)]
    assert sorted(t for _, t, arm in again if arm == "search") == [2, 3]  # 0 and 1 are not repeated
    journal = _journal_trials(part)
    assert [t.number for t in journal] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in journal)

    def result(out):
        return {r["run_id"]: (r["status"], r["config"]["trial"], r["config"]["model"]["width"],
                              (r["summary"] or {}).get("val_accuracy")) for r in _trials(out)}
    assert result(part) == result(whole)
    assert [t.params for t in journal] == [t.params for t in _journal_trials(whole)]


def test_a_larger_budget_continues_the_search(tmp_path):
    out = tmp_path / "out"
    run_study(_study(tmp_path, trials=2), out, quiet=True)
    first = {r["run_id"] for r in _trials(out)}
    outcome = run_study(_study(tmp_path, trials=4), out, resume=True, quiet=True)
    assert {s["run_id"] for s in outcome.summaries if s.get("arm") == "search"}.isdisjoint(first)
    assert len(_trials(out)) == 4 and len(_journal_trials(out)) == 4


def test_search_arm_refuses_a_sweep_and_a_model_that_ignores_the_width(tmp_path):
    text = SEARCH.replace("TRIALS", "2").replace("PRUNER", "none")
    bad = text.replace("    search: {width", "    sweep: {model.width: [4]}\n    search: {width")
    (tmp_path / "a.yaml").write_text(bad)
    with pytest.raises(StudyError, match="search arm .* takes no sweep"):
        load_study(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text(text.replace("search: {width: [2, 64]", "search: {width: [64, 2]"))
    with pytest.raises(StudyError, match="width must be"):
        load_study(str(tmp_path / "b.yaml"))


def test_missing_optuna_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)
    path = tmp_path / "s.yaml"
    path.write_text(SEARCH.replace("TRIALS", "2").replace("PRUNER", "none"))
    with pytest.raises(StudyError, match=r"needs Optuna: pip install 'widthlab\[search\]'") as e:
        load_study(str(path))
    assert "\n" not in str(e.value)


def test_random_search_arm_defaults_to_random_sampling(tmp_path):
    text = SEARCH.replace("TRIALS", "2").replace("PRUNER", "none") + "  random_search: {}\n"
    (tmp_path / "r.yaml").write_text(text)
    from widthlab.studies.compare import search_of

    spec = load_study(str(tmp_path / "r.yaml"))
    assert search_of(spec, "iris", "random_search").sampler == "random"
    assert search_of(spec, "iris", "search").sampler == "tpe"
    assert json.dumps(search_of(spec, "iris", "search").identity())  # JSON-able study identity
