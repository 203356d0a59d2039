"""Command line: parse, validate, call one function. The contract is in DESIGN.md.

    widthlab studies                         list built-in studies, one line each
    widthlab show STUDY|FILE.yaml [k=v ...]  print the resolved, validated config
    widthlab run  STUDY|FILE.yaml [k=v ...] --out DIR [--workers N] [--executor local|ray] [--resume]
    widthlab demo [--out DIR]                the main job, on an embedded default dataset
    widthlab report DIR                      (re)write DIR/report.html and DIR/report.md
    widthlab kernel --d D --width N --connectivity P [--pairs K] [--networks K] [--json]

Bad input exits with status 2 and a one-line (or one line per problem) reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from widthlab import __version__

DEMO_STUDY = "demo"


class UsageError(Exception):
    pass


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="built-in study name (see `widthlab studies`) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, type-checked like the YAML (e.g. train.epochs=5)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="widthlab", description="How wide should this network be? "
                                "Train width studies, compare width methods, compute width theory.")
    p.add_argument("--version", action="version", version=f"widthlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("studies", help="list the built-in studies")

    s = sub.add_parser("show", help="print a study's resolved, validated config and its runs")
    _add_study_args(s)

    r = sub.add_parser("run", help="run every configuration of a study")
    _add_study_args(r)
    r.add_argument("--out", required=True, type=Path, help="output directory (results.sqlite, report...)")
    r.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes, or Ray tasks (needs the ray extra)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="per-run checkpoint folders for --executor ray (shared storage on a cluster)")
    r.add_argument("--resume", action="store_true",
                   help="keep finished runs of DIR and restart unfinished ones from their checkpoints")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    r.add_argument("--quiet", action="store_true", help="no progress output")

    d = sub.add_parser("demo", help="the main job: a small width study on scikit-learn digits (minutes)")
    d.add_argument("--out", type=Path, default=Path("widthlab-demo"),
                   help="output dir (default ./widthlab-demo)")
    d.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel worker processes (default: 2, or 1 on a 1-core machine)")

    rep = sub.add_parser("report", help="(re)write DIR/report.html and DIR/report.md from DIR/results.sqlite")
    rep.add_argument("dir", type=Path)
    rep.add_argument("--rebuild", action="store_true",
                     help="rebuild a damaged DIR/results.sqlite from the run folders (runs/*/config.yaml, "
                     "metrics.jsonl, result.json) first; the damaged file is kept as results.sqlite.damaged")

    k = sub.add_parser("kernel", help="distance of a sparse 1-hidden-layer ReLU net's GP kernel to the "
                       "infinite-width kernel (Theorem 1 of Golubeva et al. 2021)")
    k.add_argument("--d", type=int, required=True, help="input dimension")
    k.add_argument("--width", type=int, required=True, help="hidden width n")
    k.add_argument("--connectivity", type=float, required=True, help="connectivity p in (0, 1]")
    k.add_argument("--pairs", type=int, default=30, help="input pairs (default 30)")
    k.add_argument("--masks", type=int, default=None, help="Monte-Carlo mask samples")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--inputs", default=None,
                   help="dataset name (e.g. digits) or .npz/.csv file to draw inputs from (default Gaussian)")
    k.add_argument("--networks", type=int, default=0,
                   help="also estimate D from this many sampled whole networks (independent check)")
    k.add_argument("--json", action="store_true", help="print all terms and standard errors as JSON")

    b = sub.add_parser("build-cpu-kernel", help="compile the adaptive-width layers' CPU kernel now (else it "
                       "is built the first time an adaptive model runs on the CPU)")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    return p


# ------------------------------------------------------------------------------------------ commands


def cmd_studies(args) -> int:
    from widthlab.studies.load import builtin_studies, study_headline

    studies = builtin_studies()
    width = max(map(len, studies), default=0)
    for name, path in sorted(studies.items()):
        print(f"{name:<{width}}  {study_headline(path)}")
    return 0


def _dynamic_runs(spec) -> list[str]:
    """What a comparison decides while it runs: search trials, fixed retrain controls."""
    from widthlab.studies.compare import CompareSpec, arm_studies

    if not isinstance(spec, CompareSpec):
        return []
    out = []
    for a in arm_studies(spec):
        seeds = len(a.study.seeds)
        if a.search is not None:
            budget = f"{a.search.budget_trials} trials" if a.search.flops is None else \
                f"{a.search.flops:.3g} FLOPs"
            out.append(f"task={a.task} arm={a.arm}: Optuna {a.search.sampler} + {a.search.pruner}, "
                       f"width {list(a.search.width)}, {budget} per seed x {seeds} seed(s), asked while "
                       "it runs")
        elif a.retrain:
            out.append(f"task={a.task} arm={a.arm}_retrain: a fixed net of the width {a.arm} finds, "
                       f"1 per seed x {seeds}, once {a.arm}'s run is done")
    return out


def cmd_show(args) -> int:
    from widthlab.studies.load import dump_yaml, expand_runs, load_study

    spec = load_study(args.study, args.overrides)
    runs = expand_runs(spec)
    print(dump_yaml(spec.model_dump()), end="")
    print(f"# {len(runs)} run(s):")
    for r in runs:
        tags = "".join(f"{k}={r.tags[k]} " for k in ("task", "arm") if k in r.tags)
        axes = " ".join(f"{k}={v}" for k, v in r.axes.items())
        print(f"#   {r.run_id}  {tags}seed={r.seed} {axes}".rstrip())
    for line in _dynamic_runs(spec):
        print(f"#   + {line}")
    return 0


def _finish_study(out: Path, write_report: bool, quiet: bool) -> None:
    from widthlab.studies.store import ResultStore

    with ResultStore(out, create=False) as store:
        store.write_summary()
    if not write_report:
        return
    from widthlab.report import format_results_table
    from widthlab.report import write_report as write

    html, md = write(out)
    if not quiet:
        from widthlab.report import comparison_text
        from widthlab.report.compare import is_compare

        with ResultStore(out, create=False) as store:
            rows = store.runs()
        print(comparison_text(out) if is_compare(rows) else format_results_table(rows))
        print(f"\nreport: {html}\n        {md}\nsummary: {out / 'summary.json'}")


def cmd_run(args) -> int:
    import torch

    from widthlab.studies.executor import run_study
    from widthlab.studies.load import load_study, study_device
    from widthlab.studies.outdir import job_lock
    from widthlab.train.distributed import init_from_env, shutdown

    spec = load_study(args.study, args.overrides)
    # Under torchrun (WORLD_SIZE > 1) every rank joins the process group and trains data-parallel.
    ctx = init_from_env(torch.device(study_device(spec)))
    t0 = time.perf_counter()
    # One driver per output folder, for the driver's whole life (rank 0 of a torchrun job holds it).
    with job_lock(args.out, ctx):
        outcome = run_study(spec, args.out, workers=args.workers, resume=args.resume, quiet=args.quiet,
                            executor=args.executor, address=args.address, runs_root=args.checkpoint_dir)
        if ctx.is_main:
            _finish_study(args.out, not args.no_report, args.quiet)
    shutdown()  # every rank of a torchrun job, once rank 0 has written the report (else a no-op)
    if not ctx.is_main:
        return 0
    if not args.quiet:
        print(f"{len(outcome.summaries)} run(s) in {time.perf_counter() - t0:.1f}s "
              f"({len(outcome.failed)} failed, {outcome.skipped} kept from before)")
    return 1 if outcome.failed else 0


def cmd_demo(args) -> int:
    from widthlab.studies.executor import run_study
    from widthlab.studies.load import load_study
    from widthlab.studies.outdir import driver_lock

    spec = load_study(DEMO_STUDY)
    print(f"widthlab demo: {spec.description.strip().splitlines()[0]}")
    print(f"output: {args.out}")
    t0 = time.perf_counter()
    with driver_lock(args.out):
        outcome = run_study(spec, args.out, workers=args.workers, resume=True)
        _finish_study(args.out, True, False)
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 1 if outcome.failed else 0


def cmd_report(args) -> int:
    from widthlab.report import write_report
    from widthlab.studies.runner import final_model_problem
    from widthlab.studies.store import ResultStore

    if args.rebuild:
        from widthlab.studies.rebuild import rebuild_store

        count, moved = rebuild_store(args.dir)
        kept = f"; the damaged database is kept as {moved}" if moved else ""
        print(f"rebuilt {args.dir / 'results.sqlite'} from {count} run folder(s){kept}", file=sys.stderr)
    with ResultStore(args.dir, create=False) as store:
        store.check_integrity()
        store.write_summary()
        runs = store.runs()
    damaged = 0
    for r in runs:
        problem = final_model_problem(args.dir / "runs" / r["run_id"]) if r["status"] == "done" else None
        if problem:
            damaged += 1
            print(f"widthlab report: warning: run {r['run_id']}: {problem}; `widthlab run ... --out "
                  f"{args.dir} --resume` writes it again", file=sys.stderr)
    html, md = write_report(args.dir)
    print(f"{html}\n{md}")
    return 1 if damaged else 0


def cmd_kernel(args) -> int:
    from widthlab.theory import format_kernel_summary, kernel_distance_summary

    if args.d < 1 or args.width < 1 or args.pairs < 1:
        raise UsageError("--d, --width and --pairs must be >= 1")
    if args.networks < 0:
        raise UsageError(f"--networks must be >= 0, got {args.networks}")
    if not 0 < args.connectivity <= 1:
        raise UsageError(f"--connectivity must be in (0, 1], got {args.connectivity}")
    inputs = None
    if args.inputs is not None:
        inputs = _kernel_inputs(args.inputs, args.d)
    kw = {"pairs": args.pairs, "seed": args.seed, "inputs": inputs, "networks": args.networks}
    if args.masks is not None:
        kw["masks"] = args.masks
    out = kernel_distance_summary(args.d, args.width, args.connectivity, **kw)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(format_kernel_summary(out))
    return 0


def _kernel_inputs(ref: str, d: int):
    """Inputs for ``widthlab kernel --inputs``: a dataset name or a table file, flattened to vectors."""
    import torch

    from widthlab.data.registry import DATASETS, load_dataset

    if ref in DATASETS:
        task = load_dataset(ref, flatten=True)
    elif Path(ref).suffix in (".npz", ".csv"):
        task = load_dataset("table", path=ref)
    else:
        raise UsageError(f"--inputs {ref!r}: neither a dataset name ({', '.join(DATASETS.names())}) "
                         f"nor a .npz/.csv file")
    x = torch.stack([task.train[i][0] for i in range(len(task.train))]).flatten(1).double()
    if x.shape[1] != d:
        raise UsageError(f"--inputs {ref!r} has {x.shape[1]} features but --d is {d}")
    return x


def cmd_build_cpu_kernel(args) -> int:
    from widthlab.methods.adaptive import cpu_kernel

    try:
        cpu_kernel.load(verbose=args.verbose, strict=True)
    except RuntimeError as e:
        print(f"widthlab build-cpu-kernel: {e}; adaptive layers will use PyTorch operations (same "
              "values, slower on small networks)", file=sys.stderr)
        return 1
    print(f"adaptive-width CPU kernel ready in {cpu_kernel.build_dir()}")
    return 0


COMMANDS = {"studies": cmd_studies, "show": cmd_show, "run": cmd_run, "demo": cmd_demo,
            "report": cmd_report, "kernel": cmd_kernel, "build-cpu-kernel": cmd_build_cpu_kernel}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after the options (`run demo --out D train.epochs=5`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    import sqlite3

    from widthlab.studies.load import StudyError
    from widthlab.train.checkpoint import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, StudyError, CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"widthlab {args.command}: error: {cap_message(msg)}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as e:  # a path that is not a folder, a read-only disk, ...
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"widthlab {args.command}: error: {cap_message(where + text)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"widthlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("WIDTHLAB_TRACEBACK"):
            raise
        print(f"widthlab {args.command}: internal error: {type(e).__name__}: {cap_message(str(e))} (set "
              "WIDTHLAB_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1


MAX_LINE = 500
MAX_LINES = 40


def cap_message(msg: str) -> str:
    """An error message as printed: each line at most MAX_LINE characters, at most MAX_LINES lines."""
    lines = str(msg).splitlines() or [""]
    out = [ln if len(ln) <= MAX_LINE else ln[:MAX_LINE] + f"... ({len(ln) - MAX_LINE} more characters)"
           for ln in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        out.append(f"... ({len(lines) - MAX_LINES} more lines)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
