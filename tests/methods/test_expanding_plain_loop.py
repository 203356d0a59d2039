"""The self-expanding method from a plain loop (Mitchell et al. 2023): the Trainer's controller driven by
hand, on its expandable networks and on the Linear sites of any model; insertions preserve the function
and the optimizer keeps every old weight's state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rounding import assert_equal_up_to_rounding, forward_magnitude
from user_models import EncoderBlock, ResNet, TwoTowers, sequential_mlp
from widthlab.methods.expanding.any_model import SiteNetwork
from widthlab.methods.expanding.model import ExpandableMLP
from widthlab.methods.expanding.plain_loop import SelfExpanding
from widthlab.nn.discovery import DiscoveryError
from widthlab.nn.optim_surgery import assert_optimizer_matches

FAST = dict(tau=0.0, alpha=0.0, cooldown=1, max_widths=[6], proposals=4, mala_bursts=1, mala_steps=2,
            max_additions=2)


def _blobs(n=96, d=5, classes=3):
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def test_plain_loop_grows_and_keeps_the_optimizer_state_of_old_weights():
    x, y = _blobs()
    torch.manual_seed(0)
    net = ExpandableMLP(5, 3, widths=[2])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    se = SelfExpanding(net, opt, (x, y), epochs=3, expand_at_start=False, **FAST)
    for _ in range(3):
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    w_before = net.layers[0].weight.detach().clone()
    m_before = opt.state[net.layers[0].weight]["exp_avg"].clone()
    with torch.no_grad():
        out_before = net(x)
    events = se.epoch_end()
    assert events and se.widths()[0] > 2
    assert_optimizer_matches(opt, net)
    st = opt.state[net.layers[0].weight]
    assert torch.equal(net.layers[0].weight[:2], w_before) and torch.equal(st["exp_avg"][:2], m_before)
    assert not st["exp_avg"][2:].any() and torch.all(st["exp_avg_sq"][2:] == 1.0)  # new units: m 0, v 1
    with torch.no_grad():  # zero outgoing weights: the same function, up to rounding of the longer sums
        torch.testing.assert_close(net(x), out_before, rtol=1e-5, atol=1e-5)
    F.cross_entropy(net(x), y).backward()
    opt.step()  # the remapped optimizer steps the grown model
    assert se.summary()["neurons_added"] == se.widths()[0] - 2


def test_a_site_scores_candidates_through_its_own_per_unit_operations():
    """Site "2" of the Sequential MLP is Linear -> BatchNorm1d -> Tanh -> Dropout -> Linear: a new unit's
    feature is tanh(z / sqrt(1 + eps)) (its BatchNorm identity-initialised, in evaluation mode)."""
    torch.manual_seed(0)
    net = SiteNetwork(sequential_mlp().eval(), torch.randn(2, 5))
    assert [s.name for s in net.sites] == ["0", "2"]
    z = torch.randn(3, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(net.chains[1](z), torch.tanh(z / (1 + 1e-5) ** 0.5), rtol=1e-12, atol=0)
    torch.testing.assert_close(net.chains[0](z), torch.relu(z), rtol=0, atol=0)


@pytest.mark.numerics
def test_any_model_grows_its_linear_sites_keeping_function_and_optimizer_state():
    x, y = _blobs(d=5)
    torch.manual_seed(0)
    model = sequential_mlp()  # Linear -> ReLU -> Linear -> BatchNorm1d -> Tanh -> Dropout -> Linear
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    se = SelfExpanding(model, opt, (x, y), expand_at_start=False, **{**FAST, "max_widths": [20, 16]})
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    old = {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone()) for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    events = se.epoch_end()
    assert events and se.widths() != [16, 12] and se.widths()[0] <= 20 and se.widths()[1] <= 16
    assert_optimizer_matches(opt, model)
    for n, p in model.named_parameters():  # survivors: the same weights and Adam moments, in order
        w, m = old[n]
        prefix = tuple(slice(0, k) for k in w.shape)
        assert torch.equal(p.detach()[prefix], w) and torch.equal(opt.state[p]["exp_avg"][prefix], m), n
    with torch.no_grad():
        terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, nn.Linear))
        assert_equal_up_to_rounding(model(x), before, terms=terms, magnitude=forward_magnitude(model, x))
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_models_without_linear_sites_are_refused_with_the_reason():
    with pytest.raises(DiscoveryError, match="no Linear -> Linear width site"):
        SelfExpanding(nn.Sequential(nn.Linear(5, 3)), None, _blobs())
    with pytest.raises(DiscoveryError, match=r"tied widths.*'a\+1'"):
        SelfExpanding(TwoTowers(), None, (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(DiscoveryError, match=r"embed reads \(2, 5, 6\) \(token sequences"):
        SelfExpanding(EncoderBlock(), None, (torch.randn(4, 5, 6), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(DiscoveryError, match="not between two Linear layers"):
        SelfExpanding(ResNet(), None, (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)),
                      sites=["layer1.0.conv1"])


def test_a_candidates_features_are_what_its_consumer_reads_once_inserted():
    """Scoring and insertion agree: the features the score sees for a candidate (the site's chain on
    W h + b) equal the new input column of the consumer after inserting that unit (eval mode)."""
    from widthlab.nn.surgery import resize_site

    torch.manual_seed(0)
    model = sequential_mlp().eval()
    x = torch.randn(9, 5)
    net = SiteNetwork(model, x[:2])
    site, chain = net.sites[1], net.chains[1]  # Linear(16, 12) -> BN -> Tanh -> Dropout -> Linear(12, 3)
    h = torch.relu(model[0](x)).detach()  # the producer's input
    w, b = torch.randn(1, 16), torch.randn(1)
    feats = chain((h @ w.T + b)[None])[0]  # (N, 1)

    def init_in(w_block, b_block):
        w_block.copy_(w)
        b_block.copy_(b)

    resize_site(site, None, 1, init_in=init_in, init_out="zeros", model=model)
    seen = {}
    model[6].register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0]))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen["a"][:, -1:], feats)


def test_a_dead_candidate_behind_a_relu_scores_zero():
    """All features 0 (a ReLU unit that never fires): the score is 0, not a singular solve."""
    from widthlab.methods.expanding.any_model import _score_fn

    r, G_inv = torch.randn(8, 3), torch.eye(3)
    dead_and_live = torch.stack([torch.zeros(8, 1), torch.randn(8, 1)])  # (P=2, N, k=1)
    s = _score_fn(lambda th: dead_and_live, r, G_inv, 8, 1.0, 1e-6)(torch.zeros(2, 10))
    assert s[0] == 0 and s[1] > 0
