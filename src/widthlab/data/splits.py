"""Seeded (stratified) splits and subsets, and standardisation fitted on the training split only.

Split sizes follow Errica et al. 2025, experimental setup: the test set is ``round(test_fraction · N)`` of
the data, the validation set ``round(val_fraction · rest)`` of what remains (5000 points with 0.2 / 0.1
give the paper's 3600 / 400 / 1000). Splits of classification data are stratified: every class contributes in
proportion to its size, the rounding left-overs going to the classes with the largest remainders, so
the sizes are exact and a class is never over-drawn. Returned index arrays are sorted, so a split keeps
the order of the source file (``subset_mode="first"`` relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Fixed per-channel constants for pixels in [0, 1] (mean, std).
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Golubeva et al. 2021, App. A, Fig. 5 MLPs: the MNIST MLP inputs.
    "mnist": ((0.1307,), (0.3081,)),
    # Errica et al. 2025, experimental setup: the AWNN CIFAR pipeline (these std values are the widely
    # copied, slightly off ones).
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # Golubeva et al. 2021, App. A, ResNet-18: ResNet-18 on CIFAR-10/100 and SVHN uses the ImageNet
    # statistics.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZE_MODES = ("none", "feature", "channel", *PRESETS)


def _quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` draws over classes in proportion to ``counts`` (largest remainder, exact total)."""
    ideal = counts * (n / counts.sum())
    q = np.minimum(np.floor(ideal).astype(np.int64), counts)
    # Hand out the rounding left-overs by largest remainder; ties go to the lower class index.
    order = np.lexsort((np.arange(len(counts)), -(ideal - q)))
    for k in order:
        if q.sum() == n:
            break
        if q[k] < counts[k]:
            q[k] += 1
    return q


def take(pool: np.ndarray, n: int, rng: np.random.Generator, y: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` indices from ``pool`` at random (stratified by ``y`` when given).

    Args:
        pool: candidate indices into ``y``.
        n: how many to draw, ``0 <= n <= len(pool)``.
        rng: numpy Generator; consumed in a fixed order, so results are reproducible.
        y: integer labels of the whole data set, or None for a plain random draw (regression).

    Returns:
        ``(taken, rest)``: two sorted, disjoint index arrays whose union is ``pool``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if not 0 <= n <= len(pool):
        raise ValueError(f"cannot draw {n} examples from {len(pool)}")
    if y is None:
        chosen = rng.permutation(len(pool))[:n]
    else:
        labels = y[pool]
        classes, counts = np.unique(labels, return_counts=True)
        per_class = _quotas(counts, n)
        chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:m]
                                 for c, m in zip(classes, per_class)] or [np.zeros(0, np.int64)])
    mask = np.zeros(len(pool), dtype=bool)
    mask[chosen] = True
    return np.sort(pool[mask]), np.sort(pool[~mask])


def split_indices(n: int, *, test_fraction: float | None, val_fraction: float | None, seed: int,
                  y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train / validation / test indices of ``n`` examples (Errica et al. 2025, experimental protocol).

    Args:
        n: number of examples.
        test_fraction: share of all ``n`` held out for test; None or 0 gives an empty test split.
        val_fraction: share of what is left after the test split; None or 0 gives no validation.
        seed: seed of the numpy Generator drawing the splits.
        y: integer labels for a stratified split, or None (regression) for a plain random one.

    Returns:
        ``(train, val, test)`` sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    everything = np.arange(n, dtype=np.int64)
    test, rest = take(everything, round(n * (test_fraction or 0.0)), rng, y)
    val, train = take(rest, round(len(rest) * (val_fraction or 0.0)), rng, y)
    if len(train) == 0:
        raise ValueError(f"test_fraction={test_fraction} and val_fraction={val_fraction} leave no "
                         f"training example out of {n}")
    return train, val, test


@dataclass
class Standardizer:
    """``x -> (x - mean) / std`` with statistics fitted on training inputs only.

    Attributes:
        mode: one of ``NORMALIZE_MODES``.
        mean, std: tensors broadcastable against one input (``(C, 1, 1)`` per channel, the input's
            shape per feature); None for ``"none"``.
    """

    mode: str
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @classmethod
    def fit(cls, x: torch.Tensor, mode: str) -> Standardizer:
        """Fit on the training inputs ``x`` (N, ...).

        ``"feature"`` standardises every input coordinate (pixel-wise for images, as in
        Golubeva et al. 2021, App. A, Fig. 5 MLPs); ``"channel"`` every image channel over all its pixels; a
        preset name
        applies that preset's fixed constants. A zero standard deviation (a constant coordinate, e.g.
        MNIST's border pixels) is replaced by 1, so that coordinate is only centred. Statistics are
        population ones (divide by N).
        """
        if mode == "none":
            return cls(mode)
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}; got {mode!r}")
        if mode != "feature" and x.dim() != 4:
            raise ValueError(f"normalize={mode!r} needs images (N, C, H, W), got inputs of shape "
                             f"{tuple(x.shape[1:])}; use 'feature' or 'none'")
        if mode in PRESETS:
            m, s = PRESETS[mode]
            if len(m) != x.shape[1]:
                raise ValueError(f"normalize={mode!r} is for {len(m)}-channel images, got "
                                 f"{x.shape[1]} channels")
            return cls(mode, torch.tensor(m, dtype=x.dtype).view(-1, 1, 1),
                       torch.tensor(s, dtype=x.dtype).view(-1, 1, 1))
        if mode == "feature":
            var, mean = torch.var_mean(x, dim=0, correction=0)
        else:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
            var, mean = var[0], mean[0]  # (C, 1, 1)
        std = var.sqrt()
        # "Constant" is judged relative to the float32 rounding of the mean: a constant column of 0.3
        # can come out with std ~1e-8 instead of 0, and dividing by that would only amplify rounding.
        constant = std <= 1e-6 * mean.abs().clamp_min(1.0)
        return cls(mode, mean, torch.where(constant, torch.ones_like(std), std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise ``x`` in place (it is a freshly converted float copy) and return it."""
        if self.mean is None:
            return x
        return x.sub_(self.mean).div_(self.std)

    def record(self, limit: int = 64) -> dict:
        """A JSON-friendly description for ``TaskData.meta`` (constants listed when small)."""
        out: dict = {"mode": self.mode}
        if self.mean is not None:
            out["shape"] = list(self.mean.shape)
            if self.mean.numel() <= limit:
                out["mean"] = self.mean.flatten().tolist()
                out["std"] = self.std.flatten().tolist()
        return out
