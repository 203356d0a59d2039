"""Atomic, code-free checkpoints that can restore a model whose widths changed during training.

Format: one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts, so that it loads
with ``torch.load(weights_only=True)`` (loading never executes code from the file). Optimizer state is
stored by parameter *name*, not by position, because width surgery swaps parameters in and out of the
optimizer and positions stop matching ``model.parameters()`` order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file is truncated, garbled, or its bytes differ from the checksum recorded for it."""


CHECKSUMS = "checksums.json"  # per folder: file name -> sha256 of its recent versions, newest first
_KEEP = 3  # versions remembered per slot: the current file, the previous one, one in flight


def _short(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def _slot(path: Path) -> str:
    """``checkpoint.prev.pt`` is checked against the versions recorded for ``checkpoint.pt``."""
    return path.name.replace(".prev.pt", ".pt")


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".pt") + ".prev.pt")


def _read_checksums(folder: Path) -> dict[str, list[str]]:
    try:
        data = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: [str(x) for x in v] for k, v in data.items() if isinstance(v, list)} \
        if isinstance(data, dict) else {}


def _write_bytes_atomic(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path, keep_previous: bool = False) -> str:
    """Write ``obj`` with torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    A reader (or a process killed mid-write) therefore sees either the old complete file or the new one.
    The file's sha256 is recorded in the folder's ``checksums.json`` *before* the rename, so every
    complete checkpoint on disk has a recorded checksum at any moment; :func:`load_file` verifies it.
    ``keep_previous`` first moves the old file to ``<name>.prev.pt`` (the last good checkpoint to fall
    back on if the newest one is later damaged). Returns the sha256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums = _read_checksums(path.parent)
        sums[path.name] = [digest, *[d for d in sums.get(path.name, []) if d != digest]][:_KEEP]
        _write_bytes_atomic(json.dumps(sums, indent=1, sort_keys=True).encode(), path.parent / CHECKSUMS)
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_problem(path: str | Path, digest: str | None = None) -> str | None:
    """Why ``path`` fails its recorded checksum (None: it matches, or none was recorded for it)."""
    path = Path(path)
    recorded = _read_checksums(path.parent).get(_slot(path))
    if not recorded:
        return None
    if not path.is_file():
        return "file is missing"
    if (digest or file_sha256(path)) not in recorded:
        return "damaged: its checksum differs from the one recorded when it was written"
    return None


def load_file(path: str | Path, expect: dict[str, Any] | None = None) -> dict:
    """Load a checkpoint safely, with a one-line error that names the file and the problem.

    Raises :class:`DamagedCheckpoint` for a truncated/garbled file or a checksum mismatch, and
    :class:`CheckpointError` for a file that is not a widthlab checkpoint or (``expect`` given: run id,
    architecture, epochs) one that belongs to another run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DamagedCheckpoint(f"checkpoint {path}: cannot be read ({_short(e)})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if what is None:  # garbage bytes, not a refused global
            raise DamagedCheckpoint(f"checkpoint {path}: damaged or truncated, cannot be read "
                                    f"({type(e).__name__}: {_short(str(e).splitlines()[-1], 160)})") from None
        detail = f" (it asks for {what.group(1)})"
        raise CheckpointError(f"checkpoint {path}: not a widthlab checkpoint: loading it would need code "
                              f"from the file{detail}; it was not loaded") from None
    except Exception as e:  # corrupt zip, truncated file...
        raise DamagedCheckpoint(f"checkpoint {path}: damaged or truncated, cannot be read "
                                f"({type(e).__name__}: {_short(e, 160)})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {path}: not a widthlab checkpoint (no 'model' entry); "
                              "it was not loaded")
    if expect:
        check_identity(obj, expect, path)
    problem = checksum_problem(path, hashlib.sha256(data).hexdigest())
    if problem:
        raise DamagedCheckpoint(f"checkpoint {path}: {problem}")
    return obj


# ---------------------------------------------------------------- which run a checkpoint belongs to


def architecture(model: nn.Module) -> dict[str, Any]:
    """A fingerprint of a freshly built model: names and shapes of its tensors, and its parameter count."""
    entries = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "parameters": sum(p.numel() for p in model.parameters())}


def _arch_text(a: Any) -> str:
    if isinstance(a, dict):
        return f"architecture {a.get('fingerprint')} with {a.get('parameters')} parameters"
    return f"architecture {a!r}"


def check_identity(obj: dict, expect: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another run or architecture, or one past the run's last epoch."""
    ident = obj.get("identity")
    if isinstance(ident, dict):
        for key in ("run_id", "architecture"):
            have, want = ident.get(key), expect.get(key)
            if have is not None and want is not None and have != want:
                if key == "run_id":
                    raise CheckpointError(f"checkpoint {path} belongs to run {have}, not to run {want}; "
                                          "refused (delete it to train this run from the start)")
                raise CheckpointError(f"checkpoint {path} holds {_arch_text(have)} but this run builds "
                                      f"{_arch_text(want)}; refused (delete it to train this run from the "
                                      "start)")
    epochs, epoch = expect.get("epochs"), obj.get("epoch")
    if epochs is not None and epoch is not None and (
            isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= epochs):
        raise CheckpointError(f"checkpoint {path}: claims epoch {epoch!r} of a {epochs}-epoch run; refused")


def prepare_resume(path: str | Path, expect: dict[str, Any] | None = None) -> list[str]:
    """Make ``path`` the last good checkpoint to resume from, or remove it; returns what was done.

    A damaged newest checkpoint is replaced by the previous one (``<name>.prev.pt``) when that one is
    good; if neither is good both are moved aside (``*.damaged``) and the run starts from the beginning.
    A checkpoint of another run or architecture, or past the last epoch, raises :class:`CheckpointError`.
    """
    path = Path(path)
    prev = previous_path(path)
    notes: list[str] = []
    for candidate in (path, prev):
        if not candidate.is_file():
            continue
        try:
            state = load_file(candidate, expect)
        except DamagedCheckpoint as e:
            notes.append(str(e))
            candidate.replace(candidate.with_name(candidate.name + ".damaged"))
            continue
        if candidate != path:
            candidate.replace(path)
            notes.append(f"resuming from the previous good checkpoint instead (epoch {state.get('epoch')})")
        return notes
    if notes:
        notes.append("no good checkpoint left: the run starts again from the beginning")
    return notes


_REQUIRED = {"model": dict, "callbacks": list, "optimizer": dict, "rng": dict, "epoch": int, "step": int,
             "history": list, "bad_epochs": int}


def check_payload(state: dict, path: Path) -> None:
    """A resume checkpoint holds every entry the trainer needs, each of the right type."""
    for key, typ in _REQUIRED.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing entry {key!r}; not a resumable widthlab "
                                  "checkpoint")
        if not isinstance(state[key], typ) or (typ is int and isinstance(state[key], bool)):
            raise CheckpointError(f"checkpoint {path}: entry {key!r} should be a {typ.__name__}, got "
                                  f"{type(state[key]).__name__}")


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
