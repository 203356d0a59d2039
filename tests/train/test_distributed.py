"""Data-parallel training under torchrun (2 CPU processes, gloo) follows a 1-process run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from widthlab.train.distributed import DistContext

STUDY = """\
name: ddp
data: {{name: iris}}
model: {{name: mlp, width: 16}}
train: {{epochs: {epochs}, batch_size: 25, optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}}}
seeds: [0]
"""
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def test_shards_cover_the_batch_and_scales_average_to_one():
    for n in (1, 7, 25, 64):
        for world in (1, 2, 3):
            parts = [DistContext(rank=r, world=world).shard(n) for r in range(world)]
            rows = [i for p in parts for i in range(n)[p]]
            assert rows == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1
            # DDP averages the ranks' gradients of scale * (local mean loss); with per-row losses l_i that
            # is (1/W) sum_r W n_r/n * (1/n_r) sum_{i in r} l_i = (1/n) sum_i l_i, the global mean.
            weights = [DistContext(rank=r, world=world).loss_scale(s, n) / s / world if s else 0.0
                       for r, s in enumerate(sizes)]
            assert all(w == pytest.approx(1 / n) for w, s in zip(weights, sizes) if s)


def _cmd(study: Path, out: Path, procs: int, *extra: str) -> list[str]:
    base = ["-m", "widthlab.cli", "run", str(study), "--out", str(out), "--quiet", "--no-report", *extra]
    if procs == 1:
        return [sys.executable, *base]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={procs}", *base]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())[0]


def _weights(out: Path, run_id: str) -> dict:
    return torch.load(out / "runs" / run_id / "final.pt", weights_only=True)["model"]


def _assert_same(a: Path, b: Path) -> None:
    sa, sb = _summary(a), _summary(b)
    assert sa["run_id"] == sb["run_id"] and sa["status"] == sb["status"] == "done"
    assert sa["widths"] == sb["widths"] and sa["epochs"] == sb["epochs"]
    for k in ("train_loss", "val_loss", "test_accuracy", "train_accuracy"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k
    wa, wb = _weights(a, sa["run_id"]), _weights(b, sb["run_id"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the interpreter")
def test_two_processes_match_one(tmp_path):
    study = tmp_path / "ddp.yaml"
    study.write_text(STUDY.format(epochs=5))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(study, tmp_path / "one", 1), check=True, timeout=300, env=env)
    subprocess.run(_cmd(study, tmp_path / "two", 2), check=True, timeout=300, env=env,
                   capture_output=True)
    _assert_same(tmp_path / "one", tmp_path / "two")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the interpreter")
def test_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    study = tmp_path / "ddp.yaml"
    study.write_text(STUDY.format(epochs=40))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(study, tmp_path / "ref", 1), check=True, timeout=300, env=env)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(study, out, 2), start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        cks = list(out.glob("runs/*/checkpoint.pt"))
        if cks and torch.load(cks[0], weights_only=True)["epoch"] >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the 2-process run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cmd(study, out, 1, "--resume"), check=True, timeout=300, env=env)
    _assert_same(tmp_path / "ref", out)


def test_shutdown_releases_the_group_and_is_a_no_op_without_one(tmp_path):
    """distributed.shutdown destroys an initialised group, after freeing a DDP wrapper kept alive by a
    reference cycle (which would otherwise hold the group until interpreter exit), and does nothing
    without a group."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from widthlab.train import distributed

    distributed.shutdown()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(3, 2))
        holder = {"ddp": ddp}
        holder["self"] = holder  # a cycle, as between a trainer and its callbacks
        ref = weakref.ref(ddp)
        del ddp, holder
        gc.disable()  # the cycle survives until shutdown collects it
        distributed.shutdown()
        assert ref() is None and not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
