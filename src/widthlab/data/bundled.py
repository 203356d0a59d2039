"""Small real datasets shipped inside scikit-learn: no network, no user files.

Only the ``load_*`` functions are used; they read files bundled with scikit-learn. The ``fetch_*``
functions download and must never be called here.
"""

from __future__ import annotations

import numpy as np
from sklearn import datasets as skd

from widthlab.data.build import Source


def _classification(bunch, **meta) -> Source:
    y = bunch.target.astype(np.int64)
    names = [str(n) for n in getattr(bunch, "target_names", [])]
    return Source(x=bunch.data.astype(np.float32), y=y, task="classification", num_outputs=int(y.max()) + 1,
                  meta={"source": "scikit-learn bundled", "class_names": names, **meta})


def load_digits(as_image: bool = False) -> Source:
    """8x8 handwritten digits, 1797 x 64 pixel values in 0..16, 10 classes.

    Args:
        as_image: give inputs of shape (1, 8, 8) instead of 64 features.
    """
    src = _classification(skd.load_digits())
    if as_image:
        src.x = src.x.reshape(-1, 1, 8, 8)
    return src


def load_breast_cancer() -> Source:
    """Wisconsin breast cancer: 569 x 30 features, 2 classes."""
    return _classification(skd.load_breast_cancer())


def load_wine() -> Source:
    """Wine recognition: 178 x 13 features, 3 classes."""
    return _classification(skd.load_wine())


def load_iris() -> Source:
    """Iris: 150 x 4 features, 3 classes."""
    return _classification(skd.load_iris())


def load_diabetes() -> Source:
    """Diabetes progression: 442 x 10 features (already centred and scaled by scikit-learn), regression.

    Targets are one year disease progression (25 to 346), as (N, 1) float32; pass
    ``normalize_target=True`` to standardise them with training statistics.
    """
    b = skd.load_diabetes()
    return Source(x=b.data.astype(np.float32), y=b.target.astype(np.float32).reshape(-1, 1),
                  task="regression", num_outputs=1, meta={"source": "scikit-learn bundled"})
