"""APPROXIMATIONS to the Theorem 1 distance D, for isotropic Gaussian inputs. Not exact results.

Use ``distance.theorem1_distance`` (exact up to Monte-Carlo error) for any number that matters.
Everything here assumes x, y with i.i.d. N(0, 1) entries and dp >> 1 (Golubeva et al. 2021, App. F.1; our
numerical checks);
every function works elementwise on Python floats or tensors.

* :func:`eq4_distance`: the paper's eq. (4), App. F.1. **Its bias term is not confirmed** (our numerical
checks):
  averaging over masks keeps the linear term in x.y of the dense kernel (E_s[x_s.y_s] = p x.y), so
  the +-1/sqrt(dp) term the paper keeps from one "typical" mask cancels, and the measured bias
  term is 1e-7 to 1e-5 where eq. (4) predicts ~1e-3 at d = 784. Eq. (4) overestimates D for
  p <~ 0.1 (e.g. n = 512, np = 8: 4.3e-3 against the exact 5.7e-4) and puts its minimum over
  width at the wrong place. It is kept to reproduce the paper's statements, not to predict D.
* :func:`p_star` and :func:`eq4_integer_minimiser`: the optimum of eq. (4) at a fixed budget
  N = n p (paper; p* = 0.0505, n* ~ 158 and integer minimiser n = 170 at N = 8, d = 784). They
  inherit eq. (4)'s unconfirmed bias term: p* is the paper's statement, not a consequence of
  Theorem 1 for isotropic inputs (our numerical checks).
* :func:`diagonal_distance_approx`: the paper's x = y case, (1/n)(5/4 + 3/(dp)). The exact
  value is ``distance.diagonal_distance``; for Gaussian x it averages to
  (1/n)[(5/4)(1 + 2/d) + (9/2)(1 - p)/(dp)], so the approximation is good while dp >> 1.
* :func:`variance_only_distance`: our approximation (our numerical checks), the variance term alone,
  (1/4n)[(1 - 1/pi^2) + 3(1 - p)/(dp)]; it matched the exact D within about 3% for dp >~ 3.
"""

from __future__ import annotations

import math

import torch

_C = 1.0 - 1.0 / math.pi**2  # (1 - 1/pi^2): variance of the dense last-layer kernel, in units of 1/(4n)


def eq4_distance(d, width, connectivity):
    """APPROXIMATION, paper eq. (4): D ~ (1/4d) [ (1/4)(p^{-1/2} - 1)^2 + (d/n)(1 - 1/pi^2) ].

    Bias term not confirmed by Theorem 1 (module docstring, our numerical checks).

    Args:
        d: input dimension.
        width: n.
        connectivity: p.

    Returns:
        The eq. (4) value, float or tensor.
    """
    return (0.25 * (connectivity**-0.5 - 1.0) ** 2 + (d / width) * _C) / (4.0 * d)


def diagonal_distance_approx(d, width, connectivity):
    """APPROXIMATION, paper App. F.1 diagonal case: D(x, x) ~ (1/n)(5/4 + 3/(dp)).

    Args:
        d: input dimension.
        width: n.
        connectivity: p.

    Returns:
        The approximate D(x, x), float or tensor.
    """
    return (1.25 + 3.0 / (d * connectivity)) / width


def variance_only_distance(d, width, connectivity):
    """APPROXIMATION (ours): D ~ (1/4n) [ (1 - 1/pi^2) + 3(1 - p)/(dp) ].

    Drops the bias term of Theorem 1 (measured 1e-7 to 1e-5 at d = 784) and expands the variance
    term for Gaussian inputs; within ~3-5% of the exact D for dp >~ 3. At p = 1 it is the exact
    dense limit (1 - 1/pi^2)/(4n) up to O(1/d).

    Args:
        d: input dimension.
        width: n.
        connectivity: p.

    Returns:
        The approximate D, float or tensor.
    """
    return (_C + 3.0 * (1.0 - connectivity) / (d * connectivity)) / (4.0 * width)


def p_star(d, budget):
    """APPROXIMATION, the paper's optimal connectivity at fixed N = n p: p* = sqrt(N / (4d)).

    From minimising (1/4)(p^{-1/2} - 1)^2 + (d/N) p, i.e. eq. (4) at n = N/p, with the factor
    (1 - 1/pi^2) dropped and sqrt(p) << 1 (paper App. F.1). N = 8, d = 784 gives 0.0505. A
    connectivity is at most 1, so p* is clipped there: sqrt(N/(4d)) >= 1 (N >= 4d, where the
    sqrt(p) << 1 assumption has failed anyway) gives the dense network, n* = N.

    Args:
        d: input dimension.
        budget: N = n p, nonzero first-layer weights per input unit.

    Returns:
        p* in (0, 1], float or tensor. The width is n* = N / p*.
    """
    p = (budget / (4.0 * d)) ** 0.5
    return p.clamp(max=1.0) if isinstance(p, torch.Tensor) else min(1.0, p)


def eq4_integer_minimiser(d: int, budget: float, n_max: int | None = None) -> int:
    """APPROXIMATION, the integer width minimising eq. (4) at fixed N = n p (Golubeva et al. 2021, App. F.1).

    Scans n = ceil(N), ..., n_max with p = N/n. The default n_max = floor(N d) keeps dp >= 1,
    i.e. at least one expected connection per hidden unit. N = 8, d = 784 gives n = 170 (p = 0.047).

    Args:
        d: input dimension.
        budget: N = n p.
        n_max: largest width scanned.

    Returns:
        The minimising width n.
    """
    n_lo = max(1, math.ceil(budget))
    n_hi = math.floor(budget * d) if n_max is None else int(n_max)
    if n_hi < n_lo:
        raise ValueError(f"empty width range [{n_lo}, {n_hi}] for budget N = {budget}")
    n = torch.arange(n_lo, n_hi + 1, dtype=torch.float64)
    return int(n[torch.argmin(eq4_distance(d, n, budget / n))].item())
