"""Run the whole bench suite and write one Markdown table of its headline ratios.

    .venv/bin/python bench/run_all.py [--quick] [--out bench/results/suite-<device>.md]

Each bench runs as its own command (a subprocess, with its own threads and memory), exactly as
bench/README.md documents it, and writes its full report; every ratio in it compares variants timed in
that one process (bench/_timing.py). This script then reads the headline ratio columns of each
report's tables and writes one table, with the machine in the header, followed by the full reports.
A bench that fails, or whose report lacks an expected column, gets a row saying so; the suite goes on.

Headline ratios: ``bench_sparse.py``: masked/CSR, dense/CSR and masked/dense time of one Linear layer
per density, and CSR/base step time of the MLP family at a fixed weight budget; ``bench_adaptive.py``:
adaptive-width step / fixed step; ``bench_expanding.py``: K-FAC natural-gradient step / Adam step and
the share of wall time in expansion events; ``bench_ddp.py``: samples/s of 2 gloo processes / 1 process
at the same global batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import markdown_table  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """One bench command and where its report holds its headline ratios.

    ``columns``: (table, column, name) triples: in every table of the report whose first header
    starts with ``table``, the first column whose header starts with ``column`` (bold marks ignored)
    gives one summary row per table row, labelled by the row's first cell and called ``name``.
    """

    script: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    columns: tuple[tuple[str, str, str], ...]


def benches(device: str) -> list[Bench]:
    return [
        Bench("bench_sparse.py", ("--threads", "1"), ("--quick", "--threads", "1"), (
            ("density", "masked/CSR", "Linear fwd+bwd time, masked / CSR (>1: CSR faster)"),
            ("density", "dense/CSR", "Linear fwd+bwd time, dense / CSR (>1: CSR faster)"),
            ("density", "masked/dense", "Linear fwd+bwd time, masked / dense"),
            ("n", "CSR/base", "MLP step time, CSR member of width n / dense base (same weights)"))),
        Bench("bench_adaptive.py", ("--device", device, "--threads", "1"),
              ("--device", device, "--threads", "1", "--rounds", "7"), (
            ("config", "ratio (wall", "step time, adaptive / fixed width (target <= 1.2)"),)),
        Bench("bench_expanding.py", ("--threads", "1"), ("--quick", "--threads", "1"), (
            ("MLP", "K-FAC/Adam", "step time, K-FAC natural gradient / Adam (target <= 2)"),
            ("study", "share of all runs",
             "share of wall time in expansion events, whole study (target <= 0.2)"))),
        Bench("bench_ddp.py", ("--world", "2"), ("--quick", "--world", "2"), (
            ("config", "2p / 1p x 1t", "samples/s, 2 gloo processes / 1 process (>1: DDP faster)"),
            ("config", "2p / 1p x 2t", "samples/s, 2 processes / 1 process with 2 threads"))),
    ]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return name or platform.processor() or platform.machine()


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every pipe table in ``markdown``; cells stripped, bold marks removed."""
    out, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in block[1]):
            out.append((block[0], block[2:]))
        block = []
    return out


def headline_rows(bench: Bench, report: str) -> list[list[str]]:
    """Summary rows [bench, ratio, case, value] from ``report``; a row saying so if a column is missing."""
    rows = []
    for table, column, name in bench.columns:
        found = False
        for header, body in tables(report):
            col = next((i for i, h in enumerate(header) if h.startswith(column)), None)
            if not header[0].startswith(table) or col is None:
                continue
            found = True
            rows += [[bench.script, name, r[0], r[col]] for r in body if col < len(r)]
        if not found:
            rows.append([bench.script, name, f"no column '{column}' in the report", "-"])
    return rows


def run_bench(bench: Bench, quick: bool, workdir: Path, timeout: float) -> tuple[str, str, float]:
    """Run one bench; returns (its report or an error note, status, seconds)."""
    out = workdir / bench.script.replace(".py", ".md")
    cmd = [sys.executable, str(HERE / bench.script), *(bench.quick_args if quick else bench.args),
           "--out", str(out)]
    shown = " ".join(["python", f"bench/{bench.script}", *cmd[2:-2]])
    print(f"== {shown}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`{shown}` timed out after {timeout:.0f} s.", "timed out", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`{shown}` failed (exit {proc.returncode}): {tail[0]}", f"failed: {tail[0]}", dt
    # The report's own headings go two levels down, under this suite's "## bench" section.
    body = "\n".join("##" + ln if ln.startswith("#") else ln for ln in out.read_text().strip().splitlines())
    return f"`{shown}` ({dt:.0f} s)\n\n{body}\n", "ok", dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each bench's quick mode (minutes, indicative)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device of the benches that can use a GPU (the adaptive step); auto: cuda if any")
    ap.add_argument("--only", default=None, help="comma-separated bench names to run (e.g. sparse,ddp)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per bench")
    ap.add_argument("--out", default=None, help="Markdown output (default bench/results/suite-<device>.md)")
    args = ap.parse_args(argv)
    gpu = gpu_name() if args.device != "cpu" else None
    if args.device == "cuda" and gpu is None:
        ap.error("--device cuda but CUDA is not available")
    device = "cuda" if gpu else "cpu"
    out = Path(args.out) if args.out else HERE / "results" / f"suite-{device}.md"
    chosen = benches(device)
    if args.only:
        keep = {f"bench_{n.strip()}.py" for n in args.only.split(",")}
        chosen = [b for b in chosen if b.script in keep]
    import torch

    t0 = time.perf_counter()
    summary, reports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for bench in chosen:
            report, status, dt = run_bench(bench, args.quick, Path(tmp), args.timeout)
            print(f"   {status}, {dt:.0f} s", flush=True)
            summary += headline_rows(bench, report) if status == "ok" else [[bench.script, status, "-", "-"]]
            reports.append(f"## {bench.script}\n\n{report}")
    machine = f"CPU: {cpu_name()}, {os.cpu_count()} cores" + (f"; GPU: {gpu}" if gpu else "; no GPU")
    text = "\n".join([
        f"# Bench suite ({'quick' if args.quick else 'full'}): {gpu or cpu_name()}",
        "",
        f"{machine}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
        f"`python bench/run_all.py{' --quick' if args.quick else ''}` in {time.perf_counter() - t0:.0f} s.",
        "",
        "Every ratio compares variants timed round-robin in one process of one bench (for DDP: one "
        "job), so it holds for this run on this machine; absolute times are not comparable across "
        "runs. Each bench's full report, with its noise figures, follows the table.",
        "",
        markdown_table(["bench", "ratio", "case", "value"], summary),
        "",
        *reports,
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
