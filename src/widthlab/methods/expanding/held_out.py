"""Deciding on held-out examples: cross-fitted expansion scores with a bootstrap lower bound.

The expansion loop of Mitchell et al. (2023) refines candidate units by maximising Δη′ on the scoring
examples and then compares the refined candidates' Δη′ on the *same* examples with τ and α. A maximum
over a family of units is biased upwards (the winner's curse): on N examples a unit unrelated to the
residual already scores k·ρ/N on average (ρ the consumer's room), and the search finds units that fit
the examples' noise better than that. Small scoring sets therefore grow more, and once a network nearly
interpolates its training data (a residual concentrated on a few examples) the loop can add dozens of
units in one event, none of which generalise.

Cross-fitting removes the bias: the search sees only part of the scoring examples, and the decision
scores its proposals on the rest. For a unit fitted elsewhere and unrelated to the residual, the
held-out Δη′ has expectation exactly k·ρ_B/N_B (the chance level, subtracted with ``chance_correction``);
what is left is evidence that the unit explains residual it was not fitted to. The decision compares the
bootstrap lower bound D − z·SE of that evidence (SE: standard deviation of D over resamples of the
held-out rows) with τ and α, so that an addition needs the held-out examples to support it at about
z standard errors. More data -> smaller SE -> more units pass: the width follows the data.

This is a departure from the paper (which decides on the refining examples); it is off by default
(``ExpansionConfig.holdout = 0``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from widthlab.methods.expanding import scores
from widthlab.methods.expanding.unit_score import Site


@dataclass(frozen=True)
class Split:
    """Row indices of the scoring examples: ``search`` refines the proposals, ``held`` decides."""

    search: torch.Tensor
    held: torch.Tensor


def split_rows(n: int, fraction: float, seed: int) -> Split:
    """A fixed random split of ``n`` scoring rows, ``round(fraction·n)`` of them held out (at least one
    on each side)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"holdout needs at least 2 scoring examples, got {n}")
    held = min(max(int(round(fraction * n)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return Split(perm[held:].sort().values, perm[:held].sort().values)


def restrict(site: Site, rows: torch.Tensor) -> Site:
    """The site seen through a subset of its rows (same G⁻¹ and normaliser η)."""
    rows = rows.to(site.h.device)
    return Site(site.h[rows], site.r_perp[rows], site.G_inv, site.norm)


def weighted_statistic(search_scores: torch.Tensor, temperature: float, decision: str, chosen: int
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """D(s_B): what the decision compares, from held-out scores s_B of all proposals. The weights come
    from the *search* scores, so the held-out rows do not also select: ``"softmax_mean"`` gives
    Σ softmax(s_A/T)·s_B, ``"chosen"`` the chosen proposal's s_B."""
    if decision == "softmax_mean":
        w = torch.softmax(search_scores / temperature, 0)
        return lambda s: (w.to(s.dtype) * s).sum(-1)
    return lambda s: s[..., chosen]


def seed_of(key: tuple) -> int:
    """A seed from a tuple of ints and bools, the same in every process (``hash`` of strings is not)."""
    return int(hashlib.blake2b(repr(key).encode(), digest_size=7).hexdigest(), 16)


def resampled_scores(f: torch.Tensor, site: Site, weights: torch.Tensor, jitter: float = 1e-10
                     ) -> torch.Tensor:
    """Δη′/η of P candidates on reweighted rows: C = Σ_n w_n f_n r_⊥,nᵀ / N, A_f = Σ_n w_n f_n f_nᵀ / N,
    Δη′ = tr(Cᵀ A_f⁻¹ C G⁻¹) (Mitchell et al. 2023, the score bound). ``f``: (P, N, k) features of the
    candidates on the site's rows, ``weights``: (B, N) row counts of B resamples (ones: the rows
    themselves). Returns (B, P). A row's features do not depend on the other rows, so a resample
    only reweights them."""
    P, n, k = f.shape
    w = weights.to(f.dtype)
    r = site.r_perp.to(f.dtype)
    fn = f.transpose(0, 1)  # (N, P, k): one GEMM per moment, rows against resamples
    C = (w @ (fn[..., None] * r[:, None, None, :]).reshape(n, -1)).view(-1, P, k, r.shape[1]) / n
    A_f = (w @ (fn[..., :, None] * fn[..., None, :]).reshape(n, -1)).view(-1, P, k, k) / n
    return scores.delta_eta_lb(C, A_f, site.G_inv.to(f.dtype), jitter=jitter) / site.norm


def bootstrap_se(f: torch.Tensor, site: Site, statistic: Callable[[torch.Tensor], torch.Tensor], draws: int,
                 generator: torch.Generator) -> float:
    """Standard deviation of ``statistic`` (of the P candidates' scores) over ``draws`` resamples of the
    site's N rows drawn with replacement (Efron's bootstrap estimate of its standard error)."""
    n = f.shape[1]
    if draws < 2 or n < 2:
        return 0.0
    rows = torch.randint(n, (draws, n), generator=generator)
    counts = torch.zeros(draws, n, dtype=f.dtype).scatter_add_(1, rows, torch.ones(draws, n, dtype=f.dtype))
    s = resampled_scores(f, site, counts.to(f.device))
    return float(statistic(torch.where(torch.isfinite(s), s, torch.zeros_like(s))).std())
