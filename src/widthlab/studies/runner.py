"""Execute one run: build data, model and method from a :class:`RunSpec`, fit, record in the store.

This is the only place where study configs meet the library: below here everything takes typed
objects (``TaskData``, modules, ``TrainConfig``).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from widthlab.data.registry import load_dataset
from widthlab.models import create_model
from widthlab.models.counting import count_nonzero_weights, count_parameters, count_weights
from widthlab.search.pruning import TrialPruned
from widthlab.studies.load import RunSpec, dump_yaml
from widthlab.studies.methods import build_method, model_width_used
from widthlab.studies.store import BufferedRecords, ResultStore, dumps
from widthlab.train import checkpoint as ckpt
from widthlab.train import distributed
from widthlab.train.compute import ComputeMeter
from widthlab.train.loader import dataset_len
from widthlab.train.trainer import CHECKPOINT, FINAL, FitResult, Trainer, seed_everything

ProgressFn = Callable[[dict[str, Any]], None]


def model_widths(model: torch.nn.Module) -> dict[str, int]:
    fn = getattr(model, "widths", None)
    return dict(fn()) if callable(fn) else {}


class EpochRecorder:
    """Callback writing each epoch's record (plus current widths) to the store and to a progress sink."""

    def __init__(self, store, run_id: str, progress: ProgressFn | None, epochs: int):
        self.store, self.run_id, self.progress, self.epochs = store, run_id, progress, epochs
        self._synced = False

    def metrics(self, trainer) -> dict[str, Any]:
        widths = model_widths(trainer.model)
        out: dict[str, Any] = {"nonzero_weights": count_nonzero_weights(trainer.model)}
        if widths:
            out.update(widths=widths, total_width=sum(widths.values()))
        return out

    def on_epoch_end(self, trainer) -> None:
        if not self._synced:
            # A run restarted from a checkpoint drops the epochs recorded after that checkpoint and
            # (re)writes the ones restored with it, which a remote worker's driver may never have seen.
            self.store.truncate_epochs(self.run_id, trainer.epoch - 1)
            for old in trainer.history[:-1]:
                self.store.add_epoch(self.run_id, old["epoch"], old)
            self._synced = True
        record = trainer.history[-1]
        self.store.add_epoch(self.run_id, record["epoch"], record)
        if self.progress is not None:
            self.progress({"kind": "epoch", "run_id": self.run_id, "epoch": record["epoch"],
                           "epochs": self.epochs, "record": record})


_WARM = False


def _warm_up() -> None:
    """Pay one-time process costs before the first run's clock starts, so that wall seconds compare
    across runs (and across the methods of a comparison): the first optimizer a process builds imports
    torch's compiler stack (seconds)."""
    global _WARM
    if not _WARM:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        _WARM = True


def run_label(run: RunSpec) -> str:
    s = run.spec
    width = s.model.width if s.model.width is not None else s.model.widths
    wtxt = f" w={width}" if width is not None and model_width_used(s.method.name, s.model.name) else ""
    extra = "".join(" " + _axis_text(k, v) for k, v in run.axes.items()
                    if k not in ("model.width", "model.widths"))
    if run.tags:  # a comparison run: its task and compared method; a search also its member's width
        arm = run.tags.get("arm", s.method.name)
        if "trial" in run.tags:  # a search arm's trial: two trials may sample the same width
            arm = f"{arm} trial {run.tags['trial']}"
        if run.tags.get("role") == "single" and "retrain_of" not in run.tags:
            return f"{run.tags.get('task', '?')}: {arm}{extra}".rstrip()
        return f"{run.tags.get('task', '?')}: {arm} {s.model.name}{wtxt}{extra}".rstrip()
    return f"{s.method.name} {s.model.name}{wtxt}{extra}".rstrip()


