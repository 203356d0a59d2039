"""Issue 22: one driver per output folder, damaged files found and repaired, every bad input one line."""

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_files import tiny_study

from widthlab.cli import main
from widthlab.studies.executor import run_study
from widthlab.studies.load import StudyError, load_study
from widthlab.studies.store import ResultStore


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _summary(out: Path) -> dict:
    entries = json.loads((out / "summary.json").read_text())
    return {e["run_id"]: (e["status"], e.get("test_accuracy"), e.get("epochs")) for e in entries}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "widthlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------- 1. lock


def test_second_driver_is_refused_while_the_first_lives_and_sigkill_leaves_no_stale_lock(tmp_path):
    slow = tiny_study(tmp_path, epochs=5000, name="slow.yaml")
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "widthlab.cli", "run", str(slow), "--out", str(out),
                              "--quiet", "--no-report"], start_new_session=True)
    try:
        lock = out / ".widthlab.lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, "the first driver exited early"
            time.sleep(0.05)
        second = _cli("run", str(slow), "--out", str(out), "--quiet", "--no-report", "--resume")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0] and "in use" in lines[0]
        assert first.poll() is None  # the refused driver changed nothing for the running one
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The lock died with its holder: the next driver gets the folder (a corrected, shorter study).
    short = tiny_study(tmp_path, epochs=2, name="slow.yaml")
    third = _cli("run", str(short), "--out", str(out), "--quiet", "--no-report", "--resume")
    assert third.returncode == 0, third.stderr
    assert all(s == "done" for s, _, _ in _summary(out).values())


# ---------------------------------------------------------------------------------------- 2 / 13. database


def _finished(tmp_path) -> tuple[Path, Path, dict]:
    path = tiny_study(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report"]) == 0
    return path, out, _summary(out)


def _garble_pages(db: Path, first_page: int) -> None:
    size = sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(db.read_bytes())
    for page in range(first_page, len(data) // size):
        start = page * size
        data[start + 8:start + size] = bytes((i * 37 + 11) % 256 for i in range(size - 8))
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("first_page", [1, 3])
def test_corrupted_database_is_one_line_and_rebuild_restores_it(tmp_path, capsys, first_page):
    path, out, before = _finished(tmp_path)
    db = out / "results.sqlite"
    _garble_pages(db, first_page)
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    line = _err_line(capsys)
    assert str(db) in line and "--rebuild" in line
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 2
    line = _err_line(capsys)
    assert str(db) in line and "--rebuild" in line
    assert main(["report", str(out), "--rebuild"]) == 0
    assert _summary(out) == before
    assert (out / "results.sqlite.damaged").is_file()
    with ResultStore(out, create=False) as store:
        for run_id in before:
            assert [m["epoch"] for m in store.epochs(run_id)] == [1, 2, 3]
    again = run_study(load_study(str(path)), out, quiet=True, resume=True)
    assert again.skipped == len(before) and again.summaries == []


def test_report_checks_integrity_of_a_subtly_damaged_database(tmp_path, capsys):
    """A damaged index page: the report's table scans would not notice, the integrity check does."""
    _, out, _ = _finished(tmp_path)
    db = out / "results.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='sqlite_autoindex_runs_1'"
                               ).fetchone()
    data = bytearray(db.read_bytes())
    start = (root - 1) * size
    data[start + 3:start + 5] = b"\xff\xff"  # the page's cell count
    db.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    line = _err_line(capsys)
    assert "damaged" in line and "--rebuild" in line


# ---------------------------------------------------------------------------------------- 3. final model


def test_truncated_final_model_is_reported_and_rebuilt_by_resume(tmp_path, capsys):
    path, out, before = _finished(tmp_path)
    run_id = sorted(before)[0]
    final = out / "runs" / run_id / "final.pt"
    final.write_bytes(final.read_bytes()[:100])
    capsys.readouterr()
    assert main(["report", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and run_id in err and "final.pt" in err and "damaged" in err
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    assert run_id in capsys.readouterr().err
    assert _summary(out) == before
    assert main(["report", str(out)]) == 0


def test_damaged_checkpoint_of_an_interrupted_run_resumes_from_the_last_good_one(tmp_path, capsys):
    path, out, before = _finished(tmp_path)
    run_id = sorted(before)[0]
    run_dir = out / "runs" / run_id
    with ResultStore(out) as store:  # make it an interrupted run whose newest checkpoint is damaged
        store.finish(run_id, "running", {}, error=None)
    (run_dir / "final.pt").unlink()
    ck = run_dir / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:200])
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(out), "--no-report", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "checkpoint.pt" in err and "damaged" in err
    assert "previous good checkpoint" in err
    assert _summary(out) == before


# ---------------------------------------------------------------------------------------- 4. paths


def test_output_path_problems_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    study = str(tiny_study(tmp_path))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [afile, afile / "sub"]
    dbdir = tmp_path / "dbdir"
    (dbdir / "results.sqlite").mkdir(parents=True)
    cases.append(dbdir)
    for out in cases:
        assert main(["run", study, "--out", str(out), "--quiet"]) == 2, out
        assert str(out) in _err_line(capsys)
    assert main(["report", str(dbdir)]) == 2
    _err_line(capsys)

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["run", study, "--out", str(tmp_path / "ro" / "out"), "--quiet"]) == 2
    assert "read-only" in _err_line(capsys).lower()


