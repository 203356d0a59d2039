"""Optimizer-state surgery from resize events, in "keep" and "reset" modes."""

import copy

import pytest
import torch
from torch import nn

from widthlab.nn.optim_surgery import assert_optimizer_matches, remap_optimizer, sync_optimizer
from widthlab.nn.resize import ParamResize, ResizeEvent, WidthSite
from widthlab.nn.surgery import resize

BATCH = 64


class MLP(nn.Module):
    def __init__(self, d_in=4, widths=(8, 8), d_out=1, bn=False):
        super().__init__()
        dims = (d_in, *widths, d_out)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) if bn else nn.Identity() for w in widths)
        self.bn = bn

    def forward(self, x):
        for fc, norm in zip(self.fcs[:-1], self.norms):
            x = torch.tanh(norm(fc(x)))
        return self.fcs[-1](x)

    def width_sites(self):
        return [WidthSite(f"h{i}", self.fcs[i], self.fcs[i + 1], (self.norms[i],) if self.bn else (),
                          f"fcs.{i}", f"fcs.{i + 1}", (f"norms.{i}",) if self.bn else ())
                for i in range(len(self.norms))]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                  weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def data(seed=0, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def train_steps(model, opt, steps=3, seed=0):
    losses = []
    for s in range(steps):
        x, y = data(seed + s)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(opt):
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
            for p, st in opt.state.items()}


# --- keep mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_keep_mode_slices_surviving_state_and_zero_pads_new_units(name):
    torch.manual_seed(0)
    model = MLP()
    opt = OPTIMIZERS[name](model.parameters())
    train_steps(model, opt)
    old = snapshot(opt)
    untouched = model.fcs[2].weight
    untouched_state = opt.state[untouched]
    keep = torch.tensor([6, 1, 3])
    event = resize(model, "h0", keep=keep, n_new=2)
    remap_optimizer(opt, event, mode="keep")
    assert_optimizer_matches(opt, model)

    for pr in event.params:
        new_state, old_state = opt.state[pr.new], old[pr.old]
        assert new_state.keys() == old_state.keys()
        for key, v in old_state.items():
            if torch.is_tensor(v) and v.shape == pr.old.shape:
                assert torch.equal(new_state[key].narrow(pr.dim, 0, 3), v.index_select(pr.dim, keep)), key
                assert not new_state[key].narrow(pr.dim, 3, 2).any(), key
            else:
                assert new_state[key] is v or new_state[key] == v, key  # e.g. step kept
    assert opt.state[untouched] is untouched_state
    train_steps(model, opt, seed=10)


def test_keep_mode_with_batchnorm_params():
    torch.manual_seed(0)
    model = MLP(bn=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt)
    bn_w = model.norms[0].weight
    m = opt.state[bn_w]["exp_avg"].clone()
    event = resize(model, "h0", keep=[2, 5], n_new=1)
    remap_optimizer(opt, event)
    new_m = opt.state[model.norms[0].weight]["exp_avg"]
    assert torch.equal(new_m, torch.cat([m[[2, 5]], torch.zeros(1)]))
    assert_optimizer_matches(opt, model)
    train_steps(model, opt)


