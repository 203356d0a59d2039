"""Exact resume: a job SIGKILLed mid-training and resumed ends with bitwise the same weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

JOB = Path(__file__).with_name("resume_job.py")


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), str(run_dir), *extra], capture_output=True, text=True,
                          timeout=300, check=True)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    killed_dir.mkdir()
    _run(ref_dir)

    proc = subprocess.Popen([sys.executable, str(JOB), str(killed_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ck = killed_dir / "checkpoint.pt"
    deadline = time.time() + 120
    # Kill once at least two epochs are checkpointed (the checkpoint is replaced atomically, so reading
    # it while the job runs is safe); the metrics log may already hold a line the checkpoint has not.
    while time.time() < deadline and proc.poll() is None:
        if ck.exists() and torch.load(ck, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "job finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "weights.pt").exists()
    state = torch.load(ck, weights_only=True)
    assert 2 <= state["epoch"] < 8

    out = _run(killed_dir, "resume")
    assert out.stdout.split() == ["done", "8"]
    ref = torch.load(ref_dir / "weights.pt", weights_only=True)
    got = torch.load(killed_dir / "weights.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The metrics log was rewritten from the checkpoint: one line per epoch, no duplicates.
    lines = (killed_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert (killed_dir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text() or all(
        a.split('"epoch_seconds"')[0] == b.split('"epoch_seconds"')[0]
        for a, b in zip(lines, (ref_dir / "metrics.jsonl").read_text().splitlines()))
