"""Theorem 1: the exact mean squared distance of a sparse network's kernel to the dense limit.

Spec widesparse §5.2 (paper §3, Theorem 1). For f(x) = (n d)^{-1/2} v^T [u x]_+ with first-layer
weights 0 w.p. 1 - p and N(0, 1/p) otherwise, the n rows of u are i.i.d., so Theta (``empirical.py``)
is a mean of n i.i.d. terms with E[Theta] = K~_{1,p}/d and Var Theta = (K~_{2,p} - K~_{1,p}^2)/(d^2 n).
With Theta_inf = K_1(x, y)/d, the bias-variance split is

    D(x, y) := E[(Theta - Theta_inf)^2] = (K~_{1,p} - K_1)^2 / d^2  +  (K~_{2,p} - K~_{1,p}^2) / (d^2 n)
                                        =           bias^2             +         variance term.

Two independent estimators of the pair average D = (1/P) sum_j D(x_j, y_j):

* :func:`theorem1_distance` evaluates the formula with K~ estimated by Monte Carlo over masks
  (``sparse_kernel.py``) and K_1 in closed form. Both squared means in it are biased upward by
  (per-mask variance)/M: E[(k - c)^2] = (K~ - c)^2 + Var/M and E[k^2] = K~^2 + Var/M. By default we
  subtract that term (``debias=True``), which makes both terms unbiased; it matters for the bias
  term, whose true size (1e-7 to 1e-5 at d = 784, our numerical checks) is comparable to Var/M. A debiased
  bias term can come out slightly negative when the true one is below MC resolution.
  Standard errors: the estimate is a quadratic function q(k1, k2) of the pair-wise mask means,
  whose covariance C = cov / M is known (masks are shared by the pairs of a block). For a Gaussian
  mean vector (central limit theorem over M masks) Var q = g^T C g + 2 tr((A C)^2) exactly, with g
  the gradient at the true mean and A the quadratic part; ``_quadratic_var`` estimates it without
  bias from the gradient at the estimate. Unlike the first-order delta method alone, this stays
  honest when the bias term is near zero, where g vanishes. Blocks of pairs use independent
  masks, so their variances add.
* :func:`network_distance_mc` samples whole sparse networks, computes Theta from the gradient with
  respect to the last layer, and averages (Theta - Theta_inf)^2 over networks and pairs; its
  standard error is the spread over networks. It checks the theorem rather than using it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from widthlab.theory._random import bernoulli_mask, make_generator
from widthlab.theory.arccos import arccos_kernel, infinite_width_theta
from widthlab.theory.empirical import last_layer_kernel
from widthlab.theory.sparse_kernel import DEFAULT_MASKS, check_connectivity, sparse_kernel

DEFAULT_NETWORKS = 400
_PAIR_BLOCK = 512  # pairs sharing one set of masks; bounds the (2P, 2P) mask covariance to 8 MiB
_CHUNK_ELEMENTS = 1 << 22  # weights per chunk of sampled networks (32 MiB in float64)


@dataclass(frozen=True)
class KernelDistance:
    """Theorem 1 distance averaged over P pairs, with Monte-Carlo standard errors.

    Attributes:
        D: bias_sq + variance_term.
        D_se: standard error of D.
        bias_sq: (1/P) sum_j (K~_{1,p} - K_1)^2 / d^2.
        bias_sq_se: its standard error.
        variance_term: (1/P) sum_j (K~_{2,p} - K~_{1,p}^2) / (d^2 n).
        variance_term_se: its standard error.
        per_pair: D(x_j, y_j), shape (P,).
        width: n.
        connectivity: p.
        num_masks: masks averaged per pair (1 at p = 1, where the result is exact).
    """

    D: float
    D_se: float
    bias_sq: float
    bias_sq_se: float
    variance_term: float
    variance_term_se: float
    per_pair: Tensor
    width: int
    connectivity: float
    num_masks: int

    @property
    def pairs_se(self) -> float:
        """Standard error of D as an estimate of its mean over the input law the pairs were drawn
        from: the spread of ``per_pair`` over the P pairs (it includes the mask noise)."""
        P = self.per_pair.shape[0]
        return (self.per_pair.std() / P**0.5).item() if P > 1 else float("nan")


def _quadratic_var(g: Tensor, A_diag: Tensor, C: Tensor) -> Tensor:
    """Variance of q(z) = z^T A z + b^T z at a Gaussian estimate z ~ N(mu, C), A diagonal.

    Var q = g(mu)^T C g(mu) + 2 tr((A C)^2) with g = 2 A z + b. Only g(z) at the estimate is known,
    and E[g(z)^T C g(z)] = g(mu)^T C g(mu) + 4 tr((A C)^2), so we use g(z)^T C g(z) - 2 tr((A C)^2),
    floored at 2 tr((A C)^2), the variance when g(mu) = 0. Without the correction the SE of a
    near-zero bias term comes out about twice too large.
    """
    AC = A_diag[:, None] * C
    quad = 2.0 * (AC * AC.T).sum()
    return torch.maximum(g @ C @ g - quad, quad).clamp_min(0.0)


def _theorem1_block(x, y, n, p, num_masks, gen, debias):
    """Per-pair bias and variance terms on one block of pairs, and the variances of their block
    sums (bias, variance term, D), from one set of masks shared by the block."""
    P, d = x.shape
    est = sparse_kernel(x, y, p, num_masks=num_masks, seed=gen)
    K1 = arccos_kernel(x, y, 1)  # (P,) dense closed form
    C = est.cov / est.num_masks  # (2P, 2P) covariance of the mask means (k1, k2)
    v1 = C.diagonal()[:P] if debias else torch.zeros(P, dtype=torch.float64)  # Var(k1_j)

    bias_j = ((est.k1 - K1) ** 2 - v1) / d**2  # (P,)
    var_j = (est.k2 - est.k1**2 + v1) / (d**2 * n)  # (P,)

    # Gradients and quadratic parts of the block sums as functions of z = (k1, k2) in R^{2P}.
    zeros = torch.zeros(P, dtype=torch.float64)
    ones = torch.ones(P, dtype=torch.float64)
    g_bias = torch.cat([2.0 * (est.k1 - K1), zeros]) / d**2
    A_bias = torch.cat([ones, zeros]) / d**2
    g_var = torch.cat([-2.0 * est.k1, ones]) / (d**2 * n)
    A_var = torch.cat([-ones, zeros]) / (d**2 * n)
    sum_vars = torch.stack([
        _quadratic_var(g_bias, A_bias, C),
        _quadratic_var(g_var, A_var, C),
        _quadratic_var(g_bias + g_var, A_bias + A_var, C),
    ])
    return bias_j, var_j, sum_vars, est.num_masks


def theorem1_distance(
    x: Tensor,
    y: Tensor,
    width: int,
    connectivity: float,
    num_masks: int = DEFAULT_MASKS,
    seed: int | torch.Generator = 0,
    debias: bool = True,
) -> KernelDistance:
    """Exact distance of Theorem 1, D = bias^2 + variance/n, averaged over pairs (Golubeva et al. 2021,
    Theorem 1).

    Pairs are processed in blocks of up to 512; each block shares one set of masks, and blocks use
    independent masks, so their errors add in quadrature. This bounds memory (the per-block mask
    covariance is (2P, 2P)) for the 10^4 pairs of the Fig. 8 protocol (Golubeva et al. 2021, App. A, Fig. 8).

    Args:
        x: inputs, shape (P, d).
        y: inputs, shape (P, d).
        width: n, the number of hidden units.
        connectivity: p in (0, 1].
        num_masks: masks M for the estimate of K~_{l,p} (per block of pairs).
        seed: int seed or torch.Generator for the masks.
        debias: subtract the Var/M upward bias of the squared MC means (module docstring).

    Returns:
        A :class:`KernelDistance`.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    p = check_connectivity(connectivity)
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, x.shape[-1])
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, y.shape[-1])
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    P = x.shape[0]
    n = int(width)
    gen = make_generator(seed, "masks")
    blocks = [_theorem1_block(x[i : i + _PAIR_BLOCK], y[i : i + _PAIR_BLOCK], n, p, num_masks, gen, debias)
              for i in range(0, P, _PAIR_BLOCK)]
    bias_j = torch.cat([b[0] for b in blocks])  # (P,)
    var_j = torch.cat([b[1] for b in blocks])  # (P,)
    se = (sum(b[2] for b in blocks) / P**2).sqrt()  # (3,): SEs of the means over pairs
    per_pair = bias_j + var_j
    return KernelDistance(
        D=per_pair.mean().item(),
        D_se=se[2].item(),
        bias_sq=bias_j.mean().item(),
        bias_sq_se=se[0].item(),
        variance_term=var_j.mean().item(),
        variance_term_se=se[1].item(),
        per_pair=per_pair,
        width=n,
        connectivity=p,
        num_masks=blocks[0][3],
    )


