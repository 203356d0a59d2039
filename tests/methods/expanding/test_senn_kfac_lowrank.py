"""K-FAC optimizer: the factored form of the preconditioned gradient (float64).

For a Linear layer the gradient on R rows is ∇_W = gᵀã (g: output-gradient rows, ã: input rows with a
ones column for the bias), so the damped natural gradient G⁻¹ ∇_W A⁻¹ (Martens & Grosse 2015) equals
(G⁻¹gᵀ)(ãA⁻¹). Every step here is checked against an explicit dense G⁻¹ [∇_W | ∇_b] A⁻¹ formed from
the optimizer's stored inverses and the autograd gradients, up to the rounding bound of the longest
summation chain (R + D + m terms), on whichever form the optimizer took; and the form it took is
asserted: factored where the rows make ``.grad`` and it is cheaper, full otherwise.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rounding import assert_equal_up_to_rounding
from widthlab.methods.expanding import cost
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer, precondition_flops

DT = torch.float64
LR = 0.3
pytestmark = pytest.mark.numerics  # two summation orders of one product


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class _Rows:
    """Independent capture of every call's input and output gradient of some layers (retain_grad)."""

    def __init__(self, modules):
        self.calls = {m: [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, mod, inputs, out):
        out.retain_grad()
        self.calls[mod].append((inputs[0].detach(), out))

    def abs_gradient(self, m, bias=True):
        """Σ_r |g_r| |ã_r|ᵀ, (m, D): bounds the sums of absolute products behind ∇_W."""
        tot = 0
        for a, s in self.calls[m]:
            a, g = a.reshape(-1, a.shape[-1]), s.grad.reshape(-1, s.shape[-1])
            if bias and m.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            tot = tot + g.abs().T @ a.abs()
        return tot

    def count(self, m):
        return sum(a.numel() // a.shape[-1] for a, _ in self.calls[m])

    def close(self):
        for h in self.handles:
            h.remove()


def _check_step(opt, before, rows: _Rows, wd=0.0, bias=True):
    """Each layer's step against θ₀ − lr·G⁻¹ [∇_W | ∇_b] A⁻¹ (dense, from the stored inverses)."""
    for m in rows.calls:
        st = opt.state[m.weight]
        w0 = before[m.weight]
        gw = m.weight.grad.reshape(m.out_features, -1) + wd * w0.reshape(m.out_features, -1)
        folded = bias and m.bias is not None
        if folded:
            gw = torch.cat([gw, (m.bias.grad + wd * before[m.bias])[:, None]], 1)
        delta = st["G_inv"] @ gw @ st["A_inv"]
        absg = rows.abs_gradient(m, bias) + wd * gw.abs()
        mag = LR * float((st["G_inv"].abs() @ absg @ st["A_inv"].abs()).max()) + float(w0.abs().max())
        terms = rows.count(m) + st["A_inv"].shape[0] + m.out_features + 2
        d = m.in_features
        assert_equal_up_to_rounding(m.weight.detach(), w0 - LR * delta[:, :d].reshape(w0.shape), terms=terms,
                                    magnitude=mag)
        if m.bias is not None:
            want = before[m.bias] - LR * (delta[:, d] if folded else m.bias.grad + wd * before[m.bias])
            assert_equal_up_to_rounding(m.bias.detach(), want, terms=terms, magnitude=mag)


def _mlp(d=40, h=30, c=3, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h, bias=bias), nn.Tanh(), nn.Linear(h, c)).to(DT)


def _opt(net, **kw):
    kw = {"lr": LR, "damping": 0.05, "stat_every": 1, "inv_every": 1, "ema_decay": 0.0,
          "g_estimator": "exact", **kw}
    return KFACOptimizer(net.parameters(), net, "cross_entropy", **kw)


def _data(n, d=40, c=3, seed=1, shape=None):
    g = _gen(seed)
    x = torch.randn(*(shape or (n, d)), generator=g, dtype=DT)
    return x, torch.randint(0, c, (n,), generator=g)


def _step(net, opt, passes, x, y, modules, wd=0.0, bias=True, edit=None, zero=True):
    """``passes``: list of (x, y) for the backward passes of one step; returns the forms taken."""
    rows = _Rows(modules)
    if zero:
        opt.zero_grad()
    for xb, yb in passes:
        (F.cross_entropy(net(xb), yb) * len(yb) / len(y)).backward()
    rows.close()
    if edit is not None:
        edit(net)
    before = {p: p.detach().clone() for p in net.parameters()}
    opt.set_batch(x, y)
    opt.step()
    _check_step(opt, before, rows, wd, bias)
    return opt.last_forms


# ------------------------------------------------------------------------------- equal steps


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("layer_bias, opt_bias", [(True, True), (False, True), (True, False)])
def test_linear_step_equals_the_dense_product(factored, layer_bias, opt_bias):
    """Two steps (rows recorded from the first forward on), with and without bias, the bias folded into
    A or outside it; 40 → 30 on 8 rows takes the factored form, 30 → 3 does not (too few outputs)."""
    net = _mlp(bias=layer_bias)
    opt = _opt(net, bias=opt_bias)
    opt._lowrank = factored
    x, y = _data(8)
    for _ in range(2):
        forms = _step(net, opt, [(x, y)], x, y, [net[0], net[2]], bias=opt_bias)
    assert forms == {"0": "factored" if factored else "full", "2": "full"}


def test_token_inputs_are_rows():
    """(N, T, d) inputs: the N·T tokens are the rows (12 here)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Flatten(1), nn.Linear(120, 3)).to(DT)
    opt = _opt(net)
    x, y = _data(3, shape=(3, 4, 40))
    forms = _step(net, opt, [(x, y)], x, y, [net[0], net[3]])
    assert forms == {"0": "factored", "3": "full"}


def test_accumulated_backward_passes_concatenate():
    """Two half-batch backward passes before one step: 4 + 4 rows."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    forms = _step(net, opt, [(x[:4], y[:4]), (x[4:], y[4:])], x, y, [net[0], net[2]])
    assert forms["0"] == "factored"
    assert opt._rows.status(net[0]) == ("ok", 0, 0)  # cleared by the step


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(40, 30), nn.Linear(30, 30), nn.Linear(30, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


def test_a_layer_used_twice():
    """A weight applied twice in one forward: both calls' rows (2 × 8) make its gradient."""
    torch.manual_seed(0)
    net = _Twice().to(DT)
    opt = _opt(net)
    x, y = _data(8)
    forms = _step(net, opt, [(x, y)], x, y, [net.inp, net.shared, net.head])
    assert forms == {"inp": "factored", "shared": "factored", "head": "full"}


@pytest.mark.parametrize("how", ["optimizer", "module"])
def test_rows_of_zeroed_gradients_are_dropped(how):
    """A pass whose gradients were zeroed (optimizer.zero_grad or the module's) before the next pass:
    only the later pass's rows are used."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    F.cross_entropy(net(x[:6]), y[:6]).backward()
    (opt if how == "optimizer" else net).zero_grad()
    forms = _step(net, opt, [(x, y)], x, y, [net[0], net[2]], zero=False)
    assert forms["0"] == "factored"


# ------------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("edit", ["clip", "user"])
def test_edited_gradients_fall_back_to_the_full_product(edit):
    """Clipping between backward and step, or a user's edit: .grad is no longer gᵀã; the probe sees it."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    if edit == "clip":
        fn = lambda n: torch.nn.utils.clip_grad_norm_(n.parameters(), 1e-3)  # noqa: E731
    else:
        fn = lambda n: n[0].weight.grad[3, 5].add_(1e-3)  # noqa: E731
    forms = _step(net, opt, [(x, y)], x, y, [net[0], net[2]], edit=fn)
    assert forms == {"0": "full", "2": "full"}


def test_weight_decay_takes_the_full_product():
    net = _mlp()
    opt = _opt(net, weight_decay=0.1)
    x, y = _data(8)
    forms = _step(net, opt, [(x, y)], x, y, [net[0], net[2]], wd=0.1)
    assert forms == {"0": "full", "2": "full"}


def test_convolutions_take_the_full_product():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 30, 3), nn.Tanh(), nn.Flatten(1), nn.Linear(30, 3)).to(DT)
    opt = _opt(net)
    x, y = _data(4, shape=(4, 2, 3, 3))
    forms = _step(net, opt, [(x, y)], x, y, [net[3]])
    assert forms == {"0": "full", "3": "full"}
    assert opt._rows.status(net[0])[0] == "untracked"


