"""FLOPs the self-expanding method computes besides the trainer's forward and backward passes.

The training meter (``train/compute.py``) charges every run 3 forward passes per example at the widths
in use. The self-expanding method also solves for natural gradients (CG Gauss-Newton products, K-FAC
statistics, inverses and preconditioning) and, at each expansion event, observes the network and
scores thousands of candidate units (Mitchell et al. 2023, §3: "the natural expansion score"; §4:
proposals refined by sampling). Leaving that out flatters the method in a comparison, so the run
records it as ``method_flops``, which the comparison adds to ``train_flops``.

Counting convention, the same as the training meter's: floating-point operations of matrix products
(2·m·n·k per (m×n)·(n×k) product, convolutions as their products) and of matrix decompositions
(textbook counts: Cholesky n³/3, LU 2n³/3, inverse from a factor n³, inverse by LU 2n³, symmetric
eigendecomposition with vectors 9n³ (Golub & Van Loan, §8.3), pseudo-inverse of a symmetric matrix 11n³,
triangular solves n²·k, two of them for a solve from a Cholesky factor); matrix-vector products
(``mv``, ``addmv``: not in ``FlopCounterMode``'s table, added here) 2·m·n; elementwise operations,
rank-one updates (``addr``) among them, are not counted.

How: ``torch.utils.flop_counter.FlopCounterMode`` counts the products of a computation exactly, but it
slows every operation down, so :class:`FlopCache` measures a computation only the first time it sees
its *key* (the shapes it depends on) and adds the cached count on every later call. A proposal search
evaluates the same score function on the same shapes thousands of times, so it is measured once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCache", "MeteredScore", "counted", "shapes_key"]

aten = torch.ops.aten


def _n(shape) -> int:
    return shape[-1] if shape else 1


def _batch(shape) -> int:
    return math.prod(shape[:-2]) if len(shape) > 2 else 1


def _mv(a, b, *args, out_shape=None, **kw) -> int:
    return 2 * a[0] * a[1]


def _addmv(c, a, b, *args, out_shape=None, **kw) -> int:
    return _mv(a, b)


def _dot(a, b, *args, out_shape=None, **kw) -> int:
    return 2 * a[0]


def _cholesky(a, *args, out_shape=None, **kw) -> int:
    return _batch(a) * _n(a) ** 3 // 3


def _cholesky_inverse(a, *args, out_shape=None, **kw) -> int:
    return _batch(a) * _n(a) ** 3


def _inverse(a, *args, out_shape=None, **kw) -> int:
    return _batch(a) * 2 * _n(a) ** 3


def _cholesky_solve(b, L, *args, out_shape=None, **kw) -> int:
    return _batch(L) * 2 * _n(L) ** 2 * (b[-1] if len(b) > 1 else 1)


def _eigh(a, *args, out_shape=None, **kw) -> int:
    return _batch(a) * 9 * _n(a) ** 3


def _lu_factor(a, *args, out_shape=None, **kw) -> int:
    return _batch(a) * 2 * _n(a) ** 3 // 3


def _solve(a, b, *args, out_shape=None, **kw) -> int:
    k = 1 if len(b) < len(a) else b[-1]
    return _batch(a) * (2 * _n(a) ** 3 // 3 + 2 * _n(a) ** 2 * k)


def _lu_solve(lu, piv, b, *args, out_shape=None, **kw) -> int:
    return _batch(lu) * 2 * _n(lu) ** 2 * (b[-1] if len(b) > 1 else 1)


def _pinv(a, *args, out_shape=None, hermitian: bool = False, **kw) -> int:
    """Hermitian: an eigendecomposition and the product back (11n³); otherwise an SVD (about 22n³)."""
    herm = hermitian or any(x is True for x in args)
    return _batch(a) * (11 if herm else 22) * _n(a) ** 3


def _triangular(a, b, *args, out_shape=None, **kw) -> int:
    return _batch(a) * _n(a) ** 2 * (b[-1] if len(b) > 1 else 1)


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten.mv: _mv, aten.addmv: _addmv, aten.dot: _dot, aten.vdot: _dot,
    aten.linalg_cholesky_ex: _cholesky, aten.cholesky_inverse: _cholesky_inverse,
    aten.cholesky_solve: _cholesky_solve, aten.linalg_inv_ex: _inverse,
    aten._linalg_eigh: _eigh, aten.linalg_lu_factor_ex: _lu_factor, aten._linalg_solve_ex: _solve,
    aten.linalg_lu_solve: _lu_solve, aten.linalg_solve_triangular: _triangular,
    aten.linalg_pinv: _pinv,
}


_SHAPE_OPS = {aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
              aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default,
              aten.size.default, aten.sym_size.default, aten.stride.default, aten.sym_stride.default,
              aten.storage_offset.default, aten.sym_storage_offset.default, aten.numel.default,
              aten.sym_numel.default, aten.dim.default, torch.ops.prim.layout.default}


class _Counter(TorchDispatchMode):
    """The total of ``FlopCounterMode`` (same formulas, same decompositions) without its per-module
    attribution, whose module hooks and bookkeeping cost tens of microseconds per operation: the meter
    only needs the total, and expansion events measure thousands of small operations."""

    def __init__(self, registry: dict[Any, Callable[..., int]]):
        super().__init__()
        self.registry, self.total = registry, 0
        self._composite: dict[Any, bool] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHAPE_OPS:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):  # not used by the method; count it exactly
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as mode:
                out = func(*args, **kwargs)
            self.total += int(mode.get_total_flops())
            return out
        comp = self._composite.get(func)
        if comp is None:
            comp = self._composite[func] = func is not torch.ops.prim.device.default and \
                torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
        if comp:  # as FlopCounterMode: count what a composite operation decomposes into
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


_REGISTRY: dict[Any, Callable[..., int]] | None = None


def _registry() -> dict[Any, Callable[..., int]]:
    global _REGISTRY
    if _REGISTRY is None:  # FlopCounterMode's own table with our formulas, wrapped as it wraps them
        _REGISTRY = dict(FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS).flop_registry)
    return _REGISTRY


def counted(fn: Callable[..., Any], *args, **kw) -> tuple[Any, int]:
    """Run ``fn(*args, **kw)`` and return its result and the FLOPs of its products and decompositions
    (the total ``FlopCounterMode`` with :data:`EXTRA_FORMULAS` reports, see :class:`_Counter`)."""
    mode = _Counter(_registry())
    with mode:
        out = fn(*args, **kw)
    return out, int(mode.total)


def linear_observe_flops(layers: list[torch.nn.Linear], n: int, backprops: int, cotangents: int,
                         bias: bool = True) -> int:
    """FLOPs of ``kfac.observe`` on a chain of Linear layers (elementwise activations between them):
    the forward pass (2·N·d·m per layer), one backward pass per back-propagated output vector down to
    the first layer's output (2·N·d·m per later layer: input gradients only), A = aᵀa (2·N·(d+1)²) and
    one eᵀe per G cotangent (2·N·m²). Used for MLPs, where measuring it for every architecture would
    cost more than the observation itself (a test checks it against a direct count)."""
    fwd = sum(2 * n * m.in_features * m.out_features for m in layers)
    back = sum(2 * n * m.in_features * m.out_features for m in layers[1:])
    a = sum(2 * n * (m.in_features + (1 if bias and m.bias is not None else 0)) ** 2 for m in layers)
    g = sum(2 * n * m.out_features ** 2 for m in layers)
    return fwd + backprops * back + a + cotangents * g


def _probe(probe: Callable[[], Any]) -> tuple[int, int]:
    n, fn = probe()
    return n, counted(fn)[1]


def shapes_key(*things: Any) -> tuple:
    """A hashable key of tensors' shapes and dtypes (other values as they are)."""
    out = []
    for t in things:
        if isinstance(t, torch.Tensor):
            out.append((tuple(t.shape), str(t.dtype)))
        elif isinstance(t, (list, tuple)):
            out.append(shapes_key(*t))
        elif isinstance(t, dict):
            out.append(tuple((k, shapes_key(v)) for k, v in t.items()))
        else:
            out.append(t)
    return tuple(out)


