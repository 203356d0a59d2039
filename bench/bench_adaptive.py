"""Bench: one training step of an adaptive-width MLP vs a fixed MLP of the same width (specs/awnn.md).

The adaptive step is everything the method adds to a plain step: the rescaling by p (forward and
backward), the ELBO prior terms, lam's parameter in Adam, and the per-step width check of the callback
(projection, device-side D(lam), one host read). The fixed step is the same MLP (same width, same
activation, Adam, cross-entropy) without the method. Both are timed round-robin in one process
(bench/_timing.py) and reported as a ratio of medians. lam is put back after each adaptive step so that
both nets keep the same width throughout (the steady state; resizes are rare once training settles and
are measured separately below).

    python bench/bench_adaptive.py            # writes bench/results/adaptive-cpu.md

Target (issue 6): ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, ratio, time_interleaved  # noqa: E402
from widthlab.methods.adaptive.callback import AdaptiveWidthCallback  # noqa: E402
from widthlab.methods.adaptive.loss import ElboPrior  # noqa: E402
from widthlab.methods.adaptive.mlp import adaptive_mlp  # noqa: E402
from widthlab.models.mlp import MLP, MLPConfig  # noqa: E402


class _Trainer:
    """The attributes of the trainer that the callback reads."""

    def __init__(self, model):
        self.model = model


def steps(d_in: int, n_out: int, lam0: float, batch: int, hidden_layers: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device)
    y = torch.randint(0, n_out, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    ada = adaptive_mlp(d_in, n_out, lam0=lam0, hidden_layers=hidden_layers).to(device)
    widths = tuple(ada.widths().values())
    fixed = MLP(MLPConfig(d_in, n_out, widths=widths, activation="relu6")).to(device)
    opt_a = torch.optim.Adam(ada.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fixed.parameters(), lr=1e-3)
    cb = AdaptiveWidthCallback(ElboPrior(sigma_theta=1.0, n_observations=1000), seed=0)
    tr = _Trainer(ada)
    r0 = [s.dist.r.detach().clone() for s in ada.scales]

    def step_fixed():
        out = fixed(x)
        loss = F.cross_entropy(out, y)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()

    def step_adaptive():
        out = ada(x)
        loss = F.cross_entropy(out, y) + cb.extra_loss(ada, out, y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
        with torch.no_grad():  # steady state: keep lam (hence D) where it was
            for s, r in zip(ada.scales, r0):
                s.dist.r.copy_(r)
        events = cb.on_step_end(tr)
        assert not events

    return widths, step_fixed, step_adaptive, (ada, cb, tr, opt_a)


def time_interleaved_cpu(fns, rounds: int, inner: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Like ``_timing.time_interleaved`` (round-robin, rotating order) but on the thread's CPU clock.

    With one torch thread all of a step's work runs on the calling thread, so ``time.thread_time``
    counts only that work: time the thread spends descheduled by other processes on a shared machine
    (the main noise of wall-clock medians there) is left out.
    """
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.thread_time()
            for _ in range(inner):
                fns[n]()
            samples[n].append((time.thread_time() - t0) / inner)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "adaptive-cpu.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    configs = [
        # (label, d_in, outputs, lam0, batch, hidden layers)
        ("MNIST-sized, 784 -> D -> 10, batch 128", 784, 10, 0.01, 128, 1),
        ("SpiralHard-sized, 2 -> D -> 2, batch 128", 2, 2, 0.01, 128, 1),
        ("deep, 784 -> D -> D -> D -> 10, batch 128", 784, 10, 0.01, 128, 3),
    ]
    rows = []
    cpu_clock = args.device == "cpu" and args.threads == 1
    for label, d_in, n_out, lam0, batch, layers in configs:
        widths, fixed, adaptive, _ = steps(d_in, n_out, lam0, batch, layers, args.device)
        fns = {"fixed": fixed, "adaptive": adaptive}
        t = time_interleaved(fns, rounds=args.rounds, sync=sync)
        row = [label, "/".join(map(str, widths)), t["fixed"].ms, t["adaptive"].ms,
               ratio(t["adaptive"], t["fixed"]), max(t["fixed"].spread, t["adaptive"].spread)]
        if cpu_clock:
            c = time_interleaved_cpu(fns, rounds=args.rounds)
            cf, ca = statistics.median(c["fixed"]), statistics.median(c["adaptive"])
            row += [1e3 * cf, 1e3 * ca, ca / cf, min(c["adaptive"]) / min(c["fixed"])]
        rows.append(row)
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row), flush=True)
    header = ["config", "width D", "fixed step (ms, wall)", "adaptive step (ms, wall)",
              "ratio (wall)", "IQR spread (wall)"]
    if cpu_clock:
        header += ["fixed (ms, thread CPU)", "adaptive (ms, thread CPU)", "ratio (thread CPU)",
                   "ratio of minima (thread CPU)"]
    table = markdown_table(header, rows)
    text = (f"# Adaptive-width MLP step vs fixed MLP step ({args.device})\n\n"
            f"`python bench/bench_adaptive.py --device {args.device} --threads {args.threads}`; torch "
            f"{torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
            f"{args.rounds} interleaved rounds, medians.\n\n{table}\n\n"
            "The adaptive step includes the rescaling by p, the ELBO prior terms (sigma_theta = 1, "
            "N = 1000), lam in Adam and the callback's per-step width check (one host read). Target: "
            "ratio <= 1.2. Wall-clock medians come from bench/_timing.py; on one CPU thread the same "
            "interleaved scheme is repeated on the thread's CPU clock (time.thread_time), which leaves out "
            "time the process spends descheduled on a shared, loaded machine; the ratio of the fastest "
            "samples estimates the cost on an idle machine.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
