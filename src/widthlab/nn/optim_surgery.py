"""Optimizer-state surgery: the one place that edits optimizer state after a structural change.

Width surgery (``widthlab.nn.surgery`` and the methods) replaces ``nn.Parameter`` objects and reports
the change as a :class:`~widthlab.nn.resize.ResizeEvent`. :func:`remap_optimizer` swaps each new object
into the param group and slot of the old one and remaps its state in one of two modes:

``"reset"``
    The state of every replaced tensor is dropped, so its next ``step()`` starts fresh (Adam: m = v = 0,
    step 0). This is what the adaptive-width paper's code does; like that code it also resets tensors
    that were only re-wrapped (``dim=None`` entries whose object changed).
``"keep"``
    Per-element state tensors (those shaped like the parameter: Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, SGD ``momentum_buffer``, RMSprop/Adagrad buffers, ...) are sliced to the
    surviving units in their new order, and zeros (or per-key ``fill`` values) are appended for the new
    units. Scalar state such as Adam's ``step`` is kept. So a surviving unit continues exactly as if
    nothing had happened. New units share the old step count, so Adam's bias correction treats their zero
    moments as long-averaged: their first update is m / sqrt(v) = (1 - beta1) g / sqrt((1 - beta2) g^2),
    about 3x a fresh parameter's lr-sized step with the default betas (0.1 / sqrt(0.001)). State that
    must not start at zero needs ``fill`` (Rprop's ``step_size``, Adagrad with
    ``initial_accumulator_value``).

Optimizers whose state is not shaped like the parameter (e.g. factored second moments) work in
``"reset"`` mode only; ``"keep"`` refuses them rather than guess.

Parameters the optimizer does not hold (frozen ones, say) are left out after the change too. The
optimizer is edited only after the whole event has been checked, so an error leaves it untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from widthlab.nn.resize import ParamResize, ResizeEvent

Mode = Literal["keep", "reset"]
MODES = ("keep", "reset")

# State keys that torch's optimizers keep per element; used by the consistency check only.
_PER_ELEMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                     "grad_avg", "sum", "acc_delta", "exp_inf", "ax", "prev", "step_size")


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    event: ResizeEvent | Iterable[ResizeEvent],
    mode: Mode = "keep",
    *,
    added_group: int | str = 0,
    fill: Mapping[str, float] | None = None,
) -> None:
    """Make ``optimizer`` hold the parameters after ``event``, with its state remapped.

    Entries of ``event.params`` are processed in order, so merged events that touch a tensor twice
    chain correctly. Then ``event.removed`` parameters leave their group and the state, and
    ``event.added`` parameters join a group with empty state.

    Args:
        optimizer: any ``torch.optim.Optimizer``; edited in place.
        event: the change, or several applied one after the other.
        mode: ``"keep"`` (slice surviving state, zero-pad new units) or ``"reset"`` (drop the state of
            changed tensors, as the adaptive-width paper's code does).
        added_group: the group that receives ``event.added`` parameters: an index into
            ``optimizer.param_groups`` or the value of a group's ``"name"`` key. Defaults to the first.
        fill: ``"keep"`` mode only: the value new units start from, per state key (default 0). E.g.
            ``{"exp_avg_sq": 1.0}`` gives new units v = 1, as the self-expanding CNN code does.

    Raises:
        ValueError: unknown mode or group; a new parameter the optimizer already holds elsewhere; or,
            in ``"keep"`` mode, state the slicing cannot interpret. The optimizer is then unchanged.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    events = [event] if isinstance(event, ResizeEvent) else list(event)
    # Work on copies and commit at the end so that any error leaves the optimizer as it was.
    groups = [list(g["params"]) for g in optimizer.param_groups]
    state = dict(optimizer.state)
    target = _group_index(optimizer, added_group) if any(e.added for e in events) else 0

    for ev in events:
        for pr in ev.params:
            _swap(groups, state, pr, mode, fill or {})
        for p in ev.removed:
            loc = _locate(groups, p)
            if loc is not None:
                del groups[loc[0]][loc[1]]
            state.pop(p, None)
        for _name, p in ev.added:
            if _locate(groups, p) is None:
                groups[target].append(p)
            state.pop(p, None)

    for g, params in zip(optimizer.param_groups, groups):
        g["params"] = params
    # The state object itself is kept (a defaultdict that other code may hold a reference to).
    optimizer.state.clear()
    optimizer.state.update(state)


def apply_events(optimizer: torch.optim.Optimizer | None, events: ResizeEvent | Iterable[ResizeEvent] | None,
                 default_mode: Mode = "keep") -> bool:
    """Remap ``optimizer`` through each non-empty event in order, each in its own ``optimizer_mode``
    (else ``default_mode``) and with its own ``optimizer_fill`` for new units, if it carries one.

    The one loop every resizer (the Trainer, the plain-loop controllers) runs after a resize. Returns
    whether any event changed the model; with ``optimizer=None`` nothing is remapped.
    """
    if events is None:
        return False
    events = [events] if isinstance(events, ResizeEvent) else list(events)
    changed = False
    for ev in events:
        if ev and optimizer is not None:
            remap_optimizer(optimizer, ev, mode=ev.optimizer_mode or default_mode,
                            fill=getattr(ev, "optimizer_fill", None))
        changed = changed or bool(ev)
    return changed


def sync_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    added_group: int | str = 0,
) -> None:
    """Reconcile ``optimizer`` with ``model`` without an event: a last resort, not the normal path.

    Parameters the model no longer has are removed with their state; trainable parameters
    (``requires_grad``) the optimizer lacks join ``added_group`` with empty state. Without an event the
    state of a replaced tensor cannot be carried over, so this amounts to ``"reset"`` for every change.
    """
    current = {id(p): p for p in model.parameters()}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    target = _group_index(optimizer, added_group)
    stale = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in current]
    added = tuple(("", p) for p in current.values() if p.requires_grad and id(p) not in held)
    remap_optimizer(optimizer, ResizeEvent(added=added, removed=tuple(stale)), "reset", added_group=target)
    for p in list(optimizer.state):
        if id(p) not in current:
            del optimizer.state[p]


