"""The chance level of the natural expansion score (Mitchell et al. 2023, the score bound Δη′): a unit
whose features are unrelated to the residual still scores, on N scoring examples, k·ρ/N on average
(ρ the consumer's room), which ``chance_correction`` subtracts."""

from __future__ import annotations

import pytest
import torch

from widthlab.methods.expanding import scores
from widthlab.methods.expanding.expansion_config import ExpansionConfig


@pytest.mark.parametrize("n", [40, 160])
def test_random_features_score_room_over_n_on_average(n):
    """For f with a uniformly random direction in R^N, Δη′ = fᵀMf / (N fᵀf) with M = r G⁻¹ rᵀ / N, so
    E[Δη′] = tr(M)/N² = ρ/N exactly (ρ = tr(rᵀ r G⁻¹)/N). Monte Carlo over 20000 Gaussian features."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(n, 3, generator=g, dtype=torch.float64)
    r = r @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    B = torch.randn(3, 3, generator=g, dtype=torch.float64)
    G_inv = B @ B.T + torch.eye(3, dtype=torch.float64)
    f = torch.randn(20000, n, 1, generator=g, dtype=torch.float64)
    st = scores.candidate_stats(f, r, n)
    mean = scores.delta_eta_lb(st.C, st.A_f, G_inv).mean()
    rho = scores.room(r, G_inv, n)
    torch.testing.assert_close(mean, rho / n, rtol=0.03, atol=0)


def test_chance_correction_needs_the_room_normaliser():
    ExpansionConfig(chance_correction=True)
    with pytest.raises(ValueError, match="chance_correction needs abs_normalizer 'room'"):
        ExpansionConfig(chance_correction=True, abs_normalizer="sqnorm")
