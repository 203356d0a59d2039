"""Width-site discovery with torch.fx on models that declare no width_sites(): what is found (asserted
by module name), what is grouped or fixed and why, and that growing a discovered site preserves the
function up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rounding import assert_equal_up_to_rounding, forward_magnitude
from user_models import EncoderBlock, ResNet, TwoTowers, sequential_mlp
from widthlab.models.mlp import mlp as builtin_mlp
from widthlab.nn.discovery import DiscoveryError, discover, width_sites
from widthlab.nn.group_surgery import resize_group
from widthlab.nn.surgery import resize_site


def _names(sites):
    return {s.name: (s.consumer_name, s.norm_names) for s in sites}


def test_sequential_mlp():
    found = discover(sequential_mlp(), torch.randn(4, 5))
    assert _names(found.sites) == {"0": ("2", ()), "2": ("6", ("3",))}
    assert not found.groups
    assert [(f.producers, f.reasons) for f in found.fixed] == [(("6",), ("it is an output of the model",))]


def test_residual_cnn_sites_groups_and_reasons():
    found = discover(ResNet(), torch.randn(2, 3, 8, 8))
    assert _names(found.sites) == {f"layer{s}.{b}.conv1": (f"layer{s}.{b}.conv2", (f"layer{s}.{b}.bn1",))
                                   for s in (1, 2) for b in (0, 1)}
    groups = {g.name: g for g in found.groups}
    assert set(groups) == {"conv1+2", "layer2.0.conv2+2"}
    stage1, stage2 = groups["conv1+2"], groups["layer2.0.conv2+2"]
    assert set(stage1.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(stage1.consumers) == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                     "layer2.0.shortcut.0"}
    assert set(stage1.norms) == {"bn1", "layer1.0.bn2", "layer1.1.bn2"}
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"}
    assert set(stage2.consumers) == {"layer2.1.conv1", "fc"}
    assert all("residual addition" in r for g in found.groups for r in g.reasons)
    with pytest.raises(DiscoveryError, match="tied to.*residual addition"):
        found.site("layer1.0.conv2")


def test_transformer_block_finds_the_feed_forward_width_and_fixes_the_model_width():
    found = discover(EncoderBlock(), torch.randn(2, 5, 6))
    assert _names(found.sites) == {"ff.0": ("ff.3", ())}
    (model_dim,) = [f for f in found.fixed if "embed" in f.producers]
    assert set(model_dim.producers) == {"embed", "ff.3"}
    assert any("attn (MultiheadAttention)" in r for r in model_dim.reasons), model_dim.reasons
    with pytest.raises(DiscoveryError, match="attn"):
        found.site("embed")


def test_custom_forward_groups_summed_towers_and_fixes_a_concatenation():
    found = discover(TwoTowers(), torch.randn(3, 6))
    assert _names(found.sites) == {}
    (towers,) = found.groups
    assert (towers.name, towers.producers, towers.consumers) == ("a+1", ("a", "b"), ("mix",))
    fixed = {f.producers: f.reasons for f in found.fixed}
    assert any("concatenated" in r for r in fixed[("mix",)])
    assert any("concatenated" in r for r in fixed[("side",)])


def test_tied_weights_are_fixed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.out(torch.relu(self.dec(torch.relu(self.enc(x)))))

    found = discover(Tied(), torch.randn(2, 4))
    assert not found.sites
    assert any("tied weights" in r for f in found.fixed for r in f.reasons)


def test_data_dependent_control_flow_is_one_clear_error_naming_the_module():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -x

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Gate(), nn.Linear(8, 2))
    with pytest.raises(DiscoveryError) as err:
        discover(model, torch.randn(2, 4))
    msg = str(err.value)
    assert "2 (Gate)" in msg and "data-dependent control flow" in msg and "\n" not in msg
    # Treated as opaque, the rest is discovered: the first layer now feeds an unknown module.
    found = discover(model, torch.randn(2, 4), leaf_modules=[Gate])
    assert not found.sites and any("Gate" in r for f in found.fixed for r in f.reasons)


def test_example_input_that_does_not_fit_is_reported():
    with pytest.raises(DiscoveryError, match="does not run"):
        discover(sequential_mlp(), torch.randn(4, 7))


@pytest.mark.numerics
@pytest.mark.parametrize("build,x", [
    (sequential_mlp, torch.randn(16, 5)),
    (ResNet, torch.randn(4, 3, 8, 8)),
    (EncoderBlock, torch.randn(4, 5, 6)),
], ids=["sequential", "resnet", "transformer"])
def test_growing_every_discovered_site_preserves_the_function_up_to_rounding(build, x):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        before = model(x)
    sites = discover(model, x).sites
    assert sites
    for site in sites:
        resize_site(site, n_new=3, init_in="normal", model=model)
    with torch.no_grad():
        after = model(x)
    terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert_equal_up_to_rounding(after, before, terms=terms + x.shape[1] * 64,
                                magnitude=forward_magnitude(model, x))
    grown = discover(model, x)  # the grown model is discovered with the new widths
    assert {s.name: s.width for s in grown.sites} == {s.name: s.width for s in sites}


def test_declared_sites_are_kept_and_names_select():
    model = builtin_mlp((4,), 3, width=8, depth=2)
    assert [s.name for s in width_sites(model)] == [s.name for s in model.width_sites()]
    with pytest.raises(DiscoveryError, match="no width site 'x'"):
        width_sites(model, names=["x"])
    seq = sequential_mlp()
    assert [s.name for s in width_sites(seq, torch.randn(2, 5), names=["2"])] == ["2"]
    with pytest.raises(DiscoveryError, match="example input"):
        width_sites(seq)
    with pytest.raises(DiscoveryError, match="cannot be resized: it is an output"):
        width_sites(seq, torch.randn(2, 5), names=["6"])


# --- groups: one width shared by several producers and consumers ------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("build,x", [(ResNet, torch.randn(4, 3, 8, 8)), (TwoTowers, torch.randn(8, 6))],
                         ids=["resnet-streams", "summed-towers"])
def test_growing_every_group_preserves_the_function_up_to_rounding(build, x):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        before = model(x)
    groups = discover(model, x).groups
    events = [resize_group(model, g, n_new=5, init_in="normal") for g in groups]
    with torch.no_grad():
        after = model(x)
    terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert_equal_up_to_rounding(after, before, terms=terms + 64, magnitude=forward_magnitude(model, x))
    regrown = {g.name: g for g in discover(model, x).groups}
    for g, event in zip(groups, events):
        (width,) = event.widths.values()
        for name in (*g.producers, *g.consumers):
            w = model.get_submodule(name).weight
            assert w.shape[0 if name in g.producers else 1] == width, name
        assert regrown[g.name].producers == g.producers


def test_group_keep_selects_the_same_units_everywhere():
    torch.manual_seed(0)
    model = ResNet()
    (stage2,) = [g for g in discover(model, torch.randn(2, 3, 8, 8)).groups if "fc" in g.consumers]
    old = {n: model.get_submodule(n).weight.detach().clone() for n in (*stage2.producers, *stage2.consumers)}
    old_bn = {n: model.get_submodule(n).running_var.clone() for n in stage2.norms}
    keep = [5, 0, 9]
    event = resize_group(model, stage2, keep=keep, n_new=2)
    for n in stage2.producers:
        assert torch.equal(model.get_submodule(n).weight[:3], old[n][keep])
    for n in stage2.consumers:
        assert torch.equal(model.get_submodule(n).weight[:, :3], old[n][:, keep])
        assert not model.get_submodule(n).weight[:, 3:].any()
    for n in stage2.norms:
        bn = model.get_submodule(n)
        assert torch.equal(bn.running_var, torch.cat([old_bn[n][keep], torch.ones(2)]))
        assert bn.num_features == 5
    assert model.fc.in_features == 5
    names = {p.name for p in event.params}
    assert {f"{n}.weight" for n in (*stage2.producers, *stage2.consumers)} <= names
    with pytest.raises(ValueError, match="keep indices must lie"):
        resize_group(model, stage2, keep=[7])


def test_discovery_leaves_batchnorm_statistics_and_modes_alone():
    model = ResNet().train()
    model.layer1[0].bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover(model, torch.randn(4, 3, 8, 8) + 3.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training


class ResidualBranch(nn.Module):
    """A branch that reads and writes the stream: ``hid`` is a producer and a consumer of one width."""

    def __init__(self):
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.relu(self.hid(h)) + h)


@pytest.mark.numerics
def test_a_module_that_reads_and_writes_a_group_width_is_resized_on_both_axes():
    torch.manual_seed(0)
    model, x = ResidualBranch(), torch.randn(8, 4)
    (group,) = discover(model, x).groups
    assert (group.producers, group.consumers) == (("inp", "hid"), ("hid", "out"))
    with torch.no_grad():
        before = model(x)
    old = model.hid.weight.detach().clone()
    resize_group(model, group, keep=[4, 0, 2, 1, 3, 5], n_new=3, init_in="normal", init_out="zeros")
    assert model.hid.weight.shape == (9, 9)
    assert torch.equal(model.hid.weight[:6, :6], old[[4, 0, 2, 1, 3, 5]][:, [4, 0, 2, 1, 3, 5]])
    assert not model.hid.weight[:, 6:].any()  # new units feed nothing
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), before, terms=4 + 9 + 9 + 9,
                                    magnitude=forward_magnitude(model, x))
