"""width_sites() names real modules and widths() follows the live weight shapes, also after surgery."""

import pytest
import torch
from torch import nn

from widthlab.models import create_model

CASES = {
    "mlp": ((5,), {"widths": [7, 6, 4]}),
    "mlp_bn_ntk": ((5,), {"widths": [7, 6], "batch_norm": True, "parametrization": "ntk"}),
    "resnet18": ((3, 8, 8), {"width": 2}),
    "resnet18_imagenet": ((3, 32, 32), {"width": 2}),
    "resnet20": ((3, 8, 8), {"width": 2}),
    "resnet20_head": ((3, 8, 8), {"width": 2, "head_width": 5}),
}


def _build(case):
    name = case.split("_bn")[0].removesuffix("_head")
    input_shape, options = CASES[case]
    return create_model(name, input_shape=input_shape, num_outputs=3, **options)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sites_name_the_modules_they_hold(case):
    model = _build(case)
    modules = dict(model.named_modules())
    sites = model.width_sites()
    assert len({s.name for s in sites}) == len(sites)
    for s in sites:
        assert modules[s.producer_name] is s.producer
        assert modules[s.consumer_name] is s.consumer
        assert len(s.norm_names) == len(s.norms)
        for norm_name, norm in zip(s.norm_names, s.norms):
            assert modules[norm_name] is norm
            assert norm.num_features == s.width
        assert s.consumer.weight.shape[1] == s.width  # consumer columns / input channels
    assert model.widths() == {s.name: s.producer.weight.shape[0] for s in sites}


def test_site_names():
    assert list(_build("mlp").widths()) == ["hidden.0", "hidden.1", "hidden.2"]
    assert _build("mlp").widths() == {"hidden.0": 7, "hidden.1": 6, "hidden.2": 4}
    r18 = _build("resnet18").widths()
    assert list(r18) == [f"layer{s}.{b}.mid" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert r18["layer2.1.mid"] == 4 and r18["layer4.0.mid"] == 16
    r20 = _build("resnet20_head").widths()
    assert list(r20)[:3] == ["layer1.0.mid", "layer1.1.mid", "layer1.2.mid"]
    assert len(r20) == 10 and r20["head.0"] == 5 and r20["layer3.2.mid"] == 8


def test_site_norms_and_names_for_mlp():
    site = _build("mlp_bn_ntk").width_sites()[1]
    assert (site.producer_name, site.norm_names, site.consumer_name) == ("layers.1", ("norms.1",), "layers.2")
    assert _build("mlp").width_sites()[0].norms == ()


def _narrow_linear(layer: nn.Linear, rows=None, cols=None) -> None:
    # Hand-made surgery (not nn/surgery.py): keep a prefix of rows and/or columns in place.
    with torch.no_grad():
        w = layer.weight
        w = w[:rows] if rows is not None else w
        w = w[:, :cols] if cols is not None else w
        layer.weight = nn.Parameter(w.clone())
        if rows is not None and layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[:rows].clone())


def test_widths_follow_mlp_surgery():
    torch.manual_seed(0)
    model = _build("mlp_bn_ntk")
    _narrow_linear(model.layers[0], rows=3)
    model.norms[0] = nn.BatchNorm1d(3)
    _narrow_linear(model.layers[1], cols=3)
    assert model.widths() == {"hidden.0": 3, "hidden.1": 6}
    assert model(torch.randn(4, 5)).shape == (4, 3)
    assert model.width_sites()[0].norms[0] is model.norms[0]


def test_widths_follow_resnet_surgery():
    model = _build("resnet18")
    block = model.layer2[1]
    block.conv1 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
    block.bn1 = nn.BatchNorm2d(3)
    block.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    assert model.widths()["layer2.1.mid"] == 3
    assert model.width_sites()[3].producer is block.conv1
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_widths_of_an_mlp_with_csr_layers():
    # The wide & sparse CSR path replaces a producer by a CSRLinear, which holds no dense weight.
    from widthlab.nn.sparse_linear import CSRLinear

    model = create_model("mlp", input_shape=(5,), num_outputs=3, widths=[7, 6])
    fc = model.layers[0]
    model.layers[0] = CSRLinear.from_dense(fc.weight, torch.rand(7, 5) < 0.5, fc.bias)
    assert model.widths() == {"hidden.0": 7, "hidden.1": 6}
