"""Bench: data-parallel training throughput, W gloo processes on the CPU vs 1 process, same global batch.

Each configuration is one method's model trained by the real trainer step (``Trainer._train_step``:
batch slicing, loss scaling, the method's callbacks, DDP's gradient all-reduce), on a fixed global
batch. In one W-rank job, rank 0 times three variants round-robin (rotating order, one sample of each
per round, as bench/_timing.py does):

* ``1p x 1t``: one process, one torch thread, the whole global batch (the other ranks wait);
* ``1p x Wt``: one process with W threads: the same cores as the W processes;
* ``Wp``: W processes of one thread each under DDP, each on its slice of the batch.

Both trainers of a configuration start from the same seed and see the same batches, and a W-rank step
equals a 1-process step (tests/train/test_ddp_methods.py), so they pass through the same widths
(adaptive) in step. Reported: samples/s of each variant and the ratios ``Wp / 1p x 1t`` (the speed-up
of data parallelism) and ``Wp / 1p x Wt`` (against intra-op threading on the same cores). On a shared
machine whose cores are busy, W processes cannot run in parallel and the ratios fall below 1.

    .venv/bin/python bench/bench_ddp.py                 # writes bench/results/ddp-cpu.md
    .venv/bin/python bench/bench_ddp.py --quick --world 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Timing, markdown_table  # noqa: E402
from widthlab.data.base import TaskData  # noqa: E402
from widthlab.models import create_model  # noqa: E402
from widthlab.studies.methods import build_method  # noqa: E402
from widthlab.train import distributed  # noqa: E402
from widthlab.train.config import OptimConfig, TrainConfig  # noqa: E402
from widthlab.train.metrics import Accumulator  # noqa: E402
from widthlab.train.trainer import Trainer, seed_everything  # noqa: E402

D_IN, CLASSES = 784, 10


def configs(quick: bool) -> list[dict]:
    """(label, method, model options, method options, global batch)."""
    width, batch = (256, 256) if quick else (1024, 512)
    mlp = {"width": width, "depth": 2}
    return [
        {"label": f"dense MLP 784-{width}-{width}-10", "method": "dense", "model": mlp, "options": {},
         "batch": batch},
        {"label": f"wide & sparse MLP 784-{width}-{width}-10, base width {width // 4}",
         "method": "widesparse", "model": mlp, "options": {"base_width": width // 4}, "batch": batch},
        # lam0 0.01: 232 units per adaptive layer; a small lr keeps the widths near it.
        {"label": "adaptive MLP 784-D-D-10 (D(0.01) = 232)", "method": "adaptive",
         "model": {"width": 8, "depth": 2}, "options": {"lambda0": 0.01}, "batch": batch},
    ]


def _task(batch: int) -> tuple[TaskData, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, D_IN, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    ds = TensorDataset(x, y)
    return TaskData("bench", "classification", ds, ds, ds, (D_IN,), CLASSES), x, y


def _step_fn(cfg: dict, single: bool):
    """One training step of ``cfg`` as the trainer takes it; ``single``: a 1-process trainer even inside
    the W-rank job (its own DistContext), else the job's DDP trainer."""
    data, x, y = _task(cfg["batch"])
    seed_everything(0)
    model = create_model("mlp", input_shape=(D_IN,), num_outputs=CLASSES, **cfg["model"])
    plan = build_method(cfg["method"], cfg["options"], model, data, seed=0)
    tc = TrainConfig(epochs=1, batch_size=cfg["batch"], optimizer=OptimConfig(name="adam", lr=1e-4),
                     progress="none", checkpoint_every=0)
    tr = Trainer(plan.model, data, tc, plan.callbacks)
    if single:
        tr.dist = distributed.DistContext()
    # What Trainer.fit does before its first epoch (private: a bench measures the real step).
    tr.optimizer = tr._build_optimizer()
    tr._build_schedule()
    tr.dispatch("on_fit_start")
    tr._rewrap()
    tr.model.train()
    acc = Accumulator(True, tr.device)
    return lambda: tr._train_step(x, y, acc)