class FlopCache:
    """Adds up the FLOPs of repeated computations, measuring each key once (see the module docstring).

    ``total`` is the running sum; ``run(key, fn, ...)`` calls ``fn`` and charges it.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._seen: dict[Hashable, int] = {}

    def run(self, key: Hashable, fn: Callable[..., Any], *args, **kw) -> Any:
        hit = self._seen.get(key)
        if hit is None:
            out, hit = counted(fn, *args, **kw)
            self._seen[key] = hit
        else:
            out = fn(*args, **kw)
        self.total += hit
        return out

    def run_per_sample(self, key: Hashable, n: int, probe: Callable[[], Any], fn: Callable[..., Any], *args,
                       **kw) -> Any:
        """Call ``fn(*args, **kw)`` on a batch of ``n`` samples and charge n × the FLOPs per sample that
        ``probe()`` (the same computation on a small slice) measured, per ``key`` once. For computations
        whose every product has one sample dimension (forward and backward passes, per-sample
        Jacobians, sums over samples), so that the count is exactly proportional to the batch: the
        measurement then costs a few tiny operations instead of a slow pass over the whole batch."""
        per = self._seen.get(key)
        if per is None:
            probe_n, flops = _probe(probe)
            per = flops / probe_n
            self._seen[key] = per
        self.total += per * n
        return fn(*args, **kw)

    def add(self, flops: float) -> None:
        self.total += float(flops)

    def wrap(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` charged on every call under ``key`` extended by its tensor arguments' shapes."""
        return lambda *a, **kw: self.run((key, shapes_key(*a)), fn, *a, **kw)


