"""Bench: the self-expanding method's optimisers and the cost of its expansion events (Mitchell et al. 2023).

1. One training step of an MLP with the K-FAC natural-gradient optimizer (default settings: statistics
   and inverses refreshed every 10 steps, so their cost is amortised over the steps as in training)
   against one Adam step of the same MLP, timed round-robin in one process (bench/_timing.py); the
   CG natural-gradient step of the official code is timed too, for reference. Target (issue 7):
   K-FAC/Adam <= 2.
2. The share of a run's wall time spent in expansion events, per run and per study (all its runs
   together), from the shipped CPU studies run whole (``--quick``: short versions of them; or from
   finished study directories with ``--results DIR ...``): ``expansion_seconds`` and
   ``expansion_share`` are recorded in every expanding run's summary, and so is ``method_flops`` (the
   natural-gradient solves and expansion scoring, next to the trainer's ``train_flops``).

    python bench/bench_expanding.py                 # writes bench/results/expanding-cpu.md
    python bench/bench_expanding.py --quick         # fewer rounds, shorter study runs
    python bench/bench_expanding.py --results runs/expanding-moons runs/expanding-digits-datasize
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, ratio, time_interleaved  # noqa: E402
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer, precondition_flops  # noqa: E402
from widthlab.methods.expanding.natural_gradient import NaturalGradientCG  # noqa: E402
from widthlab.models.mlp import MLP, MLPConfig  # noqa: E402

# (label, d_in, widths, classes, batch)
SHAPES = [
    ("digits-like 64-256-256-10, B=256", 64, (256, 256), 10, 256),
    ("MNIST-like 784-128-10, B=1024", 784, (128,), 10, 1024),
    ("MNIST-like 784-512-512-10, B=256", 784, (512, 512), 10, 256),
]


def optimizer_steps(d_in, widths, classes, batch, cg_iters):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    nets, opts = {}, {}
    for name in ("adam", "kfac", "cg"):
        torch.manual_seed(0)
        net = MLP(MLPConfig(d_in, classes, widths=widths, activation="tanh"))
        nets[name] = net
        if name == "adam":
            opts[name] = torch.optim.Adam(net.parameters(), lr=1e-3)
        elif name == "kfac":
            opts[name] = KFACOptimizer(net.parameters(), net, "cross_entropy", lr=1e-3)
        else:
            opts[name] = NaturalGradientCG(net.parameters(), net, "cross_entropy", lr=1e-3, maxiter=cg_iters,
                                           tol=0.0)

    def make(name):
        net, opt = nets[name], opts[name]

        def step():
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(opt, "set_batch"):
                opt.set_batch(x, y)
            opt.step()

        return step

    return {name: make(name) for name in nets}, opts


def flop_floor(d_in: int, widths: tuple[int, ...], classes: int, batch: int) -> tuple[float, float]:
    """(Adam step FLOPs, K-FAC preconditioning FLOPs) of one step, in closed form.

    Adam: the forward and backward GEMMs (2·B·d·m each for the forward, the weight gradient and, past the
    first layer, the input gradient) plus a generous 16 FLOPs per parameter for bias, activation and
    update. Preconditioning: G⁻¹ ḡ A⁻¹ per layer in the cheaper of its full and factored forms
    (``precondition_flops``). K-FAC does all of Adam's passes and the preconditioning every step, so
    ``1 + pre / adam`` bounds its FLOP ratio from below, statistics and inverses left out.
    """
    dims = [d_in, *widths, classes]
    adam = pre = 0.0
    for i, (d, m) in enumerate(zip(dims, dims[1:])):
        adam += 2 * batch * d * m * (2 if i == 0 else 3) + 16 * (d + 1) * m
        pre += min(precondition_flops(m, d, d + 1), precondition_flops(m, d, d + 1, batch))
    return adam, pre


def bench_optimizers(rounds: int, cg_iters: int) -> tuple[str, list[float]]:
    rows, ratios = [], []
    for label, d_in, widths, classes, batch in SHAPES:
        fns, opts = optimizer_steps(d_in, widths, classes, batch, cg_iters)
        # 20 warm-up steps: the first K-FAC steps compute statistics and inverses every time.
        kfac = opts["kfac"]
        cycle = math.lcm(kfac.stat_every, kfac.inv_every)  # samples of whole statistics cycles
        t = time_interleaved(fns, rounds=rounds, warmup=20, min_sample_s=0.2, period={"kfac": cycle})
        r = ratio(t["kfac"], t["adam"])
        ratios.append(r)
        adam, pre = flop_floor(d_in, widths, classes, batch)
        counted = kfac.method_flops / kfac.param_groups[0]["kfac_step"]  # statistics and inverses in
        rows.append([label, t["adam"].ms, t["kfac"].ms, r, 1 + pre / adam, 1 + counted / adam,
                     ratio(t["cg"], t["adam"]), max(x.spread for x in t.values())])
    table = markdown_table(["MLP", "Adam step (ms)", "K-FAC step (ms)", "K-FAC/Adam", "FLOP floor",
                            "counted FLOPs", f"CG({cg_iters})/Adam", "IQR/2 (rel.)"], rows)
    return table, ratios


# ---------------------------------------------------------------------------------- expansion share

QUICK_STUDIES = {
    "expanding-moons": ["train.epochs=60", "seeds=[0]"],
    "expanding-regression1d": ["train.epochs=200", "seeds=[0]"],
    "expanding-digits-datasize": ["train.epochs=20", "seeds=[0]", "sweep.data.subset=[400]"],
    "expanding-cnn-digits": ["train.epochs=45", "seeds=[0]"],
    "expanding-densecnn-digits": ["train.epochs=10", "seeds=[0]"],
}


def study_shares(results: list[str], quick: bool) -> str:
    from widthlab.studies.executor import run_study
    from widthlab.studies.load import load_study

    summaries = []
    if results:
        for d in results:
            path = Path(d) / "summary.json"
            summaries += [s for s in json.loads(path.read_text()) if s.get("method") == "expanding"]
        source = "finished study directories: " + ", ".join(results)
    elif quick:
        for name, over in QUICK_STUDIES.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = run_study(load_study(name, [*over, "method.mala_bursts=5"]), tmp, workers=1, quiet=True)
                summaries += out.summaries
        runs = "; ".join(f"{k} {' '.join(v)}" for k, v in QUICK_STUDIES.items())
        source = ("short runs of the CPU studies (indicative: a short run holds its first events, the one "
                  "before any training included, in a fraction of the training): " + runs)
    else:  # the target is on whole runs: the shipped studies as they are, two runs at a time
        for name in QUICK_STUDIES:
            with tempfile.TemporaryDirectory() as tmp:
                summaries += run_study(load_study(name, []), tmp, workers=2, quiet=True).summaries
        source = "the shipped CPU studies, whole (" + ", ".join(QUICK_STUDIES) + "), two runs at a time"
    rows = []
    for s in summaries:
        if s.get("method") != "expanding" or s.get("status") != "done":
            continue
        events, seconds = s.get("expansion_events") or 0, s.get("expansion_seconds")
        per_event = seconds / events if events and seconds is not None else None
        train, extra = s.get("train_flops"), s.get("method_flops")
        rows.append([s["study"], s.get("label", ""), s["seed"], s.get("final_widths"), s.get("wall_seconds"),
                     s.get("expansion_seconds"), events, per_event, s.get("expansion_share"),
                     extra / train if extra is not None and train else None])
    header = ["study", "run", "seed", "final widths", "wall (s)", "expansion (s)", "events", "s/event",
              "share (run)", "method FLOPs / train FLOPs"]
    table = markdown_table(header, rows)
    totals = {}
    for r in rows:
        t = totals.setdefault(r[0], [0, 0.0, 0.0])
        t[0] += 1
        t[1] += r[5] or 0.0
        t[2] += r[4] or 0.0
    total_rows = [[name, n, e, w, e / w if w else None] for name, (n, e, w) in totals.items()]
    summary = markdown_table(["study", "runs", "expansion (s)", "wall (s)", "share of all runs"], total_rows)
    return f"Source: {source}.\n\n{table}\n\nPer study (target <= 0.2):\n\n{summary}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cg-iters", type=int, default=20, help="CG iterations per natural-gradient step")
    ap.add_argument("--results", nargs="*", default=[], help="finished study output directories")
    ap.add_argument("--skip-studies", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "expanding-cpu.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table, ratios = bench_optimizers(3 if args.quick else 9, args.cg_iters)
    parts = [
        "# Self-expanding networks: optimiser step cost and expansion-time share",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{args.threads} thread(s). Ratios of medians of interleaved repeats (bench/_timing.py).",
        "",
        "## One training step: K-FAC natural gradient vs Adam (target K-FAC/Adam <= 2)",
        "",
        "K-FAC with its defaults (statistics from one sampled-Fisher backward on at most 256 samples and "
        "inverses every 10 steps, amortised: each timing sample holds whole 10-step cycles); CG with a "
        "fixed number of iterations (each one JVP + one VJP). FLOP floor: "
        "1 + (preconditioning FLOPs) / (Adam step FLOPs), in closed form (``flop_floor``): no K-FAC step "
        "can have a smaller FLOP ratio, whatever the implementation. Counted FLOPs: the same with the "
        "FLOPs the optimizer counted per step (preconditioning, statistics and inverses, amortised).",
        "",
        table,
        "",
        f"Worst K-FAC/Adam ratio: {max(ratios):.2f}.",
    ]
    if not args.skip_studies:
        parts += ["", "## Share of wall time spent in expansion events", "",
                  study_shares(args.results, args.quick)]
    parts += ["", f"Bench wall time: {time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(parts)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
