"""SVHN "cropped digits" MATLAB files: ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``).

Format: MATLAB v5 files read with ``scipy.io.loadmat`` (which only decodes
data, it never runs code); ``X`` is (32, 32, 3, N) uint8 and ``y`` is (N, 1) with digits 1..9 and
**label 10 for the digit 0**, mapped here to 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from widthlab.data.build import Source


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN .mat file into images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file")
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5, which loadmat does not read
        raise ValueError(f"{path}: unsupported MATLAB file version ({e}); save it as v5 / v7") from None
    except Exception as e:  # truncated or garbled files raise many kinds of errors inside scipy
        raise ValueError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    for key in ("X", "y"):
        if key not in mat:
            raise ValueError(f"{path}: no variable {key!r} in the file")
    X, y = mat["X"], mat["y"]
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise ValueError(f"{path}: 'X' must be a uint8 array of shape (32, 32, 3, N), "
                         f"got {X.dtype} {X.shape}")
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ValueError(f"{path}: 'y' must hold integer labels, got {y.dtype}")
    if len(y) != X.shape[3]:
        raise ValueError(f"{path}: {X.shape[3]} images but {len(y)} labels")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: labels span [{y.min()}, {y.max()}], expected 1..10 (10 = digit 0)")
    y[y == 10] = 0
    # (H, W, C, N) -> (N, C, H, W)
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)), y


def load_svhn(path: str, include_extra: bool = False) -> Source:
    """SVHN cropped digits: 73257 train / 26032 test images (3 x 32 x 32), 10 classes.

    Args:
        path: folder holding ``train_32x32.mat`` and ``test_32x32.mat``.
        include_extra: append ``extra_32x32.mat`` (531131 easier images) to the training pool; the
            wide & sparse paper uses the ``train`` split only (Golubeva et al. 2021, App. A, ResNet-18).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing folder (expected train_32x32.mat and test_32x32.mat)")
    names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if include_extra else [])
    read = {n: read_svhn_mat(folder / n) for n in names}
    x, y = read["train_32x32.mat"]
    if include_extra:
        xe, ye = read["extra_32x32.mat"]
        x, y = np.concatenate([x, xe]), np.concatenate([y, ye])
    xt, yt = read["test_32x32.mat"]
    return Source(x=x, y=y, x_test=xt, y_test=yt, task="classification", num_outputs=10, divisor=255.0,
                  meta={"source": "svhn", "files": [str(folder / n) for n in names]})
