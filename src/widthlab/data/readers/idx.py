"""IDX files: MNIST, Fashion-MNIST and KMNIST as distributed (raw or gzipped).

Format: a big-endian header -- two zero bytes, a dtype byte (0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions -- then one
int32 per dimension, then the data in C order. Images are magic 0x00000803 (uint8, N x rows x cols),
labels 0x00000801 (uint8, N).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from widthlab.data.build import Source

DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# The four files of MNIST, Fashion-MNIST and KMNIST; some mirrors write a dot instead of the dash.
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def read_maybe_gz(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when its name ends in ``.gz``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def parse_idx(raw: bytes, where: str | Path) -> np.ndarray:
    """Decode the bytes of one IDX file; ``where`` names the file in error messages."""
    if len(raw) < 4:
        raise ValueError(f"{where}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{where}: bad magic number 0x{magic:08X} (an IDX file starts with two zero bytes)")
    if raw[2] not in DTYPES:
        raise ValueError(f"{where}: unsupported dtype byte 0x{raw[2]:02X} in magic number 0x{magic:08X}")
    dtype, ndim = DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{where}: truncated header: {ndim} dimensions need {header} header bytes, "
                         f"file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize  # Python ints: huge dimensions cannot wrap around
    got = len(raw) - header
    if got != expected:
        problem = "truncated" if got < expected else "trailing bytes"
        raise ValueError(f"{where}: expected {expected} bytes of data for shape {dims}, got {got} "
                         f"({problem})")
    # Native byte order so torch.from_numpy accepts it later.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw, or gzipped when the name ends in ``.gz``) into a numpy array."""
    path = Path(path)
    return parse_idx(read_maybe_gz(path), path)


def find_file(folder: Path, stem: str) -> Path:
    """``folder/stem`` or ``folder/stem.gz`` (also under ``raw/``, and with '.' for '-idx'); raw first."""
    names = [stem, stem + ".gz"]
    dotted = stem.replace("-idx", ".idx")
    names += [dotted, dotted + ".gz"]
    for d in (folder, folder / "raw"):
        for n in names:
            if (d / n).is_file():
                return d / n
    raise FileNotFoundError(f"{folder / stem}: missing file (looked for {stem} and {stem}.gz in {folder} "
                            f"and {folder / 'raw'})")


def _load_pair(img_path: Path, lbl_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise ValueError(f"{img_path}: expected images (3 dimensions: N x rows x cols), got shape "
                         f"{images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{lbl_path}: expected integer labels (1 dimension), got {labels.dtype} of shape "
                         f"{labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{lbl_path}: labels span [{labels.min()}, {labels.max()}], "
                         f"expected 0..{num_classes - 1}")
    return images[:, None], labels.astype(np.int64)  # (N, 1, rows, cols)


def load_idx_folder(path: str | Path, name: str, num_classes: int = 10) -> Source:
    """The four IDX files of ``name`` in folder ``path``: official train and test splits.

    Args:
        path: folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
            t10k-labels-idx1-ubyte (each raw or .gz, directly or under ``raw/``).
        name: dataset name for the record.
        num_classes: labels must lie in ``0..num_classes-1``.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing folder (expected the {name} IDX files in it)")
    files = {k: find_file(folder, stem) for k, stem in FILES.items()}
    x, y = _load_pair(files["train_images"], files["train_labels"], num_classes)
    xt, yt = _load_pair(files["test_images"], files["test_labels"], num_classes)
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"{files['test_images']}: images of shape {xt.shape[2:]} but "
                         f"{files['train_images']} has {x.shape[2:]}")
    return Source(x=x, y=y, x_test=xt, y_test=yt, task="classification", num_outputs=num_classes,
                  divisor=255.0 if x.dtype == np.uint8 else 1.0,
                  meta={"source": name, "files": {k: str(p) for k, p in files.items()}})


def load_mnist(path: str) -> Source:
    """MNIST from its IDX files in folder ``path`` (60000 train, 10000 test, 1 x 28 x 28, 10 classes).

    Args:
        path: folder with the four standard IDX files, raw or gzipped.
    """
    return load_idx_folder(path, "mnist")


def load_fashion_mnist(path: str) -> Source:
    """Fashion-MNIST from its IDX files in folder ``path`` (same names and layout as MNIST).

    Args:
        path: folder with the four standard IDX files, raw or gzipped.
    """
    return load_idx_folder(path, "fashion_mnist")


def load_kmnist(path: str) -> Source:
    """Kuzushiji-MNIST from its IDX files in folder ``path`` (same names and layout as MNIST).

    Args:
        path: folder with the four standard IDX files, raw or gzipped.
    """
    return load_idx_folder(path, "kmnist")
