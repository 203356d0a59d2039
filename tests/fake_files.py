"""Miniature data files in their real formats (MNIST IDX, CIFAR python batches) for tests.

A plain module next to ``conftest.py`` (the tests folder is on ``sys.path``), shared by the reader tests
and the tests that run built-in studies on the user's-files datasets.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from widthlab.data.readers.cifar import LAYOUTS
from widthlab.data.readers.idx import FILES


def idx_bytes(a: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
            np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}[a.dtype]
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def mnist_folder(root: Path, gz: bool, n=40, n_test=20, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(n) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}
    root.mkdir(exist_ok=True)
    for key, stem in FILES.items():
        write(root / stem, idx_bytes(arrays[key]), gz)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes as Python 2 ``str`` (BINSTRING), as cPickle wrote the official batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def batch(n: int, rng, classes: int = 10, cifar100: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    d = {b"batch_label": b"testing batch", b"data": data, b"filenames": [b"img%d.png" % i for i in range(n)]}
    if cifar100:
        d[b"fine_labels"] = [int(v) for v in labels]
        d[b"coarse_labels"] = [int(v) // 5 for v in labels]
    else:
        d[b"labels"] = [int(v) for v in labels]
    return d, data, labels


def write_cifar(root: Path, kind: str = "cifar10", archive: bool = False, per_batch: int = 4, seed: int = 0):
    """Write a miniature CIFAR in its real layout; returns the path to load and the expected arrays."""
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[kind]
    c100 = kind == "cifar100"
    files, expect = {}, {}
    for split in ("train", "test"):
        xs, ys = [], []
        for name in layout[split]:
            d, data, labels = batch(per_batch if split == "train" else per_batch + 2, rng,
                                    100 if c100 else 10, c100)
            files[name] = py2_pickle(d)
            xs.append(data)
            ys.append(labels)
        expect[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys))
    names = [b"class%d" % i for i in range(10)]
    files[layout["meta"]] = py2_pickle({b"label_names": names} if not c100 else
                                       {b"fine_label_names": [b"f%d" % i for i in range(100)],
                                        b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    if archive:
        path = root / f"{kind}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"{layout['folder']}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return path, expect
    folder = root / layout["folder"]
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return root, expect
