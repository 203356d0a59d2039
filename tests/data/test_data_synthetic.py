"""Synthetic generators of the AWNN (Errica et al. 2025) and SENN (Mitchell et al. 2023) experiments:
formulas, sizes, splits, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons

from widthlab.data import synthetic
from widthlab.data.registry import load_dataset


def _labels(ds) -> torch.Tensor:
    return ds.tensors[1]


@pytest.mark.parametrize("name, n_per_class, sizes", [
    ("doublemoon", 2500, (3600, 400, 1000)),
    ("spiral", 2500, (3600, 400, 1000)),
    ("spiralhard", 5000, (7200, 800, 2000)),
])
def test_awnn_sets_have_the_spec_split_sizes_and_balanced_classes(name, n_per_class, sizes):
    t = load_dataset(name)
    assert (len(t.train), len(t.val), len(t.test)) == sizes
    assert t.input_shape == (2,) and t.num_outputs == 2 and t.task == "classification"
    for ds, n in zip((t.train, t.val, t.test), sizes):
        # stratified: both classes exactly half of every split
        assert torch.bincount(_labels(ds)).tolist() == [n // 2, n // 2]
        assert ds.tensors[0].dtype == torch.float32 and _labels(ds).dtype == torch.int64
    # the three splits partition the generated cloud (no point lost or duplicated)
    x = torch.cat([t.train.tensors[0], t.val.tensors[0], t.test.tensors[0]])
    assert len(torch.unique(x, dim=0)) == 2 * n_per_class


def test_awnn_splits_are_deterministic_and_follow_the_seed():
    a, b, c = load_dataset("spiral"), load_dataset("spiral"), load_dataset("spiral", seed=7)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # the cloud itself is fixed by generator_seed (numpy seed 0, as in the AWNN code), not by the split seed
    pool = lambda t: torch.cat([t.train.tensors[0], t.val.tensors[0], t.test.tensors[0]]).sort(0)[0]  # noqa: E731
    assert torch.equal(pool(a), pool(c))


def test_double_moon_points_lie_on_the_spec_half_circles():
    r = 10.0
    x, y = synthetic.double_moon(200, noise=0.0)
    assert x.shape == (400, 2) and y.tolist() == [0] * 200 + [1] * 200
    c0, c1 = x[y == 0], x[y == 1]
    # class 0: radius r around (-r/2, 0), upper half; class 1: radius r around (r/2, r/2), lower half
    np.testing.assert_allclose(np.hypot(c0[:, 0] + r / 2, c0[:, 1]), r, rtol=1e-12)
    assert np.all(c0[:, 1] >= 0)
    np.testing.assert_allclose(np.hypot(c1[:, 0] - r / 2, c1[:, 1] - r / 2), r, rtol=1e-12)
    assert np.all(c1[:, 1] <= r / 2)


def test_double_moon_noise_has_the_spec_scale():
    x, y = synthetic.double_moon(4000, noise=0.3)
    c0 = x[y == 0]
    radial = np.hypot(c0[:, 0] + 5, c0[:, 1]) - 10
    assert abs(radial.std() - 0.3) < 0.02


@pytest.mark.parametrize("rep", [1, 2])
def test_spiral_points_lie_on_the_spec_arms(rep):
    x, y = synthetic.spiral(300, rep=rep, noise=0.0)
    p0, p1 = x[y == 0] * rep, -x[y == 1] * rep
    for p in (p0, p1):
        t = np.hypot(p[:, 0], p[:, 1])  # |(-t cos t, t sin t)| = t
        assert t.max() <= rep * 4 * np.pi + 1e-9
        np.testing.assert_allclose(p[:, 0], -t * np.cos(t), atol=1e-9)
        np.testing.assert_allclose(p[:, 1], t * np.sin(t), atol=1e-9)


def test_generators_are_deterministic_per_seed():
    a, b, c = synthetic.spiral(50, seed=0), synthetic.spiral(50, seed=0), synthetic.spiral(50, seed=1)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    # numpy's legacy stream, as np.random.seed(0) in the official code: first draw is the first angle
    first = np.sqrt(np.random.RandomState(0).rand(1)[0]) * 4 * np.pi
    np.testing.assert_allclose(np.hypot(*synthetic.spiral(1, noise=0.0)[0][0]), first, rtol=1e-12)


def test_moons_are_the_senn_draws_plus_a_separate_validation_draw():
    t = load_dataset("moons")
    assert (len(t.train), len(t.val), len(t.test)) == (200, 200, 500)
    for ds, n, seed in ((t.train, 200, 0), (t.test, 500, 1), (t.val, 200, 2)):
        x, y = make_moons(n_samples=n, noise=0.3, random_state=seed)
        assert torch.equal(ds.tensors[0], torch.from_numpy(x.astype(np.float32)))
        assert torch.equal(ds.tensors[1], torch.from_numpy(y))
    assert torch.bincount(t.train.tensors[1]).tolist() == [100, 100]


def test_moons_reject_val_fraction_because_validation_is_a_separate_draw():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("moons", val_fraction=0.2)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("moons", test_fraction=0.2)


def test_teacher1d_targets_come_from_the_seeded_teacher():
    t = load_dataset("teacher1d")
    assert (len(t.train), len(t.val), len(t.test)) == (50, 200, 1000)
    assert t.task == "regression" and t.input_shape == (1,) and t.num_outputs == 1
    x, y = t.train.tensors
    assert y.shape == (50, 1) and y.dtype == torch.float32
    teacher = synthetic.make_teacher((16, 16, 16, 16), seed=0)
    assert torch.allclose(synthetic.teacher_forward(teacher, x).float(), y, atol=1e-6)
    assert y.std() > 1e-3  # a non-trivial function
    other = load_dataset("teacher1d", teacher_seed=1)
    assert torch.equal(other.train.tensors[0], x) and not torch.allclose(other.train.tensors[1], y)
    moved = load_dataset("teacher1d", seed=5)
    assert not torch.equal(moved.train.tensors[0], x)


def test_teacher_architecture_and_lecun_normal_init():
    layers = synthetic.make_teacher((16, 16, 16, 16), seed=0)
    assert [tuple(layer["W"].shape) for layer in layers] == [(1, 16), (16, 16), (16, 16), (16, 16), (16, 1)]
    assert all("v" in layer for layer in layers[:4]) and "v" not in layers[4]  # no output activation
    w = synthetic.lecun_normal_(torch.empty(500, 400, dtype=torch.float64), torch.Generator().manual_seed(0))
    σ = (1 / 500) ** 0.5 / 0.87962566103423978
    assert w.abs().max() <= 2 * σ
    assert abs(w.std().item() - (1 / 500) ** 0.5) < 0.02 * (1 / 500) ** 0.5
