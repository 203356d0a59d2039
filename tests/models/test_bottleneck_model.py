"""The bottleneck ResNet-18 families of the wide & sparse paper (§2.2, Fig. 3), CIFAR-10 (C = 10).

All numbers are computed here from the architecture (App. A: stage widths w, 2w, 4w, 8w; two
BasicBlocks per stage; 1x1 shortcuts at the entries of stages 2-4; 3x3 stem on 3 channels; Linear
8w -> 10), never read from the code under test:

* dense count N(w) = 2724 w^2 + 27 w + 80 w; N(18) = 884,502;
* non-linear bottleneck: the layers that do not shrink (stem 27 w, shortcuts 42 w^2, head 80 w) grow
  with w, and the block mids take what is left, stage by stage as d_b,s = alpha w0_s^2 / w_s with
  alpha = (N(w0) - fixed(w)) / (N(w0) - fixed(w0)) (Fig. 3b holds the total weight count);
* linear bottleneck, factorised base (w0, d_b = min(d_i, d_o)): a k x k conv d_i -> d_o costs
  d_b (k^2 d_i + d_o), so stage 1 costs 4 * 10 w^2, each later stage of width c costs
  2.75 c^2 (entry conv) + 3 * 10 c^2 + 0.75 c^2 (shortcut) = 33.5 c^2, the head 10 (8 w + 10), and the
  total is 2854 w^2 + 107 w + 100; 926,722 at w = 18.
"""

import math

import pytest
import torch

from widthlab.methods.widesparse.bottleneck import bottleneck_sizes
from widthlab.methods.widesparse.plan import build
from widthlab.models import count_weights, create_model
from widthlab.models.bottleneck import nonlinear_bottleneck_resnet
from widthlab.models.resnet import ResNetConfig

W0 = 18


def dense_count(w: int) -> int:
    return 2724 * w * w + 27 * w + 80 * w


def fixed_count(w: int) -> int:
    """Stem, the three 1x1 shortcuts (w 2w + 2w 4w + 4w 8w = 42 w^2) and the head."""
    return 27 * w + 42 * w * w + 80 * w


def factorized_count(w: int) -> int:
    return 2854 * w * w + 107 * w + 100


def _blocks(w: int):
    """(prefix, c_in, c_out) of the eight BasicBlocks."""
    out, c_in = [], w
    for s in range(4):
        c = w * 2**s
        for b in range(2):
            out.append((f"layer{s + 1}.{b}", c_in, c))
            c_in = c
    return out


def test_counts_of_the_closed_forms():
    assert dense_count(W0) == 884_502  # the paper's CIFAR-10 ResNet-18 count at w = 18
    cfg = ResNetConfig(in_channels=3, num_classes=10, width=W0)
    assert bottleneck_sizes(cfg, W0, "nonlinear_bottleneck").target == dense_count(W0)


@pytest.mark.parametrize("w", [25, 36, 51, 72, 102])
def test_nonlinear_mids_follow_w0s_squared_over_ws_stage_by_stage(w):
    cfg = ResNetConfig(in_channels=3, num_classes=10, width=w)
    member = bottleneck_sizes(cfg, W0, "nonlinear_bottleneck")
    alpha = (dense_count(W0) - fixed_count(w)) / (dense_count(W0) - fixed_count(W0))
    assert 0 < alpha < 1
    total = fixed_count(w)
    for s, (prefix, c_in, c) in enumerate(_blocks(w)):
        w0s = W0 * 2 ** (s // 2)
        ideal = alpha * w0s**2 / c  # paper §2.2 / Fig. 3b reconstruction: d_b,s ~ w0_s^2 / w_s
        mid = member.dims[prefix]
        assert mid in (max(1, math.floor(ideal)), math.ceil(ideal)), (prefix, mid, ideal)
        total += 9 * (c_in + c) * mid
    assert member.counted == total <= dense_count(W0)
    # Within one channel of the dearest block of the target (integer mids).
    assert dense_count(W0) - total < 9 * 2 * 8 * w
    model = nonlinear_bottleneck_resnet(cfg, W0)
    assert count_weights(model) == total


def test_nonlinear_at_w72_is_not_drained_from_the_last_block():
    member = bottleneck_sizes(ResNetConfig(in_channels=3, num_classes=10, width=72), W0,
                              "nonlinear_bottleneck")
    # alpha = 0.7585: ideals 3.41, 6.83, 13.65, 27.3 per stage (the drained fit gave 36 and 16 in
    # stage 4 and a 1-channel mid at w = 102).
    mids = [member.dims[p] for p, _, _ in _blocks(72)]
    assert mids[6] - mids[7] in (-1, 0, 1) and mids[0] - mids[1] in (-1, 0, 1)
    assert mids[6] in (27, 28) and mids[0] in (3, 4)


def test_nonlinear_at_base_width_is_the_dense_base():
    member = bottleneck_sizes(ResNetConfig(in_channels=3, num_classes=10, width=W0), W0,
                              "nonlinear_bottleneck")
    assert member.mismatch == 0
    assert [member.dims[p] for p, _, _ in _blocks(W0)] == [c for _, _, c in _blocks(W0)]


def test_linear_bottleneck_targets_the_factorised_base_by_default():
    cfg = ResNetConfig(in_channels=3, num_classes=10, width=W0)
    member = bottleneck_sizes(cfg, W0, "linear_bottleneck")
    assert member.target == factorized_count(W0) == 926_722
    # At w = w0 every layer keeps its full inner width min(d_i, d_o): no extra rank constraint.
    for prefix, c_in, c in _blocks(W0):
        assert member.dims[f"{prefix}.conv1"] == min(c_in, c)
        assert member.dims[f"{prefix}.conv2"] == c
    assert member.dims["fc"] == 10 and member.dims["layer2.0.shortcut.0"] == W0
    assert member.mismatch == 0


def test_linear_bottleneck_plan_default_and_member_count():
    torch.manual_seed(0)
    model = create_model("resnet18", input_shape=(3, 32, 32), num_outputs=10, width=36)
    plan = build(model, None, seed=0, base_width=W0, variant="linear_bottleneck")
    assert plan.summary["target_weights"] == dense_count(W0)  # the sparse family's count, for reference
    counted = count_weights(plan.model)
    assert counted - factorized_count(W0) == plan.summary["weight_mismatch"]
    # Integer ranks: within one channel of the dearest factorised layer (9 * 8w + 8w).
    assert abs(plan.summary["weight_mismatch"]) < 10 * 8 * 36
    dense = create_model("resnet18_linear_bottleneck", input_shape=(3, 32, 32), num_outputs=10, width=36,
                         base_width=W0)
    assert count_weights(dense) == counted  # the registered model has the same default


def test_factorised_conv_rank_limit_at_stage_entries():
    """With d_b = min(d_i, d_o) a 3x3 conv d_i -> 2 d_i has rank <= d_i as a (d_o, 9 d_i) matrix,
    while a dense conv reaches rank 2 d_i; every other layer (d_o <= d_i, or 1x1) is unconstrained."""
    model = create_model("resnet18_linear_bottleneck", input_shape=(3, 32, 32), num_outputs=10, width=8,
                         base_width=8)
    entry = model.get_submodule("layer2.0.conv1")
    W = torch.einsum("ob,bikl->oikl", entry.b.weight[:, :, 0, 0].double(), entry.a.weight.double())
    assert torch.linalg.matrix_rank(W.reshape(16, -1)).item() == 8
    dense = torch.nn.Conv2d(8, 16, 3, bias=False).weight.reshape(16, -1)
    assert torch.linalg.matrix_rank(dense.double()).item() == 16
