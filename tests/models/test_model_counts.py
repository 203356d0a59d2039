"""Weight counts against the wide & sparse paper's tables (its counting rule, App. A).

The expected numbers are worked out by hand from the paper's counts, not from this code's output. Large
models are built on the ``meta`` device: counting reads shapes only, so no 180M-entry tensor is allocated.
"""

import pytest
import torch
from torch import nn

from widthlab.models import (
    count_nonzero_weights,
    count_parameters,
    count_weights,
    counted_layers,
    create_model,
)


def _meta(name, input_shape, num_outputs, **kw):
    with torch.device("meta"):
        return create_model(name, input_shape=input_shape, num_outputs=num_outputs, **kw)


@pytest.mark.parametrize("width, expected", [
    (64, 11_678_912), (90, 22_797_630), (128, 45_672_832), (181, 90_715_571), (256, 180_605_696),
])
def test_imagenet_resnet18_table(width, expected):
    model = _meta("resnet18_imagenet", (3, 224, 224), 1000, width=width)
    assert count_weights(model) == expected


@pytest.mark.parametrize("num_classes, width, expected", [
    (10, 8, 175_192), (10, 12, 393_540), (10, 18, 884_502), (10, 40, 4_362_680), (10, 64, 11_164_352),
    (100, 8, 180_952), (100, 12, 402_180), (100, 18, 897_462), (100, 40, 4_391_480),
    (100, 64, 11_210_432),
])
def test_cifar_resnet18_table(num_classes, width, expected):
    model = _meta("resnet18", (3, 32, 32), num_classes, width=width)
    assert count_weights(model) == expected


@pytest.mark.parametrize("n, expected", [(5, 3_970), (8, 6_352), (1, 794), (640, 794 * 640)])
def test_mnist_mlp_is_794n(n, expected):
    model = _meta("mlp", (1, 28, 28), 10, width=n)
    assert count_weights(model) == expected


@pytest.mark.parametrize("c_in, num_classes", [(3, 10), (1, 100), (4, 7)])
@pytest.mark.parametrize("w", [1, 3, 7, 13])
def test_resnet18_count_formula(w, c_in, num_classes):
    # N(w) = 2724 w^2 + k^2 c_in w + 8 w C: stages 36w^2 + 128w^2 + 512w^2 + 2048w^2 (1x1 shortcuts
    # included), stem k x k conv (k = 3 CIFAR, 7 ImageNet), head 8w -> C.
    cifar = _meta("resnet18", (c_in, 32, 32), num_classes, width=w)
    imagenet = _meta("resnet18_imagenet", (c_in, 224, 224), num_classes, width=w)
    assert count_weights(cifar) == 2724 * w**2 + 9 * c_in * w + 8 * w * num_classes
    assert count_weights(imagenet) == 2724 * w**2 + 49 * c_in * w + 8 * w * num_classes


@pytest.mark.parametrize("w", [16, 5])
def test_resnet20_count_formula(w):
    # Stem 9 c_in w; stage 1: 6 convs 9w^2; stage 2: 9*2w^2 + 5*9*4w^2; stage 3: 9*8w^2 + 5*9*16w^2;
    # = 1044 w^2 in the stages; option-A shortcuts have no weights; head 4w -> C.
    model = _meta("resnet20", (3, 32, 32), 10, width=w)
    assert count_weights(model) == 1044 * w**2 + 27 * w + 40 * w
    if w == 16:
        assert count_weights(model) == 268_336  # the usual "0.27M" ResNet-20


def test_biases_and_batchnorm_are_not_counted():
    mlp = create_model("mlp", input_shape=(20,), num_outputs=3, widths=[7, 5], batch_norm=True)
    weights = 20 * 7 + 7 * 5 + 5 * 3
    biases = 7 + 5 + 3
    bn = 2 * (7 + 5)
    assert count_weights(mlp) == weights
    assert count_parameters(mlp) == weights + biases + bn

    resnet = create_model("resnet18", input_shape=(3, 8, 8), num_outputs=10, width=2)
    bn_params = sum(p.numel() for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)
                    for p in m.parameters())
    fc_bias = resnet.fc.bias.numel()
    assert count_parameters(resnet) == count_weights(resnet) + bn_params + fc_bias


def test_counted_layers_are_linear_and_conv_in_forward_order():
    model = create_model("resnet18", input_shape=(3, 8, 8), num_outputs=10, width=2)
    names = [n for n, _ in counted_layers(model)]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert len(names) == 21  # stem + 16 block convs + 3 shortcut convs + fc (21 counted tensors)
    assert "layer2.0.shortcut.0" in names


def test_nonzero_count_sees_zeroed_entries():
    model = create_model("mlp", input_shape=(6,), num_outputs=2, width=4)
    assert count_nonzero_weights(model) == count_weights(model) == 6 * 4 + 4 * 2
    with torch.no_grad():
        model.layers[0].weight[:2, :3] = 0
        model.layers[0].bias.zero_()  # biases never count, zero or not
    assert count_nonzero_weights(model) == 6 * 4 + 4 * 2 - 6


def test_custom_layers_opt_in_with_counted_weight():
    class Sparse(nn.Module):
        """A stand-in for a CSR layer: dense size 10x4, 5 stored values."""

        counted_weight = True

        def __init__(self):
            super().__init__()
            self.values = nn.Parameter(torch.ones(5))

        def num_counted_weights(self):
            return 40

        def num_nonzero_weights(self):
            return int(torch.count_nonzero(self.values))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 3))

    class OptIn(Plain):
        counted_weight = True

    model = nn.Sequential(Sparse(), Plain(), OptIn(), nn.Linear(2, 2))
    assert count_weights(model) == 40 + 9 + 4
    assert count_nonzero_weights(model) == 5 + 9 + 4
    assert count_parameters(model) == 5 + 9 + 9 + 4 + 2
