"""Family members (Golubeva et al. 2021, §2): every sparse member holds exactly N(w0) nonzero counted weights;
the study-facing plan; the bottleneck variants (§2.2, Fig. 3) with their reported mismatch."""

import pytest
import torch

from widthlab.methods.widesparse import build_member, family, model_builder
from widthlab.methods.widesparse.bottleneck import bottleneck_family, bottleneck_member
from widthlab.methods.widesparse.plan import build
from widthlab.models import count_nonzero_weights, count_weights, create_model
from widthlab.models.bottleneck import FactorizedConv2d, LinearBottleneckResNet
from widthlab.models.resnet import ResNetConfig

CASES = {  # name: (input_shape, classes, options, w0, widths, allocation options)
    "mlp": ((1, 8, 8), 10, {}, 5, [10, 40, 60], {"fract_cl": 0.5}),
    "resnet18": ((3, 16, 16), 10, {}, 4, [6, 8], {}),
    "resnet18_imagenet": ((3, 32, 32), 7, {}, 4, [6], {}),
    "resnet20": ((3, 16, 16), 10, {}, 4, [8], {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_member_has_exactly_base_weights(name):
    shape, C, opts, w0, widths, alloc = CASES[name]
    builder = model_builder(name, input_shape=shape, num_outputs=C, **opts)
    members = family(builder, w0, widths, **alloc)
    N0 = members[0].counted
    assert [m.kind for m in members][:3] == ["dense", "sparse", "dense"]
    for m in members:
        if m.kind == "sparse":
            assert m.nonzero == N0 and m.counted - m.allocation.T == N0
    for w in widths:
        torch.manual_seed(0)
        model, alloc_w, res = build_member(builder, w0, w, seed=1, **alloc)
        assert count_nonzero_weights(model) == N0 and count_weights(model) == alloc_w.T + N0
        assert res.removed == alloc_w.T
        out = model(torch.randn(2, *shape))
        assert out.shape == (2, C)


def test_plan_summary_and_callbacks():
    torch.manual_seed(0)
    model = create_model("resnet18", input_shape=(3, 16, 16), num_outputs=10, width=8)
    plan = build(model, None, seed=3, base_width=4)
    s = plan.summary
    assert s["base_width"] == 4 and s["family"] == "resnet18-w0=4"
    assert s["target_weights"] == count_nonzero_weights(plan.model) == 2724 * 16 + 27 * 4 + 80 * 4
    assert s["connectivity"] == pytest.approx(s["target_weights"] / count_weights(plan.model))
    assert s["weight_mismatch"] == 0 and s["layers"] == 21 and s["sparse_impl"] in ("masked", "csr", "mixed")
    assert s["removed_weights"] == count_weights(plan.model) - s["target_weights"]
    assert len(plan.callbacks) == 1
    # Same seed, same masks, whatever the global RNG did before.
    torch.manual_seed(1)
    again = build(create_model("resnet18", input_shape=(3, 16, 16), num_outputs=10, width=8), None,
                  seed=3, base_width=4)
    for (k, a), (_, b) in zip(plan.model.state_dict().items(), again.model.state_dict().items()):
        if k.endswith("weight_mask"):
            assert torch.equal(a, b)


def test_plan_at_base_width_is_dense_and_errors_are_clear():
    model = create_model("mlp", input_shape=(64,), num_outputs=10, width=8)
    plan = build(model, None, seed=0, base_width=8)
    assert plan.summary["connectivity"] == 1.0 and plan.summary["removed_weights"] == 0
    with pytest.raises(ValueError, match="base_width"):
        build(create_model("mlp", input_shape=(64,), num_outputs=10, width=8), None, seed=0)
    with pytest.raises(ValueError, match="below base_width"):
        build(create_model("mlp", input_shape=(64,), num_outputs=10, width=8), None, seed=0, base_width=9)
    with pytest.raises(ValueError, match="variant"):
        build(create_model("mlp", input_shape=(64,), num_outputs=10, width=8), None, seed=0, base_width=4,
              variant="nope")
    mlp = build(create_model("mlp", input_shape=(64,), num_outputs=10, width=32), None, seed=0, base_width=4,
                classifier_connectivity=0.5)
    assert mlp.summary["classifier_connectivity"] == 0.5 and mlp.summary["family"] == "mlp-w0=4-c_cl=0.5"


def test_ntk_mlp_member_keeps_ntk_forward():
    from widthlab.nn.masked import MaskedNTKLinear

    model = create_model("mlp", input_shape=(1, 28, 28), num_outputs=10, width=128, parametrization="ntk",
                         bias=False)
    plan = build(model, None, seed=0, base_width=8, fract_cl=0.0)
    fc = plan.model.layers[0]
    assert isinstance(fc, MaskedNTKLinear) and fc.num_nonzero_weights() == 6352 - 1280
    # O(1) weights with variance 1/c_l (the paper's NTK-style Fig. 8 MLP), 1/sqrt(784) in the forward.
    free = fc.weight[fc.weight_mask]
    assert free.var().item() == pytest.approx(1 / fc.connectivity, rel=0.1)


@pytest.mark.parametrize("kind", ["linear_bottleneck", "nonlinear_bottleneck"])
def test_bottleneck_members_match_the_base_count(kind):
    cfg = ResNetConfig(in_channels=3, num_classes=10, width=18)
    members = bottleneck_family(cfg, 18, [18, 25, 36, 51, 72], kind)
    # Linear: the factorised base (w0, d_b = min(d_i, d_o)), 2854 w0^2 + 107 w0 + 100 (derived in
    # tests/models/test_bottleneck_model.py); non-linear: the dense base N(w0) = 884,502.
    target = 926_722 if kind == "linear_bottleneck" else 884_502
    for m in members:
        assert m.target == target
        # Integer channel counts: the residual is below one channel of the cheapest shrinkable layer
        # (linear) or of the dearest block (non-linear: each mid is the floor or ceil of its share).
        bound = 9 * 2 * m.width + m.width if kind == "linear_bottleneck" else 9 * 16 * m.width
        assert abs(m.mismatch) < bound, (m.width, m.mismatch)
    if kind == "nonlinear_bottleneck":
        assert members[0].mismatch == 0 and members[0].dims["layer1.0"] == 18  # w = w0 is the dense base
        assert members[-1].dims["layer4.1"] < 8 * 18  # mids shrink as the residual width grows


@pytest.mark.parametrize("kind", ["linear_bottleneck", "nonlinear_bottleneck"])
def test_bottleneck_plan_builds_a_trainable_model(kind):
    torch.manual_seed(0)
    model = create_model("resnet18", input_shape=(3, 16, 16), num_outputs=10, width=8)
    plan = build(model, None, seed=0, base_width=4, variant=kind)
    s = plan.summary
    assert s["family"] == f"resnet18-w0=4-{kind}" and plan.callbacks == []
    assert count_weights(plan.model) - s["bottleneck_target"] == s["weight_mismatch"]
    assert abs(s["weight_mismatch"]) / s["bottleneck_target"] < 0.01
    out = plan.model(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    if kind == "linear_bottleneck":
        assert isinstance(plan.model, LinearBottleneckResNet)
        assert isinstance(plan.model.get_submodule("layer4.1.conv2"), FactorizedConv2d)
        assert plan.model.widths() == {}
    else:
        assert set(plan.model.widths()) == {f"layer{s}.{b}.mid" for s in range(1, 5) for b in range(2)}


def test_registered_bottleneck_models_and_errors():
    m = create_model("resnet18_linear_bottleneck", input_shape=(3, 16, 16), num_outputs=10, width=8,
                     base_width=4, match="factorized")
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match="base_width"):
        create_model("resnet18_nonlinear_bottleneck", input_shape=(3, 16, 16), num_outputs=10, width=8)
    with pytest.raises(ValueError, match="ResNet"):
        bottleneck_member(create_model("mlp", input_shape=(4,), num_outputs=2, width=3), 2,
                          "linear_bottleneck")