# ---------------------------------------------------------------------------------------- 5 / 6. values


@pytest.mark.parametrize("override, key", [
    ("train.optimizer.lr=.inf", "train.optimizer.lr"), ("train.optimizer.lr=-.inf", "train.optimizer.lr"),
    ("train.epochs=true", "train.epochs"), ("train.batch_size=false", "train.batch_size"),
    ("seeds=[-1]", "seeds"), ("seeds=[99999999999999999999]", "seeds"),
    ("train.grad_clip=.inf", "train.grad_clip")])
def test_invalid_values_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(StudyError, match=key.replace(".", r"\.")):
        load_study(str(tiny_study(tmp_path)), [override])


def test_duplicate_yaml_keys_are_refused_naming_the_line(tmp_path):
    path = tiny_study(tmp_path, extra="seeds: [3]\n")  # `seeds` is already on line 7
    with pytest.raises(StudyError, match=r"duplicate key 'seeds' \(first on line 7\).*line 10"):
        load_study(str(path))
    with pytest.raises(StudyError, match="duplicate key 'a'"):
        load_study(str(tiny_study(tmp_path)), ["data={name: iris, a: 1, a: 2}"])


def _bomb(levels: int = 7) -> str:
    """A YAML value whose nested aliases expand to 9**levels strings (a few hundred bytes of text)."""
    value = '&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, levels):
        value = f"&l{i} [{value}, {', '.join([f'*l{i - 1}'] * 8)}]"
    return value


@pytest.mark.parametrize("where", [
    "seeds: {bomb}\n",  # where the schema refuses the value
    "method: {{name: widesparse, base_width: 2, kernel: {{pairs: {bomb}}}}}\n"])  # where it does not
def test_alias_bomb_is_refused_with_a_short_message(tmp_path, capsys, where):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\ndata: {name: iris}\nmodel: {name: mlp, width: 4}\n"
                    + where.format(bomb=_bomb()))
    t0 = time.perf_counter()
    assert main(["show", str(path)]) == 2
    line = _err_line(capsys)
    assert "bomb.yaml" in line and "alias" in line and len(line) < 1000
    assert time.perf_counter() - t0 < 60  # refused before anything expands it
    small = tmp_path / "small.yaml"  # aliases that expand to little stay allowed
    small.write_text("name: s\ndata: {name: iris}\nmodel: {name: mlp, width: 4}\nseeds: &s [1, 2]\n"
                     "sweep: {model.width: *s}\n")
    assert main(["show", str(small)]) == 0


def test_non_utf8_study_file_is_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(tiny_study(tmp_path).read_bytes().replace(b"tiny iris", b"caf\xe9 iris"))
    with pytest.raises(StudyError, match=r"latin\.yaml: not UTF-8"):
        load_study(str(path))


# ---------------------------------------------------------------------------------------- 10. options


@pytest.mark.parametrize("override, key", [
    ("model.activation=bogus", "activation"), ("model.depth=-1", "depth"),
    ("method={name: widesparse, base_width: 2, classifier_connectivity: 1.5}", "classifier_connectivity"),
    ("method={name: widesparse, base_width: 2, fract_cl: 2}", "fract_cl"),
    ("method={name: widesparse, base_width: abc}", "base_width"),
    ("data.val_fraction=1.5", "val_fraction"), ("data.subset=0", "subset")])
def test_bad_option_values_fail_at_load_with_exit_2(tmp_path, capsys, override, key):
    study = str(tiny_study(tmp_path))
    assert main(["show", study, override]) == 2
    assert key in _err_line(capsys)
    out = tmp_path / "out"
    assert main(["run", study, override, "--out", str(out), "--quiet"]) == 2
    assert key in _err_line(capsys)
    assert not (out / "results.sqlite").exists()


