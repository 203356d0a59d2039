"""Seeded stratified splits, subsets and train-only standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widthlab.data.build import Source, build_task
from widthlab.data.splits import PRESETS, Standardizer, _quotas, split_indices, take


def test_quotas_are_exact_and_proportional():
    counts = np.array([700, 200, 100])
    for n in (0, 1, 7, 333, 999, 1000):
        q = _quotas(counts, n)
        assert q.sum() == n and np.all(q <= counts)
        assert np.all(np.abs(q - counts * n / counts.sum()) < 1)


def test_stratified_split_keeps_class_proportions():
    y = np.repeat([0, 1, 2], [600, 300, 100])
    train, val, test = split_indices(1000, test_fraction=0.2, val_fraction=0.1, seed=3, y=y)
    assert (len(train), len(val), len(test)) == (720, 80, 200)
    assert np.bincount(y[test]).tolist() == [120, 60, 20]
    assert np.bincount(y[val]).tolist() == [48, 24, 8]
    everything = np.concatenate([train, val, test])
    assert len(np.unique(everything)) == 1000  # a partition
    assert all(np.all(np.diff(s) > 0) for s in (train, val, test))  # sorted, file order kept


def test_splits_are_seeded():
    y = np.arange(500) % 5
    a = split_indices(500, test_fraction=0.2, val_fraction=0.1, seed=1, y=y)
    b = split_indices(500, test_fraction=0.2, val_fraction=0.1, seed=1, y=y)
    c = split_indices(500, test_fraction=0.2, val_fraction=0.1, seed=2, y=y)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[2], c[2])


def test_unstratified_split_for_regression_and_empty_validation():
    train, val, test = split_indices(50, test_fraction=0.2, val_fraction=0.0, seed=0)
    assert (len(train), len(val), len(test)) == (40, 0, 10)
    with pytest.raises(ValueError, match="no training example"):
        split_indices(3, test_fraction=0.5, val_fraction=0.99, seed=0)


def test_take_refuses_more_than_the_pool():
    with pytest.raises(ValueError, match="cannot draw 5"):
        take(np.arange(4), 5, np.random.default_rng(0))


def _src(n=200, d=3, classes=4, seed=0, **kw):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * [1, 10, 100] + [5, -3, 0]).astype(np.float32)
    return Source(x=x, y=np.arange(n) % classes, task="classification", num_outputs=classes, **kw)


def test_standardisation_is_fitted_on_train_only():
    src = _src()
    t = build_task("toy", src, seed=0, val_fraction=0.1, test_fraction=0.2, normalize="feature")
    x_tr = t.train.tensors[0]
    assert torch.allclose(x_tr.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x_tr.std(0, correction=0), torch.ones(3), atol=1e-5)
    # test inputs went through the *training* statistics, not their own
    raw = build_task("toy", src, seed=0, val_fraction=0.1, test_fraction=0.2, normalize="none")
    mu, sd = raw.train.tensors[0].mean(0), raw.train.tensors[0].std(0, correction=0)
    assert torch.allclose(t.test.tensors[0], (raw.test.tensors[0] - mu) / sd, atol=1e-4)
    assert not torch.allclose(t.test.tensors[0].mean(0), torch.zeros(3), atol=1e-3)
    assert t.meta["normalize"]["mode"] == "feature" and len(t.meta["normalize"]["mean"]) == 3


def test_channel_standardisation_and_presets():
    x = torch.rand(20, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    s = Standardizer.fit(x, "channel")
    assert s.mean.shape == (3, 1, 1)
    z = s(x.clone())
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    p = Standardizer.fit(x, "cifar")
    assert p.std.flatten().tolist() == pytest.approx(list(PRESETS["cifar"][1]))
    with pytest.raises(ValueError, match="1-channel"):
        Standardizer.fit(x, "mnist")
    with pytest.raises(ValueError, match="needs images"):
        Standardizer.fit(torch.rand(10, 5), "channel")


def test_constant_feature_is_only_centred():
    x = torch.tensor([[0.3, 1.0], [0.3, 2.0], [0.3, 3.0]] * 100)
    z = Standardizer.fit(x, "feature")(x.clone())
    assert torch.all(z[:, 0].abs() < 1e-6) and torch.isfinite(z).all()


def test_subset_stratified_and_first():
    src = _src(n=400)
    t = build_task("toy", src, seed=0, val_fraction=0.0, test_fraction=0.0, normalize="none", subset=40)
    assert len(t.train) == 40 and torch.bincount(t.train.tensors[1]).tolist() == [10] * 4
    first = build_task("toy", src, seed=0, val_fraction=0.0, test_fraction=0.0, normalize="none", subset=40,
                       subset_mode="first")
    assert torch.equal(first.train.tensors[0], torch.from_numpy(src.x[:40]))
    with pytest.raises(ValueError, match="subset=500"):
        build_task("toy", src, seed=0, val_fraction=0.0, test_fraction=0.0, normalize="none", subset=500)


def test_labels_outside_the_class_range_are_refused():
    src = _src(classes=4)
    src.num_outputs = 3
    with pytest.raises(ValueError, match="labels span"):
        build_task("toy", src, seed=0, val_fraction=None, test_fraction=None, normalize="none")
