"""Frozen training configuration. The study schema (pydantic) converts into these; nothing below
``studies/`` sees a dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["constant", "multistep", "cosine", "onecycle", "plateau"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer choice and hyper-parameters.

    ``weight_decay`` is coupled (added to the gradient) for SGD and Adam and decoupled for AdamW, as in
    torch.optim.
    """

    name: OptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule.

    multistep: ``lr *= gamma`` at each epoch in ``milestones``. cosine: cosine decay over the run to
    ``min_lr``. onecycle: torch's one-cycle policy stepped per batch, peaking at the optimizer lr after
    ``pct_start`` of the steps. plateau: ``lr *= factor`` when the monitored metric has not improved for
    ``patience`` epochs.
    """

    name: ScheduleName = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr: float = 0.0
    pct_start: float = 0.3
    factor: float = 0.1
    patience: int = 10


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer needs besides the model, the data and the callbacks.

    Attributes:
        loss: ``auto`` picks cross-entropy for classification and mean squared error for regression;
            ``half_sse`` is 1/2 ||o - y||^2 summed over outputs and averaged over the batch (the adaptive-
            width paper's regression loss).
        monitor: metric used for best-checkpoint selection, early stopping and the plateau schedule;
            ``auto`` is validation accuracy (classification) or validation loss (regression).
        early_stopping: stop after this many epochs without improvement of ``monitor`` (None: never).
        select_best: evaluate the test split with the best-validation weights at the end.
        amp: mixed precision on CUDA (``fp16`` with a gradient scaler, or ``bf16``); an error on CPU.
        checkpoint_every: write a resumable checkpoint every this many epochs (0: never).
        progress: ``auto`` shows a bar on a terminal and plain log lines otherwise.
        tensorboard: write TensorBoard scalars; None means "if tensorboard is installed".
        num_threads: torch intra-op threads for this run (None: leave torch's default).
        max_steps: stop after this many optimizer steps in total (None: run all epochs); for tests.
    """

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: Literal["auto", "cross_entropy", "mse", "half_sse"] = "auto"
    grad_clip: float | None = None
    early_stopping: int | None = None
    monitor: str = "auto"
    select_best: bool = True
    eval_test_every_epoch: bool = True
    device: str = "cpu"
    amp: Literal["none", "fp16", "bf16"] = "none"
    seed: int = 0
    deterministic: bool = False
    num_threads: int | None = None
    checkpoint_every: int = 1
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    tensorboard: bool | None = None
    max_steps: int | None = None
