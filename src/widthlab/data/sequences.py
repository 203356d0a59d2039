"""Sequences from images: an image read row by row, optionally with a fixed pixel permutation.

PMNIST (Errica et al. 2025, architectures and experiments) feeds an RNN the 28 rows of a 28 x 28 MNIST image
as a 28-step
sequence of 28-dim vectors, after permuting the 784 pixels with one fixed permutation (numpy seed 42)
shared by every image -- so each "row" mixes pixels from all over the image and the task needs memory.
``digits_seq`` does the same with scikit-learn's bundled 8 x 8 digits (8 steps of 8), for tests and
quick studies without any file.

Inputs come out as (N, T, F) float32 in [0, 1] (pixels / 255, digits / 16).
"""

from __future__ import annotations

import numpy as np
from sklearn import datasets as skd

from widthlab.data.build import Source
from widthlab.data.readers import idx


def permutation(n_pixels: int, seed: int = 42) -> np.ndarray:
    """The fixed pixel permutation: ``np.random.RandomState(seed).permutation(n_pixels)``."""
    return np.random.RandomState(seed).permutation(n_pixels)


def rows_as_sequence(images: np.ndarray, *, permute: bool, perm_seed: int = 42) -> np.ndarray:
    """(N, [1,] H, W) images -> (N, H, W) sequences of H steps of W features.

    With ``permute`` the H*W pixels of every image are first reordered by the same
    :func:`permutation`, then cut into H consecutive chunks of W.
    """
    x = images.reshape(len(images), -1)
    h, w = images.shape[-2:]
    if permute:
        x = x[:, permutation(h * w, perm_seed)]
    return np.ascontiguousarray(x.reshape(len(images), h, w))


def load_pmnist(path: str, permute: bool = True, perm_seed: int = 42) -> Source:
    """Permuted (or, with ``permute=False``, row-by-row sequential) MNIST from the user's IDX files.

    Args:
        path: folder with the four MNIST IDX files (raw or .gz), as for the ``mnist`` dataset.
        permute: apply the fixed pixel permutation (PMNIST); False reads plain rows.
        perm_seed: numpy seed of the permutation (42 in the paper's code).
    """
    src = idx.load_mnist(path)
    src.x = rows_as_sequence(src.x, permute=permute, perm_seed=perm_seed)
    if src.x_test is not None:
        src.x_test = rows_as_sequence(src.x_test, permute=permute, perm_seed=perm_seed)
    src.meta.update(sequence="rows", permute=permute, perm_seed=perm_seed)
    return src


def load_digits_seq(permute: bool = False, perm_seed: int = 42) -> Source:
    """scikit-learn's 8 x 8 digits as 8-step sequences of 8 features (values / 16), 10 classes.

    Args:
        permute: apply a fixed pixel permutation first (a small PMNIST).
        perm_seed: numpy seed of the permutation.
    """
    b = skd.load_digits()
    x = rows_as_sequence(b.images.astype(np.float32), permute=permute, perm_seed=perm_seed)
    return Source(x=x, y=b.target.astype(np.int64), task="classification", num_outputs=10, divisor=16.0,
                  meta={"source": "scikit-learn bundled digits", "sequence": "rows", "permute": permute,
                        "perm_seed": perm_seed})