def assert_optimizer_matches(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    trainable_only: bool = False,
) -> None:
    """Check that the optimizer holds exactly the model's current parameters, by identity.

    Also checks that no parameter is held twice, that all state belongs to held parameters, and that the
    usual per-element state tensors have their parameter's shape.

    Args:
        optimizer: the optimizer to check.
        model: the model whose ``parameters()`` the optimizer must hold.
        trainable_only: compare with the parameters that require grad only (for optimizers built over
            the trainable subset).

    Raises:
        AssertionError: with a message listing the missing, stale or inconsistent parameters.
    """
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    held: dict[int, torch.Tensor] = {}
    problems = []
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) in held:
                problems.append(f"{names.get(id(p), tuple(p.shape))} held twice (group {gi})")
            held[id(p)] = p
    missing = [n for i, n in names.items() if i not in held]
    stale = [tuple(p.shape) for i, p in held.items() if i not in names]
    if missing:
        problems.append(f"missing from the optimizer: {missing}")
    if stale:
        problems.append(f"{len(stale)} stale tensor(s) not in the model, shapes {stale}")
    for p, st in optimizer.state.items():
        if id(p) not in held:
            problems.append(f"state for a tensor the optimizer does not hold, shape {tuple(p.shape)}")
            continue
        for key in _PER_ELEMENT_KEYS:
            v = st.get(key)
            if torch.is_tensor(v) and v.shape != p.shape:
                problems.append(f"{names.get(id(p), '?')}: state {key!r} has shape {tuple(v.shape)}, "
                                f"parameter {tuple(p.shape)}")
    if problems:
        raise AssertionError("optimizer does not match the model: " + "; ".join(problems))


# --- internals ----------------------------------------------------------------------------------------


def _swap(groups: list[list], state: dict, pr: ParamResize, mode: Mode, fill: Mapping[str, float]) -> None:
    """Put ``pr.new`` where ``pr.old`` was and give it the remapped state."""
    loc = _locate(groups, pr.old)
    if loc is None:
        return  # not optimized before (frozen, or the event was already applied): not optimized now
    if pr.new is not pr.old:
        if _locate(groups, pr.new) is not None:
            raise ValueError(f"{pr.name}: the optimizer already holds the new parameter elsewhere")
        groups[loc[0]][loc[1]] = pr.new
    old_state = state.pop(pr.old, None)
    unchanged = pr.dim is None and pr.new is pr.old
    if not old_state or (mode == "reset" and not unchanged):
        return
    state[pr.new] = old_state if pr.dim is None else _slice_state(pr, old_state, fill)


def _slice_state(pr: ParamResize, old_state: dict, fill: Mapping[str, float]) -> dict:
    """Keep-mode state of ``pr.new``: per-element tensors sliced to the survivors, ``fill`` (default 0)
    for the new units."""
    new_state = {}
    for key, v in old_state.items():
        if torch.is_tensor(v) and _per_element(v, pr):
            kept = v.index_select(pr.dim, pr.kept.to(v.device))
            if pr.n_new:
                pad = list(v.shape)
                pad[pr.dim] = pr.n_new
                kept = torch.cat([kept, v.new_full(pad, fill.get(key, 0.0))], pr.dim)
            new_state[key] = kept
        elif torch.is_tensor(v) and v.numel() > 1:
            raise ValueError(f"{pr.name}: optimizer state {key!r} of shape {tuple(v.shape)} is not shaped "
                             f"like the parameter {tuple(pr.old.shape)}; use mode='reset'")
        else:
            new_state[key] = v  # step counts and other scalars
    return new_state


def _per_element(v: torch.Tensor, pr: ParamResize) -> bool:
    if pr.old is not pr.new:
        return v.shape == pr.old.shape
    # The parameter was resized in place, so its old size along ``dim`` is gone: match the other dims.
    return v.dim() == pr.new.dim() and all(v.shape[d] == pr.new.shape[d] for d in range(v.dim())
                                           if d != pr.dim)


def _locate(groups: list[list], p: torch.Tensor) -> tuple[int, int] | None:
    # Identity, not ==: tensors compare element-wise.
    for gi, params in enumerate(groups):
        for i, q in enumerate(params):
            if q is p:
                return gi, i
    return None


def _group_index(optimizer: torch.optim.Optimizer, group: int | str) -> int:
    groups = optimizer.param_groups
    if isinstance(group, str):
        for i, g in enumerate(groups):
            if g.get("name") == group:
                return i
        raise ValueError(f"no param group named {group!r}; names are {[g.get('name') for g in groups]}")
    if not -len(groups) <= group < len(groups):
        raise ValueError(f"param group {group} out of range; the optimizer has {len(groups)}")
    return group % len(groups)
