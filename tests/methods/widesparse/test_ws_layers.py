"""Masked layers and ``sparsify`` (Golubeva et al. 2021, §2.3): function, gradients, state dict, init,
user modules."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthlab.methods.widesparse import sparsify
from widthlab.methods.widesparse.masks import layer_generator, random_mask
from widthlab.methods.widesparse.sparsify import csr_available
from widthlab.models import count_nonzero_weights, count_weights, create_model
from widthlab.nn.masked import MaskedConv2d, MaskedLinear, MaskedNTKLinear, masked_layers, to_masked
from widthlab.nn.ntk import NTKLinear


def mask_like(shape, k, seed=0):
    return random_mask(shape, k, generator=layer_generator(seed, "t"))


def test_masked_linear_and_conv_compute_with_zeroed_weight():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    m = to_masked(lin, mask_like((4, 6), 10))
    assert isinstance(m, MaskedLinear) and isinstance(m, nn.Linear) and m.weight is lin.weight
    assert int((m.weight == 0).sum()) == 10
    x = torch.randn(3, 6)
    assert torch.equal(m(x), F.linear(x, m.weight * m.weight_mask, m.bias))
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    mc = to_masked(conv, mask_like((5, 3, 3, 3), 60))
    assert isinstance(mc, MaskedConv2d) and mc.stride == (2, 2) and mc.bias is None
    xi = torch.randn(2, 3, 8, 8)
    assert torch.equal(mc(xi), conv._conv_forward(xi, conv.weight, None))


def test_gradients_off_the_mask_are_exactly_zero_even_if_weights_leak():
    m = to_masked(nn.Linear(8, 8), mask_like((8, 8), 40))
    with torch.no_grad():
        m.weight.add_(1.0)  # leak nonzeros into masked positions by hand
    out = m(torch.randn(4, 8))
    out.square().sum().backward()
    assert torch.all(m.weight.grad[~m.weight_mask] == 0)
    assert torch.any(m.weight.grad[m.weight_mask] != 0)
    m.apply_mask_()
    assert torch.all(m.weight[~m.weight_mask] == 0)


def test_ntk_linear_keeps_its_forward():
    torch.manual_seed(0)
    layer = NTKLinear(20, 7, init="uniform")
    m = to_masked(layer, mask_like((7, 20), 100))
    assert isinstance(m, MaskedNTKLinear) and m.init == "uniform"
    x = torch.randn(3, 20)
    expected = F.linear(x, layer.weight * m.weight_mask) / math.sqrt(20) + layer.bias
    assert torch.allclose(m(x), expected)


def test_unsupported_layer_type():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="MyLinear"):
        to_masked(MyLinear(3, 3), torch.ones(3, 3, dtype=torch.bool))


def test_state_dict_round_trip_and_dense_load_is_remasked():
    torch.manual_seed(0)
    a = create_model("mlp", input_shape=(10,), num_outputs=3, width=16)
    sparsify(a, {"layers.0": 120, "layers.1": 20}, seed=1)
    sd = a.state_dict()
    assert sd["layers.0.weight_mask"].dtype == torch.bool and int((~sd["layers.0.weight_mask"]).sum()) == 120
    b = create_model("mlp", input_shape=(10,), num_outputs=3, width=16)
    sparsify(b, {"layers.0": 120, "layers.1": 20}, seed=99)  # other masks, replaced by the loaded ones
    b.load_state_dict(sd)
    x = torch.randn(5, 10)
    assert torch.equal(a(x), b(x))
    assert torch.equal(b.layers[0].weight_mask, a.layers[0].weight_mask)
    # A dense checkpoint loaded into a masked model: the weight is re-zeroed off the mask.
    dense = create_model("mlp", input_shape=(10,), num_outputs=3, width=16).state_dict()
    dense["layers.0.weight_mask"] = a.layers[0].weight_mask
    dense["layers.1.weight_mask"] = a.layers[1].weight_mask
    b.load_state_dict(dense)
    assert int((b.layers[0].weight != 0).sum()) == 160 - 120
    c = copy.deepcopy(b)
    assert torch.equal(c(x), b(x)) and len(list(masked_layers(c))) == 2


def test_counts_are_exact():
    torch.manual_seed(0)
    model = create_model("resnet18", input_shape=(3, 16, 16), num_outputs=4, width=4)
    N = count_weights(model)
    res = sparsify(model, {"layer4.0.conv2": 1000, "fc": 10, "conv1": 5}, seed=0)
    assert count_weights(model) == N
    assert count_nonzero_weights(model) == N - 1015 == N - res.removed
    assert {n: s.k for n, s in res.layers.items()} == {"layer4.0.conv2": 1000, "fc": 10, "conv1": 5}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("c", [0.5, 0.1, 0.02])
def test_fan_in_corrected_init(c):
    # Fan-in correction (paper §2.3 / App. A): free weights ~ U(+-1/sqrt(fan_in c)), std 1/sqrt(3 fan_in c),
    # so a unit's pre-activation variance matches the dense default layer's.
    torch.manual_seed(0)
    fan_in, out = 512, 256
    model = nn.Sequential(nn.Linear(fan_in, out))
    k = round((1 - c) * fan_in * out)
    sparsify(model, {"0": k}, seed=3)
    layer = model[0]
    c = layer.connectivity  # the exact c_l after rounding k
    free = layer.weight[layer.weight_mask]
    assert free.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in * c), rel=0.05)
    assert free.abs().max().item() <= 1 / math.sqrt(fan_in * c)
    x = torch.randn(4096, fan_in)
    dense = nn.Linear(fan_in, out)
    v_sparse = (x @ layer.weight.T).var().item()
    v_dense = (x @ dense.weight.T).var().item()
    assert v_sparse == pytest.approx(v_dense, rel=0.05)


def test_users_own_module_is_sparsified_in_place():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
            self.head = nn.ModuleDict({"out": nn.Linear(8, 2)})

        def forward(self, x):
            return self.head["out"](self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net()
    names_before = [n for n, _ in net.named_parameters()]
    res = sparsify(net, {"features.0": 30, "features.2": 300, "head.out": 0}, seed=0, init="none")
    assert [n for n, _ in net.named_parameters()] == names_before
    assert isinstance(net.features[0], MaskedConv2d) and isinstance(net.features[2], MaskedConv2d)
    assert type(net.head["out"]) is nn.Linear and res.layers["head.out"].impl == "dense"
    assert count_nonzero_weights(net) == count_weights(net) - 330
    net(torch.randn(2, 1, 6, 6)).sum().backward()
    assert torch.all(net.features[2].weight.grad[~net.features[2].weight_mask] == 0)
    with pytest.raises(ValueError, match="no layer named"):
        sparsify(net, {"nope": 1}, seed=0)
    with pytest.raises(ValueError, match="keep at least one"):
        sparsify(net, {"features.0": 72}, seed=0)


def test_io_only_sparsify_removes_whole_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    res = sparsify(model, {"0": 9 * 10 + 2}, seed=0, io_only=True)
    m = model[0].weight_mask
    assert res.layers["0"].k == 90 and torch.equal(m, m[:, :, :1, :1].expand_as(m))


@pytest.mark.skipif(not csr_available(), reason="CSR layer module not present")
def test_csr_member_equals_masked_member():
    from widthlab.nn.sparse_linear import CSRLinear

    torch.manual_seed(0)
    a = create_model("mlp", input_shape=(30,), num_outputs=5, width=40)
    b = copy.deepcopy(a)
    sparsify(a, {"layers.0": 1100}, seed=4, sparse_impl="masked")
    res = sparsify(b, {"layers.0": 1100}, seed=4, sparse_impl="csr")
    assert isinstance(b.layers[0], CSRLinear) and res.impl == "csr"
    assert count_nonzero_weights(a) == count_nonzero_weights(b) and count_weights(a) == count_weights(b)
    x = torch.randn(16, 30)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    dense_grad = a.layers[0].weight.grad[a.layers[0].weight_mask]
    assert torch.allclose(dense_grad, b.layers[0].values.grad, atol=1e-6)
    weight, mask = b.layers[0].to_dense()
    assert torch.equal(mask, a.layers[0].weight_mask) and torch.allclose(weight, a.layers[0].weight)
