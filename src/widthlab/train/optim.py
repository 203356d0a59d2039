"""Build optimizers and learning-rate schedules from the training config."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from widthlab.train.config import OptimConfig, ScheduleConfig

# dtypes torch's fused CPU kernels update (checked for each in tests/train/test_optim.py).
_FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def cpu_fused(params: list[nn.Parameter]) -> bool:
    """Whether to run the optimizer's fused kernel: every parameter a dense CPU tensor of a supported dtype.

    On the CPU torch's default is a Python loop over the tensors, about ten kernel calls per tensor per
    step; the fused kernel updates all of them in one call. On the small networks of the synthetic and
    tabular studies that is a third of a training step (bench/bench_adaptive.py measures both). The
    update is the same algorithm (trajectories agree to float rounding). CUDA keeps torch's own default
    (the multi-tensor ``foreach`` path).
    """
    return bool(params) and all(p.device.type == "cpu" and p.layout == torch.strided
                                and p.dtype in _FUSED_CPU_DTYPES for p in params)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, coupled weight decay), Adam (coupled) or AdamW (decoupled).

    On the CPU the fused implementation is used (:func:`cpu_fused`); ``fused=None`` leaves torch's choice.
    """
    params = list(params)
    fused = True if cpu_fused(params) else None
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}; known: sgd, adam, adamw")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, epochs: int,
                   steps_per_epoch: int, monitor_mode: str = "max"):
    """Return ``(scheduler, per_step)``; ``per_step`` says whether it is stepped after every batch.

    Schedulers keep a reference to the optimizer object, which width surgery edits in place, so they
    stay valid when parameters are replaced.
    """
    if cfg.name == "constant":
        return None, False
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma), False
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1),
                                                          eta_min=cfg.min_lr), False
    if cfg.name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr,
                                                    total_steps=max(epochs * steps_per_epoch, 1),
                                                    pct_start=cfg.pct_start)
        return sched, True
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.factor,
                                                          patience=cfg.patience,
                                                          min_lr=cfg.min_lr), False
    raise ValueError(f"unknown schedule {cfg.name!r}")
