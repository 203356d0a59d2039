"""Sparse-network kernels K~_{l,p} by Monte Carlo over masks, with the closed form per mask.

Spec widesparse §5.2 (paper Theorem 1). Each first-layer weight is 0 with probability 1 - p and
otherwise N(0, sigma^2) with sigma^2 = 1/p (so E[u_ij^2] = 1 at every p). The sparse analogue of
the arc-cosine kernel conditions on the mask s ~ Bernoulli(p)^d of one row:

    K~_{l,p}(x, y) = E_{w ~ spike-and-slab}[ (w.x)^l (w.y)^l H(w.x) H(w.y) ]
                   = sigma^{2l} sum_s p^{|s|} (1 - p)^{d - |s|} K_l(x_s, y_s),     x_s = x * s.

The sum has 2^d terms, so we average K_l(x_s, y_s) over sampled masks instead. Given a mask, the
Gram entries of (x_s, y_s) are s.(x*x), s.(y*y) and s.(x*y): one (masks, d) @ (d, 3 P) product gives
them for every mask and every pair at once, and the closed form of ``arccos.py`` does the rest.
Nothing loops over masks or pairs; masks are drawn in chunks only to bound memory.

Common random numbers: every pair sees the same masks. The per-pair estimates are then correlated,
so we keep the full (2P, 2P) covariance of one mask's sample [K_1 values; K_2 values]; any smooth
function of all the estimates (such as the pair-averaged distance D of Theorem 1) gets its standard
error from it by the delta method (``distance.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from widthlab.theory._random import bernoulli_mask, make_generator
from widthlab.theory.arccos import arccos_kernel_from_gram

# ~0.4% relative standard error on D at d = 784, p = 0.1, 30 pairs, in a fraction of a second.
DEFAULT_MASKS = 4096
# Masks are drawn in chunks of about this many float64 entries per (mask, d) and (mask, pair) array.
_CHUNK_ELEMENTS = 1 << 22


def check_connectivity(p: float) -> float:
    """Validate a connectivity p in (0, 1]."""
    p = float(p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"connectivity must lie in (0, 1], got {p}")
    return p


@dataclass(frozen=True)
class SparseKernelEstimate:
    """Mask Monte-Carlo estimates of K~_{1,p}(x_j, y_j) and K~_{2,p}(x_j, y_j) on P pairs.

    Attributes:
        k1: K~_{1,p} per pair, shape (P,).
        k2: K~_{2,p} per pair, shape (P,).
        cov: sample covariance of one mask's draw z = [K_1 terms (P); K_2 terms (P)], shape (2P, 2P);
            the covariance of the estimates (k1, k2) is ``cov / num_masks``. All zeros at p = 1.
        num_masks: number of masks averaged (1 at p = 1, where the single all-ones mask is exact).
        connectivity: p.
    """

    k1: Tensor
    k2: Tensor
    cov: Tensor
    num_masks: int
    connectivity: float

    @property
    def k1_se(self) -> Tensor:
        """Standard error of ``k1`` per pair, shape (P,)."""
        P = self.k1.shape[0]
        return (self.cov.diagonal()[:P] / self.num_masks).sqrt()

    @property
    def k2_se(self) -> Tensor:
        """Standard error of ``k2`` per pair, shape (P,)."""
        P = self.k1.shape[0]
        return (self.cov.diagonal()[P:] / self.num_masks).sqrt()


def masked_kernel_samples(x: Tensor, y: Tensor, masks: Tensor, p: float) -> Tensor:
    """sigma^{2l} K_l(x_s, y_s) for l = 1, 2, every mask s and every pair (Golubeva et al. 2021, Theorem 1).

    Args:
        x: inputs, shape (P, d).
        y: inputs, shape (P, d).
        masks: 0/1 masks, shape (M, d), same dtype as x.
        p: connectivity; sigma^2 = 1/p.

    Returns:
        Shape (M, 2P): columns [:P] hold sigma^2 K_1(x_s, y_s), columns [P:] sigma^4 K_2(x_s, y_s).
    """
    P = x.shape[0]
    feats = torch.cat([x * x, y * y, x * y], dim=0).T  # (d, 3P)
    gram = masks @ feats  # (M, 3P): |x_s|^2, |y_s|^2, x_s.y_s
    aa, bb, ab = gram[:, :P], gram[:, P : 2 * P], gram[:, 2 * P :]
    sigma2 = 1.0 / p
    k1 = sigma2 * arccos_kernel_from_gram(aa, bb, ab, 1)  # K_l is homogeneous: K_l(sx, sy) = s^2l K_l
    k2 = sigma2**2 * arccos_kernel_from_gram(aa, bb, ab, 2)
    return torch.cat([k1, k2], dim=1)


def sparse_kernel(
    x: Tensor,
    y: Tensor,
    connectivity: float,
    num_masks: int = DEFAULT_MASKS,
    seed: int | torch.Generator = 0,
) -> SparseKernelEstimate:
    """Estimate K~_{1,p} and K~_{2,p} on pairs (x_j, y_j) by Monte Carlo over masks (Golubeva et al. 2021,
    Theorem 1).

    Masks s ~ Bernoulli(p)^d are shared by all pairs (common random numbers). Mean and covariance
    are accumulated chunk by chunk with the pairwise update of Chan et al. (1979), which is exact
    and stable, so memory is bounded by one chunk of masks whatever ``num_masks`` is.

    Args:
        x: inputs, shape (P, d) (or (d,) for one pair); computed in float64.
        y: inputs, shape (P, d) (or (d,)).
        connectivity: p in (0, 1]. At p = 1 the one all-ones mask is exact and no sampling is done.
        num_masks: number of sampled masks M.
        seed: int seed or a torch.Generator (CPU).

    Returns:
        A :class:`SparseKernelEstimate` (k1, k2 of shape (P,), their covariance, M).
    """
    p = check_connectivity(connectivity)
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, x.shape[-1]).cpu()
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, y.shape[-1]).cpu()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    P, d = x.shape
    if p == 1.0:
        z = masked_kernel_samples(x, y, torch.ones(1, d, dtype=torch.float64), p)[0]  # (2P,)
        return SparseKernelEstimate(z[:P], z[P:], torch.zeros(2 * P, 2 * P, dtype=torch.float64), 1, p)
    if num_masks < 2:
        raise ValueError(f"need at least 2 masks for a standard error, got {num_masks}")

    gen = make_generator(seed, "masks")
    # Per mask: d mask entries, 3P Gram entries, 2P kernel values and a few (P,) temporaries.
    chunk = max(1, _CHUNK_ELEMENTS // (d + 8 * P))
    count = 0
    mean = torch.zeros(2 * P, dtype=torch.float64)  # running mean of z
    m2 = torch.zeros(2 * P, 2 * P, dtype=torch.float64)  # running sum of outer products of deviations
    for start in range(0, num_masks, chunk):
        B = min(chunk, num_masks - start)
        masks = bernoulli_mask((B, d), p, gen).to(torch.float64)  # (B, d)
        z = masked_kernel_samples(x, y, masks, p)  # (B, 2P)
        mean_b = z.mean(0)
        dev = z - mean_b
        m2_b = dev.T @ dev
        delta = mean_b - mean
        total = count + B
        mean = mean + delta * (B / total)
        m2 = m2 + m2_b + torch.outer(delta, delta) * (count * B / total)
        count = total
    cov = m2 / (count - 1)
    return SparseKernelEstimate(mean[:P], mean[P:], cov, count, p)
