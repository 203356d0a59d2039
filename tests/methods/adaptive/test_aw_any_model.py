"""The adaptive-width method on models widthlab did not build, from a plain PyTorch loop
(Errica et al. 2025, Sec. 3: importance rescaling, ELBO terms, growth and shrinking at the tail).

Models: an ``nn.Sequential`` MLP, a ResNet-18-style CNN with BatchNorm (block widths and a residual
stream), a Transformer encoder block (its feed-forward width) and a user-written forward (two summed
towers, a tied width)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rounding import assert_equal_up_to_rounding, forward_magnitude
from user_models import EncoderBlock, ResNet, TwoTowers, gated_mlp, sequential_mlp
from widthlab import AdaptiveWidth, fold_adaptive
from widthlab.methods.adaptive.callback import AdaptiveWidthCallback
from widthlab.methods.adaptive.distributions import softplus_inv
from widthlab.methods.adaptive.layer import collect_sites
from widthlab.nn.discovery import DiscoveryError
from widthlab.nn.optim_surgery import assert_optimizer_matches

CASES = {
    "sequential": (sequential_mlp, lambda: torch.randn(32, 5), 3, None),
    "resnet": (ResNet, lambda: torch.randn(8, 3, 8, 8), 4, None),
    "resnet-stream": (ResNet, lambda: torch.randn(8, 3, 8, 8), 4, ["conv1+2", "layer2.0.conv1"]),
    "transformer": (EncoderBlock, lambda: torch.randn(8, 5, 6), 3, None),
    "custom-forward": (TwoTowers, lambda: torch.randn(32, 6), 2, ["a+1"]),
}
EXPECTED_SITES = {
    "sequential": ["0", "2"],
    "resnet": [f"layer{s}.{b}.conv1" for s in (1, 2) for b in (0, 1)],
    "resnet-stream": ["conv1+2", "layer2.0.conv1"],
    "transformer": ["ff.0"],
    "custom-forward": ["a+1"],
}


def _setup(case, **options):
    build, inputs, classes, sites = CASES[case]
    torch.manual_seed(0)
    model, x = build(), inputs()
    y = torch.randint(0, classes, (x.shape[0],))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    aw = AdaptiveWidth(model, opt, x, sites=sites, n_observations=500, **options)
    return model, opt, aw, x, y


def _train_step(model, opt, aw, x, y):
    loss = aw.loss(F.cross_entropy(model(x), y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, aw.step()


@pytest.mark.parametrize("case", list(CASES))
def test_plain_loop_trains_with_widths_changing(case):
    model, opt, aw, x, y = _setup(case)
    assert list(aw.widths()) == EXPECTED_SITES[case]
    start = aw.widths()
    # lam0 = c / (w - 1.5) starts every width at its built size: nothing resized at insertion.
    assert not aw.initial_events
    resized = 0
    for _ in range(12):
        loss, events = _train_step(model, opt, aw, x, y)
        assert torch.isfinite(loss)
        resized += len(events)
        assert_optimizer_matches(opt, model)  # lam's r included, no stale tensors
    assert resized and aw.widths() != start
    for s in collect_sites(model):  # the live width is D(lam) after every step
        assert s.width == s.scale.dist.width(s.scale.k)
    with torch.no_grad():
        assert model(x).shape[0] == x.shape[0]


def _state(opt, model):
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
            if p in opt.state}


@pytest.mark.parametrize("case", list(CASES))
def test_keep_mode_leaves_surviving_units_optimizer_state_unchanged(case):
    """At the step that resizes, every surviving unit's Adam moments and step count are bitwise the
    ones before the resize, whatever dimension was cut or grown; new units start at zero; tensors the
    resize did not touch keep their state object unchanged."""
    model, opt, aw, x, y = _setup(case, optimizer_mode="keep")
    for _ in range(40):
        loss = aw.loss(F.cross_entropy(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = _state(opt, model)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        events = aw.step()
        if events:
            break
    assert events, "no resize in 40 steps"
    after = _state(opt, model)
    assert set(after) == set(before)
    changed = 0
    for n, st in after.items():
        old = before[n]
        assert st["step"] == old["step"]
        new_w = dict(model.named_parameters())[n].detach()
        if new_w.shape == weights[n].shape:
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], old[k]), (n, k)
            continue
        changed += 1
        (dim,) = [d for d in range(new_w.dim()) if new_w.shape[d] != weights[n].shape[d]]
        keep = min(new_w.shape[dim], weights[n].shape[dim])  # the tail is cut or appended (Sec. 3)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k].narrow(dim, 0, keep), old[k].narrow(dim, 0, keep)), (n, k)
            assert not st[k].narrow(dim, keep, st[k].shape[dim] - keep).any(), (n, k)
        assert torch.equal(new_w.narrow(dim, 0, keep), weights[n].narrow(dim, 0, keep))
    assert changed


def test_reset_mode_restarts_the_state_of_resized_tensors():
    model, opt, aw, x, y = _setup("sequential", optimizer_mode="reset")
    with torch.no_grad():  # lam up: the first width shrinks
        site = collect_sites(model)[0]
        site.scale.dist.r.fill_(softplus_inv(0.5))
    _train_step(model, opt, aw, x, y)
    assert aw.widths()["0"] == math.floor(-math.log(0.1) / 0.5) + 2  # D(0.5) = 6 (Sec. 3)
    assert opt.state.get(model[0].weight, {}) == {}


def test_loss_terms_are_the_elbo_priors_over_n():
    """(1/N) sum theta^2 / (2 sigma_theta^2) over every parameter except lam's, plus the lam prior
    ln sigma + (lam - mu)^2 / (2 sigma^2) per layer, over N (Sec. 3)."""
    torch.manual_seed(0)
    model = sequential_mlp()
    aw = AdaptiveWidth(model, None, torch.randn(4, 5), sigma_theta=2.0, prior_lambda=(0.05, 0.5))
    with pytest.raises(ValueError, match="n_observations"):
        aw.loss(torch.tensor(0.0))
    got = aw.loss(torch.tensor(1.0), 40)
    thetas = [p for n, p in model.named_parameters() if not n.endswith("dist.r")]
    lams = [s.scale.dist.lam.detach() for s in collect_sites(model)]
    expect = 1.0 + (sum(float((p.detach().double() ** 2).sum()) for p in thetas) / (2 * 4.0)
                    + sum(math.log(0.5) + (float(lam) - 0.05) ** 2 / (2 * 0.25) for lam in lams)) / 40
    assert float(got.detach()) == pytest.approx(expect, rel=1e-5)


def test_lam_joins_the_optimizer_and_the_state_dict():
    torch.manual_seed(0)
    model = sequential_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    AdaptiveWidth(model, opt, torch.randn(4, 5), n_observations=10)
    names = [n for n, _ in model.named_parameters() if n.endswith("dist.r")]
    assert names == ["0.adaptive_scale.dist.r", "2.adaptive_scale.dist.r"]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    assert set(model.state_dict()) >= set(names)


def test_lambda0_resizes_to_its_width_at_once():
    torch.manual_seed(0)
    model = sequential_mlp()
    opt = torch.optim.Adam(model.parameters())
    aw = AdaptiveWidth(model, opt, torch.randn(4, 5), n_observations=10, lambda0=0.1)
    assert aw.widths() == {"0": 25, "2": 25}  # D(0.1) = floor(ln 10 / 0.1) + 2 (Sec. 3)
    assert model[0].out_features == 25 and model[3].num_features == 25 and model[6].in_features == 25
    assert_optimizer_matches(opt, model)


@pytest.mark.numerics
@pytest.mark.parametrize("case", ["resnet", "transformer", "custom-forward"])
def test_preserve_init_and_folding_keep_the_function(case):
    """consumer_init="preserve" (W / p) computes the model's function at insertion, and folding p
    back into the weights (W diag(p)) computes the adaptive model's: equal in exact arithmetic."""
    build, inputs, _, sites = CASES[case]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    with torch.no_grad():
        plain = model(x)
    AdaptiveWidth(model, None, x, sites=sites, consumer_init="preserve")
    terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():
        adaptive = model(x)
        assert_equal_up_to_rounding(adaptive, plain, terms=terms, magnitude=forward_magnitude(model, x))
        fold_adaptive(model)
        assert not any(n.endswith("dist.r") for n, _ in model.named_parameters())
        assert_equal_up_to_rounding(model(x), adaptive, terms=terms, magnitude=forward_magnitude(model, x))


