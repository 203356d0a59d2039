"""The output folder of a study driver: checked, locked for the driver's life, swept of stale temp files.

One driver (``widthlab run``, a Ray driver, rank 0 of a torchrun job, ``report --rebuild``) works on a
folder at a time: :func:`driver_lock` holds an exclusive ``flock`` on ``DIR/.widthlab.lock`` for as long
as the driver lives. The operating system drops the lock when the process dies, however it dies
(SIGKILL included), so a lock is never stale; the file only records the holder's PID for the message a
second driver gets. The lock is re-entrant within a process (``cmd_run`` and ``run_study`` both take it).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from widthlab.studies.load import StudyError

LOCK_NAME = ".widthlab.lock"
_HELD: dict[Path, int] = {}  # resolved folder -> re-entrancy depth, for this process


class OutputDirError(StudyError):
    """The output folder cannot be used (not a folder, read-only, held by another driver...)."""


def _why(e: OSError) -> str:
    if e.errno in (errno.EROFS,):
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed; a one-line :class:`OutputDirError` when it cannot be a study's folder."""
    out = Path(out_dir)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"is inside {parent}, which is a file"
                raise OutputDirError(f"--out {out}: {what}, not a folder; choose another --out")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"--out {out}: cannot create the folder ({_why(e)})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out {out}: the folder is not writable (read-only file system or no "
                             "permission)")
    db = out / "results.sqlite"
    if db.exists() and not db.is_file():
        raise OutputDirError(f"{db}: is a folder, not a results database; move it away or choose another "
                             "--out")
    return out


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


@contextmanager
def driver_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir`` for the ``with`` block (one line naming the holder if taken)."""
    out = prepare_output_dir(out_dir)
    key = out.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputDirError(f"--out {out}: cannot create the lock file {path.name} ({_why(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputDirError(f"--out {out}: cannot lock the folder ({_why(e)})") from None
            raise OutputDirError(f"{out} is in use by another widthlab driver ({_holder(path)}); wait for "
                                 "it to finish or stop it, or choose another --out (nothing was changed)"
                                 ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = 1
        try:
            clean_stale_temp_files(out)
            yield
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def job_lock(out_dir: str | Path, ctx) -> Iterator[None]:
    """:func:`driver_lock` for a (possibly torchrun) job: rank 0 takes it, every rank learns the outcome,
    so that a refused job fails on all ranks instead of leaving some waiting in a collective."""
    with ExitStack() as stack:
        err = None
        if ctx.is_main:
            try:
                stack.enter_context(driver_lock(out_dir))
            except OutputDirError as e:
                err = str(e)
        if ctx.active:
            err = ctx.broadcast_object(err)
        if err:
            raise OutputDirError(err)
        yield


def holds_lock(out_dir: str | Path) -> bool:
    return Path(out_dir).resolve() in _HELD


def clean_stale_temp_files(out_dir: Path) -> list[Path]:
    """Remove ``.<name>.*.tmp`` files that killed writers left in ``out_dir`` and its run folders.

    Only called under the driver lock, so no live writer of this folder can own them.
    """
    removed = []
    folders = [out_dir]
    runs = out_dir / "runs"
    if runs.is_dir():
        folders += [p for p in runs.iterdir() if p.is_dir()]
    for folder in folders:
        for tmp in folder.glob(".*.tmp" if folder == out_dir else "*.tmp"):
            try:
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
            except OSError:
                pass
    return removed
