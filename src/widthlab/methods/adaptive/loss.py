"""The ELBO-derived loss of adaptive-width networks (Errica et al. 2025, the ELBO as optimised by the
official code).

With the first-order approximation E_q[g(lam, theta)] ≈ g(nu, rho) the ELBO becomes MAP with Gaussian
priors; per batch of size M out of N observations the official code minimises::

    L = data_loss_mean(batch)
        + (1/N) [ sum_{theta} theta^2 / (2 sigma_theta^2)
                  + 1_prior sum_l ( ln sigma_lam + (lam_l - mu_lam)^2 / (2 sigma_lam^2) ) ]

* data loss: cross-entropy (classification) or 1/2 ||o - y||^2 summed over outputs (regression, the
  trainer's ``half_sse``), averaged over the batch -- the trainer computes it;
* the theta prior covers *every* parameter of the network (output layer, biases, convolutions,
  attention) except the distributions' own parameters (lam's r): §9 test 3 sums 13.15 without r. It
  is the one prior a fixed network can share (a Gaussian weight prior, i.e. L2);
* the lam prior acts on the post-softplus rate, drops the constant 1/2 ln 2 pi, and is off when
  sigma_lam is None (a flat prior; most of the paper's configs). For the other learnable families it
  acts on their own width parameter (power law: gamma; sigmoid: the location b), in its units; the
  uniform control learns nothing and refuses it;
* N (``n_observations``) scales the priors against the per-example data term.

Where online compression stops (Errica et al. 2025, §5): under Adam the lam prior sets the direction of
r, not its step, so lam moves until the data term's d CE / d lam balances the prior's pull
(mu - lam) / (sigma^2 N). A mean far below the wanted width (the paper's mu = 0.05, 48 units) pulls
everywhere, so the end point is wherever the data term's slope equals a pull that grows as 1/sigma^2:
a narrow sigma window, seed-dependent. A mean on the target width, mu = ln(1 / (1 - k)) / (D - 1.5)
for D units, has a pull that vanishes there, and with a small sigma the target is the end point.

:class:`ElboPrior` returns the bracket divided by N, which the trainer adds to its data loss through the
callback's ``extra_loss``. Both prior terms are device computations: no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from widthlab.methods.adaptive.distributions import ImportanceDistribution
from widthlab.methods.adaptive.layer import collect_sites


class _SumOfSquares(torch.autograd.Function):
    """c sum_k ||theta_k||^2 over a list of tensors as one graph node (gradient 2 c theta_k g), with the
    multi-tensor ``_foreach`` kernels: a step of a small network costs per graph node, not per flop, so
    the constant c (1 / (2 sigma_theta^2 N) in the loss) is applied inside rather than as two more nodes.
    """

    @staticmethod
    def forward(ctx, c: float, *params: torch.Tensor):
        ctx.save_for_backward(*params)
        ctx.c = c
        return torch.stack(torch._foreach_norm(params)).square().sum() * c

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (None, *torch._foreach_mul(ctx.saved_tensors, g * (2 * ctx.c)))


def theta_sq_sum(params: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """``scale`` times the sum of theta^2 over ``params``, differentiable."""
    return _SumOfSquares.apply(float(scale), *params)


def theta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except those of importance distributions, in one module walk.

    Works on plain models too (the fixed baseline of the bench trains with this prior). Runs every
    step, so it walks the modules once instead of collecting the adaptive sites and filtering.
    """
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, ImportanceDistribution):
            continue
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:  # shared (tied) parameters count once
                seen.add(id(p))
                out.append(p)
    return out


def neg_log_prior_lambda(lam: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """-log N(lam; mu, sigma^2) without the constant 1/2 ln 2 pi: ln sigma + (lam - mu)^2 / (2 sigma^2)."""
    return math.log(sigma) + (lam - mu) ** 2 / (2 * sigma**2)


@dataclass
class ElboPrior:
    """The prior part of the loss, divided by N.

    Attributes:
        sigma_theta: std of the Gaussian prior on every network parameter; None switches it off (the
            Transformer configs train with plain cross-entropy).
        mu_lambda, sigma_lambda: the Gaussian prior on each lam_l; ``sigma_lambda`` None is a flat prior.
            The annealing schedule (``callback.LinearAnneal``) edits ``sigma_lambda`` and ``active``.
        n_observations: N.
        active: whether the lam prior is currently on (the schedule keeps it off before its start).
    """

    sigma_theta: float | None = 1.0
    mu_lambda: float = 0.01
    sigma_lambda: float | None = None
    n_observations: int = 1
    active: bool = True

    def __post_init__(self):
        if self.sigma_theta is not None and not self.sigma_theta > 0:
            raise ValueError(f"sigma_theta must be > 0 or null, got {self.sigma_theta}")
        if self.sigma_lambda is not None and not self.sigma_lambda > 0:
            raise ValueError(f"the lambda prior's sigma must be > 0, got {self.sigma_lambda}")
        if not self.n_observations >= 1:
            raise ValueError(f"n_observations must be >= 1, got {self.n_observations}")

    @property
    def lambda_prior_on(self) -> bool:
        return self.active and self.sigma_lambda is not None

    def theta_term(self, model: nn.Module, scale: float = 1.0) -> torch.Tensor | None:
        """``scale`` times sum theta^2 / (2 sigma_theta^2) over all parameters except the distributions'."""
        if self.sigma_theta is None:
            return None
        return theta_sq_sum(theta_parameters(model), scale / (2 * self.sigma_theta**2))

    def lambda_term(self, model: nn.Module) -> torch.Tensor | None:
        """sum_l ln sigma_lam + (lam_l - mu_lam)^2 / (2 sigma_lam^2) over the model's distributions.

        lam_l is each distribution's own width parameter (``ImportanceDistribution.latent``: the rate of
        the exponential, gamma of the power law, the location b of the sigmoid), so ``mu_lambda`` is in
        that parameter's units. A distribution shared by several layers (one lam for all of them) is one
        latent and counts once.

        Raises:
            ValueError: the prior is on and some layer's family has no learnable parameter (uniform).
        """
        if not self.lambda_prior_on:
            return None
        lams, seen = [], set()
        for s in collect_sites(model):
            dist = s.scale.dist
            if id(dist) in seen:
                continue
            seen.add(id(dist))
            latent = dist.latent
            if latent is None:
                raise ValueError(f"adaptive site {s.name!r}: the {dist.family} distribution learns no "
                                 "parameter, so the lambda prior (prior_lambda) cannot act on it")
            lams.append(latent)
        if not lams:
            return None
        return neg_log_prior_lambda(torch.stack(lams), self.mu_lambda, self.sigma_lambda).sum()

    def __call__(self, model: nn.Module) -> torch.Tensor | None:
        """(theta term + lam term) / N, or None when both priors are off."""
        theta = self.theta_term(model, 1.0 / self.n_observations)  # 1/N folded into its one graph node
        lam = self.lambda_term(model)
        if lam is None:
            return theta
        lam = lam / self.n_observations
        return lam if theta is None else theta + lam
