"""Sparse members are initialised from their dense references' init family, with the fan-in
correction (paper §2.3 / App. A: the effective fan-in of a layer at connectivity c_l is fan_in c_l,
so the free weights' variance is the dense variance / c_l).

Reference stds are the closed forms of the families, computed here: Kaiming-normal fan-out
sqrt(2 / (k^2 C_out)) for the convs of the torchvision-style ImageNet ResNet-18, Kaiming-normal
fan-in sqrt(2 / fan_in) for ResNet-20, PyTorch's default U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in),
for the CIFAR ResNet-18 and every Linear head left at PyTorch's default. Each sparsified layer is
compared with the same layer of the dense model at the same width, and both with the closed form.
"""

import math

import pytest
import torch
from torch import nn

from widthlab.methods.widesparse.plan import build
from widthlab.models import create_model
from widthlab.nn.masked import MaskedMixin


def _closed_form_std(model_name: str, layer: nn.Module) -> float:
    fan_in = layer.weight[0].numel()
    if isinstance(layer, nn.Conv2d) and model_name == "resnet18_imagenet":
        return math.sqrt(2.0 / (layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]))
    if model_name == "resnet20":
        return math.sqrt(2.0 / fan_in)
    return 1.0 / math.sqrt(3.0 * fan_in)


def _tol(n: int) -> float:
    """Five standard errors of a sample std's relative error, sqrt(1 / (2 n)) (normal; uniform is
    smaller)."""
    return 5.0 * math.sqrt(1.0 / (2.0 * n))


@pytest.mark.parametrize("name, shape, w0, w", [
    ("resnet18_imagenet", (3, 32, 32), 8, 24),
    ("resnet18", (3, 16, 16), 8, 24),
    ("resnet20", (3, 16, 16), 8, 24),
])
def test_sparse_free_weight_std_is_the_dense_std_over_sqrt_c(name, shape, w0, w):
    torch.manual_seed(0)
    dense = create_model(name, input_shape=shape, num_outputs=10, width=w)
    torch.manual_seed(1)
    member = build(create_model(name, input_shape=shape, num_outputs=10, width=w), None, seed=2,
                   base_width=w0, sparse_impl="masked").model
    dense_layers = dict(dense.named_modules())
    checked = 0
    for lname, layer in member.named_modules():
        if not isinstance(layer, MaskedMixin) or layer.weight.numel() < 2000:
            continue
        free = layer.weight[layer.weight_mask].detach().double()
        ref = dense_layers[lname].weight.detach().double()
        c = layer.connectivity
        expected = _closed_form_std(name, dense_layers[lname])
        assert ref.std().item() == pytest.approx(expected, rel=_tol(ref.numel())), lname  # the family
        tol = _tol(free.numel()) + _tol(ref.numel())
        assert free.std().item() * math.sqrt(c) == pytest.approx(ref.std().item(), rel=tol), (lname, c)
        assert free.std().item() == pytest.approx(expected / math.sqrt(c), rel=_tol(free.numel())), lname
        checked += 1
    assert checked >= 4


def test_kaiming_member_draws_normal_weights():
    """The fan-out family is normal, not uniform: the free weights' kurtosis is 3 (uniform: 1.8)."""
    torch.manual_seed(1)
    member = build(create_model("resnet18_imagenet", input_shape=(3, 32, 32), num_outputs=10, width=32),
                   None, seed=2, base_width=8, sparse_impl="masked").model
    layer = member.get_submodule("layer4.1.conv2")
    free = layer.weight[layer.weight_mask].detach().double()
    z = (free - free.mean()) / free.std()
    assert z.pow(4).mean().item() == pytest.approx(3.0, abs=0.3)
