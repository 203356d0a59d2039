"""Study kind ``compare``: file validation, merge order, expansion into tagged runs, and a real run."""

import json

import pytest

from widthlab.cli import main
from widthlab.studies.compare import CompareSpec, deep_merge
from widthlab.studies.load import StudyError, expand_runs, load_study
from widthlab.studies.store import ResultStore

COMPARE = """\
name: cmp
kind: compare
seeds: [0, 1]
train: {epochs: 2, batch_size: 32, optimizer: {name: adam, lr: 0.003}, checkpoint_every: 0}
tasks:
  iris:
    data: {name: iris}
    model: {name: mlp, width: 8}
  wine:
    data: {name: wine}
    model: {name: mlp, width: 8}
    train: {batch_size: 16}
    methods:
      dense: {sweep: {model.width: [4, 8]}}
methods:
  dense:
    sweep: {model.width: [4, 8, 16]}
  widesparse:
    method: {base_width: 8, fract_cl: 0.5}
    sweep: {model.width: [8, 16]}
  adaptive:
    model: {depth: 1}
    train: {optimizer: {lr: 0.01}}
"""


def _write(tmp_path, text=COMPARE):
    path = tmp_path / "cmp.yaml"
    path.write_text(text)
    return str(path)


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}, "c": 2}) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # not modified


def test_compare_expands_to_tagged_runs_with_the_merge_order(tmp_path):
    spec = load_study(_write(tmp_path))
    assert isinstance(spec, CompareSpec)
    runs = expand_runs(spec)
    # iris: dense 3 + widesparse 2 + adaptive 1; wine: dense 2 (task override) + 2 + 1; times 2 seeds.
    assert len(runs) == 2 * (6 + 5)
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.position for r in runs] == list(range(len(runs)))
    by = {}
    for r in runs:
        by.setdefault((r.tags["task"], r.tags["arm"]), []).append(r)
    assert sorted({r.spec.model.width for r in by["wine", "dense"]}) == [4, 8]
    assert all(r.tags["role"] == "search" for r in by["iris", "dense"] + by["iris", "widesparse"])
    ada = by["iris", "adaptive"][0]
    assert ada.tags["role"] == "single" and ada.spec.method.name == "adaptive"
    # Shared train, then the method's: lr from the method, batch size and epochs from the shared recipe.
    assert ada.spec.train.optimizer.lr == 0.01 and ada.spec.train.optimizer.name == "adam"
    assert ada.spec.train.epochs == 2 and ada.spec.train.batch_size == 32
    assert by["wine", "adaptive"][0].spec.train.batch_size == 16  # the task's train section
    ws = by["iris", "widesparse"][0]
    assert ws.spec.method.options() == {"base_width": 8, "fract_cl": 0.5}
    assert ws.spec.train.optimizer.lr == 0.003
    cfg = ada.config()
    assert (cfg["task"], cfg["arm"], cfg["role"], cfg["study"]) == ("iris", "adaptive", "single", "cmp")


@pytest.mark.parametrize("edit, message", [
    (("  adaptive:\n    model", "  adaptive:\n    bogus: 1\n    model"),
     "methods.adaptive.bogus: unknown key"),
    (("      dense: {sweep", "      expanding: {sweep"), "unknown method"),
    (("kind: compare\n", "kind: compare\nsweep: {model.width: [1]}\n"), "sweep: unknown key"),
    (("    method: {base_width: 8, fract_cl: 0.5}", "    method: {base_width: 8, nope: 2}"),
     "method.nope: unknown option"),
    (("  iris:\n    data: {name: iris}", "  iris:\n    data: {name: irises}"), "unknown dataset 'irises'"),
])
def test_bad_compare_files_name_the_problem(tmp_path, edit, message):
    old, new = edit
    assert old in COMPARE
    with pytest.raises(StudyError, match=message) as err:
        load_study(_write(tmp_path, COMPARE.replace(old, new)))
    assert "cmp.yaml" in str(err.value)


def test_overrides_apply_to_compare_files(tmp_path):
    spec = load_study(_write(tmp_path), ["train.epochs=1", "seeds=[3]",
                                         "methods.dense.sweep={model.width: [2]}"])
    runs = expand_runs(spec)
    assert {r.seed for r in runs} == {3} and all(r.spec.train.epochs == 1 for r in runs)
    iris_dense = {"task": "iris", "arm": "dense", "role": "search"}
    assert {r.spec.model.width for r in runs if r.tags == iris_dense} == {2}


