"""Synthetic tasks of the adaptive-width (Errica et al. 2025, experimental setup) and self-expanding
(Mitchell et al. 2023, experiment settings) papers.

The AWNN generators draw from numpy's legacy ``RandomState(0)`` in the order of the official code
(per class: angles, then x-noise, then y-noise), so with the default seed they produce the points of the
paper's experiments up to float rounding. The SENN tasks cannot be bit-identical (the official code
uses JAX's random streams); they follow the same distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import make_moons

from widthlab.data.build import Source
from widthlab.nn.rational import rational

# ---- AWNN generators (Errica et al. 2025, experimental setup) ----------------------------------------------

def double_moon(n_per_class: int = 2500, *, r: float = 10.0, noise: float = 0.3, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles of radius r (Errica et al. 2025, DoubleMoon), θ ~ U[0, π).

    class 0: (r cos θ − r/2 + ε, r sin θ + ε), an upper half circle centred at (−r/2, 0);
    class 1: (−(r cos θ + ε) + r/2, −(r sin θ + ε) + r/2), a lower half circle centred at (r/2, r/2).

    Returns:
        ``x`` float64 (2n, 2) and ``y`` int64 (2n,): class 0 first, then class 1.
    """
    rs = np.random.RandomState(seed)
    n = n_per_class
    θ = rs.rand(n) * np.pi
    x0 = np.stack([r * np.cos(θ) - r / 2 + rs.randn(n) * noise, r * np.sin(θ) + rs.randn(n) * noise], 1)
    θ = rs.rand(n) * np.pi
    x1 = np.stack([-(r * np.cos(θ) + rs.randn(n) * noise) + r / 2,
                   -(r * np.sin(θ) + rs.randn(n) * noise) + r / 2], 1)
    return np.concatenate([x0, x1]), np.repeat(np.arange(2, dtype=np.int64), n)