# ------------------------------------------------------------------------------- which form, what it costs


def test_cost_rule_on_the_mnist_mlp():
    """784-512-512-10 at B = 256: the factored form 2B(m² + dD + mD) against the full 2mD(d + m)
    (D = d + 1): cheaper for 784 → 512 and 512 → 512, not for 512 → 10."""
    torch.manual_seed(0)
    dims, B = [784, 512, 512, 10], 256
    net = nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    opt = KFACOptimizer(net.parameters(), net, "cross_entropy", lr=1e-3)
    x, y = torch.randn(B, 784, generator=_gen()), torch.randint(0, 10, (B,), generator=_gen(1))
    F.cross_entropy(net(x), y).backward()
    opt.set_batch(x, y)
    opt.step()
    want = {}
    for i, (d, m) in enumerate(zip(dims[:-1], dims[1:])):
        D = d + 1
        want[str(2 * i)] = "factored" if B * (m * m + d * D + m * D) < m * D * (d + m) else "full"
    assert want == {"0": "factored", "2": "factored", "4": "full"}
    assert opt.last_forms == want


def test_factored_step_flops_equal_a_direct_count():
    """The meter's key tells the forms and row counts apart: metered = counted, step by step, with a
    factored layer and changing row counts."""
    net, twin = _mlp(), _mlp()
    opt, ref = _opt(net, stat_every=2, inv_every=2), _opt(twin, stat_every=2, inv_every=2)
    direct = 0
    for i, n in enumerate([8, 8, 5, 8]):
        x, y = _data(n, seed=i)
        for model, o in ((net, opt), (twin, ref)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.set_batch(x, y)
        opt.step()
        direct += cost.counted(ref.step)[1]
        assert opt.last_forms["0"] == ref.last_forms["0"] == "factored"
    assert opt.method_flops == direct > 0
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)



