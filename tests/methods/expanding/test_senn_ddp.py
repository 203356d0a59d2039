"""Data parallelism for the self-expanding method (issue #9): a 2-process gloo run under torchrun follows
a 1-process run with the same global batch, growth included.

Under torchrun each rank trains on a slice of every global batch; the natural-gradient optimizers sum
their curvature over the ranks (K-FAC factors all-reduced, CG's Gauss-Newton products all-reduced), rank
0 alone runs each expansion event and broadcasts the units it inserted, and the trainer rebuilds the DDP
wrapper after every growth step. K-FAC uses its exact G estimator here: the sampled one draws different
Monte-Carlo cotangents when the batch is split, so it agrees only in distribution.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STUDY = """\
name: ddp-expanding
data: {name: moons, n_train: 64, n_val: 32, n_test: 64}
model: {name: mlp, width: 1}
method:
  name: expanding
  start_widths: []
  max_widths: [3, 4]
  tau: 0.0
  alpha: 0.0
  alpha_layer: 0.0
  cooldown: 2
  layer_cooldown: 1
  proposals: 8
  layer_proposals: 8
  mala_bursts: 2
  mala_steps: 3
  cg_maxiter: 20
  eta_maxiter: 20
  kfac_g_estimator: exact
  kfac_stat_every: 2
train: {epochs: 5, batch_size: 32, num_threads: 1, select_best: false}
seeds: [0]
sweep:
  method.optimizer: [kfac, cg]
"""
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def _run(study: Path, out: Path, procs: int) -> list[dict]:
    base = ["-m", "widthlab.cli", "run", str(study), "--out", str(out), "--quiet", "--no-report"]
    cmd = [sys.executable, *base] if procs == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={procs}",
                                                       *base]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, timeout=600, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return sorted(json.loads((out / "summary.json").read_text()), key=lambda s: s["run_id"])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the interpreter")
def test_two_processes_grow_like_one(tmp_path):
    study = tmp_path / "ddp.yaml"
    study.write_text(STUDY)
    one, two = _run(study, tmp_path / "one", 1), _run(study, tmp_path / "two", 2)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["run_id"] == b["run_id"] and a["status"] == b["status"] == "done", (a["error"], b["error"])
        assert a["final_widths"] == b["final_widths"] == [3, 4]
        assert a["layers_added"] == b["layers_added"] == 2 and a["neurons_added"] == b["neurons_added"]
        for k in ("train_loss", "val_loss", "test_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["optimizer"], k)
        wa, wb = (torch.load(d / "runs" / a["run_id"] / "final.pt", weights_only=True)["model"]
                  for d in (tmp_path / "one", tmp_path / "two"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{a['optimizer']} {k}")


class _FakeDist:
    """Rank ``rank`` of a 2-process job whose broadcast hands out what rank 0 sent (in one process)."""

    active, world = True, 2

    def __init__(self, rank, box):
        self.rank, self.box = rank, box

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast_object(self, obj):
        if self.is_main:
            self.box.append(obj)
            return obj
        return self.box[-1]


def test_other_ranks_insert_what_rank_0_chose():
    """In-process check of the broadcast: rank 1's controller has another proposal RNG, so its own search
    would pick other units; it inserts rank 0's units instead and ends with the same weights, counters
    and resize events."""
    from types import SimpleNamespace

    from widthlab.data.registry import load_dataset
    from widthlab.methods.expanding.plan import build

    data = load_dataset("moons", n_train=48, n_val=16, n_test=16)
    opts = dict(start_widths=[2], tau=0.0, alpha=0.0, alpha_layer=0.0, proposals=6, layer_proposals=6,
                mala_bursts=2, mala_steps=2, max_widths=(4, 3), eta_maxiter=10)
    plans = [build(None, data, seed=0, **opts) for _ in range(2)]
    plans[1].callbacks[-1].generator.manual_seed(12345)
    box: list = []
    events = []
    for rank, plan in enumerate(plans):
        trainer = SimpleNamespace(model=plan.model, data=data, epoch=0, device=torch.device("cpu"),
                                  dist=_FakeDist(rank, box))
        events.append(plan.callbacks[-1].expand(trainer))
    assert plans[0].model.hidden_widths() == plans[1].model.hidden_widths() == [4, 3]
    assert [e.description for e in events[0]] == [e.description for e in events[1]]
    for (n, p), q in zip(plans[0].model.state_dict().items(), plans[1].model.state_dict().values()):
        assert torch.equal(p, q), n
    c0, c1 = (p.callbacks[-1] for p in plans)
    assert c0.state_dict()["log"] == c1.state_dict()["log"] and c1.neurons_added == c0.neurons_added == 2
    assert torch.equal(c0.generator.get_state(), c1.generator.get_state())