def _axis_text(key: str, value: Any) -> str:
    """``train.optimizer.lr`` 0.01 -> ``lr=0.01``; a swept section ({name: widesparse, base_width: 4})
    -> ``base_width=4`` (its name is already in the label)."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if k != "name")
    return f"{key.split('.')[-1]}={value}"


def execute_run(run: RunSpec, out_dir: Path, *, resume: bool = False, progress: ProgressFn | None = None,
                num_threads: int | None = None, records=None,
                runs_root: Path | None = None) -> dict[str, Any]:
    """Run one configuration to completion (or failure) and record it; returns its summary entry.

    Args:
        out_dir: the study's output directory (its ``results.sqlite``).
        records: where the store writes go; None opens ``out_dir``'s database (local workers), a
            :class:`~widthlab.studies.store.BufferedRecords` collects them for a remote driver.
        runs_root: folder of the per-run directories (checkpoints, metrics.jsonl); default
            ``out_dir/runs``; on a cluster, shared storage every worker can reach.
    """
    out_dir = Path(out_dir)
    run_dir = Path(runs_root or out_dir / "runs") / run.run_id
    main = distributed.current().is_main
    if not main:  # under torchrun only rank 0 records; the other ranks train in step with it
        records, progress = BufferedRecords(), None
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / "config.yaml").write_text(dump_yaml(run.config()))
    store = records if records is not None else ResultStore(out_dir)
    store.register(run.run_id, run.study, run.position, run.config())
    store.mark_running(run.run_id)
    if main:
        write_run_record(run_dir, run, {"status": "running", "error": None})
    if progress:
        progress({"kind": "start", "run_id": run.run_id, "label": run_label(run), "seed": run.seed})
    _warm_up()
    t0, c0 = time.perf_counter(), time.process_time()
    summary: dict[str, Any] = base_summary(run)
    trainer = None
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        spec = run.spec
        seed_everything(run.seed)
        data = load_dataset(spec.data.name, **spec.data.options())
        model_kw = spec.model.options()
        if spec.model.width is not None:
            model_kw["width"] = spec.model.width
        if spec.model.widths is not None:
            model_kw["widths"] = spec.model.widths
        model = create_model(spec.model.name, input_shape=data.input_shape, num_outputs=data.num_outputs,
                             **model_kw)
        plan = build_method(spec.method.name, spec.method.options(), model, data, seed=run.seed)
        model = plan.model
        train_cfg = spec.train.to_config(seed=run.seed)
        if num_threads and train_cfg.num_threads is None:
            train_cfg = type(train_cfg)(**{**train_cfg.__dict__, "num_threads": num_threads})
        recorder = EpochRecorder(store, run.run_id, progress, train_cfg.epochs)
        meter = ComputeMeter()
        summary["val_examples"] = dataset_len(data.val)
        callbacks = [*plan.callbacks, meter, recorder]
        if run.search is not None:  # a search arm's trial: the pruner watches its validation curve
            from widthlab.search.pruning import PruneCallback

            callbacks.append(PruneCallback(run.search))
        trainer = Trainer(model, data, train_cfg, callbacks, run_dir=run_dir,
                          identity={"run_id": run.run_id})
        if resume:
            # A damaged newest checkpoint: fall back to the previous good one, or start over, and say so.
            # Rank 0 alone repairs the folder; under torchrun the other ranks wait for it.
            if main:
                expect = {**trainer.identity, "epochs": train_cfg.epochs}
                notes = ckpt.prepare_resume(run_dir / CHECKPOINT, expect)
                for note in notes:
                    if progress:
                        progress({"kind": "note", "run_id": run.run_id, "text": note})
                if notes:
                    summary["resume_note"] = "; ".join(notes)
            distributed.current().barrier()
        try:
            result = trainer.fit(resume=resume)
        except TrialPruned:
            result = pruned_result(trainer)
        summary.update(fit_summary(result, model, data.task))
        summary.update(meter.metrics(trainer))
        summary.update(plan.summary)
        if run.search is not None:
            summary.update(callbacks[-1].summary(trainer))
        summary["wall_seconds"] = time.perf_counter() - t0 + trainer.wall_before
        summary["cpu_seconds"] = time.process_time() - c0 + trainer.cpu_before
        if main and (run_dir / FINAL).is_file():
            summary["final_sha256"] = ckpt.file_sha256(run_dir / FINAL)
        store.finish(run.run_id, result.status, summary, error=result.error,
                     wall_seconds=summary["wall_seconds"])
        summary["status"], summary["error"] = result.status, result.error
    except Exception as e:  # any failure is recorded and the sweep goes on
        (run_dir / "error.log").write_text(traceback.format_exc())
        msg = str(e) if isinstance(e, ckpt.CheckpointError) else f"{type(e).__name__}: {e}"
        msg = msg if len(msg) <= 2000 else msg[:2000] + "..."
        summary.update(status="failed", error=msg, wall_seconds=time.perf_counter() - t0,
                       cpu_seconds=time.process_time() - c0 + (trainer.cpu_before if trainer else 0.0))
        store.finish(run.run_id, "failed", summary, error=msg, wall_seconds=summary["wall_seconds"])
    finally:
        if main:
            write_run_record(run_dir, run, summary)
        store.write_summary()
        store.close()
    if progress:
        progress({"kind": "end", "run_id": run.run_id, "status": summary["status"], "error": summary["error"],
                  "summary": summary})
    return summary


RUN_RECORD = "result.json"


def write_run_record(run_dir: Path, run: RunSpec, summary: dict[str, Any]) -> None:
    """``runs/<id>/result.json``: the run's study, position, status and summary, so that the run folders
    alone can rebuild a damaged ``results.sqlite`` (``widthlab report DIR --rebuild``)."""
    record = {"run_id": run.run_id, "study": run.study, "position": run.position,
              "status": summary.get("status", "running"), "error": summary.get("error"),
              "wall_seconds": summary.get("wall_seconds"), "summary": summary}
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_RECORD}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(record))
        os.replace(tmp, run_dir / RUN_RECORD)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def final_model_problem(run_dir: Path) -> str | None:
    """Why a finished run's final model ``runs/<id>/final.pt`` is not the file that was written (None if
    it is, or if no checksum was recorded for it)."""
    problem = ckpt.checksum_problem(run_dir / FINAL)
    if problem is None:
        return None
    what = "missing" if "missing" in problem else "damaged (its checksum differs from the recorded one)"
    return f"final model {run_dir / FINAL} is {what}"


def base_summary(run: RunSpec) -> dict[str, Any]:
    s = run.spec
    return {
        "run_id": run.run_id, "study": run.study, "method": s.method.name, "model": s.model.name,
        "dataset": s.data.name, "seed": run.seed, "status": "running", "error": None,
        "width": s.model.width if s.model.width is not None else (max(s.model.widths) if s.model.widths
                                                                  else None),
        "group": run.group, "label": run_label(run), "axes": run.axes,
        "base_width": None, "family": None, **run.tags,
    }


def pruned_result(trainer: Trainer) -> FitResult:
    """The fit of a trial the pruner stopped: its last epoch, charged up to there, status ``pruned``."""
    last = dict(trainer.history[-1]) if trainer.history else {}
    best = trainer._best["epoch"] if trainer._best else None
    return FitResult(status="pruned", error=None, epochs=trainer.epoch, best_epoch=best, final=last,
                     history=trainer.history, wall_seconds=0.0, steps=trainer.step, stop_reason="pruned")


def fit_summary(result, model: torch.nn.Module, task: str) -> dict[str, Any]:
    widths = model_widths(model)
    counted = count_weights(model)
    nonzero = count_nonzero_weights(model)
    f = result.final
    out: dict[str, Any] = {
        "widths": widths, "total_width": sum(widths.values()) if widths else None,
        "counted_weights": counted, "nonzero_weights": nonzero, "total_parameters": count_parameters(model),
        "connectivity": nonzero / counted if counted else None,
        "train_accuracy": f.get("train_accuracy"), "val_accuracy": f.get("val_accuracy"),
        "train_loss": f.get("train_loss"), "val_loss": f.get("val_loss"),
        "best_epoch": result.best_epoch, "epochs": result.epochs, "stop_reason": result.stop_reason,
    }
    if task == "classification":
        out["test_accuracy"] = f.get("test_accuracy")
    else:
        out["test_loss"] = f.get("test_loss")
    return out