@pytest.mark.parametrize("rows", [None, 3, 11])
@pytest.mark.parametrize("layer_bias, opt_bias", [(True, True), (False, True), (True, False)])
def test_precondition_flops_are_the_counted_products(rows, layer_bias, opt_bias):
    """``precondition_flops`` (behind the bench's FLOP floor and the choice of form) equals the
    dispatcher's count of one layer's preconditioning, in both forms, with and without a bias."""
    m, d = 5, 7
    lin = nn.Linear(d, m, bias=layer_bias).to(DT)
    opt = KFACOptimizer(lin.parameters(), lin, "mse", lr=LR, bias=opt_bias)
    D = d + (1 if opt_bias and layer_bias else 0)  # the bias folded into A as a ones column
    g = _gen(3)
    a_inv, g_inv = (torch.randn(k, 2 * k, generator=g, dtype=DT) for k in (D, m))
    A_inv, G_inv = a_inv @ a_inv.T, g_inv @ g_inv.T
    R = rows or 4
    a, e = torch.randn(R, d, generator=g, dtype=DT), torch.randn(R, m, generator=g, dtype=DT)
    lin.weight.grad = e.T @ a
    if layer_bias:
        lin.bias.grad = e.sum(0)
    _, flops = cost.counted(opt._precondition, lin, A_inv, G_inv, 0.0, None if rows is None else (a, e))
    assert flops == precondition_flops(m, d, D, rows)  # D = d where the bias steps by its plain gradient


