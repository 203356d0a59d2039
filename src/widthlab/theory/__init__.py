"""GP-kernel theory of wide sparse networks (Golubeva et al. 2021, §3, Theorem 1).

Pure functions over float64 tensors, one concept per module:

* ``arccos``: dense arc-cosine kernels K_l and J_l in closed form, Theta_inf = K_1/d.
* ``sparse_kernel``: the sparse kernels K~_{l,p} by Monte Carlo over masks, closed form per mask.
* ``distance``: Theorem 1's D = bias^2 + variance/n, and an independent network Monte Carlo.
* ``approximations``: the paper's eq. (4), p*, the diagonal case and the variance-only formula
  (approximations only; eq. (4)'s bias term is not confirmed by our numerical checks).
* ``empirical``: Theta of an actual model instance and its distance to Theta_inf on real inputs.
* ``pairs``: the input pairs everything is evaluated on; ``report``: the ``widthlab kernel`` summary.
"""

from widthlab.theory.approximations import (
    diagonal_distance_approx,
    eq4_distance,
    eq4_integer_minimiser,
    p_star,
    variance_only_distance,
)
from widthlab.theory.arccos import arccos_j, arccos_kernel, arccos_kernel_from_gram, infinite_width_theta
from widthlab.theory.distance import (
    KernelDistance,
    NetworkDistance,
    diagonal_distance,
    network_distance_mc,
    sample_sparse_weights,
    theorem1_distance,
)
from widthlab.theory.empirical import (
    EmpiricalDistance,
    empirical_distance_on_pairs,
    empirical_kernel_distance,
    empirical_theta,
    last_layer_kernel,
)
from widthlab.theory.pairs import sample_pairs
from widthlab.theory.report import format_kernel_summary, kernel_distance_summary
from widthlab.theory.sparse_kernel import SparseKernelEstimate, sparse_kernel

__all__ = [
    "EmpiricalDistance",
    "KernelDistance",
    "NetworkDistance",
    "SparseKernelEstimate",
    "arccos_j",
    "arccos_kernel",
    "arccos_kernel_from_gram",
    "diagonal_distance",
    "diagonal_distance_approx",
    "empirical_distance_on_pairs",
    "empirical_kernel_distance",
    "empirical_theta",
    "eq4_distance",
    "eq4_integer_minimiser",
    "format_kernel_summary",
    "infinite_width_theta",
    "kernel_distance_summary",
    "last_layer_kernel",
    "network_distance_mc",
    "p_star",
    "sample_pairs",
    "sample_sparse_weights",
    "sparse_kernel",
    "theorem1_distance",
    "variance_only_distance",
]
