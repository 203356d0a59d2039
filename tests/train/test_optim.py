"""The trainer's optimizers: torch's fused kernel on the CPU, the same updates as the per-tensor loop."""

from __future__ import annotations

import pytest
import torch

from widthlab.train.config import OptimConfig
from widthlab.train.optim import build_optimizer, cpu_fused

# The fused kernel against the per-tensor loop: rerun under a second CPU kernel selection.
pytestmark = pytest.mark.numerics

CONFIGS = [OptimConfig(name="adam", lr=1e-2),
           OptimConfig(name="adam", lr=1e-2, weight_decay=0.1, amsgrad=True),
           OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1),
           OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)]


def _loop_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The same optimizer with torch's per-tensor Python loop (the reference)."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, betas=cfg.betas, eps=cfg.eps, amsgrad=cfg.amsgrad, **kw)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-wd{c.weight_decay}")
def test_cpu_optimizer_is_fused_and_follows_the_loop_trajectory(cfg):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (), (3, 2, 2)]  # a 0-dim tensor, like lam's r
    a = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    fused, loop = build_optimizer(a, cfg), _loop_optimizer(b, cfg)
    assert fused.defaults["fused"] is True
    for step in range(30):
        for params, opt in ((a, fused), (b, loop)):
            opt.zero_grad(set_to_none=True)
            loss = sum(((p - 0.1 * step) ** 2).sum() + 0.05 * (p**4).sum() for p in params)
            loss.backward()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_cpu_step_runs_for_each_dtype(dtype):
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = build_optimizer([p], OptimConfig(name="adam", lr=0.5))
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.all(p < 1)  # Adam's first step moves by lr against the gradient's sign


def test_fused_only_for_dense_cpu_float_parameters():
    assert cpu_fused([torch.nn.Parameter(torch.ones(2))])
    assert not cpu_fused([])
    meta = torch.nn.Parameter(torch.ones(2, device="meta"))
    assert not cpu_fused([torch.nn.Parameter(torch.ones(2)), meta])
    assert not cpu_fused([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    opt = build_optimizer([torch.nn.Parameter(torch.ones(2, device="meta"))], OptimConfig(name="adam"))
    assert not opt.defaults.get("fused")
