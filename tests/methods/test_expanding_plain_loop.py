"""The self-expanding method from a plain loop (Mitchell et al. 2023): the Trainer's controller driven by
hand on its expandable networks; insertions preserve the function and the optimizer keeps every old
weight's state. Any other model: tests/methods/expanding/test_senn_any_model.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from widthlab.methods.expanding.model import ExpandableMLP
from widthlab.methods.expanding.plain_loop import SelfExpanding
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