def test_compare_study_runs_from_the_command_line_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", _write(tmp_path), "--out", str(out), "--quiet", "seeds=[0]",
                 "methods.dense.sweep={model.width: [4, 8]}"])
    assert code == 0
    entries = json.loads((out / "summary.json").read_text())
    # dense 2 + widesparse 2 + adaptive 1 + the adaptive arm's fixed retrain control 1, per task.
    assert all(e["status"] == "done" for e in entries) and len(entries) == 2 * (2 + 2 + 1 + 1)
    assert {(e["task"], e["arm"]) for e in entries} == {
        (t, a) for t in ("iris", "wine") for a in ("dense", "widesparse", "adaptive", "adaptive_retrain")}
    assert all(e["train_flops"] > 0 for e in entries)
    md = (out / "report.md").read_text()
    assert "## Comparison" in md and "### iris" in md and "### wine" in md and "## All runs" in md
    for name in ("compute", "weights", "width"):
        assert f"plots/cmp-compare-{name}.png" in md
        assert (out / "plots" / f"cmp-compare-{name}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    figures = {"compare-compute", "compare-wall", "compare-cpu", "compare-weights", "compare-width",
               "pareto-flops", "pareto-weights"}
    assert {p.stem.removeprefix("cmp-") for p in (out / "plots").glob("cmp-*.png")} == figures
    assert html.count("data:image/png;base64,") == len(figures) and 'id="comparison"' in html
    with ResultStore(out, create=False) as store:
        assert all(r["config"]["arm"] for r in store.runs())


def _demo_checks(out):
    entries = json.loads((out / "summary.json").read_text())
    assert entries and all(e["status"] in ("done", "pruned") for e in entries)  # pruned: search trials
    assert {e["arm"] for e in entries} == {"dense", "widesparse", "adaptive", "expanding", "search",
                                           "random_search", "adaptive_retrain", "expanding_retrain"}
    md = (out / "report.md").read_text()
    table = md.split("### digits", 1)[1].split("Per seed", 1)[0]
    for row in ("dense grid", "widesparse family", "adaptive", "expanding", "adaptive → fixed retrain",
                "search (Optuna TPE + Hyperband)", "random_search (random sampling + Hyperband)"):
        assert f"| {row} " in table
    header = table.strip().splitlines()[0]
    assert header.count("%") == 1 and "validation" in table  # one accuracy column, searches chosen by val
    assert {p.stem for p in (out / "plots").glob("demo-*.png")} == {
        f"demo-{f}" for f in ("compare-compute", "compare-wall", "compare-cpu", "compare-weights",
                              "compare-width", "pareto-flops", "pareto-weights")}


def test_demo_study_runs_all_four_methods_in_small(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["run", "demo", "--out", str(out), "train.epochs=2", "seeds=[0]",
                 "tasks.digits.data.subset=300",
                 "methods.dense.sweep={model.width: [8, 32]}",
                 "methods.widesparse.sweep={model.width: [16, 32]}",
                 "methods.expanding.method.proposals=4", "methods.expanding.method.mala_bursts=2",
                 "methods.search.search.trials=2", "methods.random_search.search.trials=2"])
    assert code == 0
    _demo_checks(out)
    printed = capsys.readouterr().out
    assert "| dense grid" in printed and "report: " in printed


@pytest.mark.slow
def test_full_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    _demo_checks(out)


def test_sweep_overrides_inside_a_method_and_missing_kind(tmp_path):
    spec = load_study(_write(tmp_path), ["methods.dense.sweep.model.width=[2, 3]"])
    iris_dense = [r for r in expand_runs(spec) if r.tags["arm"] == "dense" and r.tags["task"] == "iris"]
    assert {r.spec.model.width for r in iris_dense} == {2, 3}
    with pytest.raises(StudyError, match="kind: compare"):
        load_study(_write(tmp_path, COMPARE.replace("kind: compare\n", "")))


def test_widesparse_base_defaults_to_the_task_width(tmp_path):
    text = COMPARE.replace("    method: {base_width: 8, fract_cl: 0.5}", "    method: {fract_cl: 0.5}")
    runs = expand_runs(load_study(_write(tmp_path, text)))
    assert {r.spec.method.options()["base_width"] for r in runs if r.tags["arm"] == "widesparse"} == {8}


def test_resume_refuses_a_study_whose_runs_changed(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", _write(tmp_path), "--out", str(out), "--quiet", "--no-report", "seeds=[0]",
            "train.epochs=1", "methods.dense.sweep.model.width=[4]",
            "methods.widesparse.sweep.model.width=[8]"]
    assert main(args) == 0
    first = len(json.loads((out / "summary.json").read_text()))
    assert main([*args, "--resume", "methods.dense.sweep.model.width=[4, 16]"]) == 0  # growing is fine
    grown = json.loads((out / "summary.json").read_text())
    assert len(grown) == first + 1  # one more dense width on iris (wine has its own dense sweep)
    capsys.readouterr()
    assert main([*args, "--resume", "methods.dense.sweep.model.width=[16]"]) == 2  # width 4 would linger
    assert "no longer has" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == grown  # nothing changed
