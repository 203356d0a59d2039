"""Adaptive width: layers that learn their width by backpropagation (Errica et al. 2025).

Modules, one concept each: ``distributions`` (importance families, D(lam)), ``layer`` (rescaling by p,
adaptive sites), ``mlp`` (adaptive MLP, Kaiming+, dense export), ``resnet``, ``rnn``, ``gin``,
``transformer`` (the other architectures of §4), ``loss`` (ELBO prior terms), ``resizing`` (grow/shrink
through the core width surgery), ``callback`` (per-step width updates, annealing), ``truncation``
(post-training truncation, curves, export) and ``plan`` (the study-file builder).
"""

from widthlab.methods.adaptive.callback import AdaptiveWidthCallback, LinearAnneal
from widthlab.methods.adaptive.distributions import (
    Exponential,
    PowerLaw,
    Sigmoid,
    Uniform,
    exponential_width,
    make_distribution,
    softplus_inv,
)
from widthlab.methods.adaptive.layer import (
    AdaptiveScale,
    AdaptiveSite,
    collect_sites,
    share_width_distribution,
)
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig, adaptive_mlp

__all__ = [
    "AdaptiveMLP",
    "AdaptiveMLPConfig",
    "AdaptiveScale",
    "AdaptiveSite",
    "AdaptiveWidthCallback",
    "ElboPrior",
    "Exponential",
    "LinearAnneal",
    "PowerLaw",
    "Sigmoid",
    "Uniform",
    "adaptive_mlp",
    "collect_sites",
    "exponential_width",
    "make_distribution",
    "share_width_distribution",
    "softplus_inv",
]
