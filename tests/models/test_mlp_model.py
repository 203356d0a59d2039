"""MLP architecture details: depth/widths, activations, BatchNorm placement, NTK parametrisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthlab.models import MLP, MLPConfig, create_model
from widthlab.models.mlp import ACTIVATIONS, mlp_ntk_w8, mlp_w512_d3
from widthlab.nn.ntk import NTKLinear


def test_width_and_depth_make_equal_hidden_layers():
    model = create_model("mlp", input_shape=(10,), num_outputs=2, width=4, depth=3)
    assert model.config.widths == (4, 4, 4)
    assert [tuple(l.weight.shape) for l in model.layers] == [(4, 10), (4, 4), (4, 4), (2, 4)]


def test_empty_widths_is_a_linear_model():
    model = create_model("mlp", input_shape=(10,), num_outputs=2, widths=[])
    assert len(model.layers) == 1 and model.width_sites() == [] and model.widths() == {}
    assert model(torch.randn(3, 10)).shape == (3, 2)


REFERENCE = {
    "relu": torch.relu, "relu6": F.relu6, "tanh": torch.tanh, "leaky_relu": F.leaky_relu,
    "gelu": F.gelu, "identity": lambda x: x, "linear": lambda x: x,
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_is_applied(name):
    # With W1 = I and b = 0 the hidden layer's output is exactly act(x).
    model = create_model("mlp", input_shape=(7,), num_outputs=7, width=7, activation=name, bias=False)
    seen = []
    model.act.register_forward_hook(lambda m, inp, out: seen.append(out))
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(7))
        x = torch.linspace(-3, 3, 7).reshape(1, 7)
        model(x)
    torch.testing.assert_close(seen[0], REFERENCE[name](x))


def test_no_bias():
    model = create_model("mlp", input_shape=(3,), num_outputs=2, width=4, depth=2, bias=False)
    assert all(l.bias is None for l in model.layers)


def test_batch_norm_comes_after_the_activation():
    # The paper's MLP1 puts BatchNorm1d after the ReLU; its input is therefore non-negative.
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(6,), num_outputs=2, widths=[16, 8], batch_norm=True)
    seen = []
    for norm in model.norms:
        norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(torch.randn(32, 6))
    assert len(seen) == 2 and all((t >= 0).all() for t in seen)
    assert all(isinstance(n, nn.BatchNorm1d) for n in model.norms)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) and not n.bias.any() for n in model.norms)


def test_presets():
    assert mlp_w512_d3().config.widths == (512, 512, 512)
    ntk = mlp_ntk_w8()
    assert ntk.config.in_features == 784 and ntk.widths() == {"hidden.0": 8}
    assert all(isinstance(l, NTKLinear) for l in ntk.layers)


def test_ntk_mlp_matches_the_spec_forward():
    # NTK-style MLP of Golubeva et al. 2021 (Fig. 8): h = ReLU(W1 x / sqrt(784)); out = W2 h / sqrt(n),
    # computed here by hand.
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=784, out_features=10, widths=(32,), parametrization="ntk",
                          bias=False)).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    w1, w2 = model.layers[0].weight.detach(), model.layers[1].weight.detach()
    h = torch.relu(x.reshape(5, 784) @ w1.T / math.sqrt(784))
    expected = h @ w2.T / math.sqrt(32)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_ntk_mlp_with_bias_adds_it_unscaled():
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(4,), num_outputs=3, width=6, parametrization="ntk").double()
    with torch.no_grad():
        for l in model.layers:
            l.bias.normal_()
    x = torch.randn(2, 4, dtype=torch.float64)
    (w1, b1), (w2, b2) = ((l.weight.detach(), l.bias.detach()) for l in model.layers)
    expected = torch.relu(x @ w1.T / 2 + b1) @ w2.T / math.sqrt(6) + b2
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("d", [16, 256, 2048])
def test_ntk_preactivation_variance_does_not_depend_on_fan_in(d):
    # With W ~ N(0,1) and x ~ N(0, I_d): Var(W x / sqrt(d)) = |x|^2 / d ~= 1 for every d, and the
    # output Var(W2 ReLU(z) / sqrt(n)) ~= E[ReLU(z)^2] = 1/2 for every n. Tolerant: ~6 sigma.
    torch.manual_seed(d)
    model = create_model("mlp", input_shape=(d,), num_outputs=256, width=512, parametrization="ntk")
    x = torch.randn(256, d)
    with torch.no_grad():
        z = model.layers[0](x)
        out = model(x)
    assert z.var().item() == pytest.approx(1.0, rel=0.12)
    assert out.var().item() == pytest.approx(0.5, rel=0.15)


def test_ntk_uniform_init_is_the_official_codes():
    model = create_model("mlp", input_shape=(50,), num_outputs=10, width=400, parametrization="ntk",
                         ntk_init="uniform")
    w = model.layers[0].weight
    assert w.abs().max() <= 1.0
    assert w.var().item() == pytest.approx(1 / 3, rel=0.05)
