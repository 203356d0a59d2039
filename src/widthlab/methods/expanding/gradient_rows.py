"""The input rows and output-gradient rows behind a Linear layer's ``.grad``.

For a Linear layer s = a Wᵀ + b applied to rows a (the samples; the tokens of an (..., d) input are
rows too), the gradient of any loss L is ∇_W L = gᵀa and ∇_b L = gᵀ1, with g = ∂L/∂s the rows of the
output gradient. :class:`GradientRows` keeps (a, g) of the backward passes that produced the current
``.grad``, so that the K-FAC optimizer can precondition the factors gᵀ and a instead of their product
(``kfac_optimizer.py``).

How rows are attributed to ``.grad``. A forward hook on the layer keeps its input (a detached view of
a tensor the graph keeps anyway) and hooks its output; when a backward pass computes the output's
gradient the pair arrives, tagged with that pass's autograd graph task; when the same task then
accumulates into the weight's ``.grad`` (a post-accumulate-grad hook) its pairs are committed. Passes
that never reach ``.grad`` (``torch.autograd.grad``: K-FAC statistics, expansion scores) therefore
commit nothing, and a ``.grad`` contribution that came without rows (the weight used outside the
module's forward, a forward while recording was paused or inside a ``torch.func`` transform) marks the
layer incomplete. Nothing is recorded with grad disabled. Several passes before one step (gradient
accumulation, a layer used twice) concatenate their rows.

Memory is bounded per layer: once its rows would exceed the layer's limit (the optimizer's: the row
count beyond which the factored form is no cheaper) they are dropped and the layer reported as
overflowed until :meth:`GradientRows.clear`. Rows are transient (never part of a checkpoint); ``.grad``
edited after the backward (clipping, averaging, weight decay folded in) is not detected here: the
consumer checks rows against ``.grad`` before use.

Hooks reach the recorder through a weak reference and it holds the modules weakly, so neither keeps
the other alive; copies (``copy.deepcopy``) and pickles of a hooked module carry inert hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["GradientRows"]


def _inert(*args) -> None:
    return None


def _make_inert():
    return _inert


class _Hook:
    """Calls ``recorder.<method>(key, *args)`` while the recorder lives; copies and pickles are inert."""

    __slots__ = ("recorder", "method", "key")

    def __init__(self, recorder: GradientRows, method: str, key: int):
        self.recorder, self.method, self.key = weakref.ref(recorder), method, key

    def __call__(self, *args):
        rec = self.recorder()
        if rec is not None:
            getattr(rec, self.method)(self.key, *args)

    def __deepcopy__(self, memo):
        return _inert

    def __reduce__(self):
        return (_make_inert, ())


def _in_functorch() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


@dataclass
class _Layer:
    module: weakref.ref
    weight: weakref.ref
    limit: int
    handles: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # committed (a, g) pairs
    count: int = 0  # committed rows
    status: str = "ok"  # "ok", "overflow" (dropped at the limit) or "incomplete" (.grad without rows)
    task: int | None = None  # the graph task of the pending pairs
    pending: list = field(default_factory=list)
    pending_count: int = 0
    pending_over: bool = False

    def reset(self) -> None:
        self.rows, self.count, self.status = [], 0, "ok"
        self.task, self.pending, self.pending_count, self.pending_over = None, [], 0, False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class GradientRows:
    """Records, for chosen Linear layers, the (input, output-gradient) rows behind their ``.grad``."""

    def __init__(self) -> None:
        self._layers: dict[int, _Layer] = {}
        self._paused = 0

    # ------------------------------------------------------------------ which layers

    def sync(self, limits: dict[nn.Module, int]) -> None:
        """Record exactly these Linear layers, each up to its row limit: hooks are added for new layers
        (or a replaced weight), and removed for layers no longer listed (gone, or not eligible)."""
        keep: dict[int, _Layer] = {}
        for m, limit in limits.items():
            key = id(m)
            e = self._layers.get(key)
            if e is not None and e.module() is not m:  # a dead module's id, reused
                e.remove()
                e = None
            if e is not None and e.weight() is not m.weight:  # the weight was replaced (resized)
                e.handles[1].remove()
                e.handles[1] = m.weight.register_post_accumulate_grad_hook(_Hook(self, "_on_accumulate", key))
                e.weight = weakref.ref(m.weight)
                e.reset()
            if e is None:
                e = _Layer(weakref.ref(m), weakref.ref(m.weight), limit)
                e.handles = [m.register_forward_hook(_Hook(self, "_on_forward", key)),
                             m.weight.register_post_accumulate_grad_hook(_Hook(self, "_on_accumulate", key))]
            if e.count > limit:
                e.rows, e.count, e.status = [], 0, "overflow"
            e.limit = limit
            keep[key] = e
        for key, e in self._layers.items():
            if key not in keep:
                e.remove()
        self._layers = keep

    def close(self) -> None:
        """Remove every hook."""
        self.sync({})

    def __del__(self) -> None:  # an optimizer that is dropped takes its hooks along
        with suppress(Exception):  # interpreter shutdown
            self.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing from the forward passes inside the block (e.g. the optimizer's own passes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ------------------------------------------------------------------ reading

    def rows(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a, g): the (R, d) input rows and (R, m) output-gradient rows committed since the last
        :meth:`clear`, or None (none, overflowed, incomplete, or the layer's shape changed)."""
        e = self._layers.get(id(module))
        if e is None or e.module() is not module or e.status != "ok" or not e.rows:
            return None
        a = e.rows[0][0] if len(e.rows) == 1 else torch.cat([r[0] for r in e.rows])
        g = e.rows[0][1] if len(e.rows) == 1 else torch.cat([r[1] for r in e.rows])
        if a.shape[1] != module.in_features or g.shape[1] != module.out_features:
            return None
        return a, g

    def status(self, module: nn.Module) -> tuple[str, int, int]:
        """(status, committed rows, pending rows) of one layer; ``("untracked", 0, 0)`` if not recorded."""
        e = self._layers.get(id(module))
        if e is None or e.module() is not module:
            return ("untracked", 0, 0)
        return (e.status, e.count, e.pending_count)

    def clear(self) -> None:
        """Forget all rows (the gradients were consumed or zeroed)."""
        for e in self._layers.values():
            e.reset()

    # ------------------------------------------------------------------ hooks

    def _on_forward(self, key: int, module: nn.Module, inputs, output) -> None:
        e = self._layers.get(key)
        if (e is None or e.module() is not module or self._paused or not torch.is_grad_enabled()
                or not isinstance(output, torch.Tensor) or not output.requires_grad or _in_functorch()):
            return
        a = inputs[0].detach()
        if a.dim() == 0 or e.count + a.numel() // a.shape[-1] > e.limit:
            return  # too many rows: if this pass reaches .grad, the layer is marked incomplete
        ref = weakref.ref(self)

        def on_grad(g: torch.Tensor) -> None:
            rec = ref()
            if rec is not None:
                rec._on_grad(key, a, g)

        output.register_hook(on_grad)

    def _on_grad(self, key: int, a: torch.Tensor, g: torch.Tensor) -> None:
        e = self._layers.get(key)
        if e is None or e.status != "ok":
            return
        task = torch._C._current_graph_task_id()
        if e.task != task:  # the first output gradient of a new backward pass
            e.task, e.pending, e.pending_count, e.pending_over = task, [], 0, False
            w = e.weight()
            if e.rows and w is not None and w.grad is None:  # .grad was reset since they were committed
                e.rows, e.count = [], 0
        if e.pending_over:
            return
        a, g = a.reshape(-1, a.shape[-1]), g.detach().reshape(-1, g.shape[-1])
        if e.count + e.pending_count + a.shape[0] > e.limit:
            e.pending, e.pending_count, e.pending_over = [], 0, True
            return
        e.pending.append((a, g))
        e.pending_count += a.shape[0]

    def _on_accumulate(self, key: int, param: torch.Tensor) -> None:
        e = self._layers.get(key)
        if e is None or e.weight() is not param:
            return
        ours = e.task == torch._C._current_graph_task_id()
        if e.status == "ok":
            if ours and e.pending_over:
                e.status = "overflow"
            elif not ours:
                e.status = "incomplete"
            else:
                e.rows += e.pending
                e.count += e.pending_count
            if e.status != "ok":
                e.rows, e.count = [], 0
        e.task, e.pending, e.pending_count, e.pending_over = None, [], 0, False
