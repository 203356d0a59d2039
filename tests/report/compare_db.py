"""Comparison-study databases written through ResultStore the way the runner writes them.

``CompareWriter.run`` registers a run with the ``task``/``arm``/``role`` tags of a ``kind: compare``
study, records its epochs and finishes it with a summary; tests state every number they rely on.
Accuracies are written as ``k / n`` (a validation split of ``n`` examples), like the trainer does.
"""

from __future__ import annotations

from pathlib import Path

from widthlab.studies.store import ResultStore


class CompareWriter:
    def __init__(self, out: Path, study: str = "cmp"):
        self.store = ResultStore(out)
        self.study = study
        self.position = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.store.write_summary()
        self.store.close()

    def run(self, task: str, arm: str, seed: int, *, width: int | None, val: float, test: float,
            flops: float, wall: float, weights: float, method: str | None = None, role: str = "search",
            total_width: float | None = None, epochs: list[dict] | None = None, status: str = "done",
            metric: str = "accuracy", **extra) -> str:
        method = method or arm
        run_id = f"{task}-{arm}-{width}-{seed}-{self.position}"
        config = {"task": task, "arm": arm, "role": role, "seed": seed, "data": {"name": task},
                  "model": {"name": "mlp", "width": width}, "method": {"name": method},
                  "axes": {"model.width": width, "seed": seed} if role == "search" else {"seed": seed}}
        tw = total_width if total_width is not None else width
        summary = {"run_id": run_id, "study": self.study, "method": method, "model": "mlp",
                   "dataset": task, "seed": seed, "width": width, "widths": {"hidden.0": tw},
                   "total_width": tw, "nonzero_weights": weights, "counted_weights": weights,
                   "train_flops": flops, "wall_seconds": wall, f"val_{metric}": val,
                   f"test_{metric}": test, "task": task, "arm": arm, "role": role,
                   "group": f"{task}-{arm}-{width}", "label": f"{task}: {arm} w={width}",
                   "epochs": len(epochs) if epochs else 10, "best_epoch": 10, **extra}
        self.store.register(run_id, self.study, self.position, config)
        self.position += 1
        self.store.mark_running(run_id)
        for i, e in enumerate(epochs or []):
            self.store.add_epoch(run_id, i + 1, {"epoch": i + 1, **e})
        self.store.finish(run_id, status, summary if status != "failed" else {},
                          error="boom" if status == "failed" else None, wall_seconds=wall)
        return run_id


def load(out: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows and per-epoch records of every finished run, as the report reads them."""
    with ResultStore(out, create=False) as store:
        runs = store.runs()
        return runs, {r["run_id"]: store.epochs(r["run_id"]) for r in runs if r["status"] == "done"}
