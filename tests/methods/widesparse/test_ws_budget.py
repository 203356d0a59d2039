"""Weight counts (Golubeva et al. 2021, App. A), the allocation "according to layer size" (App. B/D: a cap)
and the MLP split (§2.3), checked against exact counts and allocations worked out independently."""

import pytest
import torch

from widthlab.methods.widesparse import (
    BudgetError,
    allocate,
    cap_allocation,
    family,
    fixed_allocation,
    mlp_split,
    mlp_split_grid,
    model_builder,
)
from widthlab.methods.widesparse.budget import lambdas
from widthlab.methods.widesparse.families import layer_sizes
from widthlab.models import count_weights, create_model


def meta(name, width, input_shape, C, **kw):
    with torch.device("meta"):
        return create_model(name, input_shape=input_shape, num_outputs=C, width=width, **kw)


def N(name, width, input_shape, C, **kw):
    return count_weights(meta(name, width, input_shape, C, **kw))


@pytest.mark.parametrize("w, expected", [(8, 175_192), (12, 393_540), (18, 884_502), (40, 4_362_680),
                                         (64, 11_164_352)])
def test_cifar10_counts(w, expected):
    assert N("resnet18", w, (3, 32, 32), 10) == expected == 2724 * w * w + 27 * w + 80 * w


@pytest.mark.parametrize("w, expected", [(8, 180_952), (12, 402_180), (18, 897_462), (40, 4_391_480),
                                         (64, 11_210_432)])
def test_cifar100_counts(w, expected):
    assert N("resnet18", w, (3, 32, 32), 100) == expected


@pytest.mark.parametrize("w, expected", [(64, 11_678_912), (90, 22_797_630), (128, 45_672_832),
                                         (181, 90_715_571), (256, 180_605_696)])
def test_imagenet_counts(w, expected):
    assert N("resnet18_imagenet", w, (3, 224, 224), 1000) == expected


def test_mlp_counts_exclude_biases():
    assert N("mlp", 5, (1, 28, 28), 10) == 3970 and N("mlp", 8, (1, 28, 28), 10) == 6352
    assert N("mlp", 123, (1, 28, 28), 10) == 794 * 123


# ------------------------------------------------------------------------------ reference allocations

IMAGENET = model_builder("resnet18_imagenet", input_shape=(3, 224, 224), num_outputs=1000)


@pytest.mark.parametrize("w, m, cap", [(90, 4, 1_302_721), (128, 9, 924_196), (181, 13, 735_047),
                                       (256, 14, 616_188)])
def test_imagenet_allocation(w, m, cap):
    sparse = family(IMAGENET, 64, [w], dense=False)[0]
    a = sparse.allocation
    assert len(a.sizes) == 21 and a.m == m and a.cap == cap
    assert sum(a.removals.values()) == a.T == N("resnet18_imagenet", w, (3, 224, 224), 1000) - 11_678_912
    assert sparse.counted - a.T == 11_678_912
    # remaining_l = min(N_l, c*), except the largest layer which holds the rounding (< m fewer).
    largest = max(a.sizes, key=lambda n: a.sizes[n])
    for name, left in a.remaining.items():
        if name == largest:
            assert cap - m < left <= min(a.sizes[name], cap)
        else:
            assert left == min(a.sizes[name], cap)
    if w == 90:
        assert all(n.startswith("layer4.") and n.endswith(("conv1", "conv2")) for n in a.sparsified)
        assert a.remaining["fc"] == 720_000
    if w == 128:
        assert a.remaining["fc"] == 924_196 and a.sizes["fc"] == 1_024_000


def test_cifar10_18_to_64():
    sparse = family(model_builder("resnet18", input_shape=(3, 32, 32), num_outputs=10), 18, [64],
                    dense=False)[0]
    a = sparse.allocation
    assert (a.m, len(a.sizes), a.cap) == (13, 21, 53_019)
    assert round(sparse.connectivity, 5) == 0.07923
    c = a.layer_connectivity
    # Allocation example: layer-4 3x3 convs keep 2.25%, layer-3 9.0%, layer-2 36%, layer4 shortcut 40%.
    assert c["layer4.1.conv2"] == pytest.approx(0.0225, abs=5e-4)
    assert c["layer3.1.conv2"] == pytest.approx(0.090, abs=1e-3)
    assert c["layer2.1.conv2"] == pytest.approx(0.36, abs=5e-3)
    assert c["layer4.0.shortcut.0"] == pytest.approx(0.40, abs=5e-3)
    for dense in ("conv1", "layer1.0.conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0", "fc"):
        assert c[dense] == 1.0