def worker(quick: bool, rounds: int, out: Path) -> None:
    """One rank of the job; rank 0 times and writes the results (JSON) to ``out``."""
    torch.set_num_threads(1)
    ctx = distributed.init_from_env(torch.device("cpu"))
    world, main = ctx.world, ctx.is_main
    rows = []
    for cfg in configs(quick):
        ddp = _step_fn(cfg, single=False)
        one = _step_fn(cfg, single=True) if main else None
        for _ in range(3):  # warm-up: allocator, thread pools, DDP buckets
            ddp()
            if main:
                one()
        t0 = time.perf_counter()
        ddp()
        # Steps per sample: at least ~50 ms of the DDP variant; rank 0 decides for every rank.
        inner = ctx.broadcast_object(max(1, math.ceil(0.05 / (time.perf_counter() - t0))))
        names = ["1p x 1t", f"1p x {world}t", f"{world}p"]
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % 3:] + names[:r % 3]:
                ctx.barrier()
                if name.endswith("t"):  # single-process variants: rank 0 alone, the others wait
                    if main:
                        torch.set_num_threads(world if name != "1p x 1t" else 1)
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            one()
                        samples[name].append((time.perf_counter() - t0) / inner)
                        torch.set_num_threads(1)
                else:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        ddp()
                    samples[name].append((time.perf_counter() - t0) / inner)
        if main:
            t = {n: Timing(tuple(s), inner) for n, s in samples.items()}
            rows.append({"label": cfg["label"], "batch": cfg["batch"], "world": world,
                         "samples_per_s": {n: cfg["batch"] / t[n].median for n in names},
                         "ddp_vs_1t": t["1p x 1t"].median / t[f"{world}p"].median,
                         "ddp_vs_wt": t[f"1p x {world}t"].median / t[f"{world}p"].median,
                         "spread": max(x.spread for x in t.values())})
    if main:
        out.write_text(json.dumps(rows))
    distributed.shutdown()


def measure(quick: bool = False, world: int = 2, rounds: int | None = None) -> list[dict]:
    """Launch the W-rank job (ranks started as torchrun starts them) and return rank 0's rows."""
    rounds = rounds or (5 if quick else 11)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(world)}
        cmd = [sys.executable, __file__, "--worker", "--rounds", str(rounds), "--json", str(out)]
        cmd += ["--quick"] if quick else []
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"bench_ddp ranks exited with {codes}")
        return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    w = rows[0]["world"]
    header = ["config", "global batch", "1p x 1t (samples/s)", f"1p x {w}t (samples/s)",
              f"{w}p (samples/s)", f"**{w}p / 1p x 1t**", f"{w}p / 1p x {w}t", "IQR/2 (rel.)"]
    body = [[r["label"], r["batch"], *r["samples_per_s"].values(), r["ddp_vs_1t"], r["ddp_vs_wt"],
             r["spread"]] for r in rows]
    return markdown_table(header, body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer rounds")
    ap.add_argument("--world", type=int, default=2, help="number of processes (default 2)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ddp-cpu.md"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.quick, args.rounds, Path(args.json))
        return 0
    load0 = os.getloadavg()[0]
    rows = measure(args.quick, args.world, args.rounds)
    load = max(load0, os.getloadavg()[0])
    text = (f"# Data-parallel throughput: {args.world} gloo processes vs 1 process (CPU)\n\n"
            f"`python bench/bench_ddp.py{' --quick' if args.quick else ''} --world {args.world}`; torch "
            f"{torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"load average {load:.1f} (1 min, before or after, the larger). Medians of interleaved rounds; "
            f"samples/s are for orientation, the ratios are the result.\n\n{table(rows)}\n")
    slow = [r["label"] for r in rows if r["ddp_vs_wt"] > r["ddp_vs_1t"]]
    if slow:
        # More threads making one process slower means the cores were busy: OpenMP threads then wait
        # for each other at every op, and W processes wait for each other at every all-reduce.
        text += (f"\nWARNING: one process was slower with {args.world} threads than with 1 ({len(slow)} of "
                 f"{len(rows)} configs): the cores were busy, so these ratios measure contention, not the "
                 f"parallel speed-up an idle machine would show.\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
