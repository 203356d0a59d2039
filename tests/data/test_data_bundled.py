"""scikit-learn's bundled datasets: shapes, tasks and default standardisation."""

from __future__ import annotations

import pytest
import torch

from widthlab.data.registry import load_dataset


@pytest.mark.parametrize("name, n, d, classes", [
    ("digits", 1797, 64, 10), ("breast_cancer", 569, 30, 2), ("wine", 178, 13, 3), ("iris", 150, 4, 3),
])
def test_classification_sets_have_their_known_shapes(name, n, d, classes):
    t = load_dataset(name)
    assert len(t.train) + len(t.val) + len(t.test) == n
    assert t.input_shape == (d,) and t.num_outputs == classes and t.task == "classification"
    assert t.train.tensors[1].dtype == torch.int64
    assert set(t.test.tensors[1].tolist()) == set(range(classes))  # stratified: every class in test


def test_diabetes_is_a_regression_with_column_targets():
    t = load_dataset("diabetes")
    assert len(t.train) + len(t.val) + len(t.test) == 442
    assert t.task == "regression" and t.input_shape == (10,) and t.num_outputs == 1
    y = t.train.tensors[1]
    assert y.shape == (len(t.train), 1) and y.dtype == torch.float32 and y.min() >= 25


def test_diabetes_targets_can_be_standardised_on_train():
    t = load_dataset("diabetes", normalize_target=True)
    y = t.train.tensors[1]
    assert abs(y.mean().item()) < 1e-5 and abs(y.std(correction=0).item() - 1) < 1e-5
    assert t.meta["target_normalize"]["mode"] == "feature"


def test_bundled_features_are_z_scored_on_the_training_split_by_default():
    t = load_dataset("wine")
    x = t.train.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(x.std(0, correction=0), torch.ones(13), atol=1e-4)
    assert t.meta["normalize"]["mode"] == "feature"


def test_digits_as_image():
    t = load_dataset("digits", as_image=True, normalize="channel")
    assert t.input_shape == (1, 8, 8) and t.train.tensors[0].shape[1:] == (1, 8, 8)
    flat = load_dataset("digits", as_image=True, flatten=True, normalize="none")
    assert flat.input_shape == (64,)
    raw = load_dataset("digits", normalize="none")
    assert torch.equal(flat.train.tensors[0], raw.train.tensors[0])  # same split, same pixel order
