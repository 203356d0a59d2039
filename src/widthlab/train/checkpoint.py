"""Atomic, code-free checkpoints that can restore a model whose widths changed during training.

Format: one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(weights_only=True)`` (loading never executes code from the file). Optimizer state is
stored by parameter *name*, not by position, because width surgery swaps parameters in and out of the
optimizer and positions stop matching ``model.parameters()`` order.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    A reader (or a process killed mid-write) therefore sees either the old complete file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path) -> dict:
    """Load a checkpoint safely, with an error that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, disallowed global...
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {path}: not a widthlab checkpoint (no 'model' entry)")
    return obj


# ---------------------------------------------------------------- optimizer state by parameter name


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The optimizer's state dict with parameter positions replaced by model parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, state = [], {}
    for g in optimizer.param_groups:
        hp = {k: v for k, v in g.items() if k != "params"}
        pnames = []
        for p in g["params"]:
            if id(p) not in names:
                raise CheckpointError("optimizer holds a parameter that is not in the model")
            pnames.append(names[id(p)])
            if p in optimizer.state:
                state[names[id(p)]] = dict(optimizer.state[p])
        groups.append({"hyper": hp, "params": pnames})
    return {"groups": groups, "state": state}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """Rebuild ``optimizer``'s groups and state from :func:`optimizer_state_by_name` output."""
    params = dict(model.named_parameters())
    missing = [n for g in saved["groups"] for n in g["params"] if n not in params]
    if missing:
        raise CheckpointError(f"optimizer state names parameters absent from the model: {missing[:5]}")
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for g in saved["groups"]:
        group = dict(g["hyper"])
        group["params"] = [params[n] for n in g["params"]]
        optimizer.param_groups.append(group)
    for n, st in saved["state"].items():
        p = params[n]
        optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                              for k, v in st.items()}


# ---------------------------------------------------------------- model state across width changes

# Size attributes that mirror tensor shapes; kept in step when a tensor is re-created at a new shape.
_SIZE_ATTRS = {
    nn.Linear: {"weight": (("out_features", 0), ("in_features", 1))},
    nn.Conv2d: {"weight": (("out_channels", 0), ("in_channels", 1))},
    nn.Conv1d: {"weight": (("out_channels", 0), ("in_channels", 1))},
}


def _resize_tensor_slot(module: nn.Module, attr: str, shape: torch.Size) -> None:
    old = getattr(module, attr)
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = new
    for cls, table in _SIZE_ATTRS.items():
        if isinstance(module, cls):
            for size_attr, dim in table.get(attr, ()):
                setattr(module, size_attr, int(shape[dim]))
    if isinstance(module, nn.modules.batchnorm._NormBase) and attr == "weight":
        module.num_features = int(shape[0])
    if isinstance(module, nn.LayerNorm) and attr == "weight":
        module.normalized_shape = tuple(shape)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` that first re-shapes any tensor whose saved shape differs.

    Width-changing methods leave models whose layers differ in size from a freshly built one; module
    *structure* (e.g. inserted layers) must already match -- methods restore it from their own state
    before this is called.
    """
    own = model.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        raise CheckpointError(f"model structure differs from checkpoint: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            mod_name, _, attr = key.rpartition(".")
            _resize_tensor_slot(model.get_submodule(mod_name), attr, tensor.shape)
    model.load_state_dict(state)


# ---------------------------------------------------------------- RNG state


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