def test_corrected_study_replaces_runs_that_never_finished(tmp_path):
    path = tiny_study(tmp_path)
    out = tmp_path / "out"
    # A value valid for the schema that makes every run diverge (recorded failed, non-finite loss).
    assert main(["run", str(path), "train.optimizer.lr=1.0e+30", "--out", str(out), "--quiet",
                 "--no-report"]) == 1
    assert {s for s, _, _ in _summary(out).values()} == {"failed"}
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    fixed = _summary(out)
    assert len(fixed) == 4 and {s for s, _, _ in fixed.values()} == {"done"}
    # Without --resume too, when nothing had finished.
    out2 = tmp_path / "out2"
    assert main(["run", str(path), "train.optimizer.lr=1.0e+30", "--out", str(out2), "--quiet",
                 "--no-report"]) == 1
    assert main(["run", str(path), "--out", str(out2), "--quiet", "--no-report"]) == 0
    assert _summary(out2) == fixed


# ---------------------------------------------------------------------------------------- 11. queue


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


def _worker_of(pid: int) -> int | None:
    """One of the driver's two workers, once both exist (any will do: whichever dies, only its run in
    flight may be lost)."""
    kids = [k for k in _children(pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    return kids[0] if len(kids) >= 2 else None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_runs_of_a_dead_worker_go_to_the_surviving_worker(tmp_path):
    path = tiny_study(tmp_path, epochs=60, extra="  train.optimizer.lr: [0.01, 0.02, 0.03]\n")
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "widthlab.cli", "run", str(path), "--out", str(out),
                               "--quiet", "--no-report", "--workers", "2"], start_new_session=True)
    try:
        deadline = time.time() + 180
        victim = None
        while time.time() < deadline and victim is None:
            if len(list(out.glob("runs/*/metrics.jsonl"))) >= 2:  # both workers are training
                victim = _worker_of(driver.pid)
            time.sleep(0.05)
        assert victim is not None, "workers did not start"
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(timeout=600) == 1  # one run lost
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    statuses = json.loads((out / "summary.json").read_text())
    failed = [e for e in statuses if e["status"] != "done"]
    assert len(statuses) == 12 and len(failed) == 1
    assert "worker process died" in failed[0]["error"]


# ---------------------------------------------------------------------------------------- 14. smaller


def test_stale_temp_files_are_cleaned_by_the_next_driver(tmp_path):
    path, out, _ = _finished(tmp_path)
    run_dir = next((out / "runs").iterdir())
    stale = [out / ".summary.json.abc123.tmp", run_dir / ".checkpoint.pt.xyz.tmp",
             run_dir / "metrics.jsonl.tmp"]
    for f in stale:
        f.write_bytes(b"half a write")
    keep = out / "notes.tmp.txt"
    keep.write_text("mine")
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    assert not any(f.exists() for f in stale) and keep.exists()


def test_resumed_run_is_charged_its_whole_wall_time(tmp_path):
    path = tiny_study(tmp_path, epochs=40, extra="  train.optimizer.lr: [0.01]\n")
    spec = load_study(str(path), ["seeds=[0]", "sweep.model.width=[16]"])
    out = tmp_path / "out"
    # The reference is the interrupted session itself (a separate run would see another machine load).
    ref = run_study(spec, out, quiet=True).summaries[0]
    run_id = ref["run_id"]
    # Make it an interrupted run whose checkpoint is near the end: only a little is left to train.
    with ResultStore(out) as store:
        store.finish(run_id, "running", {}, error=None)
    (out / "runs" / run_id / "final.pt").unlink()
    resumed = run_study(spec, out, quiet=True, resume=True).summaries[0]
    assert resumed["status"] == "done"
    assert resumed["wall_seconds"] >= 0.5 * ref["wall_seconds"]
    # Process CPU seconds too: the checkpoint carries those of the earlier session.
    assert resumed["cpu_seconds"] >= 0.5 * ref["cpu_seconds"] > 0


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the interpreter")
def test_torchrun_job_is_refused_on_every_rank_while_another_driver_holds_the_folder(tmp_path):
    from widthlab.studies.outdir import driver_lock

    study, out = tiny_study(tmp_path), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with driver_lock(out):  # this test process is the first driver
        job = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "widthlab.cli", "run",
                              str(study), "--out", str(out), "--quiet"], capture_output=True, text=True,
                             timeout=300, env=env)
    assert job.returncode != 0
    refusals = [ln for ln in job.stderr.splitlines() if f"PID {os.getpid()}" in ln]
    assert refusals and all("in use" in ln for ln in refusals)
    assert not (out / "results.sqlite").exists()
