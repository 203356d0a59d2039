"""Run a study's runs as Ray tasks (optional extra: ``pip install 'widthlab[ray]'``).

Each run is one task with its CPU/GPU needs. The worker trains with checkpoints under ``runs_root`` (on
a cluster: shared storage every node reaches) and returns its summary plus the store writes it would
have made; the driver alone writes ``results.sqlite`` (SQLite must not live on network storage), so a
study's database looks the same whether it ran locally or on Ray. ``--resume`` works the same way: the
driver skips finished runs and workers restart the others from their checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from widthlab.studies.load import RunSpec, StudyError
from widthlab.studies.runner import execute_run, run_label
from widthlab.studies.store import BufferedRecords, ResultStore, replay


def _import_ray():
    try:
        import ray
    except ImportError:
        raise StudyError("--executor ray needs Ray: pip install 'widthlab[ray]' (with torch pinned, e.g. "
                         "pip install -c constraints.txt 'widthlab[ray]')") from None
    return ray


def _remote_run(run: RunSpec, out_dir: str, runs_root: str, resume: bool, threads: int
                ) -> tuple[dict[str, Any], list]:
    """Body of one Ray task: train the run, buffering every store write for the driver."""
    records = BufferedRecords()
    summary = execute_run(run, Path(out_dir), resume=resume, records=records, runs_root=Path(runs_root),
                          num_threads=threads)
    return summary, records.calls


def run_on_ray(todo: list[RunSpec], out_dir: Path, *, resume: bool, printer, address: str | None = None,
               runs_root: Path | None = None, cpus_per_run: int = 1, gpus_per_run: float | None = None,
               init_kwargs: dict | None = None) -> list[dict[str, Any]]:
    """Submit every run as a Ray task and record results as they finish.

    Args:
        address: a running cluster's address (``ray://host:10001`` or ``auto``); None starts a local Ray.
        runs_root: per-run checkpoint folders; default ``out_dir/runs`` (fine for a single machine).
        gpus_per_run: GPUs each task asks for; default 1 for runs with ``train.device`` cuda, else 0.
    """
    ray = _import_ray()
    runs_root = Path(runs_root or out_dir / "runs")
    started_here = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
        ray.init(address=address, **kw)
        started_here = True
    try:
        remote = ray.remote(_remote_run)
        pending: dict[Any, RunSpec] = {}
        for run in todo:
            gpus = gpus_per_run if gpus_per_run is not None else (
                1 if run.spec.train.device.startswith("cuda") else 0)
            ref = remote.options(num_cpus=cpus_per_run, num_gpus=gpus).remote(
                run, str(out_dir), str(runs_root), resume, cpus_per_run)
            pending[ref] = run
            printer({"kind": "start", "run_id": run.run_id, "label": run_label(run), "seed": run.seed})
        summaries: dict[str, dict[str, Any]] = {}
        with ResultStore(out_dir) as store:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(done[0])
                try:
                    summary, calls = ray.get(done[0])
                    replay(store, calls)
                except Exception as e:  # the task itself died (node lost, out of memory...)
                    err = f"ray task failed: {type(e).__name__}: {e}"
                    summary = {"run_id": run.run_id, "status": "failed", "error": err}
                    store.register(run.run_id, run.study, run.position, run.config())
                    store.finish(run.run_id, "failed", summary, error=err)
                store.write_summary()
                summaries[run.run_id] = summary
                printer({"kind": "end", "run_id": run.run_id, "status": summary["status"],
                         "error": summary.get("error"), "summary": summary})
        return [summaries[r.run_id] for r in todo]
    finally:
        if started_here:
            ray.shutdown()
