"""The NTK-style Fig. 8 family of the kernel studies: fixed weight count, per-width learning-rate preset,
weight scale of the init laws, option checks (Golubeva et al. 2021: §2.3, Fig. 8 and its protocol in App. A).

Numbers come from the paper's setting: 794 n dense weights, 6,352 = 794 * 8 kept, the first layer keeps
6,352 - 10 n (2 at n = 635, 1,232 at n = 512), and the per-width learning-rate table of its released code.
"""

import math

import pytest
import torch

from widthlab.methods.widesparse.kernel import KernelOptions, first_layer, init_weight_std
from widthlab.methods.widesparse.lr_presets import PresetLR, preset_lr
from widthlab.methods.widesparse.plan import build
from widthlab.models import create_model
from widthlab.models.counting import count_nonzero_weights, count_weights
from widthlab.studies.load import expand_runs, load_study

# The paper's per-width Fig. 8 learning rates, typed from its released code (dense; sparse at base width 8).
SPEC_DENSE = {8: 5.0, 32: 80, 128: 173, 216: 228, 328: 306, 512: 445, 635: 460}
SPEC_SPARSE_8 = {32: 136, 128: 260, 216: 361, 328: 491, 512: 736, 635: 875}


def _member(study: str, width: int, input_shape):
    """The run's network at init, built as the runner does (without the kernel recorder)."""
    run = next(r for r in expand_runs(load_study(study))
               if r.spec.model.width == width and r.spec.method.name == "widesparse")
    torch.manual_seed(run.seed)
    model = create_model("mlp", input_shape=input_shape, num_outputs=10, width=width,
                         **run.spec.model.options())
    opts = {k: v for k, v in run.spec.method.options().items() if k != "kernel"}
    return build(model, None, seed=run.seed, **opts)


@pytest.mark.parametrize("width", [8, 32, 128, 216, 328, 512, 635])
def test_mnist_family_keeps_6352_weights_with_a_dense_classifier(width):
    plan = _member("widesparse-kernel-mnist", width, (1, 28, 28))
    model = plan.model
    assert count_weights(model) == 794 * width
    assert count_nonzero_weights(model) == 6352
    fc, cl = model.layers[0], model.layers[1]
    kept_fc = int((fc.weight != 0).sum())
    assert kept_fc == 6352 - 10 * width
    assert int((cl.weight != 0).sum()) == 10 * width  # classifier dense (fract_cl = 0)
    if width == 512:
        assert kept_fc == 1232
    if width == 635:
        assert kept_fc == 2
    lr = SPEC_DENSE[8] if width == 8 else SPEC_SPARSE_8[width]
    assert plan.summary["lr"] == lr and plan.summary["lr_preset"] == "ntk-fig8"


@pytest.mark.parametrize("width", [128, 216, 328, 512, 635])
def test_digits_family_keeps_86_times_74_weights(width):
    plan = _member("widesparse-kernel-digits", width, (64,))
    assert count_nonzero_weights(plan.model) == 86 * 74 == 6364
    assert int((plan.model.layers[0].weight != 0).sum()) == 6364 - 10 * width
    assert plan.summary["lr"] == SPEC_SPARSE_8[width]  # ntk-fig8:sparse-w0=8, looked up by width


def test_preset_is_the_spec_table():
    for w, lr in SPEC_DENSE.items():
        assert preset_lr("ntk-fig8", w) == lr == preset_lr("ntk-fig8:dense", w, 8)
    assert preset_lr("ntk-fig8", 8, 8) == 5.0  # the family's member at w0 is the dense base
    for w, lr in SPEC_SPARSE_8.items():
        assert preset_lr("ntk-fig8", w, 8) == lr == preset_lr("ntk-fig8:sparse-w0=8", w, 86)
    for bad in [("ntk-fig8", 64, 8), ("ntk-fig8", 128, 86), ("nope", 8, 8), ("ntk-fig8:sparse", 32, 8),
                ("ntk-fig8:sparse-w0=16", 32, 16)]:
        with pytest.raises(ValueError):
            preset_lr(*bad)


def test_preset_replaces_the_configured_rate():
    model = torch.nn.Linear(3, 2)
    opt = PresetLR(491.0).make_optimizer(model, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert [g["lr"] for g in opt.param_groups] == [491.0]
    assert opt.param_groups[0]["momentum"] == 0.9  # the rest of the configured optimizer stays


@pytest.mark.parametrize("ntk_init, expected_var", [("normal", 1.0), ("uniform", 1.0)])
def test_weight_scale_maps_init_to_unit_variance(ntk_init, expected_var):
    """Theorem 1's u has E[u^2] = 1 over all entries; W / init_weight_std must too. NTK: N(0, 1/c)
    (E[W^2] = 1) or U(+-1/sqrt(c)) (E[W^2] = 1/3); standard Linear: U(+-1/sqrt(d c)), E[W^2] = 1/(3d)."""
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(64,), num_outputs=10, width=400, parametrization="ntk",
                         bias=False, ntk_init=ntk_init)
    plan = build(model, None, seed=0, base_width=86, fract_cl=0.0, sparse_impl="masked")
    fc = first_layer(plan.model)
    u = fc.weight.detach().double() / init_weight_std(fc)
    assert u.pow(2).mean().item() == pytest.approx(expected_var, rel=0.05)  # 2,364 nonzero entries
    std_model = create_model("mlp", input_shape=(64,), num_outputs=10, width=400, bias=False)
    plan = build(std_model, None, seed=0, base_width=86, fract_cl=0.0, sparse_impl="masked")
    fc = first_layer(plan.model)
    assert init_weight_std(fc) == pytest.approx(1 / math.sqrt(3 * 64))
    u = fc.weight.detach().double() / init_weight_std(fc)
    assert u.pow(2).mean().item() == pytest.approx(1.0, rel=0.05)


def test_kernel_option_checks():
    assert KernelOptions.parse(True) == KernelOptions()
    assert KernelOptions.parse({"pairs": 50}).pairs == 50
    for bad in [{"pair": 5}, {"pairs": 1}, {"split": "holdout"}, {"masks": 2.5}, "yes"]:
        with pytest.raises(ValueError):
            KernelOptions.parse(bad)
    deep = create_model("mlp", input_shape=(64,), num_outputs=10, width=8, depth=2)
    with pytest.raises(ValueError, match="one-hidden-layer"):
        build(deep, None, seed=0, base_width=4, kernel=True)
    resnet = create_model("resnet18", input_shape=(3, 32, 32), num_outputs=10, width=8)
    with pytest.raises(ValueError, match="sparse variant"):
        build(resnet, None, seed=0, base_width=4, variant="linear_bottleneck", lr_preset="ntk-fig8:dense")


@pytest.mark.parametrize("name, widths", [("widesparse-kernel-digits", [128, 216, 328, 512, 635]),
                                          ("widesparse-kernel-mnist", [8, 32, 128, 216, 328, 512, 635])])
def test_kernel_studies_are_one_family_with_preset_and_kernel(name, widths):
    runs = [r for r in expand_runs(load_study(name)) if r.spec.method.name == "widesparse"]
    assert sorted({r.spec.model.width for r in runs}) == widths  # the paper's Fig. 8 widths
    assert len(runs) == len(widths) * 10  # 10 seeds (paper App. A)
    for r in runs:
        opts = r.spec.method.options()
        assert opts["fract_cl"] == 0.0
        assert opts["lr_preset"].startswith("ntk-fig8") and opts["kernel"]["pairs"] >= 1000
        assert r.spec.model.options()["parametrization"] == "ntk" and r.spec.model.options()["bias"] is False
