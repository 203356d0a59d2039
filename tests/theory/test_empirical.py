"""Empirical kernel of a model instance (Golubeva et al. 2021: §3 setup, Fig. 8 protocol of App. A).

The reference is independent of the library's formula: an actual nn.Module
f(x) = (n d)^{-1/2} v^T relu(u x) whose last-layer gradients grad_v f(x) come from torch.func
(jacobian, no loop over inputs); Theta(x, y) = grad_v f(x) . grad_v f(y).
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from widthlab.theory import (
    empirical_distance_on_pairs,
    empirical_kernel_distance,
    empirical_theta,
    infinite_width_theta,
    sample_pairs,
    sample_sparse_weights,
    theorem1_distance,
)

F64 = torch.float64


class OneHiddenNTK(nn.Module):
    """f(x) = (n d)^{-1/2} v^T relu(u x), no biases: the network of Theorem 1."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        n, d = u.shape
        self.fc = nn.Linear(d, n, bias=False).to(F64)
        self.out = nn.Linear(n, 1, bias=False).to(F64)
        with torch.no_grad():
            self.fc.weight.copy_(u)
            self.out.weight.copy_(v.reshape(1, n))
        self.scale = (n * d) ** -0.5

    def forward(self, x):  # (B, d) -> (B,)
        return self.scale * self.out(torch.relu(self.fc(x))).squeeze(-1)


def _autograd_theta(model, x, y):
    """Theta_j = grad_v f(x_j) . grad_v f(y_j), from the jacobian of all outputs w.r.t. v at once."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    Z = torch.cat([x, y])  # (2P, d)

    def outputs(v):
        return functional_call(model, {**params, "out.weight": v}, (Z,))

    J = jacrev(outputs)(params["out.weight"]).reshape(Z.shape[0], -1)  # (2P, n)
    P = x.shape[0]
    return (J[:P] * J[P:]).sum(-1)


@pytest.fixture(scope="module")
def instance():
    g = torch.Generator().manual_seed(0)
    u = sample_sparse_weights(1, 200, 784, 0.1, g)[0]  # (n, d) Bernoulli(p) * N(0, 1/p)
    v = torch.randn(200, generator=g, dtype=F64)
    return OneHiddenNTK(u, v), u


def test_theta_equals_last_layer_gradient_kernel(instance):
    model, u = instance
    x, y = sample_pairs(40, d=784, seed=1)
    ref = _autograd_theta(model, x, y)
    torch.testing.assert_close(empirical_theta(model, x, y), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(empirical_theta(u, x, y), ref, rtol=1e-10, atol=0)


def test_distance_on_real_inputs_equals_reference(instance):
    model, _ = instance
    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 1, 28, 28, generator=g, dtype=F64).exp()  # image-shaped, non-Gaussian
    res = empirical_kernel_distance(model, inputs=X, pairs=300, seed=3)
    x, y = sample_pairs(300, inputs=X, seed=3)  # the same pairs
    sq = (_autograd_theta(model, x, y) - infinite_width_theta(x, y)) ** 2
    assert math.isclose(res.D, sq.mean().item(), rel_tol=1e-10)
    assert math.isclose(res.D_se, sq.std().item() / 300**0.5, rel_tol=1e-8)
    assert (res.width, res.d, res.num_pairs) == (200, 784, 300)
    assert res.connectivity == pytest.approx(0.1, abs=0.005)


def test_distance_on_given_pairs_equals_reference(instance):
    """The pairs-given form: same value as the reference on those pairs, and as the sampling form."""
    model, _ = instance
    g = torch.Generator().manual_seed(6)
    X = torch.randn(50, 784, generator=g, dtype=F64) ** 3  # heavy-tailed
    x, y = sample_pairs(120, inputs=X, seed=7)
    res = empirical_distance_on_pairs(model, x, y)
    sq = (_autograd_theta(model, x, y) - infinite_width_theta(x, y)) ** 2
    assert math.isclose(res.D, sq.mean().item(), rel_tol=1e-10) and res.num_pairs == 120
    assert res.D == empirical_kernel_distance(model, inputs=X, pairs=120, seed=7).D
    with pytest.raises(ValueError):
        empirical_distance_on_pairs(model, x, y[:5])


def test_parametrisations_map_to_the_same_kernel(instance):
    """Standard parametrisation W = u / sqrt(d) with weight_std = d^-1/2, a dense W with a mask, a
    module nested in Sequential, and the 'rms' scale all give the theorem-convention kernel."""
    model, u = instance
    x, y = sample_pairs(20, d=784, seed=4)
    ref = empirical_theta(u, x, y)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(784, 200, bias=True), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        seq[1].weight.copy_(u / 784**0.5)
    torch.testing.assert_close(empirical_theta(seq, x, y, weight_std=784**-0.5), ref)
    dense = torch.where(u != 0, u, torch.ones_like(u))
    torch.testing.assert_close(empirical_theta(dense, x, y, mask=(u != 0)), ref)
    rms = u.pow(2).mean().sqrt().item()
    torch.testing.assert_close(empirical_theta(3.0 * u, x, y, weight_std="rms"), ref / rms**2)
    with pytest.raises(TypeError):
        empirical_theta(nn.ReLU(), x, y)
    with pytest.raises(ValueError):
        empirical_theta(u, x, y, weight_std="bogus")


def test_fresh_instances_average_to_theorem1():
    """A fresh sparse instance's empirical D fluctuates by ~8% (n = 200); five average to the
    Theorem 1 value within 10% (about 3 standard errors)."""
    g = torch.Generator().manual_seed(5)
    x, y = sample_pairs(30, d=784, seed=0)
    exact = theorem1_distance(x, y, 200, 0.1).D
    Ds = [empirical_kernel_distance(sample_sparse_weights(1, 200, 784, 0.1, g)[0], pairs=2000, seed=s).D
          for s in range(5)]
    assert abs(sum(Ds) / 5 - exact) < 0.1 * exact


def test_pair_sampling_excludes_diagonal():
    X = torch.arange(2 * 3, dtype=F64).reshape(2, 3)
    x, y = sample_pairs(50, inputs=X, seed=0)
    assert (x != y).any(1).all()  # with N = 2 every pair is (0, 1) or (1, 0)
    assert x.shape == (50, 3)
    with pytest.raises(ValueError):
        sample_pairs(5, d=4, inputs=X)
    with pytest.raises(ValueError):
        sample_pairs(5, inputs=X[:1])
    with pytest.raises(ValueError):
        sample_pairs(5)
