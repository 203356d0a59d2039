"""The ELBO loss of AWNN (Errica et al. 2025) on a toy network worked out by hand, and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from widthlab.methods.adaptive.distributions import softplus_inv
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.mlp import adaptive_mlp


def toy(dtype=torch.float64):
    """k = .9, lam = .5 (D = 6), ReLU6, W1 rows (0.1 (j + 1), 0.2), W2 = [[1]*6, [-1]*6], zero biases."""
    m = adaptive_mlp(2, 2, lam0=0.5, activation="relu6").to(dtype)
    assert m.widths() == {"hidden.0": 6}
    with torch.no_grad():
        m.layers[0].weight.copy_(torch.tensor([[0.1 * (j + 1), 0.2] for j in range(6)], dtype=dtype))
        m.layers[0].bias.zero_()
        m.layers[1].weight.copy_(torch.tensor([[1.0] * 6, [-1.0] * 6], dtype=dtype))
        m.layers[1].bias.zero_()
    x = torch.tensor([[1.0, 2.0]], dtype=dtype)
    y = torch.tensor([0])
    return m, x, y


def loss(m, x, y, with_lambda_prior=True):
    prior = ElboPrior(sigma_theta=1.0, mu_lambda=0.1, sigma_lambda=0.5 if with_lambda_prior else None,
                      n_observations=100)
    return F.cross_entropy(m(x), y) + prior(m)


def test_toy_loss_constants():
    m, x, y = toy()
    assert F.cross_entropy(m(x), y).item() == pytest.approx(0.252950, abs=5e-7)
    prior = ElboPrior(sigma_theta=1.0, mu_lambda=0.1, sigma_lambda=0.5, n_observations=100)
    assert prior.theta_term(m).item() == pytest.approx(13.15 / 2, abs=1e-12)  # r is not a theta
    assert prior.lambda_term(m).item() == pytest.approx(-0.373147, abs=5e-7)
    assert loss(m, x, y).item() == pytest.approx(0.314968, abs=1e-6)
    assert loss(m, x, y, with_lambda_prior=False).item() == pytest.approx(0.318700, abs=1e-6)


def test_toy_lambda_gradient_matches_finite_differences():
    m, x, y = toy()
    r = m.scales[0].dist.r
    assert r.item() == pytest.approx(softplus_inv(0.5)) == pytest.approx(-0.43275, abs=5e-6)
    loss(m, x, y).backward()
    assert r.grad.item() == pytest.approx(0.040285, abs=1e-6)
    h = 1e-6
    with torch.no_grad():
        r0 = r.item()
        r.fill_(r0 + h)
        up = loss(m, x, y).item()
        r.fill_(r0 - h)
        down = loss(m, x, y).item()
    assert m.widths() == {"hidden.0": 6}  # D held fixed: the forward reads the live width
    assert (up - down) / (2 * h) == pytest.approx(r.grad.item(), abs=1e-8)


def test_cross_entropy_alone_moves_lambda_and_theta_prior_gradient():
    torch.manual_seed(0)
    m = adaptive_mlp(3, 2, lam0=0.05).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    F.cross_entropy(m(x), y).backward()
    assert m.scales[0].dist.r.grad.abs().item() > 0  # priors off: r learns from the data term
    m.zero_grad()
    sigma, N = 2.0, 50
    ElboPrior(sigma_theta=sigma, sigma_lambda=None, n_observations=N)(m).backward()
    for name, p in m.named_parameters():
        if name.endswith(".r"):
            assert p.grad is None or p.grad.abs().item() == 0
        else:
            assert torch.allclose(p.grad, p.detach() / (sigma**2 * N))


def test_priors_can_be_switched_off():
    m, _, _ = toy()
    assert ElboPrior(sigma_theta=None, sigma_lambda=None)(m) is None
    only_lam = ElboPrior(sigma_theta=None, mu_lambda=0.1, sigma_lambda=0.5, n_observations=100)(m)
    assert only_lam.item() == pytest.approx(-0.00373147, abs=1e-8)
    with pytest.raises(ValueError):
        ElboPrior(sigma_theta=0.0)


# The width prior on the other learnable families: each family's own parameter is the latent lam_l of
# the paper's prior p(lam_l) = N(mu, sigma^2) (closed forms below, written out by hand).


def test_width_prior_acts_on_the_power_law_exponent():
    torch.manual_seed(0)
    m = adaptive_mlp(2, 2, hidden_layers=2, distribution="power_law",
                     distribution_options={"gamma0": 3.0}).double()
    prior = ElboPrior(sigma_theta=None, mu_lambda=2.5, sigma_lambda=0.5, n_observations=10)
    # Two layers, gamma = 3 each: 2 (ln 0.5 + 0.5^2 / (2 0.25)) = 2 (-0.693147 + 0.5).
    assert prior.lambda_term(m).item() == pytest.approx(2 * (-0.6931471806 + 0.5), abs=1e-9)
    prior(m).backward()
    for scale in m.scales:  # d/dgamma = (gamma - mu) / sigma^2 / N = 0.5 / 0.25 / 10, relu' = 1
        assert scale.dist.g.grad.item() == pytest.approx(0.2, abs=1e-12)


def test_width_prior_acts_on_the_sigmoid_location():
    m = adaptive_mlp(2, 2, distribution="sigmoid", distribution_options={"b0": 128.0, "slope": 1.0})
    m = m.double()
    prior = ElboPrior(sigma_theta=None, mu_lambda=100.0, sigma_lambda=10.0, n_observations=1)
    # ln 10 + (128 - 100)^2 / (2 10^2) = 2.302585 + 3.92.
    assert prior.lambda_term(m).item() == pytest.approx(2.302585093 + 3.92, abs=1e-6)
    prior(m).backward()
    # d/dr_b = (b - mu) / sigma^2 * sigmoid(r_b), r_b = softplus^-1(128) ~ 128: sigmoid = 1 to 1e-55.
    assert m.scales[0].dist.r_b.grad.item() == pytest.approx(0.28, abs=1e-9)


def test_width_prior_refuses_a_family_without_parameter():
    m = adaptive_mlp(2, 2, distribution="uniform", distribution_options={"b": 8})
    with pytest.raises(ValueError, match="uniform distribution learns no"):
        ElboPrior(sigma_theta=None, mu_lambda=0.01, sigma_lambda=0.01)(m)
    assert ElboPrior(sigma_theta=None, sigma_lambda=None)(m) is None  # a flat prior is fine