# ------------------------------------------------------------------------------- what is recorded


def test_nothing_recorded_without_grad_nor_by_the_statistics_pass():
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    with torch.no_grad():
        net(x)
    for _ in range(5):  # forwards with grad but no backward: nothing kept once their graphs are freed
        net(x).sum()
    assert opt._rows.status(net[0]) == ("ok", 0, 0)
    F.cross_entropy(net(x), y).backward()
    assert opt._rows.status(net[0]) == ("ok", 8, 0)
    opt.set_batch(x, y)
    opt._update_factors(opt._layers(), (x, y))  # the statistics pass: its own forward and backprops
    torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))  # reaches no .grad
    assert opt._rows.status(net[0])[:2] == ("ok", 8)


def test_rows_are_bounded():
    """Many backward passes without a step: rows stop at the bound (22 for 40 → 30) and the step takes
    the full product."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    limit = 0
    while 2 * (limit + 1) * (30 * 30 + 40 * 41 + 30 * 41) < 2 * 30 * 41 * (40 + 30):
        limit += 1
    assert opt._rows._layers[id(net[0])].limit == limit == 22
    for _ in range(10):
        F.cross_entropy(net(x), y).backward()
        status, rows, pending = opt._rows.status(net[0])
        assert rows + pending <= limit
    assert status != "ok" and rows == 0  # dropped (a pass over the bound is not even recorded)
    forms = _step(net, opt, [(x, y)] * 3, x, y, [net[0], net[2]])
    assert forms["0"] == "full"  # 24 rows


def test_replaced_layers_are_followed_and_not_kept_alive():
    """A grown network replaces a module: the old one can die (hooks and recorder hold it weakly), the
    new one takes the full product until it is hooked at the next step, then the factored one."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    assert _step(net, opt, [(x, y)], x, y, [net[0], net[2]])["0"] == "factored"
    old = weakref.ref(net[0])
    torch.manual_seed(5)
    net[0] = nn.Linear(40, 30).to(DT)
    opt.param_groups[0]["params"][0:2] = [net[0].weight, net[0].bias]  # as an optimizer remap does
    gc.collect()
    assert old() is None
    assert _step(net, opt, [(x, y)], x, y, [net[0], net[2]])["0"] == "full"
    assert _step(net, opt, [(x, y)], x, y, [net[0], net[2]])["0"] == "factored"


def test_a_dropped_optimizer_takes_its_hooks_along():
    net = _mlp()
    before = (len(net[0]._forward_hooks), len(net[0].weight._post_accumulate_grad_hooks or {}))
    opt = _opt(net)
    assert len(net[0]._forward_hooks) == before[0] + 1
    del opt
    gc.collect()
    assert (len(net[0]._forward_hooks), len(net[0].weight._post_accumulate_grad_hooks or {})) == before


@pytest.mark.parametrize("order", ["forward-zero-backward", "closure"])
def test_the_trainers_orders_of_calls(order):
    """The trainer's loop: forward, zero_grad, backward, step; or step(closure) with zero_grad, forward
    and backward inside the closure. Both take the factored form and equal the dense product."""
    net = _mlp()
    opt = _opt(net)
    x, y = _data(8)
    for _ in range(2):
        rows = _Rows([net[0], net[2]])
        if order == "closure":
            def closure(rows=rows):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                rows.close()
                return loss

            before = {p: p.detach().clone() for p in net.parameters()}
            opt.set_batch(x, y)
            opt.step(closure)
        else:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            rows.close()
            before = {p: p.detach().clone() for p in net.parameters()}
            opt.set_batch(x, y)
            opt.step()
        _check_step(opt, before, rows)
        assert opt.last_forms == {"0": "factored", "2": "full"}