@pytest.mark.numerics
def test_adam_step_of_old_units_is_unchanged_up_to_rounding_by_a_new_function_preserving_unit():
    """SENN width insertion: a new unit with zero outgoing weights and transplanted Adam state (m = v = 0 for
    the new unit) leaves one optimizer step of the old parameters as it is without the unit.

    Exact in exact arithmetic; in floating point the grown consumer sums one more (zero) term, so the
    forward, the gradient and hence Adam's step agree up to rounding (tests/rounding.py). The bound on
    the gradient has two parts: the backward's own sums (batch and fan-out lengths, times
    sum_b |2 r_b / B| |J_b|), and the forward's rounding of the residual r (forward bound, times
    sum_b (2 / B) |J_b|), with J_b = d f(x_b) / d theta. Adam's step then moves by at most its
    derivative with respect to the gradient times that bound.
    """
    from torch.func import functional_call, jacrev, vmap

    from rounding import forward_magnitude, rounding_tolerance

    torch.manual_seed(0)
    model = MLP(widths=(8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    # deepcopy: load_state_dict would share the step tensors, which Adam increments in place.
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    event = resize(model, "h0", n_new=3, init_in="normal")
    remap_optimizer(opt, event, mode="keep")
    x, y = data(20)
    for net, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()

    # Independent magnitudes from per-sample Jacobians of the twin (torch.func).
    params = {k: v.detach() for k, v in twin.named_parameters()}
    J = vmap(jacrev(lambda p, xb: functional_call(twin, p, (xb[None],)).squeeze()), (None, 0))(params, x)
    with torch.no_grad():
        r = twin(x) - y
    eps32 = torch.finfo(torch.float32).eps
    forward_tol = rounding_tolerance(torch.float32, terms=4 + 11 + 1, magnitude=forward_magnitude(twin, x))
    backward_terms = BATCH + 11 + 1
    old = {"fcs.0.weight": (slice(0, 8),), "fcs.0.bias": (slice(0, 8),),
           "fcs.1.weight": (slice(None), slice(0, 8)), "fcs.1.bias": (slice(None),)}
    grad_tol = {}
    for name, idx in old.items():
        shape = (-1,) + (1,) * (J[name].dim() - 1)
        A = (2 * r.abs().view(shape) / BATCH * J[name].abs()).sum(0)
        C = (2 / BATCH * J[name].abs()).sum(0)
        grad_tol[name] = backward_terms * eps32 * A + forward_tol * C
        g_new, g_twin = model.get_parameter(name).grad[idx], twin.get_parameter(name).grad
        assert ((g_new - g_twin).abs() <= grad_tol[name]).all(), name

    opt.step()
    twin_opt.step()
    beta1, beta2 = twin_opt.defaults["betas"]
    lr, eps = twin_opt.defaults["lr"], twin_opt.defaults["eps"]
    for name, idx in old.items():
        p = twin.get_parameter(name)
        st = twin_opt.state[p]
        t = float(st["step"])
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        m_hat, sqrt_v_hat = st["exp_avg"] / bc1, (st["exp_avg_sq"] / bc2).sqrt()
        denom = sqrt_v_hat + eps
        # |d step / d g| for u = lr m_hat / (sqrt(v_hat) + eps), m and v both holding this gradient.
        sens = lr * ((1 - beta1) / bc1 + m_hat.abs() * (1 - beta2) * p.grad.abs()
                     / (bc2 * sqrt_v_hat.clamp_min(1e-30) * denom)) / denom
        tol = sens * grad_tol[name] + 4 * eps32 * (p.detach().abs() + lr * (m_hat / denom).abs())
        diff = (model.get_parameter(name).detach()[idx] - p.detach()).abs()
        assert (diff <= tol).all(), (name, float(diff.max()), float(tol.min()))


def test_keep_mode_fill_values_and_in_place_resized_parameters():
    torch.manual_seed(0)
    model = MLP(widths=(4,))
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt)
    w = model.fcs[1].weight  # (1, 4)
    v = opt.state[w]["exp_avg_sq"].clone()
    # Resized in place: the event's old and new are the same object.
    w.data = torch.cat([w.data[:, [2, 0]], torch.zeros(1, 3)], 1)
    event = ResizeEvent(params=(ParamResize("fcs.1.weight", w, w, 1, torch.tensor([2, 0]), 3),))
    remap_optimizer(opt, event, fill={"exp_avg_sq": 1.0})
    assert torch.equal(opt.state[w]["exp_avg_sq"], torch.cat([v[:, [2, 0]], torch.ones(1, 3)], 1))
    assert not opt.state[w]["exp_avg"][:, 2:].any()


# --- reset mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw_amsgrad"])
def test_reset_mode_drops_changed_state_only(name):
    torch.manual_seed(0)
    model = MLP()
    opt = OPTIMIZERS[name](model.parameters())
    train_steps(model, opt)
    untouched = model.fcs[2].weight
    untouched_state = opt.state[untouched]
    event = resize(model, "h0", keep=[0, 2], n_new=1)
    remap_optimizer(opt, event, mode="reset")
    assert_optimizer_matches(opt, model)
    for pr in event.params:
        assert pr.new not in opt.state or not opt.state[pr.new]
        assert pr.old not in opt.state
    assert opt.state[untouched] is untouched_state
    train_steps(model, opt, steps=1)
    if name != "sgd":
        assert int(opt.state[model.fcs[0].weight]["step"]) == 1
        assert int(opt.state[untouched]["step"]) == 4


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_rewrapped_tensors_reset_or_move_their_state(mode):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt, steps=1)
    old = model.fcs[1].bias
    old_state = opt.state[old]
    model.fcs[1].bias = nn.Parameter(old.detach().clone())
    event = ResizeEvent(params=(ParamResize("fcs.1.bias", old, model.fcs[1].bias, None, None),))
    remap_optimizer(opt, event, mode=mode)
    assert_optimizer_matches(opt, model)
    # The official adaptive-width code resets re-wrapped tensors too; keep mode moves the state over.
    assert opt.state[model.fcs[1].bias] == ({} if mode == "reset" else old_state)


# --- event bookkeeping --------------------------------------------------------------------------------