def test_what_cannot_be_adapted_is_one_clear_error():
    with pytest.raises(DiscoveryError, match="tied to.*residual addition.*'conv1\\+2'"):
        AdaptiveWidth(ResNet(), None, torch.randn(2, 3, 8, 8), sites=["layer1.0.conv2"])
    with pytest.raises(DiscoveryError, match="no width site of its own.*'a\\+1'"):
        AdaptiveWidth(TwoTowers(), None, torch.randn(2, 6))
    with pytest.raises(DiscoveryError, match="example input"):
        AdaptiveWidth(TwoTowers(), None)

    with pytest.raises(DiscoveryError, match=r"1 \(Gate\).*data-dependent control flow"):
        AdaptiveWidth(gated_mlp(), None, torch.randn(2, 4))
    model = sequential_mlp()
    AdaptiveWidth(model, None, torch.randn(2, 5))
    with pytest.raises(ValueError, match="already adaptive"):
        AdaptiveWidth(model, None, torch.randn(2, 5), sites=["0"])


def test_the_trainer_callback_is_the_same_controller():
    model, opt, aw, x, y = _setup("sequential")
    cb = AdaptiveWidthCallback(aw)
    assert cb.controller is aw and cb.prior is aw.prior

    class T:
        pass

    t = T()
    t.model = model
    assert cb.extra_loss(model, None, None) is not None
    with torch.no_grad():
        collect_sites(model)[0].scale.dist.r.fill_(softplus_inv(0.5))
    events = cb.on_step_end(t)  # the trainer remaps from the events; the callback does not
    assert events and aw.widths()["0"] == 6 and aw.steps == 1


