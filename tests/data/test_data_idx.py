"""IDX (MNIST-family) files written here in the real format, read back, and corrupted."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fake_files import idx_bytes, mnist_folder, write
from widthlab.data.readers.idx import FILES, read_idx
from widthlab.data.registry import load_dataset


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_round_trip(tmp_path, gz):
    arrays = mnist_folder(tmp_path, gz)
    t = load_dataset("mnist", path=str(tmp_path), normalize="none", val_fraction=0.0)
    assert t.input_shape == (1, 28, 28) and t.num_outputs == 10
    assert torch.equal(t.train.tensors[0] * 255, torch.from_numpy(arrays["train_images"]).float()[:, None])
    assert torch.equal(t.train.tensors[1], torch.from_numpy(arrays["train_labels"]).long())
    assert torch.equal(t.test.tensors[0] * 255, torch.from_numpy(arrays["test_images"]).float()[:, None])
    assert t.train.tensors[0].max() <= 1.0


def test_fashion_and_kmnist_read_the_same_layout_and_flatten(tmp_path):
    mnist_folder(tmp_path, gz=True)
    for name in ("fashion_mnist", "kmnist"):
        t = load_dataset(name, path=tmp_path, flatten=True)
        assert t.input_shape == (784,)
        assert (len(t.train), len(t.val), len(t.test)) == (36, 4, 20)  # val carved, stratified, from train
        assert abs(t.train.tensors[0].mean().item()) < 1e-5  # channel standardisation on train


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_every_idx_dtype_round_trips(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "u1" else np.arange(24, dtype="u1")
    p = write(tmp_path / "a-idx", idx_bytes(a), gz=False)
    assert np.array_equal(read_idx(p), a)


def test_bad_magic_number(tmp_path):
    p = write(tmp_path / "x-idx3-ubyte", b"\x12\x34\x08\x01" + b"\x00" * 8, gz=False)
    with pytest.raises(ValueError, match=r"x-idx3-ubyte: bad magic number 0x12340801"):
        read_idx(p)


def test_unsupported_dtype_byte(tmp_path):
    p = write(tmp_path / "x-idx", b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", gz=False)
    with pytest.raises(ValueError, match=r"x-idx: unsupported dtype byte 0x07"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(tmp_path, gz):
    a = np.zeros((5, 28, 28), dtype=np.uint8)
    p = write(tmp_path / "imgs", idx_bytes(a)[:-10], gz)
    with pytest.raises(ValueError, match=rf"{p.name}: expected 3920 bytes of data .* got 3910 \(truncated\)"):
        read_idx(p)


def test_truncated_header_and_trailing_bytes(tmp_path):
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(write(tmp_path / "h", b"\x00\x00\x08\x03\x00\x00", gz=False))
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(write(tmp_path / "t", idx_bytes(np.zeros(3, np.uint8)) + b"!", gz=False))


def test_corrupt_gzip_names_the_file(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    p = tmp_path / "labels.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"labels.gz: corrupt or truncated gzip"):
        read_idx(p)


def test_image_label_count_mismatch(tmp_path):
    mnist_folder(tmp_path, gz=False)
    write(tmp_path / FILES["train_labels"], idx_bytes((np.arange(39) % 10).astype(np.uint8)), gz=False)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte has 40 images but "
                                         r".*train-labels-idx1-ubyte has 39 labels"):
        load_dataset("mnist", path=tmp_path)


def test_missing_file_is_named(tmp_path):
    mnist_folder(tmp_path, gz=True)
    (tmp_path / (FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte: missing file"):
        load_dataset("mnist", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing folder"):
        load_dataset("mnist", path=tmp_path / "nope")


def test_wrong_kind_of_file_and_bad_labels(tmp_path):
    mnist_folder(tmp_path, gz=False)
    # labels where the images should be: a 1-D file
    write(tmp_path / FILES["test_images"], idx_bytes(np.zeros(20, np.uint8)), gz=False)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected images"):
        load_dataset("mnist", path=tmp_path)
    mnist_folder(tmp_path, gz=False)
    write(tmp_path / FILES["train_labels"], idx_bytes(np.full(40, 10, np.uint8)), gz=False)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: labels span \[10, 10\]"):
        load_dataset("mnist", path=tmp_path)


def test_test_fraction_does_not_apply_to_official_test_split(tmp_path):
    mnist_folder(tmp_path, gz=False)
    with pytest.raises(ValueError, match="test_fraction does not apply"):
        load_dataset("mnist", path=tmp_path, test_fraction=0.1)


def test_first_n_subset_like_senn(tmp_path):
    arrays = mnist_folder(tmp_path, gz=False)
    t = load_dataset("mnist", path=tmp_path, val_fraction=0.0, subset=12, subset_mode="first",
                     normalize="none")
    assert torch.equal(t.train.tensors[0][:, 0] * 255, torch.from_numpy(arrays["train_images"][:12]).float())