def test_merged_events_chain_in_order():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt)
    m = opt.state[model.fcs[0].weight]["exp_avg"].clone()
    first = resize(model, "h0", keep=[7, 6, 5, 4], n_new=2)
    second = resize(model, "h0", keep=[1, 4], n_new=1)
    remap_optimizer(opt, first.merge(second))
    assert_optimizer_matches(opt, model)
    expect = torch.cat([m[[6]], torch.zeros(2, 4)])
    assert torch.equal(opt.state[model.fcs[0].weight]["exp_avg"], expect)


def test_added_and_removed_parameters_and_named_groups():
    model = MLP()
    groups = [{"params": list(model.fcs[0].parameters()), "name": "first"},
              {"params": list(model.fcs[1:].parameters()), "name": "rest"}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    train_steps(model, opt, steps=1)
    old_head = model.fcs[2]
    model.fcs[2] = nn.Linear(8, 1)
    event = ResizeEvent(added=tuple((f"fcs.2.{n}", p) for n, p in model.fcs[2].named_parameters()),
                        removed=tuple(old_head.parameters()))
    remap_optimizer(opt, event, added_group="rest")
    assert_optimizer_matches(opt, model)
    assert all(p not in opt.state for p in old_head.parameters())
    assert any(p is model.fcs[2].weight for p in opt.param_groups[1]["params"])
    with pytest.raises(ValueError, match="no param group named"):
        remap_optimizer(opt, event, added_group="nope")
    train_steps(model, opt, steps=1)


def test_frozen_parameters_stay_out():
    model = MLP()
    for p in model.fcs[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    train_steps(model, opt, steps=1)
    remap_optimizer(opt, resize(model, "h0", n_new=2))
    assert_optimizer_matches(opt, model, trainable_only=True)
    with pytest.raises(AssertionError, match=r"missing from the optimizer: \['fcs.0.weight', 'fcs.0.bias'\]"):
        assert_optimizer_matches(opt, model)


def test_state_dict_round_trip_after_surgery():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    train_steps(model, opt)
    remap_optimizer(opt, resize(model, "h1", keep=[3, 2], n_new=4))
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    fresh.load_state_dict(opt.state_dict())
    w = model.fcs[1].weight
    assert torch.equal(fresh.state[w]["exp_avg_sq"], opt.state[w]["exp_avg_sq"])


# --- checks and sync ----------------------------------------------------------------------------------


def test_assert_optimizer_matches_finds_stale_missing_and_duplicates():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert_optimizer_matches(opt, model)
    resize(model, "h0", n_new=1)  # optimizer not remapped
    with pytest.raises(AssertionError, match="stale") as err:
        assert_optimizer_matches(opt, model)
    assert "fcs.0.weight" in str(err.value)
    sync_optimizer(opt, model)
    assert_optimizer_matches(opt, model)
    opt.param_groups[0]["params"].append(model.fcs[0].weight)
    with pytest.raises(AssertionError, match="held twice"):
        assert_optimizer_matches(opt, model)


def test_keep_mode_refuses_state_not_shaped_like_the_parameter_and_changes_nothing():
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    train_steps(model, opt, steps=1)
    opt.state[model.fcs[0].weight]["row_stats"] = torch.ones(8)  # e.g. a factored second moment
    params_before = [list(g["params"]) for g in opt.param_groups]
    event = resize(model, "h0", n_new=1)
    with pytest.raises(ValueError, match="row_stats"):
        remap_optimizer(opt, event, mode="keep")
    assert [list(g["params"]) for g in opt.param_groups] == params_before
    remap_optimizer(opt, event, mode="reset")
    assert_optimizer_matches(opt, model)


def test_bad_mode():
    opt = torch.optim.SGD(MLP().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        remap_optimizer(opt, ResizeEvent(), mode="slice")


# --- many cycles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["keep", "reset"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_training_continues_through_many_grow_shrink_cycles(mode, name):
    """50 random grow/shrink/permute cycles with two steps each, then plain training: the optimizer
    must still hold exactly the model's parameters and drive the loss down. (Randomly dropping trained
    units every few steps undoes learning, so the loss is judged after the cycles.)"""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = MLP(widths=(16, 16), bn=True)
    opt = OPTIMIZERS[name](model.parameters())
    x, y = data(0, n=128)

    def step():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        return loss.item()

    for _ in range(50):
        site = model.width_sites()[int(torch.randint(2, (1,), generator=g))]
        width = site.width
        n_keep = int(torch.randint(max(1, width - 4), width + 1, (1,), generator=g))
        keep = torch.randperm(width, generator=g)[:n_keep]
        n_new = int(torch.randint(0, 5 if width < 24 else 1, (1,), generator=g))
        event = resize(model, site.name, keep=keep, n_new=n_new, generator=g)
        remap_optimizer(opt, event, mode=mode)
        assert_optimizer_matches(opt, model)
        for _ in range(2):
            step()
    start = step()
    for _ in range(120):
        end = step()
    assert end < 0.25 * start
