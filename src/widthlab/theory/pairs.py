"""Input pairs (x_j, y_j) on which kernels and kernel distances are evaluated.

Two sources (Golubeva et al. 2021, App. F.1; App. A, Fig. 8):

* Gaussian (default): x and y independent N(0, I_d), the isotropic setting of the paper's App. F
  and of our numerical checks
* Real inputs X of shape (N, ...): each example is flattened to d features, and each pair is an
  ordered pair (i, j) with i != j drawn uniformly among the N (N - 1) such pairs, independently for
  each of the P pairs (so the same pair may repeat; for N >> sqrt(P) repeats are rare). The paper's
  Fig. 8 protocol does not say how it drew pairs (Golubeva et al. 2021, App. A, Fig. 8); excluding x = y
  keeps the
  diagonal, whose distance is ~10x larger (Golubeva et al. 2021, App. F.1), from leaking into an off-diagonal
  average.
  Inputs are used as given: standardise them first where the protocol does (Golubeva et al. 2021, App. A,
  Fig. 8, per pixel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from widthlab.theory._random import make_generator


def sample_pairs(
    num_pairs: int,
    d: int | None = None,
    inputs: Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> tuple[Tensor, Tensor]:
    """Draw P input pairs, Gaussian or from real inputs (module docstring gives the law).

    Args:
        num_pairs: P.
        d: input dimension for Gaussian pairs; with ``inputs`` it is optional and must match.
        inputs: real inputs, shape (N, ...) with N >= 2, flattened to (N, d).
        seed: int seed or a torch.Generator (CPU).

    Returns:
        (x, y), each float64 of shape (P, d).
    """
    if num_pairs < 1:
        raise ValueError(f"need at least one pair, got {num_pairs}")
    gen = make_generator(seed, "pairs")
    if inputs is None:
        if d is None or d < 1:
            raise ValueError("Gaussian pairs need an input dimension d >= 1")
        z = torch.randn(2, num_pairs, d, generator=gen, dtype=torch.float64)
        return z[0], z[1]
    X = torch.as_tensor(inputs).detach().cpu().to(torch.float64)
    X = X.reshape(X.shape[0], -1)  # (N, d)
    N = X.shape[0]
    if N < 2:
        raise ValueError("need at least two inputs to form a pair with i != j")
    if d is not None and d != X.shape[1]:
        raise ValueError(f"inputs have {X.shape[1]} features but d = {d}")
    i = torch.randint(0, N, (num_pairs,), generator=gen)
    # j uniform on the N - 1 indices other than i: draw from N - 1 slots and skip over i.
    j = torch.randint(0, N - 1, (num_pairs,), generator=gen)
    j = j + (j >= i).long()
    return X[i], X[j]
