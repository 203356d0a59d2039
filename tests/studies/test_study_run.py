"""Running studies: results database, failures, parallel workers, kill + resume, re-rendered reports."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_files import tiny_study

from widthlab.cli import main
from widthlab.studies.executor import run_study
from widthlab.studies.load import StudyError, expand_runs, load_study
from widthlab.studies.runner import run_label
from widthlab.studies.store import ResultStore

SUMMARY_KEYS = {"run_id", "study", "method", "model", "dataset", "seed", "status", "error", "width", "widths",
                "counted_weights", "nonzero_weights", "total_parameters", "test_accuracy", "train_accuracy",
                "epochs", "wall_seconds"}


def _metrics(out_dir):
    entries = json.loads((out_dir / "summary.json").read_text())
    return {e["run_id"]: (e["status"], e["test_accuracy"], e["train_accuracy"], e["epochs"]) for e in entries}


def test_run_records_database_summary_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_study(tmp_path)), "--out", str(out), "--quiet"]) == 0
    entries = json.loads((out / "summary.json").read_text())
    assert len(entries) == 4 and all(e["status"] == "done" for e in entries)
    assert set(entries[0]) >= SUMMARY_KEYS
    e4 = next(e for e in entries if e["width"] == 4)
    # Iris MLP 4 -> 4 -> 3: the paper's count is 4*4 + 4*3 weights, no biases.
    assert e4["counted_weights"] == 28 == e4["nonzero_weights"] and e4["total_parameters"] == 28 + 4 + 3
    with ResultStore(out, create=False) as store:
        for r in store.runs():
            assert [m["epoch"] for m in store.epochs(r["run_id"])] == [1, 2, 3]
    for run_id in _metrics(out):
        assert (out / "runs" / run_id / "config.yaml").is_file()
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_failing_run_is_recorded_and_others_continue(tmp_path):
    # (A bad option value is refused when the study loads; a diverging learning rate fails at run time.)
    path = tiny_study(tmp_path, extra="  train.optimizer.lr: [0.01, 1.0e+30]\n")
    outcome = run_study(load_study(str(path)), tmp_path / "out", quiet=True)
    status = [(s["status"], s.get("error") or "") for s in outcome.summaries]
    assert sum(s == "done" for s, _ in status) == 4
    failed = [e for s, e in status if s == "failed"]
    assert len(failed) == 4 and all("non-finite" in e for e in failed)
    assert (tmp_path / "out" / "runs").is_dir()


def test_existing_output_needs_resume_and_is_left_intact(tmp_path):
    spec = load_study(str(tiny_study(tmp_path)))
    run_study(spec, tmp_path / "out", quiet=True)
    before = (tmp_path / "out" / "summary.json").read_text()
    with pytest.raises(StudyError, match="--resume"):
        run_study(spec, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "summary.json").read_text() == before
    again = run_study(spec, tmp_path / "out", quiet=True, resume=True)
    assert again.skipped == 4 and again.summaries == []


def test_two_workers_write_one_database_without_loss(tmp_path):
    spec = load_study(str(tiny_study(tmp_path, epochs=4)), ["seeds=[0, 1, 2]"])
    out = tmp_path / "par"
    run_study(spec, out, workers=2, quiet=True)
    serial = tmp_path / "ser"
    run_study(spec, serial, workers=1, quiet=True)
    par, ser = _metrics(out), _metrics(serial)
    assert len(par) == 6 and par == ser
    with ResultStore(out, create=False) as store:
        assert all(len(store.epochs(r)) == 4 for r in par)


def test_killed_study_resumes_to_the_same_results(tmp_path):
    path = tiny_study(tmp_path, epochs=30, extra="  train.optimizer.lr: [0.01, 0.02]\n")
    ref = tmp_path / "ref"
    assert main(["run", str(path), "--out", str(ref), "--quiet", "--no-report"]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "widthlab.cli", "run", str(path), "--out", str(out), "--quiet",
           "--no-report"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 120
    # Kill the whole process group once some run finished and another is mid-training.
    while time.time() < deadline and proc.poll() is None:
        if (out / "summary.json").exists():
            entries = json.loads((out / "summary.json").read_text() or "[]")
            if any(e["status"] == "done" for e in entries) and any(
                    (out / "runs" / e["run_id"] / "checkpoint.pt").exists() and e["status"] != "done"
                    for e in entries):
                break
        time.sleep(0.02)
    assert proc.poll() is None, "study finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with ResultStore(out, create=False) as store:  # readable after SIGKILL
        statuses = [r["status"] for r in store.runs()]
    assert "done" in statuses and set(statuses) - {"done"}

    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    assert _metrics(out) == _metrics(ref)


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_stop_when_their_driver_is_killed(tmp_path):
    path = tiny_study(tmp_path, epochs=2000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "widthlab.cli", "run", str(path), "--out", str(out), "--quiet",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        deadline = time.time() + 120
        workers: set[int] = set()
        while time.time() < deadline and len(workers) < 2:
            workers = {k for k in _children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()}
            time.sleep(0.1)
        assert len(workers) == 2, "workers did not start"
        with_epochs = time.time() + 120
        while time.time() < with_epochs and not list(out.glob("runs/*/metrics.jsonl")):
            time.sleep(0.1)
        proc.kill()  # the driver alone: SIGKILL leaves its daemonic workers running
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        assert not alive, "orphaned workers kept training"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_report_rerenders_from_the_database_alone(tmp_path, capsys):
    out = tmp_path / "out"
    run_study(load_study(str(tiny_study(tmp_path))), out, quiet=True)
    for f in ("report.html", "report.md", "summary.json"):
        (out / f).unlink(missing_ok=True)
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no results database" in capsys.readouterr().err


def test_run_labels_show_the_model_width_only_where_it_shapes_the_network():
    """The adaptive MLP learns its widths (model.width is not used), so its label leaves the width out."""
    adaptive = expand_runs(load_study("adaptive-spiralhard", ["sweep.model.depth=[4]",
                                                              "sweep.method.sigma_theta=[100]"]))[0]
    assert run_label(adaptive) == "adaptive mlp depth=4 sigma_theta=100"
    dense = expand_runs(load_study("dense-tabular"))[0]
    assert f" w={dense.spec.model.width}" in run_label(dense)
