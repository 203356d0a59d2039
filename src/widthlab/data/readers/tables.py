"""Generic user tables: a ``.npz`` with input and target arrays, or a ``.csv`` with a header row.

``.npz`` files are opened with ``allow_pickle=False``, so an object array (which would need pickle) is
refused rather than executed. Class labels may be integers or strings; they are mapped to 0..K-1 in
sorted order (numerically when every label is a number) and the original labels are kept in
``meta["class_names"]``.
"""

from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path

import numpy as np

from widthlab.data.build import Source


def read_npz(path: Path, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x_key`` (N, ...) and ``y_key`` (N,) or (N, k) of an .npz file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (x_key, y_key) if k not in z.files]
            if missing:
                raise ValueError(f"{path}: no array {missing[0]!r} (arrays: {', '.join(z.files) or 'none'})")
            x, y = z[x_key], z[y_key]
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read array ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: inputs {x_key!r} must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    check_finite(x, path, f"array {x_key!r}")
    if y.dtype.kind in "f":
        check_finite(y, path, f"array {y_key!r}")
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} inputs in {x_key!r} but {len(y)} targets in {y_key!r}")
    return x, y


def read_csv(path: Path, target: str = "target", delimiter: str = ",") -> tuple[np.ndarray, np.ndarray, list]:
    """Features (N, d) float32, raw target strings (N,) and feature names of a .csv with a header."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV text file ({e})") from None
    rows = [r for r in rows if r]  # blank lines, e.g. a trailing newline
    if not rows:
        raise ValueError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in rows[0]]
    if target not in header:
        raise ValueError(f"{path}: no column {target!r} in the header {header}")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    x = np.empty((len(rows) - 1, len(features)), dtype=np.float32)
    y = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} fields but the header has {len(header)}")
        y.append(row[t].strip())
        for j, (i, cell) in enumerate((i, c) for i, c in enumerate(row) if i != t):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {header[i]!r}: cannot parse {cell[:40]!r} "
                                 f"as a number") from None
            if not math.isfinite(value) or abs(value) > _F32_MAX:
                raise ValueError(f"{path}: line {line}, column {header[i]!r}: non-finite value "
                                 f"{cell.strip()[:40]!r} (NaN, infinity and numbers beyond float32 are "
                                 "not allowed)")
            x[line - 2, j] = value
    if len(y) == 0:
        raise ValueError(f"{path}: header only, no data rows")
    return x, np.array(y), features


_F32_MAX = float(np.finfo(np.float32).max)


def check_finite(a: np.ndarray, path: Path, what: str) -> None:
    """Refuse NaN/inf in a numeric array, naming the file, the row (0-based) and the column."""
    if a.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(a)
    if bad.any():
        where = np.argwhere(bad)[0]
        row = int(where[0])
        col = f", column {','.join(str(int(i)) for i in where[1:])}" if len(where) > 1 else ""
        raise ValueError(f"{path}: {what}: non-finite value {a[tuple(where)].item()!r} at row {row}{col} "
                         f"({int(bad.sum())} non-finite value(s); NaN and infinity are not allowed)")


def _numeric(y: np.ndarray) -> np.ndarray | None:
    """``y`` as float64 when every entry is a number (strings from a CSV included), else None."""
    if y.dtype.kind in "biuf":
        return y.astype(np.float64)
    try:
        return y.astype(np.float64)
    except ValueError:
        return None


def class_codes(y: np.ndarray, where: Path, classes: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to 0..K-1 (``classes`` given: use that order and refuse unseen labels)."""
    num = _numeric(y)
    if num is not None:
        if y.ndim != 1 or not np.all(num == np.round(num)):
            raise ValueError(f"{where}: classification needs one integer or string label per example; "
                             f"use task='regression' for real-valued targets")
        y = num.astype(np.int64)
    if classes is None:
        classes = np.unique(y)
    codes = np.searchsorted(classes, y)
    unseen = (codes >= len(classes)) | (classes[np.minimum(codes, len(classes) - 1)] != y)
    if np.any(unseen):
        first = y[np.argmax(unseen)].item()
        raise ValueError(f"{where}: label {first!r} does not occur in the training file")
    return codes.astype(np.int64), classes


def _read(path: Path, x_key: str, y_key: str, target: str) -> tuple[np.ndarray, np.ndarray, dict]:
    if path.suffix == ".npz":
        x, y = read_npz(path, x_key, y_key)
        return x, y, {"x_key": x_key, "y_key": y_key}
    if path.suffix == ".csv":
        x, y, features = read_csv(path, target)
        return x, y, {"target": target, "features": features}
    raise ValueError(f"{path}: unsupported table format {path.suffix!r} (use .npz or .csv)")


def load_table(path: str, task: str = "classification", x_key: str = "x", y_key: str = "y",
               target: str = "target", test_path: str | None = None) -> Source:
    """A user table: ``.npz`` arrays or ``.csv`` columns.

    Args:
        path: the ``.npz`` or ``.csv`` file (test and validation are carved from it unless
            ``test_path`` is given).
        task: ``"classification"`` (labels mapped to 0..K-1) or ``"regression"`` (float targets).
        x_key, y_key: array names in a ``.npz``; inputs may have any shape (N, ...).
        target: name of the target column in a ``.csv``; every other column is a numeric feature.
        test_path: optional second file in the same format used as the official test split.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"table: task must be 'classification' or 'regression', got {task!r}")
    p = Path(path).expanduser()
    x, y, meta = _read(p, x_key, y_key, target)
    xt = yt = None
    if test_path is not None:
        pt = Path(test_path).expanduser()
        xt, yt, _ = _read(pt, x_key, y_key, target)
        if xt.shape[1:] != x.shape[1:]:
            raise ValueError(f"{pt}: inputs of shape {xt.shape[1:]} but {p} has {x.shape[1:]}")
    meta = {"source": "table", "files": [str(p)] + ([str(test_path)] if test_path else []), **meta}
    if task == "classification":
        y, classes = class_codes(y, p)
        if yt is not None:
            yt, _ = class_codes(yt, Path(test_path), classes)
        meta["class_names"] = [str(c) for c in classes.tolist()]
        num_outputs = len(classes)
    else:
        y, yt = (None if a is None else _regression(a, f) for a, f in ((y, p), (yt, test_path)))
        num_outputs = y.shape[1]
        if yt is not None and yt.shape[1] != num_outputs:
            raise ValueError(f"{test_path}: {yt.shape[1]} targets per example but {p} has {num_outputs}")
    return Source(x=x, y=y, x_test=xt, y_test=yt, task=task, num_outputs=num_outputs, meta=meta)


def _regression(y: np.ndarray, where) -> np.ndarray:
    num = _numeric(y)
    if num is None:
        raise ValueError(f"{where}: regression targets must be numbers")
    check_finite(num.reshape(len(num), -1), Path(where), "targets")
    return num.astype(np.float32).reshape(len(num), -1)
