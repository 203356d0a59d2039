"""Data-parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA).

Every rank sees the same global batch order (it depends only on (seed, epoch)) and trains on its own
contiguous slice of each global batch. DistributedDataParallel averages gradients over ranks; scaling
each rank's loss by ``W * n_local / n_global`` makes that average equal the gradient of the global
batch's mean loss even when the slices differ in size, so a W-process run follows a 1-process run with
the same global batch up to float rounding. Rank 0 alone writes checkpoints, logs and results; every
rank can resume from the same checkpoint, with any number of ranks.

Structure must agree across ranks, values are DDP's business. Every (re)wrap first checks that all ranks
hold the same parameter and buffer names, shapes and dtypes and the same integer/bool buffers (wide &
sparse masks, CSR indices): these come from seeds, and a rank that drew other masks or resized to
another width would otherwise make DDP fail obscurely, hang in a collective, or silently train another
network than the 1-process run. Float values (weights, BatchNorm statistics) are then broadcast from
rank 0 by DDP itself. Methods that decide structure during training (adaptive width) compare their
decision across ranks with :meth:`DistContext.agree` before acting on it. A disagreement raises
:class:`RankMismatch` on every rank at once (each rank sees every rank's data), so no rank is left
waiting in a collective.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """This process's place in the job; ``world == 1`` means plain single-process training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` rows (sizes differ by at most 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_scale(self, n_local: int, n_global: int) -> float:
        return self.world * n_local / n_global

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (decisions such as a structural change)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` if every rank holds the same values; else :class:`RankMismatch` on every rank.

        For small decisions taken independently on each rank (target widths): one all-gather, and every
        rank compares all the gathered copies, so all ranks raise together or none does.
        """
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        bad = [r for r in range(1, self.world) if not torch.equal(parts[r], parts[0])]
        if bad:
            shown = "; ".join(f"rank {r}: {parts[r].tolist()}" for r in [0, *bad[:3]])
            raise RankMismatch(f"data-parallel ranks disagree on {what} ({shown})")
        return t

    def check_same_structure(self, model: nn.Module, device: torch.device) -> None:
        """Raise :class:`RankMismatch` on every rank unless all ranks hold the same model structure.

        Compares names, shapes and dtypes of all parameters and buffers and the contents of the
        integer/bool buffers (masks, sparse indices): one all-gather of a CRC-32 digest; only on a
        mismatch a second gather of the per-tensor entries names the first difference.
        """
        if not self.active:
            return
        entries = structure_entries(model)
        digest = zlib.crc32(repr(entries).encode())
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.tensor([digest], dtype=torch.int64, device=comm)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        if all(int(p) == digest for p in parts):
            return
        every: list = [None] * self.world
        dist.all_gather_object(every, entries)
        raise RankMismatch(_first_difference(every))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """A DDP view of ``model`` (rebuilt after every structural change: DDP fixes its buckets).

        Checks first that every rank holds the same structure (:meth:`check_same_structure`). Left out
        of DDP's per-forward buffer broadcast (one collective per step, and a wide network's masks are
        as large as its dense weights): the integer/bool buffers just verified equal (masks, sparse
        indices), which training never changes, and non-persistent buffers (constants derived from the
        architecture, e.g. positional tables). BatchNorm statistics are still broadcast from rank 0.
        """
        if not self.active:
            return model
        self.check_same_structure(model, device)
        persistent = model.state_dict(keep_vars=True).keys()
        static = [n for n, b in model.named_buffers() if not _is_float(b) or n not in persistent]
        ignore = getattr(nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model",
                         None)
        if static and ignore is not None:  # a private hook of DDP; without it, they are broadcast too
            ignore(model, static)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class RankMismatch(RuntimeError):
    """Data-parallel ranks hold different models or took different decisions."""


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def structure_entries(model: nn.Module) -> list[tuple]:
    """(kind, name, shape, dtype[, crc32 of contents]) of every parameter and buffer of ``model``.

    Contents are fingerprinted for integer/bool buffers only (the structure: masks, indices); float
    values may differ before DDP broadcasts rank 0's.
    """
    out: list[tuple] = [("param", n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    for n, b in model.named_buffers():
        entry: tuple = ("buffer", n, tuple(b.shape), str(b.dtype))
        if not _is_float(b):
            entry += (zlib.crc32(b.detach().cpu().contiguous().numpy().tobytes()),)
        out.append(entry)
    return out


def _first_difference(every: list[list[tuple]]) -> str:
    """A one-line description of where some rank's structure first departs from rank 0's."""
    ref = every[0]
    for r, entries in enumerate(every[1:], start=1):
        if entries == ref:
            continue
        for a, b in zip(ref, entries):
            if a != b:
                what = "contents (mask or index buffer)" if a[:4] == b[:4] else f"{a[2:4]} vs {b[2:4]}"
                return (f"data-parallel ranks hold different models: rank {r} differs from rank 0 at {a[0]} "
                        f"{a[1]!r}: {what}; masks and widths must come from the same seed on every rank")
        return (f"data-parallel ranks hold different models: rank {r} has {len(entries)} parameters and "
                f"buffers, rank 0 has {len(ref)}")
    return "data-parallel ranks hold different models"


def die_with_parent() -> None:
    """Make this rank exit when its ``torchrun`` agent dies (SIGKILL included), as the local executor's
    workers do: an orphaned rank 0 would go on holding the output folder's driver lock and writing to it.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the agent died before the request took effect
            os._exit(3)
    except (OSError, AttributeError):
        pass


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    die_with_parent()
    if device.type == "cuda":
        # NCCL collectives (and all_gather_object) run on the current device: one GPU per rank.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group at the end of a data-parallel job: every rank waits for the others, then
    the group is destroyed while the interpreter is whole.

    Without this the group lives until interpreter exit: DDP wrappers left in reference cycles (a
    trainer and its callbacks) hold it, and destroying gloo's worker threads during finalisation
    intermittently aborts a rank that has finished all its work ("terminate called without an active
    exception", exit code -6), which torchrun reports as a failed job. ``gc.collect`` first frees
    those wrappers, so that ``destroy_process_group`` really releases the group. A no-op without a
    process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def current() -> DistContext:
    """The context of an already initialised process group (single process if none)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()
