"""CIFAR python batches written here as Python 2 wrote them, read from folders and archives; corrupt and
malicious variants are refused with the file named."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fake_files import batch, py2_pickle, write_cifar
from widthlab.data.readers.cifar import read_cifar, unpickle
from widthlab.data.registry import load_dataset


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_round_trip(tmp_path, archive):
    path, expect = write_cifar(tmp_path, archive=archive)
    t = load_dataset("cifar10", path=str(path), normalize="none", val_fraction=0.0)
    assert t.input_shape == (3, 32, 32) and t.num_outputs == 10
    assert torch.equal(t.train.tensors[0] * 255, torch.from_numpy(expect["train"][0]).float())
    assert torch.equal(t.train.tensors[1], torch.from_numpy(expect["train"][1]))
    assert torch.equal(t.test.tensors[0] * 255, torch.from_numpy(expect["test"][0]).float())
    assert t.meta["class_names"][3] == "class3"


def test_cifar10_folder_may_be_the_batches_folder_itself(tmp_path):
    path, expect = write_cifar(tmp_path)
    src = read_cifar(path / "cifar-10-batches-py")
    assert np.array_equal(src.x, expect["train"][0]) and np.array_equal(src.y_test, expect["test"][1])


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, archive):
    path, expect = write_cifar(tmp_path, "cifar100", archive=archive, per_batch=30)
    fine = load_dataset("cifar100", path=path, normalize="none", val_fraction=0.0)
    coarse = load_dataset("cifar100", path=path, label="coarse", normalize="none", val_fraction=0.0)
    assert fine.num_outputs == 100 and coarse.num_outputs == 20
    assert torch.equal(fine.train.tensors[1], torch.from_numpy(expect["train"][1]))
    assert torch.equal(coarse.train.tensors[1], torch.from_numpy(expect["train"][1] // 5))
    assert coarse.meta["class_names"][:2] == ["c0", "c1"]
    with pytest.raises(ValueError, match="label must be 'fine' or 'coarse'"):
        load_dataset("cifar100", path=path, label="medium")


def test_cifar_augment_and_default_channel_normalisation(tmp_path):
    path, _ = write_cifar(tmp_path)
    t = load_dataset("cifar10", path=path, augment=True)
    x = t.train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert t.augment(x[:4], torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > PWNED",)


class EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", [Evil(), EvalEvil()])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    path, _ = write_cifar(tmp_path)
    target = path / "cifar-10-batches-py" / "data_batch_2"
    target.write_bytes(py2_pickle({b"data": payload, b"labels": []}))
    with pytest.raises(ValueError, match=r"data_batch_2: refused to unpickle: refused global "
                                         r"(posix\.system|nt\.system|(__builtin__|builtins)\.eval)"):
        load_dataset("cifar10", path=path)
    assert not (tmp_path / "PWNED").exists()


def test_only_numpy_reconstruction_is_allowed():
    with pytest.raises(ValueError, match="x.bin: refused .* numpy.load"):
        unpickle(pickle.dumps(np.load, protocol=2), "x.bin")


def test_truncated_pickle_names_the_file(tmp_path):
    path, _ = write_cifar(tmp_path)
    target = path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"test_batch: not a valid CIFAR pickle"):
        load_dataset("cifar10", path=path)


def test_image_label_count_mismatch(tmp_path):
    path, _ = write_cifar(tmp_path)
    d, _, _ = batch(4, np.random.default_rng(1))
    d[b"labels"] = d[b"labels"][:3]
    (path / "cifar-10-batches-py" / "data_batch_5").write_bytes(py2_pickle(d))
    with pytest.raises(ValueError, match=r"data_batch_5: 4 images but 3 labels"):
        load_dataset("cifar10", path=path)


def test_wrong_array_shape(tmp_path):
    path, _ = write_cifar(tmp_path)
    d, _, _ = batch(4, np.random.default_rng(1))
    d[b"data"] = d[b"data"][:, :100]
    (path / "cifar-10-batches-py" / "data_batch_1").write_bytes(py2_pickle(d))
    with pytest.raises(ValueError, match=r"data_batch_1: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_dataset("cifar10", path=path)


def test_missing_batch_file_is_named(tmp_path):
    path, _ = write_cifar(tmp_path)
    (path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3: missing file"):
        load_dataset("cifar10", path=path)
    with pytest.raises(FileNotFoundError, match=r"nothing-here: missing"):
        load_dataset("cifar10", path=tmp_path / "nothing-here")


def test_archive_problems_are_named(tmp_path):
    path, _ = write_cifar(tmp_path, archive=True)
    blob = path.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut.tar.gz.*(corrupt or truncated|not a readable)"):
        load_dataset("cifar10", path=cut)
    with pytest.raises(FileNotFoundError, match=r"cifar100.tar.gz: missing file cifar-100-python/train"):
        # a CIFAR-10 archive renamed: the CIFAR-100 members are not in it
        load_dataset("cifar100", path=path.rename(tmp_path / "cifar100.tar.gz"))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"junk.tar.gz: not a readable tar archive"):
        load_dataset("cifar10", path=junk)
