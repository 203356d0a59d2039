"""create_model: every registered model builds, runs forward/backward, and bad options are named."""

import math

import pytest
import torch

from widthlab.models import MODELS, count_weights, create_model, list_models, model_options

# Tiny instances of every registered model: (input_shape, num_outputs, options).
TINY = {
    "mlp": ((1, 6, 6), 3, {"widths": [8, 5], "batch_norm": True, "activation": "gelu"}),
    "resnet18": ((3, 16, 16), 4, {"width": 4}),
    "resnet18_imagenet": ((3, 64, 64), 5, {"width": 4}),
    "resnet20": ((1, 12, 12), 3, {"width": 4, "head_width": 6}),
    "resnet18_linear_bottleneck": ((3, 16, 16), 4, {"width": 8, "base_width": 4}),
    "resnet18_nonlinear_bottleneck": ((3, 16, 16), 4, {"width": 8, "base_width": 4}),
    "rnn": ((4, 3), 2, {"width": 5, "hidden_size": 6}),
}
# Models whose inputs are not float tensors (graph batches, token sequences): their forward/backward is
# exercised with their own data in tests/methods/adaptive/test_aw_architectures.py.
NON_TENSOR_INPUT = {"gin", "transformer"}


def test_tiny_table_covers_the_registry():
    # custom builds the user's own function: tests/models/test_custom_model.py
    assert set(TINY) | NON_TENSOR_INPUT | {"custom"} == set(list_models())


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward(name):
    torch.manual_seed(0)
    input_shape, num_outputs, options = TINY[name]
    model = create_model(name, input_shape=input_shape, num_outputs=num_outputs, **options)
    x = torch.randn(2, *input_shape)
    out = model(x)
    assert out.shape == (2, num_outputs)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert count_weights(model) > 0
    assert set(model.widths()) == {s.name for s in model.width_sites()}


def test_imagenet_resnet18_default_width_runs_on_small_images():
    model = create_model("resnet18_imagenet", input_shape=(3, 64, 64), num_outputs=10)
    assert model.config.width == 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_mlp_accepts_flat_and_image_inputs():
    flat = create_model("mlp", input_shape=(64,), num_outputs=10, width=8)
    image = create_model("mlp", input_shape=(1, 28, 28), num_outputs=10, width=8)
    assert flat(torch.randn(3, 64)).shape == (3, 10)
    assert image(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert image.config.in_features == math.prod((1, 28, 28))


def test_model_options_lists_defaults():
    assert model_options("resnet20")["width"] == 16
    assert model_options("resnet18")["width"] == 64
    assert "parametrization" in model_options("mlp")


@pytest.mark.parametrize("name, options, fragment", [
    ("mlp", {"widht": 8}, "model 'mlp': unknown option 'widht'; did you mean 'width'?"),
    ("mlp", {"zzz": 1, "width": 8}, "unknown option 'zzz'; known options: width, widths"),
    ("mlp", {}, "option 'width' (or 'widths') is required"),
    ("mlp", {"width": 8, "widths": [8]}, "not both"),
    ("mlp", {"widths": [8], "depth": 2}, "option 'depth' only applies"),
    ("mlp", {"width": 0}, "option 'width' must be >= 1"),
    ("mlp", {"width": "8"}, "option 'width' must be an int"),
    ("mlp", {"width": True}, "option 'width' must be an int"),
    ("mlp", {"width": 2.0}, "option 'width' must be an int"),
    ("mlp", {"widths": [8, -1]}, "option 'widths[1]' must be >= 1"),
    ("mlp", {"widths": "8"}, "option 'widths' must be a list"),
    ("mlp", {"width": 8, "depth": 0}, "option 'depth' must be >= 1"),
    ("mlp", {"width": 8, "activation": "sigmoid"}, "option 'activation' must be one of"),
    ("mlp", {"width": 8, "bias": "yes"}, "option 'bias' must be true or false"),
    ("mlp", {"width": 8, "parametrization": "mup"}, "option 'parametrization'"),
    ("resnet18", {"width": -3}, "model 'resnet18': option 'width' must be >= 1"),
    ("resnet20", {"init": "xavier"}, "model 'resnet20': option 'init' must be one of"),
    ("resnet20", {"head_width": -1}, "option 'head_width' must be >= 0"),
])
def test_bad_options_are_named(name, options, fragment):
    input_shape = (3, 8, 8)
    with pytest.raises(ValueError) as info:
        create_model(name, input_shape=input_shape, num_outputs=10, **options)
    assert fragment in str(info.value)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; known: .*mlp, .*resnet18"):
        create_model("resnet50", input_shape=(3, 32, 32), num_outputs=10)


@pytest.mark.parametrize("input_shape, num_outputs, fragment", [
    ((64,), 10, "input_shape must be (channels, height, width)"),
    ((3, 0, 32), 10, "input_shape must hold positive ints"),
    ((3, 32, 32), 0, "num_outputs must be a positive int"),
])
def test_bad_shapes_are_named(input_shape, num_outputs, fragment):
    with pytest.raises(ValueError) as info:
        create_model("resnet18", input_shape=input_shape, num_outputs=num_outputs)
    assert fragment in str(info.value)


def test_yaml_lists_become_tuples_and_configs_are_frozen():
    model = create_model("mlp", input_shape=[1, 4, 4], num_outputs=2, widths=[3, 2])
    assert model.config.widths == (3, 2)
    with pytest.raises(AttributeError):
        model.config.widths = (1,)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        MODELS.register("mlp")(lambda input_shape, num_outputs: None)
