"""ResNet architecture details: stems, shortcuts, stage shapes, head, initialisation."""

import math

import pytest
import torch
from torch import nn

from widthlab.models import count_weights, create_model
from widthlab.models.resnet import PadShortcut, resnet18_imagenet_w64, resnet18_w18


def _layer_shapes(model, x):
    shapes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(model, name):
            getattr(model, name).register_forward_hook(
                lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        model(x)
    return shapes


def test_cifar_resnet18_stem_and_stage_shapes():
    model = create_model("resnet18", input_shape=(3, 32, 32), num_outputs=10, width=2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    shapes = _layer_shapes(model, torch.randn(2, 3, 32, 32))
    assert shapes == {"layer1": (2, 2, 32, 32), "layer2": (2, 4, 16, 16), "layer3": (2, 8, 8, 8),
                      "layer4": (2, 16, 4, 4)}  # 4x4 before pooling: the CIFAR code's avg_pool(4)


def test_imagenet_resnet18_stem_and_stage_shapes():
    model = create_model("resnet18_imagenet", input_shape=(3, 64, 64), num_outputs=10, width=2)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    shapes = _layer_shapes(model, torch.randn(2, 3, 64, 64))
    assert shapes["layer1"] == (2, 2, 16, 16) and shapes["layer4"] == (2, 16, 2, 2)


def test_resnet20_has_three_stages_of_three_blocks_and_parameter_free_shortcuts():
    model = create_model("resnet20", input_shape=(3, 32, 32), num_outputs=10)
    assert [len(s) for s in model.stages()] == [3, 3, 3]
    shortcuts = [b.shortcut for s in model.stages() for b in s]
    assert sum(isinstance(s, PadShortcut) for s in shortcuts) == 2
    assert all(not list(s.parameters()) for s in shortcuts)
    assert _layer_shapes(model, torch.randn(1, 3, 32, 32))["layer3"] == (1, 64, 8, 8)


def test_resnet18_uses_three_conv_shortcuts():
    model = create_model("resnet18", input_shape=(3, 8, 8), num_outputs=10, width=2)
    convs = [b.shortcut for s in model.stages() for b in s if isinstance(b.shortcut, nn.Sequential)]
    assert len(convs) == 3
    assert all(c[0].kernel_size == (1, 1) and c[0].stride == (2, 2) for c in convs)


def test_pad_shortcut_subsamples_and_centres_the_input_channels():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = PadShortcut(stride=2, out_channels=8)(x)
    assert y.shape == (2, 8, 2, 2)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])  # planes // 4 = 2 zero channels per side
    assert not y[:, :2].any() and not y[:, 6:].any()
    odd = PadShortcut(stride=1, out_channels=7)(x)
    assert odd.shape == (2, 7, 4, 4) and torch.equal(odd[:, 1:5], x)


def test_hidden_head_is_counted_and_resizable():
    model = create_model("resnet20", input_shape=(3, 8, 8), num_outputs=10, width=4, head_width=32)
    plain = create_model("resnet20", input_shape=(3, 8, 8), num_outputs=10, width=4)
    assert count_weights(model) - count_weights(plain) == 16 * 32 + 32 * 10 - 16 * 10
    assert model.widths()["head.0"] == 32


def _std(t):
    return t.detach().float().std().item()


def test_initialisations_follow_each_reference():
    torch.manual_seed(0)
    # kuangliu CIFAR ResNet-18: PyTorch default, kaiming_uniform(a=sqrt 5) -> |w| <= 1/sqrt(fan_in).
    cifar = create_model("resnet18", input_shape=(3, 8, 8), num_outputs=10, width=16)
    w = cifar.layer4[1].conv1.weight
    assert w.abs().max().item() <= 1 / math.sqrt(128 * 9)
    # torchvision: Kaiming normal, fan_out, ReLU gain.
    imagenet = create_model("resnet18_imagenet", input_shape=(3, 32, 32), num_outputs=10, width=16)
    assert _std(imagenet.layer4[1].conv1.weight) == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.03)
    # Option-A ResNet-20: Kaiming normal fan_in for convs and the Linear head.
    r20 = create_model("resnet20", input_shape=(3, 8, 8), num_outputs=100, width=16)
    assert _std(r20.layer3[2].conv2.weight) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert _std(r20.fc.weight) == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    for model in (cifar, imagenet, r20):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


def test_presets():
    with torch.device("meta"):
        assert count_weights(resnet18_w18()) == 884_502
        assert count_weights(resnet18_imagenet_w64()) == 11_678_912
