"""Self-expansion (Mitchell et al. 2023) on models widthlab did not build: the width sites and groups of
an ``nn.Sequential`` MLP, a ResNet-style CNN with BatchNorm (conv sites and residual streams), a
Transformer block's feed-forward width (token sequences) and a user-written forward (two summed towers),
grown from a plain loop. Insertions preserve the function, the optimizer keeps every surviving unit's
state, and the features a candidate is scored on are what its consumers read once it is inserted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rounding import assert_equal_up_to_rounding, forward_magnitude
from user_models import EncoderBlock, ResNet, TwoTowers, gated_mlp, sequential_mlp
from widthlab.methods.expanding import kfac
from widthlab.methods.expanding.any_model import SiteNetwork, _score_fn
from widthlab.methods.expanding.fisher import per_sample_loss
from widthlab.methods.expanding.plain_loop import SelfExpanding
from widthlab.nn.discovery import DiscoveryError
from widthlab.nn.layer_slot import LayerSlot
from widthlab.nn.optim_surgery import assert_optimizer_matches

FAST = dict(tau=0.0, alpha=0.0, cooldown=1, proposals=4, mala_bursts=1, mala_steps=2, max_additions=2)

CASES = {
    "sequential": (sequential_mlp, lambda: torch.randn(48, 5), 3),
    "resnet": (ResNet, lambda: torch.randn(12, 3, 8, 8), 4),
    "transformer": (EncoderBlock, lambda: torch.randn(16, 5, 6), 3),
    "custom-forward": (TwoTowers, lambda: torch.randn(48, 6), 2),
}
EXPECTED_PLACES = {
    "sequential": ["0", "2"],
    "resnet": [f"layer{s}.{b}.conv1" for s in (1, 2) for b in (0, 1)] + ["conv1+2", "layer2.0.conv2+2"],
    "transformer": ["ff.0"],
    "custom-forward": ["a+1"],
}


def _data(case):
    build, inputs, classes = CASES[case]
    torch.manual_seed(0)
    model, x = build(), inputs()
    return model, x, torch.randint(0, classes, (x.shape[0],))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("case", list(CASES))
def test_discovery_finds_the_places_self_expansion_grows(case):
    model, x, _ = _data(case)
    net = SiteNetwork(model, x[:2])
    assert [p.name for p in net.places] == EXPECTED_PLACES[case]
    assert not net.skipped
    if case == "resnet":  # the stem's stream: three producers, four consumers
        stream = net.places[4]
        assert stream.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
        assert stream.consumers == ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                    "layer2.0.shortcut.0")


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(CASES))
def test_plain_loop_grows_keeping_function_and_optimizer_state(case):
    model, x, y = _data(case)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    se = SelfExpanding(model, opt, (x, y), expand_at_start=False, max_widths=[64], **FAST)
    start = se.widths()
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    old = {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
           for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    events = se.epoch_end()
    assert events and se.widths() != start and sum(se.widths()) == sum(start) + len(events)
    assert_optimizer_matches(opt, model)
    grown = 0
    for n, p in model.named_parameters():  # survivors: the same weights and Adam moments, in order
        w, m, v = old[n]
        st = opt.state[p]
        prefix = tuple(slice(0, k) for k in w.shape)
        assert torch.equal(p.detach()[prefix], w), n
        assert torch.equal(st["exp_avg"][prefix], m) and torch.equal(st["exp_avg_sq"][prefix], v), n
        if p.shape != w.shape:  # new units: first moments 0, second moments 1 (as the Trainer)
            grown += 1
            new = torch.ones_like(p, dtype=torch.bool)
            new[prefix] = False
            assert not st["exp_avg"][new].any() and torch.all(st["exp_avg_sq"][new] == 1.0), n
    assert grown
    with torch.no_grad():  # zero outgoing weights: the same function, up to the longer sums' rounding
        terms = sum(m.weight[0].numel() for m in _layers(model))
        assert_equal_up_to_rounding(model(x), before, terms=terms, magnitude=forward_magnitude(model, x))
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the remapped optimizer steps the grown model
    assert se.summary()["neurons_added"] == len(events)


@pytest.mark.parametrize("case", list(CASES))
def test_a_candidates_features_are_what_its_consumers_read_once_inserted(case):
    """For every place: the K-FAC rows the score sees for a random candidate (replayed on the traced
    graph) equal the rows of the new input channel each consumer reads after inserting that unit,
    as K-FAC takes them from the grown model (``kfac.input_rows``), in evaluation mode."""
    model, x, _ = _data(case)
    model.eval()
    for i in range(len(EXPECTED_PLACES[case])):
        grown = copy.deepcopy(model)
        net = SiteNetwork(grown, x[:2])
        place = net.places[i]
        theta = net.layout(place).random(1, torch.Generator().manual_seed(i), torch.float32)
        with torch.no_grad():
            predicted = net.features(place, net.record(x), theta)
        blocks = iter(net.layout(place).split(theta))

        def init_in(w_block, b_block, blocks=blocks):
            W, b = next(blocks)
            w_block.copy_(W.reshape(w_block.shape))
            if b_block is not None:
                b_block.copy_(b)

        net.grow(place, 1, init_in)
        seen = {}
        hooks = [net.module(c).register_forward_pre_hook(
            lambda m, a, c=c, seen=seen: seen.setdefault(c, a[0])) for c in place.consumers]
        with torch.no_grad():
            grown(x)
        for h in hooks:
            h.remove()
        for c, rows in zip(place.consumers, predicted):
            mod = net.module(c)
            actual = kfac.input_rows(mod, seen[c], bias=False)
            per_unit = actual.shape[1] // mod.weight.shape[1]  # kh·kw entries per input channel
            magnitude = float(actual.abs().max()) + 1.0
            assert_equal_up_to_rounding(rows[0], actual[:, -per_unit:],
                                        terms=sum(m.weight[0].numel() for m in _layers(grown)),
                                        magnitude=magnitude)


def test_token_sequences_are_rows_per_sample_and_token():
    """A Linear applied to (N, T, d) shares its weights over tokens: K-FAC rows per sample and token
    (KFAC-expand), so the weight gradient from the rows equals autograd's, and the feed-forward width of
    a Transformer block is a place whose candidates have N·T rows."""
    torch.manual_seed(0)
    layer, x = nn.Linear(6, 4), torch.randn(5, 7, 6)
    y = torch.randn(5, 7, 4)
    obs = kfac.observe(nn.Sequential(layer, nn.Flatten()), x, y.flatten(1), "mse")
    lay = obs.layers["0"]
    assert lay.a_rows.shape == (35, 7) and lay.factors.t == 7
    grad = kfac.gradient_from_rows(lay.a_rows, lay.e_rows["grad"], obs.n)  # (d + 1, m)
    loss = per_sample_loss("mse", layer(x).flatten(1), y.flatten(1)).mean()
    gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
    torch.testing.assert_close(grad.float(), torch.cat([gw.T, gb[None]]), rtol=1e-5, atol=1e-6)

    model, x, _ = _data("transformer")
    net = SiteNetwork(model.eval(), x[:2])
    ff = net.places[0]
    rows = net.features(ff, net.record(x), net.layout(ff).random(3, None, torch.float32))
    assert [tuple(r.shape) for r in rows] == [(3, 16 * 5, 1)]


def test_a_group_is_scored_at_every_consumer():
    """The residual stream of the ResNet's first stage is read by four convolutions: a candidate's rows
    are the patches each of them would read (3x3 for the blocks' convolutions, 1x1 for the shortcut)."""
    model, x, _ = _data("resnet")
    net = SiteNetwork(model.eval(), x[:2])
    stream = net.places[4]
    theta = net.layout(stream).random(2, None, torch.float32)
    rows = net.features(stream, net.record(x), theta)
    assert [tuple(r.shape) for r in rows] == [(2, 12 * 64, 9), (2, 12 * 64, 9), (2, 12 * 16, 9),
                                              (2, 12 * 16, 1)]
    # the candidate writes its unit through all three producers: conv1 (3·3·3 weights) and the two
    # blocks' second convolutions (8·3·3 each), no biases
    assert net.layout(stream).size == 27 + 72 + 72


def test_resume_grows_a_fresh_model_to_the_checkpoint_widths_and_best_epoch_restores_shrink():
    model, x, y = _data("resnet")
    se = SelfExpanding(model, None, (x, y), expand_at_start=False, max_widths=[64], **FAST)
    early_arch, early_state = se.model.architecture(), copy.deepcopy(se.model.state_dict())
    with torch.no_grad():
        early_out = se.model.eval()(x)
    se.expand()
    arch, state = se.model.architecture(), copy.deepcopy(se.model.state_dict())
    assert arch["widths"] != early_arch["widths"]
    torch.manual_seed(1)
    fresh = SiteNetwork(ResNet(), x[:2])
    fresh.set_architecture(arch)
    fresh.load_state_dict(state)
    assert fresh.widths() == se.model.widths()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), se.model.eval()(x))
    # Restoring an earlier (best-epoch) checkpoint: its units are a prefix of today's.
    se.model.set_architecture(early_arch)
    se.model.load_state_dict(early_state)
    assert se.model.widths() == early_arch["widths"]
    with torch.no_grad():
        assert torch.equal(se.model.eval()(x), early_out)


