"""The compiled CPU kernel of the adaptive layers (``cpu_kernel.cpp``): t ⊙ p(r) as one autograd node.

On the CPU the rescaling of an adaptive layer with the exponential distribution runs through this
kernel when it is available, and through PyTorch operations otherwise (GPUs, the other distribution
families, a truncation mask, no compiler). Both compute the same values (p is evaluated in float64 and
rounded once; the gradients agree to float rounding); the kernel exists because on the paper's small
networks the per-node and per-call overhead of the PyTorch path costs ~25% of a training step
(``bench/bench_adaptive.py`` measures both paths).

The kernel is compiled with ``torch.utils.cpp_extension`` the first time a process needs it (about a
minute with a C++ compiler, once per machine, torch version and kernel source; ``widthlab
build-cpu-kernel`` does it ahead, as ``scripts/setup.sh`` does) into ``$WIDTHLAB_KERNEL_DIR``, default
``~/.cache/widthlab/kernels``. Set ``WIDTHLAB_CPU_KERNEL=off`` to use the PyTorch path only. A failed
build warns once, says why, and leaves the PyTorch path in place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
ENV_SWITCH = "WIDTHLAB_CPU_KERNEL"  # "off" / "0" / "false" / "no": never build or use the kernel
ENV_DIR = "WIDTHLAB_KERNEL_DIR"
NAME = "widthlab_adaptive_cpu"
CFLAGS = ("-O3", "-fopenmp")  # OpenMP: at::parallel_for splits large tensors over torch's threads
LDFLAGS = ("-fopenmp",)
STALE_LOCK_SECONDS = 900  # a build takes about a minute: a lock this old was left by a killed build

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "module": None, "error": None}


def enabled() -> bool:
    """Whether the environment allows the kernel (``WIDTHLAB_CPU_KERNEL``, default on)."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("0", "off", "false", "no")


def build_dir() -> Path:
    """Where the kernel is built: one folder per torch version, Python version and kernel source, so
    that checkouts or environments at other versions sharing the cache never load a stale binary."""
    root = os.environ.get(ENV_DIR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "widthlab" / "kernels"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((*CFLAGS, *LDFLAGS)).encode()).hexdigest()[:12]
    tag = (f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"
           f"{platform.system()}-{platform.machine()}-{digest}")
    return Path(root) / tag.replace("+", "_").lower()


def _library(directory: Path) -> Path | None:
    return next(iter(sorted(directory.glob(f"{NAME}*.so")) + sorted(directory.glob(f"{NAME}*.pyd"))), None)


def _fingerprint(path: Path) -> str:
    return f"{path.name} {path.stat().st_size} {hashlib.sha256(path.read_bytes()).hexdigest()}"


def _finished(directory: Path) -> Path | None:
    """The library of a build that completed: the marker written after its first successful import
    names its size and hash, and no build holds the folder's lock. A library without it may be half
    written (a killed linker, or one still linking): loading such a file can crash the process."""
    found, marker = _library(directory), directory / "complete"
    if found is None or not marker.exists() or (directory / "lock").exists():
        return None
    try:
        return found if marker.read_text() == _fingerprint(found) else None
    except OSError:
        return None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _compile(verbose: bool) -> ModuleType:
    """Import the finished library, or build it. The folder name pins the source, flags, versions and
    platform, so a finished library there is current: importing it directly skips torch's build check
    (~2 s a process)."""
    directory = build_dir()
    found = _finished(directory)
    if found is not None:
        return _import(found)
    from torch.utils.cpp_extension import load  # imports setuptools: ~1 s, so only to build

    _find_ninja()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"  # torch's build lock, which a killed build leaves behind: torch would wait
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:  # on it forever
        lock.unlink(missing_ok=True)
    print(f"widthlab: compiling the adaptive-width CPU kernel into {directory} (once; about a minute; "
          f"{ENV_SWITCH}=off skips it)", file=sys.stderr, flush=True)
    module = load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                  build_directory=str(directory), verbose=verbose)
    built = _library(directory)
    if built is not None:  # imported fine: mark it complete (atomically) for the fast path
        tmp = directory / f"complete.{os.getpid()}"
        tmp.write_text(_fingerprint(built))
        os.replace(tmp, directory / "complete")
    return module


def _find_ninja() -> None:
    """torch builds with ninja from PATH; the ``ninja`` wheel (a dependency) installs it next to this
    Python, which is not on PATH when the environment is used without being activated."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and shutil.which("ninja", path=str(here)) is not None:
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


def load(verbose: bool = False, strict: bool = False) -> ModuleType | None:
    """The compiled module, building it if needed; None when disabled or when the build failed.

    Args:
        verbose: show the compiler's output.
        strict: raise the build error instead of warning and returning None.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if enabled():
                try:
                    _state["module"] = _compile(verbose)
                except Exception as e:  # no compiler, a failed build: the PyTorch path stays in place
                    _state["error"] = f"{type(e).__name__}: {e}"
                    if not strict:
                        warnings.warn(f"widthlab: the adaptive-width CPU kernel is unavailable, so adaptive "
                                      f"layers use PyTorch operations (same values, slower on small nets): "
                                      f"{_shorten(_state['error'])}", RuntimeWarning, stacklevel=3)
        if strict and _state["module"] is None:
            raise RuntimeError(f"the adaptive-width CPU kernel is unavailable: "
                               f"{_state['error'] or f'{ENV_SWITCH} is off'}")
        return _state["module"]  # type: ignore[return-value]


def _shorten(message: str, head: int = 200, tail: int = 800) -> str:
    """A build error's first line and its end, where the compiler's own complaint is (the middle is
    the compile command line)."""
    if len(message) <= head + tail:
        return message
    return f"{message[:head]} [...] {message[-tail:]}"


def module() -> ModuleType | None:
    """The loaded kernel, or None; builds on the first call only (the per-step fast path)."""
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    return load()


def reset() -> None:
    """Forget the load attempt (tests; after changing ``WIDTHLAB_CPU_KERNEL``)."""
    with _lock:
        _state.update(tried=False, module=None, error=None)


@contextmanager
def disabled() -> Iterator[None]:
    """Inside the block adaptive layers use the PyTorch path (tests and the bench compare the two)."""
    with _lock:
        saved = dict(_state)
        _state.update(tried=True, module=None)
    try:
        yield
    finally:
        with _lock:
            _state.update(saved)
