"""The fixed retrain control of a learned-width arm: a dense net of the widths the arm's run selected,
trained from scratch with the arm's recipe, one per seed; kept on resume."""

from widthlab.studies.executor import run_study
from widthlab.studies.load import expand_runs, load_study
from widthlab.studies.schedule import ordered_widths
from widthlab.studies.store import ResultStore

STUDY = """\
name: rt
kind: compare
seeds: [0, 1]
train: {epochs: 3, batch_size: 32, optimizer: {name: adam, lr: 0.003}, num_threads: 1,
        checkpoint_every: 0}
tasks:
  iris:
    data: {name: iris}
    model: {name: mlp, width: 8}
methods:
  adaptive:
    model: {depth: 1}
    method: {lambda0: 0.01, activation: relu6}
    train: {optimizer: {lr: 0.01}}
  plain:
    method: {name: dense}
"""


def test_ordered_widths_follow_the_layer_index_not_the_text():
    assert ordered_widths({"hidden.10": 1, "hidden.2": 3, "hidden.0": 7}) == [7, 3, 1]


def test_retrain_trains_the_selected_widths_from_scratch_and_is_kept_on_resume(tmp_path):
    path = tmp_path / "rt.yaml"
    path.write_text(STUDY)
    spec = load_study(str(path))
    assert {r.tags["arm"] for r in expand_runs(spec)} == {"adaptive", "plain"}  # decided while running
    out = tmp_path / "out"
    run_study(spec, out, quiet=True)
    with ResultStore(out, create=False) as store:
        rows = store.runs()
    by_arm = {}
    for r in rows:
        by_arm.setdefault(r["config"]["arm"], {})[r["config"]["seed"]] = r
    # One per seed of the learned-width arm; none for a plain single run (retrain defaults to
    # adaptive and expanding arms).
    assert set(by_arm) == {"adaptive", "plain", "adaptive_retrain"}
    for seed in (0, 1):
        arm, re = by_arm["adaptive"][seed], by_arm["adaptive_retrain"][seed]
        assert re["status"] == "done" and re["config"]["retrain_of"] == "adaptive"
        assert re["config"]["method"] == {"name": "dense"}
        assert re["config"]["model"]["widths"] == ordered_widths(arm["summary"]["widths"])
        assert re["summary"]["widths"] == arm["summary"]["widths"]
        assert re["config"]["model"]["activation"] == "relu6"  # the learned net's nonlinearity
        assert re["config"]["train"] == arm["config"]["train"]  # the same recipe
    again = run_study(spec, out, quiet=True, resume=True)
    assert again.summaries == [] and again.skipped == len(rows)


def test_retrain_false_turns_it_off(tmp_path):
    path = tmp_path / "rt.yaml"
    path.write_text(STUDY.replace("    train: {optimizer: {lr: 0.01}}", "    retrain: false"))
    out = tmp_path / "out"
    run_study(load_study(str(path)), out, quiet=True)
    with ResultStore(out, create=False) as store:
        assert {r["config"]["arm"] for r in store.runs()} == {"adaptive", "plain"}