class MeteredScore:
    """A proposal score function whose every evaluation (value, or value and gradient) is charged to a
    :class:`FlopCache`, keyed by ``tag`` (what the FLOPs depend on besides θ: the site's shapes) and the
    shape of θ. Gradients of plain callables are taken here by autograd, so their backward passes are
    charged too. A score function with a ``flops(rows, grad)`` method (``unit_score.ChannelScore``) is
    charged that closed form instead of being measured on every new shape."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], cache: FlopCache, tag: Hashable):
        self.fn, self.cache, self.tag = fn, cache, tag
        if hasattr(fn, "official_value_and_grad"):
            self.official_value_and_grad = lambda theta: self.cache.run(
                (self.tag, "official", shapes_key(theta)), fn.official_value_and_grad, theta)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if hasattr(self.fn, "flops"):  # a closed form (tested against the counting mode)
            self.cache.add(self.fn.flops(theta.shape[0]))
            return self.fn(theta)
        return self.cache.run((self.tag, "value", shapes_key(theta)), self.fn, theta)

    def moments(self, theta: torch.Tensor):
        """``fn.moments(θ)``: the value with the statistics it was computed from (the same operations)."""
        if hasattr(self.fn, "flops"):
            self.cache.add(self.fn.flops(theta.shape[0]))
            return self.fn.moments(theta)
        return self.cache.run((self.tag, "value", shapes_key(theta)), self.fn.moments, theta)

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.fn, "flops") and hasattr(self.fn, "value_and_grad"):
            self.cache.add(self.fn.flops(theta.shape[0], grad=True))
            return self.fn.value_and_grad(theta)
        inner = getattr(self.fn, "value_and_grad", None)
        if inner is not None:
            return self.cache.run((self.tag, "grad", shapes_key(theta)), inner, theta)
        return self.cache.run((self.tag, "grad", shapes_key(theta)), self._autograd, theta)

    def _autograd(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            s = self.fn(t)
            (g,) = torch.autograd.grad(s.sum(), t)
        return s.detach(), g