def diagonal_distance(x: Tensor, width: int, connectivity: float) -> Tensor:
    """Exact D(x, x) of Theorem 1 in closed form: the special case y = x (Golubeva et al. 2021, Theorem 1;
    App. F.1).

    On the diagonal K_l(x_s, x_s) is a function of |x_s|^2 only (K_1 = |x_s|^2/2, K_2 = 3|x_s|^4/2),
    and the mask moments are E_s|x_s|^2 = p|x|^2, E_s|x_s|^4 = p^2|x|^4 + p(1 - p) sum_i x_i^4. So
    K~_{1,p} = |x|^2/2 = K_1 (no bias) and K~_{2,p} = (3/2)[|x|^4 + ((1 - p)/p) sum_i x_i^4]:

        D(x, x) = [ (5/4)|x|^4 + (3/2)((1 - p)/p) sum_i x_i^4 ] / (d^2 n).

    Compare the paper's approximation (1/n)(5/4 + 3/(dp)) in ``approximations.py``.

    Args:
        x: inputs, shape (..., d).
        width: n.
        connectivity: p in (0, 1].

    Returns:
        D(x, x), shape (...).
    """
    p = check_connectivity(connectivity)
    x = torch.as_tensor(x, dtype=torch.float64)
    d = x.shape[-1]
    x2 = x * x
    return (1.25 * x2.sum(-1) ** 2 + 1.5 * (1.0 - p) / p * (x2 * x2).sum(-1)) / (d**2 * width)