def test_cifar100_8_to_64():
    sparse = family(model_builder("resnet18", input_shape=(3, 32, 32), num_outputs=100), 8, [64],
                    dense=False)[0]
    a = sparse.allocation
    assert (a.m, a.cap) == (19, 9_002)
    assert round(sparse.connectivity, 4) == 0.0161


def test_cap_rule_small_example_and_ties():
    sizes = {"a": 10, "b": 50, "c": 50, "d": 30}
    assert lambdas([50, 50, 30, 10]) == [0, 40, 100]
    # m = 3 (Lambda_2 = 40 < 45 <= Lambda_3 = 100): b, c down to 30 (20 each), then R = 5 -> 1 each,
    # and the largest (b, first of the tie) also takes R mod 3 = 2.
    a = cap_allocation(sizes, 45)
    assert a.m == 3 and a.removals == {"a": 0, "b": 23, "c": 21, "d": 1} and a.cap == 29
    assert sum(a.removals.values()) == 45
    # Ties: the first of two equal largest layers (module order) absorbs the remainder.
    assert cap_allocation({"x": 100, "y": 100, "z": 10}, 3).removals == {"x": 2, "y": 1, "z": 0}
    assert cap_allocation(sizes, 0).removals == dict.fromkeys(sizes, 0)


def test_cap_rule_errors_when_budget_exceeds_lambda():
    sizes = {"a": 10, "b": 50, "c": 50, "d": 30}
    assert cap_allocation(sizes, 100).m == 3
    with pytest.raises(BudgetError, match="Lambda_3 = 100"):
        cap_allocation(sizes, 101)
    with pytest.raises(BudgetError, match="< 0"):
        cap_allocation(sizes, -1)
    # Opt-in extension: every layer down to one cap while each keeps a weight.
    a = cap_allocation(sizes, 101, all_layers=True)
    assert a.m == 4 and sum(a.removals.values()) == 101
    with pytest.raises(BudgetError):
        cap_allocation(sizes, 137, all_layers=True)


def test_mlp_split_spec_numbers():
    # Fig. 8: base 8, fract_cl = 0 -> the classifier stays dense and fc keeps 6352 - 10 n.
    for n in (32, 128, 512, 635):
        k_fc, k_cl = mlp_split(n, 8)
        assert k_cl == 0 and 784 * n - k_fc == 6352 - 10 * n
    assert 784 * 635 - mlp_split(635, 8)[0] == 2
    assert 784 * 512 - mlp_split(512, 8)[0] == 1232
    assert (784 * 512 - mlp_split(512, 8)[0]) / (784 * 512) == pytest.approx(0.0031, abs=5e-5)
    with pytest.raises(BudgetError):
        mlp_split(636, 8)
    # The official sweep of classifier removals at one width: 0..M by floor(M/5).
    grid = mlp_split_grid(80, 5, fract_cl=0.9)
    assert [k for _, k in grid] == [0, 144, 288, 432, 576, 720]
    assert all(a + b == 75 * 794 for a, b in grid)


def test_allocate_mlp_matches_mlp_split():
    model = meta("mlp", 512, (1, 28, 28), 10)
    a = allocate(model, 6352, fract_cl=0.0)
    assert a.removals == {"layers.0": mlp_split(512, 8)[0], "layers.1": 0}
    a = allocate(meta("mlp", 80, (1, 28, 28), 10), 3970, fract_cl=0.5)
    assert (a.removals["layers.0"], a.removals["layers.1"]) == mlp_split(80, 5, fract_cl=0.5)
    a = allocate(meta("mlp", 80, (1, 28, 28), 10), 3970, classifier_connectivity=0.25)
    assert a.remaining["layers.1"] == 200 and sum(a.remaining.values()) == 3970
    # The cap rule alone cannot go below the classifier's size on a two-layer MLP.
    with pytest.raises(BudgetError, match="fract_cl"):
        allocate(meta("mlp", 640, (1, 28, 28), 10), 3970)


def test_fixed_allocation_rest_by_cap_rule():
    sizes = {"a": 100, "b": 60, "c": 20}
    a = fixed_allocation(sizes, 70, {"c": 10})
    assert a.removals == {"a": 50, "b": 10, "c": 10}
    with pytest.raises(BudgetError):
        fixed_allocation(sizes, 5, {"c": 10})


def test_layer_sizes_in_module_order():
    sizes = layer_sizes(meta("resnet20", 16, (3, 32, 32), 10))
    assert list(sizes)[0] == "conv1" and list(sizes)[-1] == "fc" and len(sizes) == 20
