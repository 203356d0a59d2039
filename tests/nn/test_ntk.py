"""NTKLinear: y = x W^T / sqrt(fan_in) + b with O(1) weights (NTK-style MLP, Golubeva et al. 2021, Fig. 8)."""

import math

import pytest
import torch
from torch import nn

from widthlab.models.counting import count_weights
from widthlab.nn.ntk import NTKLinear


def test_forward_matches_an_independent_computation():
    torch.manual_seed(0)
    layer = NTKLinear(37, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 37, dtype=torch.float64)
    w, b = layer.weight.detach(), layer.bias.detach()
    expected = torch.einsum("bi,oi->bo", x, w) / math.sqrt(37) + b
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_leading_batch_axes_are_kept():
    layer = NTKLinear(6, 2, bias=False)
    assert layer(torch.randn(3, 4, 6)).shape == (3, 4, 2)
    assert layer.bias is None


def test_init():
    torch.manual_seed(0)
    normal = NTKLinear(400, 300)
    assert normal.weight.mean().item() == pytest.approx(0.0, abs=0.01)
    assert normal.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert not normal.bias.any()
    uniform = NTKLinear(400, 300, init="uniform")
    assert uniform.weight.abs().max().item() <= 1.0
    assert uniform.weight.var().item() == pytest.approx(1 / 3, rel=0.02)
    with pytest.raises(ValueError, match="init must be 'normal' or 'uniform'"):
        NTKLinear(3, 3, init="xavier")


def test_reset_parameters_redraws_with_the_same_law():
    layer = NTKLinear(200, 200, init="uniform")
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    assert layer.weight.abs().max().item() <= 1.0


@pytest.mark.parametrize("fan_in", [8, 128, 4096])
def test_preactivation_variance_is_one_at_any_fan_in(fan_in):
    # Var(w.x / sqrt(d)) = |x|^2 / d, which is ~1 for x ~ N(0, I_d): the init is width-independent.
    torch.manual_seed(fan_in)
    layer = NTKLinear(fan_in, 512)
    with torch.no_grad():
        z = layer(torch.randn(256, fan_in))
    assert z.var().item() == pytest.approx(1.0, rel=0.12)


def test_fan_in_is_read_from_the_current_weight():
    # Width surgery replaces the weight with fewer columns; the 1/sqrt(fan_in) must follow it.
    torch.manual_seed(0)
    layer = NTKLinear(10, 3, bias=False)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:, :4].clone())
    assert layer.fan_in == 4 and layer.in_features == 10  # in_features is construction-time only
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ layer.weight.detach().T / 2.0)


def test_is_a_linear_for_counting_and_surgery():
    layer = NTKLinear(5, 3)
    assert isinstance(layer, nn.Linear)
    assert count_weights(nn.Sequential(layer)) == 15
    assert "parametrization=ntk" in repr(layer)


def test_meta_device_and_gradients():
    with torch.device("meta"):
        assert NTKLinear(4, 2).weight.device.type == "meta"
    layer = NTKLinear(9, 2)
    x = torch.randn(3, 9)
    layer(x).sum().backward()
    # d/dW sum(x W^T / 3) = (sum_b x_b) / 3 for every row.
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(2, 9) / 3)
