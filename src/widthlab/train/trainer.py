"""The training loop. It knows no width method: methods are callbacks (see ``train/callbacks.py``).

One epoch: shuffled batches (order seeded by (seed, epoch)) -> forward -> data loss + callbacks' extra
losses -> backward -> ``on_after_backward`` -> clip -> optimizer step -> ``on_step_end``; then evaluation
on the validation and test splits, the epoch record, schedule, ``on_epoch_end``, best-model bookkeeping,
early stopping and an atomic checkpoint. A structural change returned by a hook is applied to the
optimizer by ``optim_surgery`` only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widthlab.data.base import TaskData
from widthlab.nn.optim_surgery import apply_events
from widthlab.nn.resize import ResizeEvent
from widthlab.train import checkpoint as ckpt
from widthlab.train import distributed
from widthlab.train.callbacks import HOOKS
from widthlab.train.config import TrainConfig
from widthlab.train.loader import batches, dataset_len, epoch_generator, num_batches
from widthlab.train.metrics import Accumulator, data_loss
from widthlab.train.optim import build_optimizer, build_schedule
from widthlab.train.reporting import MetricsLog, Progress, TensorBoard

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"


@dataclass
class FitResult:
    """What a finished (or stopped) fit leaves behind.

    ``final`` holds the metrics of the selected epoch (best validation when ``select_best``; else the
    last), including ``test_accuracy``/``test_loss`` and ``train_accuracy``.
    """

    status: str
    error: str | None
    epochs: int
    best_epoch: int | None
    final: dict[str, Any]
    history: list[dict[str, Any]]
    wall_seconds: float
    steps: int = 0
    stop_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """Fits one model on one task.

    Args:
        model: any nn.Module mapping a batch of inputs to outputs (logits or regression values).
        data: the task's splits (``TaskData``).
        config: the training configuration.
        callbacks: method objects and observers, called in order.
        run_dir: where ``checkpoint.pt``, ``final.pt``, ``metrics.jsonl`` and TensorBoard logs go
            (None: nothing is written).
        label: prefix for progress lines (e.g. the run id).
        identity: what a checkpoint of this fit belongs to (e.g. ``{"run_id": ...}``); recorded in every
            checkpoint with the model's architecture, and a resume refuses a checkpoint of another one.
            A damaged checkpoint raises :class:`~widthlab.train.checkpoint.DamagedCheckpoint`; call
            :func:`~widthlab.train.checkpoint.prepare_resume` first to fall back to the previous one.
    """

    def __init__(self, model: nn.Module, data: TaskData, config: TrainConfig,
                 callbacks: Sequence[Any] = (), run_dir: str | Path | None = None, label: str = "",
                 stream=None, identity: dict[str, Any] | None = None):
        self.cfg = config
        self.data = data
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = distributed.current()
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.dist.active and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.amp != "none" and self.device.type != "cuda":
            raise ValueError(f"train.amp={config.amp!r} needs a CUDA device "
                             f"(train.device is {config.device!r})")
        self.model = model.to(self.device)
        self.identity = {**(identity or {}), "architecture": ckpt.architecture(self.model)}
        self.wall_before = 0.0  # seconds spent in earlier sessions of a resumed fit
        self.cpu_before = 0.0  # process CPU seconds of earlier sessions
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        self.classification = data.task == "classification"
        self.loss_kind = config.loss if config.loss != "auto" else (
            "cross_entropy" if self.classification else "mse")
        monitor = config.monitor
        if monitor == "auto":
            monitor = "val_accuracy" if self.classification else "val_loss"
        self.monitor = monitor
        self.monitor_mode = "max" if monitor.endswith("accuracy") else "min"
        self.has_val = dataset_len(data.val) > 0
        self.steps_per_epoch = num_batches(data.train, config.batch_size)
        # Only rank 0 talks and writes; other ranks train silently in step with it.
        main = self.dist.is_main
        self.progress = Progress(config.progress if main else "none", config.epochs, stream=stream,
                                 label=label)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir and main else None)
        # Live state that callbacks may read.
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.resumed = False
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_outputs: torch.Tensor | None = None
        self.last_loss: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._per_step_schedule = False
        self._scaler = None
        self._best: dict[str, Any] | None = None
        self._bad_epochs = 0
        self._net: nn.Module = self.model  # what forward passes go through: the model or its DDP view

    # ------------------------------------------------------------------ set-up

    def default_optimizer(self, params) -> torch.optim.Optimizer:
        return build_optimizer(params, self.cfg.optimizer)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        makers = [cb for cb in self.callbacks if hasattr(cb, "make_optimizer")]
        if len(makers) > 1:
            raise ValueError("more than one callback defines make_optimizer")
        if makers:
            return makers[0].make_optimizer(self.model, self.default_optimizer)
        return self.default_optimizer(self.model.parameters())

    def _build_schedule(self) -> None:
        self.scheduler, self._per_step_schedule = build_schedule(
            self.optimizer, self.cfg.schedule, epochs=self.cfg.epochs,
            steps_per_epoch=self.steps_per_epoch, monitor_mode=self.monitor_mode)

    # ------------------------------------------------------------------ callbacks

    def dispatch(self, hook: str) -> None:
        """Call ``hook`` on every callback that has it and apply any resize events they return."""
        assert hook in HOOKS
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is None:
                continue
            out = fn(self)
            self.apply_resize(out)

    def apply_resize(self, events: ResizeEvent | Sequence[ResizeEvent] | None) -> None:
        """Hand structural changes to the optimizer surgery (the only editor of optimizer state)."""
        if apply_events(self.optimizer, events):
            self._rewrap()

    def _rewrap(self) -> None:
        """(Re)build the data-parallel view; DDP fixes its gradient buckets to the current parameters."""
        self._net = self.dist.wrap(self.model, self.device) if self.dist.active else self.model

    def _callback_states(self) -> list[Any]:
        return [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks]

    def _load_callback_states(self, states: list[Any]) -> None:
        if len(states) != len(self.callbacks):
            raise ckpt.CheckpointError(f"checkpoint has {len(states)} callback states, "
                                       f"the run has {len(self.callbacks)} callbacks")
        for cb, st in zip(self.callbacks, states):
            if st is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(st, self.model)

    def _callback_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cb in self.callbacks:
            if hasattr(cb, "metrics"):
                out.update(cb.metrics(self))
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        ds = getattr(self.data, split)
        if dataset_len(ds) == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        acc = Accumulator(self.classification, self.device)
        for x, y in batches(ds, self.cfg.eval_batch_size, shuffle=False, collate=self.data.collate):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x)
            acc.add(data_loss(self.loss_kind, out.float(), y), out, y)
        self.model.train(was_training)
        return acc.result(split)

    def _autocast(self):
        if self.cfg.amp == "none":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.cfg.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ one step

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self._autocast():
            out = self._net(x)
        loss = data_loss(self.loss_kind, out.float(), y)
        total = loss
        for cb in self.callbacks:
            fn = getattr(cb, "extra_loss", None)
            if fn is not None:
                extra = fn(self.model, out, y)
                if extra is not None:
                    total = total + extra
        return out, loss, total

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, acc: Accumulator) -> None:
        opt = self.optimizer
        assert opt is not None
        scale = 1.0
        if self.dist.active:  # this rank's slice of the global batch; see train/distributed.py
            n_global = y.shape[0]
            sl = self.dist.shard(n_global)
            x, y = x[sl], y[sl]
            scale = self.dist.loss_scale(y.shape[0], n_global)
        self.last_batch = (x, y)
        out, loss, total = self._loss(x, y)
        opt.zero_grad(set_to_none=True)
        backward_loss = total * scale if scale != 1.0 else total
        if self._scaler is not None:
            self._scaler.scale(backward_loss).backward()
        else:
            backward_loss.backward()
        self.dispatch("on_after_backward")
        if self.cfg.grad_clip is not None:
            if self._scaler is not None:
                self._scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if any(getattr(cb, "uses_closure", False) for cb in self.callbacks):
            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                _, _, t = self._loss(x, y)
                (t * scale if scale != 1.0 else t).backward()
                return t

            opt.step(closure)
        elif self._scaler is not None:
            self._scaler.step(opt)
            self._scaler.update()
        else:
            opt.step()
        if self.scheduler is not None and self._per_step_schedule:
            self.scheduler.step()
        self.step += 1
        self.last_outputs, self.last_loss = out, loss
        acc.add(loss, out, y, objective=total)
        self.dispatch("on_step_end")

    # ------------------------------------------------------------------ checkpoints

    def _snapshot(self) -> dict[str, Any]:
        # Run totals (e.g. the compute meter) describe the whole run, not the selected epoch: left out
        # (None), so that restoring the snapshot leaves them as they are.
        states = [None if getattr(cb, "run_totals", False) else st
                  for cb, st in zip(self.callbacks, self._callback_states())]
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "callbacks": copy.deepcopy(states)}

    def _restore_snapshot(self, snap: dict[str, Any]) -> None:
        self._load_callback_states(snap["callbacks"])
        ckpt.load_model_state(self.model, snap["model"])
        self.model.to(self.device)

    def _checkpoint_payload(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {
            "format": 1,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "callbacks": self._callback_states(),
            "optimizer": ckpt.optimizer_state_by_name(self.optimizer, self.model),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "rng": ckpt.rng_state(self.device),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self._best,
            "bad_epochs": self._bad_epochs,
            "identity": self.identity,
            "wall_seconds": self.wall_before + time.perf_counter() - self._t0,
            "cpu_seconds": self.cpu_before + time.process_time() - self._c0,
        }

    def save_checkpoint(self) -> None:
        if self.run_dir is not None and self.dist.is_main:
            ckpt.atomic_save(self._checkpoint_payload(), self.run_dir / CHECKPOINT, keep_previous=True)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_file(path, expect={**self.identity, "epochs": self.cfg.epochs})
        ckpt.check_payload(state, path)
        try:
            self._restore_checkpoint(state)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: {e}") if str(path) not in str(e) else e from None
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            what = f"missing entry {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ckpt.CheckpointError(f"checkpoint {path}: does not fit this run ({ckpt._short(what)})"
                                       ) from None

    def _restore_checkpoint(self, state: dict[str, Any]) -> None:
        self._load_callback_states(state["callbacks"])
        ckpt.load_model_state(self.model, state["model"])
        self.model.to(self.device)
        # Optimizer, then schedule, then their states: building a schedule rewrites group lrs, which the
        # saved optimizer groups then overwrite with the exact values at the checkpoint.
        self.optimizer = self._build_optimizer()
        self._build_schedule()
        ckpt.load_optimizer_state_by_name(self.optimizer, self.model, state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"], self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self._best = state["best"]
        self._bad_epochs = int(state["bad_epochs"])
        wall = state.get("wall_seconds")
        self.wall_before = float(wall) if isinstance(wall, (int, float)) and wall >= 0 else 0.0
        cpu = state.get("cpu_seconds")
        self.cpu_before = float(cpu) if isinstance(cpu, (int, float)) and cpu >= 0 else 0.0
        self.resumed = True
        self.metrics_log.rewrite(self.history)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> FitResult:
        t0 = self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        if self.cfg.amp == "fp16":
            self._scaler = torch.amp.GradScaler(self.device.type)
        self.optimizer = self._build_optimizer()
        self._build_schedule()
        tb = TensorBoard(self.run_dir / "tensorboard" if self.run_dir else None, self.cfg.tensorboard)
        self.dispatch("on_fit_start")
        ck = self.run_dir / CHECKPOINT if self.run_dir else None
        if resume and ck is not None and ck.is_file():
            self._resume(ck)
            self.progress.message(f"resumed from {ck} at epoch {self.epoch}")
        elif self.run_dir is not None:
            self.metrics_log.rewrite([])
        self._rewrap()
        status, error, stop_reason = "done", None, "epochs"
        try:
            while self.epoch < self.cfg.epochs:
                stop_reason = self._run_epoch(tb) or ""
                if stop_reason:
                    break
            else:
                stop_reason = "epochs"
        except NonFiniteLoss as e:
            status, error, stop_reason = "failed", str(e), "non-finite loss"
        finally:
            tb.close()
        return self._finish(status, error, stop_reason, self.wall_before + time.perf_counter() - t0)

    def _run_epoch(self, tb: TensorBoard) -> str | None:
        """Train one epoch and do the epoch-end bookkeeping; returns a stop reason or None."""
        t_epoch = time.perf_counter()
        self.model.train()
        gen = epoch_generator(self.cfg.seed, self.epoch)
        aug_gen = epoch_generator(self.cfg.seed, self.epoch, salt=1)
        acc = Accumulator(self.classification, self.device)
        self.progress.epoch_start(self.epoch, self.steps_per_epoch)
        hit_max_steps = False
        train_batches = batches(self.data.train, self.cfg.batch_size, shuffle=True, generator=gen,
                                collate=self.data.collate)
        for i, (x, y) in enumerate(train_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.data.augment is not None:
                x = self.data.augment(x, aug_gen)
            self._train_step(x, y, acc)
            if self.progress.mode == "bar" and (i % 10 == 0):
                self.progress.step(10 if i else 1, loss=float(self.last_loss))  # host sync: display only
            if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
                hit_max_steps = True
                break
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        if self.dist.active:  # global training metrics: sum every rank's counts
            acc.all_reduce(self.dist.all_reduce_)
        record.update(acc.result("train"))
        if not math.isfinite(record.get("train_loss", 0.0)) or bool(acc.nonfinite):
            raise NonFiniteLoss(f"non-finite training loss (data loss {record.get('train_loss')}) "
                                f"in epoch {self.epoch + 1}")
        record.update(self.evaluate("val"))
        if self.cfg.eval_test_every_epoch:
            record.update(self.evaluate("test"))
        record.update(self._callback_metrics())
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        self.epoch += 1
        self.history.append(record)
        improved = self._track_best(record)
        if self.scheduler is not None and not self._per_step_schedule:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(self._monitor_value(record))
            else:
                self.scheduler.step()
        self.dispatch("on_epoch_end")
        self.metrics_log.append(record)
        tb.log(record)
        self.progress.epoch_end(record)
        if self.cfg.checkpoint_every and self.epoch % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if hit_max_steps:
            return "max_steps"
        patience = self.cfg.early_stopping
        if patience is not None and not improved and self._bad_epochs >= patience:
            return "early_stopping"
        return None

    def _monitor_value(self, record: dict[str, Any]) -> float:
        key = self.monitor if self.has_val or not self.monitor.startswith("val_") else \
            self.monitor.replace("val_", "train_", 1)
        if key not in record:
            raise ValueError(f"train.monitor={self.monitor!r} is not a recorded metric; "
                             f"recorded: {sorted(record)}")
        return float(record[key])

    def _track_best(self, record: dict[str, Any]) -> bool:
        value = self._monitor_value(record)
        best = self._best
        if best is None:
            better = True
        else:
            better = value > best["value"] if self.monitor_mode == "max" else value < best["value"]
        if better:
            self._bad_epochs = 0
            snap = self._snapshot() if self.cfg.select_best else None
            self._best = {"epoch": record["epoch"], "value": value, "snapshot": snap}
        else:
            self._bad_epochs += 1
        return better

    def _finish(self, status: str, error: str | None, stop_reason: str, wall: float) -> FitResult:
        best_epoch = self._best["epoch"] if self._best else None
        final: dict[str, Any] = dict(self.history[-1]) if self.history else {}
        if status == "done" and self.cfg.select_best and self._best and self._best["snapshot"] is not None:
            if best_epoch != self.epoch:
                self._restore_snapshot(self._best["snapshot"])
            final = dict(self.history[best_epoch - 1])
        if status == "done" and not self.cfg.eval_test_every_epoch:
            final.update(self.evaluate("test"))
        if status == "done":
            self.dispatch("on_fit_end")
            if self.run_dir is not None and self.dist.is_main:
                ckpt.atomic_save({"format": 1, "model": {k: v.detach().cpu() for k, v in
                                                         self.model.state_dict().items()},
                                  "callbacks": self._callback_states(), "epoch": self.epoch,
                                  "identity": self.identity},
                                 self.run_dir / FINAL)
        return FitResult(status=status, error=error, epochs=self.epoch, best_epoch=best_epoch, final=final,
                         history=self.history, wall_seconds=wall, steps=self.step, stop_reason=stop_reason)


def fit(model: nn.Module, data: TaskData, config: TrainConfig, callbacks: Sequence[Any] = (),
        run_dir: str | Path | None = None, resume: bool = False, **kw) -> FitResult:
    """Convenience wrapper: ``Trainer(...).fit(resume)``."""
    return Trainer(model, data, config, callbacks, run_dir, **kw).fit(resume=resume)