def test_a_dead_candidate_behind_a_relu_scores_zero():
    """All features 0 (a ReLU unit that never fires): the score is 0, not a singular solve."""
    r, G_inv = torch.randn(8, 3), torch.eye(3)
    dead_and_live = torch.stack([torch.zeros(8, 1), torch.randn(8, 1)])  # (P=2, N, k=1)
    s = _score_fn(lambda th: [dead_and_live], [r], [G_inv], 8, 1.0, 1e-6)(torch.zeros(2, 10))
    assert s[0] == 0 and s[1] > 0


def test_what_cannot_grow_is_one_clear_error():
    with pytest.raises(DiscoveryError, match="no width that self-expansion can grow"):
        SelfExpanding(nn.Sequential(nn.Linear(5, 3)), None, (torch.randn(4, 5), torch.zeros(4).long()))
    ln = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    net = SiteNetwork(ln, torch.randn(2, 5))  # the LayerNorm's width is skipped, with the reason
    assert [p.name for p in net.places] == ["2"] and "normalises over all units" in net.skipped["0"]
    with pytest.raises(DiscoveryError, match=r"'0' cannot grow by self-expansion.*LayerNorm"):
        SiteNetwork(ln, torch.randn(2, 5), sites=["0"])
    with pytest.raises(DiscoveryError, match="tied to"):
        SiteNetwork(ResNet(), torch.randn(2, 3, 8, 8), sites=["layer1.0.conv2"])

    with pytest.raises(DiscoveryError, match=r"1 \(Gate\).*data-dependent control flow"):
        SelfExpanding(gated_mlp(), None,
                      (torch.randn(2, 4), torch.zeros(2).long()))


