"""Build optimizers and learning-rate schedules from the training config."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from widthlab.train.config import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, coupled weight decay), Adam (coupled) or AdamW (decoupled)."""
    params = list(params)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
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
