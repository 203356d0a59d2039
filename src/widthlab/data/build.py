"""From a loader's arrays to a :class:`TaskData`: split, subset, standardise, flatten, attach augmentation.

Every dataset goes through this one path so that the common options (``seed``, ``val_fraction``,
``test_fraction``, ``normalize``, ``subset``, ``flatten``, ``augment``...) mean the same thing for all
of them. Loaders only read or generate arrays (a :class:`Source`); they never split or normalise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import TensorDataset

from widthlab.data.augment import CropFlip
from widthlab.data.base import Task, TaskData
from widthlab.data.splits import Standardizer, split_indices, take

# Errica et al. 2025, experimental setup: 20 % test, then 10 % of the rest for validation (5000 -> 3600 / 400
# / 1000).
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class Source:
    """Arrays as read or generated, before any split or scaling.

    Attributes:
        x: inputs (N, ...); images are (N, C, H, W), any numeric dtype.
        y: integer labels (N,) for classification, float targets (N,) or (N, k) for regression.
        task: ``"classification"`` or ``"regression"``.
        num_outputs: number of classes, or of regression targets.
        x_val, y_val: a validation set given by the source (a separate draw), else None.
        x_test, y_test: an official test set, else None (then it is carved from ``x``).
        divisor: inputs are divided by this when converted to float32 (255 for 8-bit pixels).
        meta: facts for the record (files read, generator parameters, class names...).
    """

    x: np.ndarray
    y: np.ndarray
    task: Task
    num_outputs: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    divisor: float = 1.0
    meta: dict = field(default_factory=dict)


def _inputs(x: np.ndarray, idx: np.ndarray | None, divisor: float) -> torch.Tensor:
    part = x if idx is None else x[idx]
    t = torch.from_numpy(np.ascontiguousarray(part)).to(torch.float32)
    # Division (not multiplication by 1/255) so 8-bit pixels match the usual ToTensor values bitwise.
    return t.div_(divisor) if divisor != 1.0 else t


def _targets(y: np.ndarray, idx: np.ndarray | None, task: Task) -> torch.Tensor:
    part = np.asarray(y if idx is None else y[idx])
    if task == "classification":
        return torch.from_numpy(part.astype(np.int64))
    part = part.astype(np.float32)
    return torch.from_numpy(part.reshape(len(part), -1))


def _check_labels(name: str, src: Source) -> None:
    for what, y in (("train", src.y), ("validation", src.y_val), ("test", src.y_test)):
        if y is None or src.task != "classification" or len(y) == 0:
            continue
        lo, hi = int(np.min(y)), int(np.max(y))
        if lo < 0 or hi >= src.num_outputs:
            raise ValueError(f"{name}: {what} labels span [{lo}, {hi}] but the dataset has "
                             f"{src.num_outputs} classes")


def build_task(name: str, src: Source, *, seed: int, val_fraction: float | None, test_fraction: float | None,
               normalize: str, subset: int | None = None, subset_mode: str = "stratified",
               flatten: bool = False, augment: bool = False, normalize_target: bool = False) -> TaskData:
    """Assemble the :class:`TaskData` of dataset ``name`` from its loader's :class:`Source`.

    Args:
        name: dataset name, for messages and ``TaskData.name``.
        src: the loader's arrays.
        seed: seed of the split and subset draws (stratified for classification).
        val_fraction: share of the non-test data held out for validation (None: 0.1); must be None
            when the source gives its own validation set.
        test_fraction: share of all data held out for test (None: 0.2); must be None when the source
            has an official test set.
        normalize: ``"none"``, ``"feature"``, ``"channel"`` or a preset of ``splits.PRESETS``; the
            statistics are fitted on the final training split only.
        subset: keep only this many training examples (after the split, before standardising).
        subset_mode: ``"stratified"`` (seeded random, class proportions kept) or ``"first"`` (the first
            ones in file order, as SENN's MNIST experiment, Mitchell et al. 2023, experiment settings).
        flatten: reshape inputs to vectors (after standardising, so ``"channel"`` still applies).
        augment: attach :class:`CropFlip` (pad 4); only for (3, 32, 32) images.
        normalize_target: standardise regression targets with training statistics.
    """
    if src.x_test is not None and test_fraction is not None:
        raise ValueError(f"{name}: option test_fraction does not apply: the dataset has an official test "
                         f"split")
    if src.x_val is not None and val_fraction is not None:
        raise ValueError(f"{name}: option val_fraction does not apply: the validation set is a separate "
                         f"draw (see the dataset's own size options)")
    if len(src.x) != len(src.y):
        raise ValueError(f"{name}: {len(src.x)} inputs but {len(src.y)} targets")
    _check_labels(name, src)
    classify = src.task == "classification"
    if normalize_target and classify:
        raise ValueError(f"{name}: normalize_target only applies to regression datasets")
    if augment and (tuple(src.x.shape[1:]) != (3, 32, 32) or flatten):
        what = "flattened inputs" if flatten else f"inputs of shape {tuple(src.x.shape[1:])}"
        raise ValueError(f"{name}: augment=True (32x32 random crop + flip) needs (3, 32, 32) images, "
                         f"got {what}")
    strata = np.asarray(src.y) if classify else None

    if src.x_test is None and test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    if src.x_val is None and val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    train, val, test = split_indices(len(src.x), test_fraction=test_fraction, val_fraction=val_fraction,
                                     seed=seed, y=strata)
    if subset is not None:
        if subset > len(train):
            raise ValueError(f"{name}: subset={subset} but the training split has only {len(train)} examples")
        if subset_mode == "first":
            train = train[:subset]
        else:
            # A stream of its own, so that the subset of a given split does not depend on split internals.
            train, _ = take(train, subset, np.random.default_rng([seed, 1]), strata)

    xs = {"train": _inputs(src.x, train, src.divisor)}
    ys = {"train": _targets(src.y, train, src.task)}
    own = {"val": (val, src.x_val, src.y_val), "test": (test, src.x_test, src.y_test)}
    for part, (idx, x_own, y_own) in own.items():
        if x_own is not None:
            xs[part], ys[part] = _inputs(x_own, None, src.divisor), _targets(y_own, None, src.task)
        else:
            xs[part], ys[part] = _inputs(src.x, idx, src.divisor), _targets(src.y, idx, src.task)

    scaler = Standardizer.fit(xs["train"], normalize)
    for part in xs:
        xs[part] = scaler(xs[part])
    meta = dict(src.meta)
    meta.update(seed=seed, normalize=scaler.record(),
                sizes={part: len(t) for part, t in xs.items()})
    if normalize_target:
        y_scaler = Standardizer.fit(ys["train"], "feature")
        for part in ys:
            ys[part] = y_scaler(ys[part])
        meta["target_normalize"] = y_scaler.record()
    if subset is not None:
        meta["subset"] = {"n": subset, "mode": subset_mode}

    input_shape = tuple(xs["train"].shape[1:])
    crop_flip = None
    if augment:
        # Pad with what a black pixel becomes after standardising, as RandomCrop before Normalize does
        # (averaged over the image for per-pixel "feature" statistics, which have no value off-image).
        black = scaler(torch.zeros(1, *input_shape)).mean(dim=(0, 2, 3))
        crop_flip = CropFlip(padding=4, fill=black)
        meta["augment"] = repr(crop_flip)
    if flatten:
        input_shape = (int(np.prod(input_shape)),)
        xs = {part: t.reshape(len(t), *input_shape) for part, t in xs.items()}

    def ds(part: str) -> TensorDataset:
        return TensorDataset(xs[part], ys[part])

    return TaskData(name=name, task=src.task, train=ds("train"), val=ds("val"), test=ds("test"),
                    input_shape=input_shape, num_outputs=src.num_outputs, augment=crop_flip, meta=meta)
