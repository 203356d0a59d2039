"""SVHN .mat files written with scipy.io.savemat, read back, and corrupted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from widthlab.data.readers.svhn import read_svhn_mat
from widthlab.data.registry import load_dataset


def svhn_file(path: Path, n: int, seed: int = 0, **override) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10, 10 meaning the digit 0
    scipy.io.savemat(path, {"X": X, "y": y, **override})
    return X, y


def svhn_folder(root: Path, n=30, n_test=20):
    return svhn_file(root / "train_32x32.mat", n), svhn_file(root / "test_32x32.mat", n_test, seed=1)


def test_round_trip_with_label_10_as_digit_0(tmp_path):
    (X, y), (Xt, yt) = svhn_folder(tmp_path)
    x, labels = read_svhn_mat(tmp_path / "train_32x32.mat")
    assert x.shape == (30, 3, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(x, X.transpose(3, 2, 0, 1))
    assert np.array_equal(labels, y[:, 0] % 10)
    assert labels.min() == 0 and labels.max() == 9
    t = load_dataset("svhn", path=str(tmp_path), normalize="none", val_fraction=0.0)
    assert t.input_shape == (3, 32, 32) and t.num_outputs == 10
    assert torch.equal(t.test.tensors[0] * 255, torch.from_numpy(Xt.transpose(3, 2, 0, 1)).float())
    assert torch.equal(t.test.tensors[1], torch.from_numpy(yt[:, 0].astype(np.int64) % 10))


def test_extra_split_is_appended_to_train(tmp_path):
    svhn_folder(tmp_path)
    svhn_file(tmp_path / "extra_32x32.mat", 10, seed=2)
    t = load_dataset("svhn", path=tmp_path, include_extra=True, val_fraction=0.0)
    assert len(t.train) == 40


def test_truncated_and_garbage_files_are_named(tmp_path):
    svhn_folder(tmp_path)
    p = tmp_path / "train_32x32.mat"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"train_32x32.mat: not a readable MATLAB file"):
        load_dataset("svhn", path=tmp_path)
    p.write_bytes(b"this is not MATLAB" * 20)
    with pytest.raises(ValueError, match=r"train_32x32.mat: not a readable MATLAB file"):
        read_svhn_mat(p)


def test_count_mismatch_missing_variable_and_bad_labels(tmp_path):
    p = tmp_path / "a.mat"
    svhn_file(p, 10, y=np.ones((9, 1), np.uint8))
    with pytest.raises(ValueError, match=r"a.mat: 10 images but 9 labels"):
        read_svhn_mat(p)
    scipy.io.savemat(p, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match=r"a.mat: no variable 'y'"):
        read_svhn_mat(p)
    svhn_file(p, 4, y=np.array([[1], [2], [11], [3]], np.uint8))
    with pytest.raises(ValueError, match=r"a.mat: labels span \[1, 11\]"):
        read_svhn_mat(p)
    svhn_file(p, 4, X=np.zeros((28, 28, 1, 4), np.uint8))
    with pytest.raises(ValueError, match=r"a.mat: 'X' must be a uint8 array of shape \(32, 32, 3, N\)"):
        read_svhn_mat(p)


def test_missing_file_is_named(tmp_path):
    svhn_file(tmp_path / "train_32x32.mat", 10)
    with pytest.raises(FileNotFoundError, match=r"test_32x32.mat: missing file"):
        load_dataset("svhn", path=tmp_path)