@dataclass(frozen=True)
class NetworkDistance:
    """Network Monte-Carlo estimate of D averaged over P pairs.

    Attributes:
        D: mean over networks and pairs of (Theta - Theta_inf)^2.
        D_se: standard error over networks.
        per_pair: mean over networks of (Theta - Theta_inf)^2 per pair, shape (P,).
        width: n.
        connectivity: p.
        num_networks: number of sampled networks.
    """

    D: float
    D_se: float
    per_pair: Tensor
    width: int
    connectivity: float
    num_networks: int


def sample_sparse_weights(
    num_networks: int, width: int, d: int, connectivity: float, generator: torch.Generator
) -> Tensor:
    """First-layer weights u of Theorem 1: entries Bernoulli(p) * N(0, 1/p), shape (B, n, d), float64.

    The normals are drawn in float32 (about 4x faster than float64 normals on CPU) and then cast; the
    24-bit quantisation of a normal sample is immaterial next to the Monte-Carlo error. The mask is
    not: its uniforms are float64 (``_random.bernoulli_mask``), so P(keep) = p also at tiny p. All
    arithmetic is float64.
    """
    p = check_connectivity(connectivity)
    g = torch.randn(num_networks, width, d, generator=generator).to(torch.float64)
    if p == 1.0:
        return g
    keep = bernoulli_mask((num_networks, width, d), p, generator)  # exact p, also at tiny p
    return g.mul_(keep).mul_(p**-0.5)


def network_distance_mc(
    x: Tensor,
    y: Tensor,
    width: int,
    connectivity: float,
    num_networks: int = DEFAULT_NETWORKS,
    seed: int | torch.Generator = 0,
) -> NetworkDistance:
    """D by sampling whole sparse networks (Golubeva et al. 2021, Theorem 1, "sample whole networks and
    average").

    Each network draws u (n, d) with entries Bernoulli(p) * N(0, 1/p); Theta is its last-layer
    gradient kernel (``empirical.last_layer_kernel``) and Theta_inf = K_1/d the closed form. Networks
    are drawn in chunks to bound memory; within a chunk everything is batched.

    Args:
        x: inputs, shape (P, d).
        y: inputs, shape (P, d).
        width: n.
        connectivity: p in (0, 1].
        num_networks: number of networks B (>= 2).
        seed: int seed or torch.Generator.

    Returns:
        A :class:`NetworkDistance`.
    """
    if num_networks < 2:
        raise ValueError(f"need at least 2 networks for a standard error, got {num_networks}")
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, x.shape[-1])
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, y.shape[-1])
    P, d = x.shape
    gen = make_generator(seed, "networks")
    theta_inf = infinite_width_theta(x, y)  # (P,)
    chunk = max(1, _CHUNK_ELEMENTS // (width * d))
    sq = []
    for start in range(0, num_networks, chunk):
        u = sample_sparse_weights(min(chunk, num_networks - start), width, d, connectivity, gen)
        sq.append((last_layer_kernel(u, x, y) - theta_inf) ** 2)  # (B, P)
    sq = torch.cat(sq)  # (num_networks, P)
    per_net = sq.mean(1)
    return NetworkDistance(
        D=per_net.mean().item(),
        D_se=(per_net.std() / num_networks**0.5).item(),
        per_pair=sq.mean(0),
        width=int(width),
        connectivity=float(connectivity),
        num_networks=num_networks,
    )