def spiral(n_per_class: int = 2500, *, rep: int = 1, noise: float = 0.3, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spirals (Errica et al. 2025, Spiral; SpiralHard is rep=2, n=5000).

    t = √U · rep · 4π (√ spreads points evenly along the arm); class 0 is (−t cos t + ε, t sin t + ε),
    class 1 the negation of an independent draw; everything is divided by rep so that more turns do not
    mean a larger domain.

    Returns:
        ``x`` float64 (2n, 2) and ``y`` int64 (2n,): class 0 first, then class 1.
    """
    rs = np.random.RandomState(seed)
    n = n_per_class

    def arm() -> np.ndarray:
        t = np.sqrt(rs.rand(n)) * rep * 4 * np.pi
        return np.stack([-t * np.cos(t) + rs.randn(n) * noise, t * np.sin(t) + rs.randn(n) * noise], 1)

    x0 = arm()
    x1 = -arm()
    return np.concatenate([x0, x1]) / rep, np.repeat(np.arange(2, dtype=np.int64), n)


def _awnn_source(x: np.ndarray, y: np.ndarray, **meta) -> Source:
    return Source(x=x.astype(np.float32), y=y, task="classification", num_outputs=2, meta=meta)


def load_doublemoon(n_per_class: int = 2500, noise: float = 0.3, generator_seed: int = 0) -> Source:
    """DoubleMoon of Errica et al. 2025: 2 x 2500 points, r = 10, noise 0.3, numpy seed 0.

    Args:
        n_per_class: points per class.
        noise: standard deviation σ of the Gaussian noise ε.
        generator_seed: numpy seed of the point cloud (the split seed is the common ``seed``).
    """
    x, y = double_moon(n_per_class, noise=noise, seed=generator_seed)
    return _awnn_source(x, y, generator="doublemoon", n_per_class=n_per_class, r=10.0, noise=noise,
                        generator_seed=generator_seed)


def load_spiral(n_per_class: int = 2500, noise: float = 0.3, generator_seed: int = 0) -> Source:
    """Spiral of Errica et al. 2025: 2 x 2500 points, rep = 1, noise 0.3, numpy seed 0.

    Args:
        n_per_class: points per class.
        noise: standard deviation σ of the Gaussian noise ε.
        generator_seed: numpy seed of the point cloud (the split seed is the common ``seed``).
    """
    x, y = spiral(n_per_class, rep=1, noise=noise, seed=generator_seed)
    return _awnn_source(x, y, generator="spiral", n_per_class=n_per_class, rep=1, noise=noise,
                        generator_seed=generator_seed)


def load_spiralhard(n_per_class: int = 5000, noise: float = 0.3, generator_seed: int = 0) -> Source:
    """SpiralHard of Errica et al. 2025: the Spiral generator with 2 x 5000 points and rep = 2.

    Args:
        n_per_class: points per class.
        noise: standard deviation σ of the Gaussian noise ε.
        generator_seed: numpy seed of the point cloud (the split seed is the common ``seed``).
    """
    x, y = spiral(n_per_class, rep=2, noise=noise, seed=generator_seed)
    return _awnn_source(x, y, generator="spiralhard", n_per_class=n_per_class, rep=2, noise=noise,
                        generator_seed=generator_seed)


# ---- SENN tasks (Mitchell et al. 2023, experiment settings) ------------------------------------------------

def load_moons(seed: int = 0, n_train: int = 200, n_val: int = 200, n_test: int = 500,
               noise: float = 0.3) -> Source:
    """Two moons of SENN experiment 2 (Mitchell et al. 2023, experiment settings): sklearn ``make_moons``,
    noise 0.3.

    Each split is its own ``make_moons`` draw: train with ``seed`` (N = 200, seed 0 in the paper), test
    with ``seed + 1`` (500 points, seed 1), and -- our addition, the paper has none -- a validation set
    with ``seed + 2`` (200 points).

    Args:
        seed: seed of the training draw; test and validation use seed + 1 and seed + 2.
        n_train, n_val, n_test: points per split (classes balanced to within one point).
        noise: standard deviation of the Gaussian noise.
    """
    (x, y), (xv, yv), (xt, yt) = (make_moons(n_samples=n, noise=noise, random_state=s)
                                  for n, s in ((n_train, seed), (n_val, seed + 2), (n_test, seed + 1)))
    f32 = np.float32
    return Source(x=x.astype(f32), y=y.astype(np.int64), x_val=xv.astype(f32), y_val=yv.astype(np.int64),
                  x_test=xt.astype(f32), y_test=yt.astype(np.int64), task="classification", num_outputs=2,
                  meta={"generator": "sklearn.make_moons", "noise": noise,
                        "seeds": {"train": seed, "test": seed + 1, "val": seed + 2}})


def lecun_normal_(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """flax's default Dense kernel init: truncated N(0, 1/fan_in) on [−2σ, 2σ], variance-corrected.

    The 0.8796... factor is the standard deviation of a unit normal truncated to [−2, 2]; dividing by it
    restores variance 1/fan_in after truncation. ``w`` is (fan_in, fan_out) as in flax.
    """
    σ = math.sqrt(1.0 / w.shape[0]) / 0.87962566103423978
    return torch.nn.init.trunc_normal_(w, 0.0, σ, -2 * σ, 2 * σ, generator=generator)


def make_teacher(hidden: Sequence[int] = (16, 16, 16, 16), *, d_in: int = 1, d_out: int = 1, seed: int = 0
                 ) -> list[dict[str, torch.Tensor]]:
    """Random rational-activation MLP teacher of SENN experiment 1 (Mitchell et al. 2023, experiment 1).

    Each layer is Dense (lecun_normal kernel, bias ~ N(0, 1)) followed, on hidden layers only, by a
    per-neuron rational activation with (v, c, l) ~ N(0, 1). Parameters are float64, drawn in layer
    order (kernel, bias, v, c, l) from one torch.Generator seeded with ``seed``.

    Returns:
        one dict per layer with ``W`` (in, out), ``b`` (out,) and, for hidden layers, ``v``, ``c``, ``l``.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = [d_in, *hidden, d_out]
    layers = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = {"W": lecun_normal_(torch.empty(fan_in, fan_out, dtype=torch.float64), g),
                 "b": torch.randn(fan_out, generator=g, dtype=torch.float64)}
        if k < len(hidden):
            layer.update({p: torch.randn(fan_out, generator=g, dtype=torch.float64) for p in "vcl"})
        layers.append(layer)
    return layers


def teacher_forward(layers: list[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Evaluate a :func:`make_teacher` network on ``x`` (N, d_in); no activation after the last layer."""
    h = x.to(torch.float64)
    for layer in layers:
        h = h @ layer["W"] + layer["b"]
        if "v" in layer:
            h = rational(h, layer["v"], layer["c"], layer["l"], eps_mode="add")
    return h


def load_teacher1d(seed: int = 0, teacher_seed: int = 0, n_train: int = 50, n_val: int = 200,
                   n_test: int = 1000, hidden: Sequence[int] = (16, 16, 16, 16), noise: float = 0.0
                   ) -> Source:
    """1-D regression of SENN experiment 1 (Mitchell et al. 2023, experiment settings): y = teacher(x), x ~
    N(0, 1).

    The teacher is :func:`make_teacher` 1 → hidden → 1 seeded with ``teacher_seed``. Inputs of the
    splits are separate draws: train (N = 50) with ``seed``, test (1000) with ``seed + 1`` and -- our
    addition -- validation (200) with ``seed + 2``. Targets are noiseless unless ``noise`` > 0.

    Args:
        seed: seed of the training inputs; test and validation use seed + 1 and seed + 2.
        teacher_seed: seed of the teacher's parameters.
        n_train, n_val, n_test: points per split.
        hidden: hidden widths of the teacher.
        noise: standard deviation of Gaussian noise added to the targets (same seeded stream as x).
    """
    teacher = make_teacher(tuple(hidden), seed=teacher_seed)

    def draw(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(n, 1, generator=g, dtype=torch.float64)
        y = teacher_forward(teacher, x)
        if noise > 0:
            y = y + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
        return x.float().numpy(), y.float().numpy()

    (x, y), (xv, yv), (xt, yt) = draw(n_train, seed), draw(n_val, seed + 2), draw(n_test, seed + 1)
    return Source(x=x, y=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt, task="regression", num_outputs=1,
                  meta={"generator": "rational teacher", "hidden": list(hidden), "teacher_seed": teacher_seed,
                        "noise": noise, "seeds": {"train": seed, "test": seed + 1, "val": seed + 2}})