def test_consumers_get_kaiming_plus_for_the_importances_of_their_width():
    """Kaiming+ (Sec. 3): a layer reading a ⊙ p draws N(0, 2 / sum p^2), with p the discretised
    exponential's importances over the width (f(i) = e^{-lam i}(1 - e^{-lam}), plus 1e-6, normalised) and
    lam = c / (w - 1.5) so that D(lam) = w."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 200), nn.ReLU6(), nn.Linear(200, 300))
    AdaptiveWidth(model, None, torch.randn(2, 5))
    lam = -math.log(0.1) / (200 - 1.5)
    i = torch.arange(200, dtype=torch.float64)
    f = torch.exp(-lam * i) * (1 - math.exp(-lam)) + 1e-6
    p = f / f.sum()
    std = math.sqrt(2 / float((p ** 2).sum()))
    assert float(model[2].weight.detach().double().std()) == pytest.approx(std, rel=0.02)
    assert float(model[0].weight.detach().abs().max()) <= 1 / math.sqrt(5)  # the producer keeps its own init


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(CASES))
def test_truncating_a_user_model_cuts_every_site_and_group_like_masking_its_tail(case):
    """Truncation (Errica et al. 2025, Sec. 3.3) of a user model, residual groups included: every site
    and group keeps its first half, and the function is that of the full model with the tail units'
    importances zeroed (same p on the survivors: ``renormalize=False``), up to rounding."""
    from widthlab.methods.adaptive.truncation import kept_width, mask_units, truncate

    build, inputs, _, sites = CASES[case]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    AdaptiveWidth(model, None, x, sites=sites)
    before = {s.name: s.width for s in collect_sites(model)}
    masked = copy.deepcopy(model)
    for s in collect_sites(masked):
        mask_units(s.scale, torch.arange(kept_width(s.width, 0.5)), s.width, renormalize=False)
    truncate(model, fraction=0.5, renormalize=False)
    after = {s.name: s.width for s in collect_sites(model)}
    assert after == {k: kept_width(w, 0.5) for k, w in before.items()}
    terms = sum(m.weight[0].numel() for m in masked.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), masked(x), terms=terms, magnitude=forward_magnitude(masked, x))
