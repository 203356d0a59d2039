"""Optimizer state after an AWNN width change (Errica et al. 2025), in both modes."""

import pytest
import torch
import torch.nn.functional as F

from widthlab.methods.adaptive.callback import AdaptiveWidthCallback
from widthlab.methods.adaptive.distributions import softplus_inv
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.adaptive.mlp import adaptive_mlp
from widthlab.nn.optim_surgery import assert_optimizer_matches, remap_optimizer


def setup(mode):
    torch.manual_seed(0)
    m = adaptive_mlp(3, 2, lam0=0.2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    F.cross_entropy(m(x), y).backward()
    opt.step()
    cb = AdaptiveWidthCallback(ElboPrior(n_observations=100), optimizer_mode=mode, seed=0)
    return m, opt, cb, x, y


def force_lambda(m, lam):
    with torch.no_grad():
        m.scales[0].dist.r.fill_(softplus_inv(lam))


@pytest.mark.parametrize("mode", ["reset", "keep"])
@pytest.mark.parametrize("new_lam", [0.1, 0.4])  # grow (D 13 -> 25) and shrink (13 -> 7)
def test_width_change_remaps_the_optimizer(mode, new_lam):
    m, opt, cb, x, y = setup(mode)
    D_old = m.widths()["hidden.0"]
    old_state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                 for n, p in m.named_parameters()}
    force_lambda(m, new_lam)
    events = cb.update_widths(m)
    assert len(events) == 1 and events[0].optimizer_mode == mode
    D = m.widths()["hidden.0"]
    assert D_old != D
    for ev in events:
        remap_optimizer(opt, ev, mode=ev.optimizer_mode)
    assert_optimizer_matches(opt, m)  # same parameter set, no stale tensors
    params = dict(m.named_parameters())
    changed = ["layers.0.weight", "layers.0.bias", "layers.1.weight"]
    if mode == "reset":
        # Faithful: whole-tensor state restarts, including the re-wrapped consumer bias.
        for n in [*changed, "layers.1.bias"]:
            assert opt.state.get(params[n], {}) == {}
        r_state = opt.state[params["scales.0.dist.r"]]  # lam's parameter was not replaced: kept
        assert torch.equal(r_state["exp_avg"], old_state["scales.0.dist.r"]["exp_avg"])
    else:
        n = min(D, D_old)
        st = opt.state[params["layers.0.weight"]]
        assert torch.equal(st["exp_avg"][:n], old_state["layers.0.weight"]["exp_avg"][:n])
        assert torch.equal(st["exp_avg_sq"][:n], old_state["layers.0.weight"]["exp_avg_sq"][:n])
        assert st["step"] == old_state["layers.0.weight"]["step"]
        st1 = opt.state[params["layers.1.weight"]]
        assert torch.equal(st1["exp_avg"][:, :n], old_state["layers.1.weight"]["exp_avg"][:, :n])
        if D_old < D:
            assert st["exp_avg"][D_old:].abs().sum() == 0
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()  # the next step succeeds on the new tensors
    assert_optimizer_matches(opt, m)


def test_boundary_caps_the_width_during_updates():
    torch.manual_seed(0)
    m = adaptive_mlp(3, 2, lam0=0.05, boundary=0.02)
    cb = AdaptiveWidthCallback(ElboPrior(n_observations=10), seed=0)
    force_lambda(m, 0.001)
    cb.update_widths(m)
    assert m.widths() == {"hidden.0": 117}  # D(0.02)
    assert float(m.scales[0].dist.lam.detach()) == pytest.approx(0.02, rel=1e-6)


def test_bad_options():
    with pytest.raises(ValueError, match="optimizer_mode"):
        AdaptiveWidthCallback(ElboPrior(), optimizer_mode="slice")
    with pytest.raises(ValueError, match="anneal needs"):
        from widthlab.methods.adaptive.callback import LinearAnneal
        AdaptiveWidthCallback(ElboPrior(), anneal=LinearAnneal(1, 2))
