"""CIFAR-10 / CIFAR-100 "python version" batches, from a folder or straight from the .tar.gz.

Format: each batch is a Python-2 pickled dict with ``b'data'`` (N x 3072
uint8: the R, G, B planes of 1024 row-major pixels) and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` /
``b'coarse_labels'`` (CIFAR-100). A pickle can run arbitrary code when loaded, so these files go
through :class:`RestrictedUnpickler`, which can only rebuild numpy arrays (DESIGN.md, reliability rules).
Archives are read member by member in memory; nothing is extracted to disk.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from widthlab.data.build import Source

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

# The only globals a CIFAR batch references: numpy's array reconstructor (module renamed in numpy 2),
# the ndarray type and dtype. Everything else -- os.system, builtins.eval, ... -- is refused.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle written by Python 3: a bytes object stored as
    ``encode(str, 'latin1')``. Only that: a str and the latin-1 codec (no other codec runs)."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1 \
            or errors != "strict":
        raise RefusedGlobal(f"refused _codecs.encode with codec {encoding!r} (only latin-1 text is allowed)")
    return text.encode("latin-1")

LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta"},
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, lists, dicts, numbers and strings, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise RefusedGlobal(f"refused global {module}.{name}")
        # Both module spellings map to the current home, avoiding the deprecated numpy.core alias.
        if module == "_codecs":
            return _latin1_encode
        return _reconstruct if name == "_reconstruct" else getattr(np, name)


def unpickle(blob: bytes, where: str) -> object:
    """Load one pickle with :class:`RestrictedUnpickler`; ``where`` names the file in errors."""
    try:
        # encoding="bytes": Python-2 str objects (keys, array buffers) stay bytes, as the format needs.
        return RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except RefusedGlobal as e:
        raise ValueError(f"{where}: refused to unpickle: {e} (only numpy arrays are allowed)") from None
    except Exception as e:  # truncated or garbled pickles raise many kinds of errors
        raise ValueError(f"{where}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from None


def parse_batch(blob: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one batch into images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    d = unpickle(blob, where)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{where}: no {key!r} entry (has {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        is_array = isinstance(data, np.ndarray)
        desc = f"{data.dtype} array of shape {data.shape}" if is_array else type(data).__name__
        raise ValueError(f"{where}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {label_key!r} is not a list of integers ({e})") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{where}: {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels


class _Folder:
    """Batch files in a folder: ``path`` itself or ``path/cifar-10-batches-py``."""

    def __init__(self, root: Path, sub: str, needed: str):
        self.dir = root / sub if (root / sub / needed).is_file() else root

    def read(self, name: str) -> tuple[bytes, str]:
        p = self.dir / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing file")
        return p.read_bytes(), str(p)

    def close(self) -> None:
        pass


class _Archive:
    """Batch files inside a .tar.gz, read into memory one member at a time."""

    def __init__(self, path: Path, sub: str):
        self.path, self.sub = path, sub
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by close(), after all reads
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable tar archive ({e})") from None

    def read(self, name: str) -> tuple[bytes, str]:
        where = f"{self.path}:{self.sub}/{name}"
        try:
            member = self.tar.getmember(f"{self.sub}/{name}")
        except KeyError:
            raise FileNotFoundError(f"{self.path}: missing file {self.sub}/{name} in the archive") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{self.path}: corrupt or truncated archive ({e})") from None
        if not member.isfile():
            raise ValueError(f"{where}: not a regular file in the archive")
        try:
            return self.tar.extractfile(member).read(), where
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{where}: corrupt or truncated archive ({e})") from None

    def close(self) -> None:
        self.tar.close()


def _open(path: Path, layout: dict):
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing file or folder (expected the CIFAR python batches)")
    if path.is_dir():
        return _Folder(path, layout["folder"], layout["test"][0])
    return _Archive(path, layout["folder"])


def read_cifar(path: str | Path, kind: str = "cifar10", label: str = "fine") -> Source:
    """Read CIFAR-10 or CIFAR-100 python batches (official train and test splits).

    Args:
        path: a folder holding the batch files (or their ``cifar-10-batches-py`` / ``cifar-100-python``
            folder), or the .tar.gz archive as downloaded.
        kind: ``"cifar10"`` or ``"cifar100"``.
        label: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    layout = LAYOUTS[kind]
    if kind == "cifar100" and label not in ("fine", "coarse"):
        raise ValueError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    label_key = "labels" if kind == "cifar10" else f"{label}_labels"
    num_classes = 10 if kind == "cifar10" else (100 if label == "fine" else 20)
    store = _open(Path(path).expanduser(), layout)
    parts, read = {}, []
    try:
        for split in ("train", "test"):
            xs, ys = [], []
            for name in layout[split]:
                blob, where = store.read(name)
                x, y = parse_batch(blob, where, label_key)
                if len(y) and (y.min() < 0 or y.max() >= num_classes):
                    raise ValueError(f"{where}: labels span [{y.min()}, {y.max()}], "
                                     f"expected 0..{num_classes - 1}")
                xs.append(x)
                ys.append(y)
                read.append(where)
            parts[split] = (np.concatenate(xs), np.concatenate(ys))
        names_key = "label_names" if kind == "cifar10" else f"{label}_label_names"
        names = _class_names(store, layout["meta"], names_key)
    finally:
        store.close()
    meta = {"source": kind, "files": read, "label": label if kind == "cifar100" else "labels"}
    if names is not None:
        meta["class_names"] = names
    (x, y), (xt, yt) = parts["train"], parts["test"]
    return Source(x=x, y=y, x_test=xt, y_test=yt, task="classification", num_outputs=num_classes,
                  divisor=255.0, meta=meta)


def _class_names(store, name: str, key: str) -> list[str] | None:
    """Class names from the optional meta file; a missing meta file is not an error."""
    try:
        blob, where = store.read(name)
    except FileNotFoundError:
        return None
    d = unpickle(blob, where)
    names = (d.get(key.encode(), d.get(key))) if isinstance(d, dict) else None
    if not isinstance(names, list):
        return None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(path: str) -> Source:
    """CIFAR-10: 50000 train / 10000 test images (3 x 32 x 32), 10 classes.

    Args:
        path: folder with the python batches (or containing ``cifar-10-batches-py/``), or the
            ``cifar-10-python.tar.gz`` archive.
    """
    return read_cifar(path, "cifar10")


def load_cifar100(path: str, label: str = "fine") -> Source:
    """CIFAR-100: 50000 train / 10000 test images (3 x 32 x 32), 100 fine or 20 coarse classes.

    Args:
        path: folder with ``train``/``test``/``meta`` (or containing ``cifar-100-python/``), or the
            ``cifar-100-python.tar.gz`` archive.
        label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    return read_cifar(path, "cifar100", label)
