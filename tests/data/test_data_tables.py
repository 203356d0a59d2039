"""Generic .npz / .csv tables written here, read back, and corrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widthlab.data.registry import load_dataset


def test_npz_round_trip_with_custom_names(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)).astype(np.float32), np.arange(50) % 3
    p = tmp_path / "d.npz"
    np.savez(p, inputs=x, labels=y)
    t = load_dataset("table", path=str(p), x_key="inputs", y_key="labels", val_fraction=0.0,
                     test_fraction=0.0)
    assert t.input_shape == (6,) and t.num_outputs == 3 and t.task == "classification"
    assert torch.equal(t.train.tensors[0], torch.from_numpy(x))
    assert torch.equal(t.train.tensors[1], torch.from_numpy(y))


def test_npz_images_and_regression(tmp_path):
    p = tmp_path / "img.npz"
    x = np.random.default_rng(0).random((20, 3, 32, 32)).astype(np.float32)
    np.savez_compressed(p, x=x, y=np.linspace(0, 1, 40).reshape(20, 2))
    t = load_dataset("table", path=p, task="regression", augment=True, test_fraction=0.25)
    assert t.input_shape == (3, 32, 32) and t.num_outputs == 2 and t.augment is not None
    assert t.train.tensors[1].dtype == torch.float32 and t.train.tensors[1].shape[1] == 2


def test_npz_problems_are_named(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"d.npz: no array 'y' \(arrays: x\)"):
        load_dataset("table", path=p)
    np.savez(p, x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(ValueError, match=r"d.npz: 4 inputs in 'x' but 3 targets in 'y'"):
        load_dataset("table", path=p)
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    with pytest.raises(ValueError, match=r"d.npz: cannot read array .*allow_pickle"):
        load_dataset("table", path=p)
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"d.npz: not a readable .npz file"):
        load_dataset("table", path=p)
    with pytest.raises(FileNotFoundError, match=r"none.npz: missing file"):
        load_dataset("table", path=tmp_path / "none.npz")
    with pytest.raises(ValueError, match=r"d.txt: unsupported table format"):
        (tmp_path / "d.txt").write_text("x")
        load_dataset("table", path=tmp_path / "d.txt")


def test_csv_with_string_labels_and_a_test_file(tmp_path):
    rows = ["a,species,b"] + [f"{i},{'cat' if i % 2 else 'dog'},{i * 0.5}" for i in range(20)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("a,species,b\n1,dog,2.5\n2,cat,0\n")
    t = load_dataset("table", path=tmp_path / "train.csv", target="species", test_path=tmp_path / "test.csv",
                     val_fraction=0.0, normalize="none")
    assert t.meta["class_names"] == ["cat", "dog"] and t.input_shape == (2,)
    assert torch.equal(t.train.tensors[0][:2], torch.tensor([[0.0, 0.0], [1.0, 0.5]]))
    assert t.train.tensors[1][:2].tolist() == [1, 0]
    assert t.test.tensors[1].tolist() == [1, 0]
    (tmp_path / "bad_test.csv").write_text("a,species,b\n1,bird,2.5\n")
    with pytest.raises(ValueError, match=r"bad_test.csv: label 'bird' does not occur"):
        load_dataset("table", path=tmp_path / "train.csv", target="species",
                     test_path=tmp_path / "bad_test.csv")


def test_csv_numeric_targets_and_regression(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("x1,x2,target\n" + "".join(f"{i},{-i},{i % 3}\n" for i in range(30)))
    t = load_dataset("table", path=p)
    assert t.num_outputs == 3
    r = load_dataset("table", path=p, task="regression")
    assert r.task == "regression" and r.train.tensors[1].shape == (len(r.train), 1)


def test_csv_problems_are_named(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,target\n1,0\n2\n")
    with pytest.raises(ValueError, match=r"t.csv: line 3 has 1 fields but the header has 2"):
        load_dataset("table", path=p)
    p.write_text("a,target\n1,0\nx,1\n")
    with pytest.raises(ValueError, match=r"t.csv: line 3, column 'a': cannot parse 'x' as a number"):
        load_dataset("table", path=p)
    p.write_text("a,label\n1,0\n")
    with pytest.raises(ValueError, match=r"t.csv: no column 'target' in the header"):
        load_dataset("table", path=p)
    p.write_text("a,target\n1,0.5\n2,1.5\n")
    with pytest.raises(ValueError, match=r"t.csv: classification needs .* task='regression'"):
        load_dataset("table", path=p)
    p.write_text("")
    with pytest.raises(ValueError, match=r"t.csv: empty file"):
        load_dataset("table", path=p)
    with pytest.raises(ValueError, match="task must be"):
        load_dataset("table", path=p, task="ranking")