class SlotNet(nn.Module):
    """A user's MLP that offers a place for new layers between its hidden layer and its head."""

    def __init__(self, max_layers=2):
        super().__init__()
        self.inp, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
        self.grow_here = LayerSlot(6, max_layers=max_layers)

    def forward(self, x):
        return self.out(self.grow_here(torch.relu(self.inp(x))))


def _blobs(n=96):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    return (3 * torch.randn(3, 5, generator=g))[y] + torch.randn(n, 5, generator=g), y


def test_a_layer_slot_inserts_bitwise_identity_layers_whose_width_is_a_site():
    torch.manual_seed(0)
    model, (x, _) = SlotNet(), _blobs()
    with torch.no_grad():
        before = model(x)
    ev = model.grow_here.insert("grow_here")
    assert [n for n, _ in ev.added] == ["grow_here.layers.0.linear.weight", "grow_here.layers.0.linear.bias",
                                        "grow_here.layers.0.act.v", "grow_here.layers.0.act.c",
                                        "grow_here.layers.0.act.l"]
    with torch.no_grad():
        assert torch.equal(model(x), before)  # W = I, b = 0, σ = identity: every product is x·1 or x·0
    net = SiteNetwork(model, x[:2])
    assert [p.name for p in net.places] == ["inp", "grow_here.layers.0.linear"]
    assert net.places[1].site.norm_names == ("grow_here.layers.0.act",)
    net.grow(net.places[1], 2, "kaiming")  # the inserted layer's width grows with its rational units
    act = model.grow_here.layers[0].act
    assert act.num_units == 8 and act.v[6:].eq(0).all() and act.c[6:].eq(0).all() and act.l[6:].eq(1).all()
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), before, terms=6 + 8 + 8,
                                    magnitude=forward_magnitude(model, x))
    with pytest.raises(ValueError, match="'grow_here' is full"):
        model.grow_here.insert("grow_here"), model.grow_here.insert("grow_here")


@pytest.mark.numerics
def test_plain_loop_inserts_layers_into_slots_and_grows_them():
    torch.manual_seed(0)
    model, (x, y) = SlotNet(), _blobs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    se = SelfExpanding(model, opt, (x, y), expand_at_start=False, alpha_layer=0.0, layer_cost_mul=1e-9,
                       layer_cooldown=1, max_widths=[12], layer_proposals=4,
                       **{**FAST, "max_additions": 3})
    for _ in range(2):
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(x)
        assert se.epoch_end()
        assert_optimizer_matches(opt, model)  # new layers' parameters joined, with empty state
        with torch.no_grad():
            terms = sum(m.weight[0].numel() for m in _layers(model))
            assert_equal_up_to_rounding(model(x), before, terms=terms, magnitude=forward_magnitude(model, x))
        model.train()
    assert se.model.layers() == {"grow_here": 2} and se.summary()["layers_added"] == 2
    assert se.model.widths()["grow_here.layers.0.linear"] > 6  # an inserted layer's width grew too
    F.cross_entropy(model(x), y).backward()
    opt.step()
    arch, state = se.model.architecture(), copy.deepcopy(se.model.state_dict())  # resume
    fresh = SiteNetwork(SlotNet(), x[:2])
    fresh.set_architecture(arch)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), se.model.eval()(x))
    fresh.set_architecture({"widths": {"inp": 6}, "layers": {"grow_here": 0}})  # back to the start
    assert fresh.widths() == {"inp": 6} and fresh.layers() == {"grow_here": 0}
    assert fresh.net.inp.weight.shape == (6, 5) and fresh.net.out.weight.shape == (3, 6)


def test_a_slot_must_feed_one_linear_layer():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.slot, self.out = nn.Linear(5, 6), LayerSlot(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.relu(self.slot(self.inp(x))))

    with pytest.raises(DiscoveryError, match="layer slot 'slot' must feed exactly one nn.Linear"):
        SiteNetwork(Bad(), torch.randn(2, 5))
