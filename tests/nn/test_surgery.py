"""Width surgery on producer -> (norms) -> consumer sites.

Function preservation: a new unit j with outgoing weights W_out[:, j] = 0 adds 0 * a_j = 0 to every
consumer pre-activation, and per-unit norms (BatchNorm, InstanceNorm) treat each unit on its own, so the
old units and the outputs do not change in exact arithmetic. In floating point they agree up to
rounding, not bitwise: the grown consumer sums one more (zero) term, and BLAS may block a longer inner
product differently depending on the CPU's instruction set, so these tests assert the rounding-error
bound of tests/rounding.py (marked `numerics`: the test script reruns them under a second CPU kernel
selection). Equalities that are bitwise by construction (copied weights, the same shapes on the same
kernels) stay `torch.equal`.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rounding import assert_equal_up_to_rounding, forward_magnitude
from widthlab.nn.resize import WidthSite
from widthlab.nn.surgery import find_site, resize, resize_site

BATCH = 64


class MLP(nn.Module):
    """d_in -> widths... -> d_out, with an optional per-unit norm after each hidden Linear."""

    def __init__(self, d_in=5, widths=(8, 6), d_out=3, norm=None, names=True):
        super().__init__()
        dims = (d_in, *widths, d_out)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        make = {None: nn.Identity, "bn": nn.BatchNorm1d, "ln": nn.LayerNorm}[norm]
        self.norms = nn.ModuleList(make(w) for w in widths)
        self.has_norm = norm is not None
        self.names = names

    def forward(self, x):
        for fc, norm in zip(self.fcs[:-1], self.norms):
            x = torch.relu(norm(fc(x)))
        return self.fcs[-1](x)

    def width_sites(self):
        sites = []
        for i in range(len(self.norms)):
            norms = (self.norms[i],) if self.has_norm else ()
            named = dict(producer_name=f"fcs.{i}", consumer_name=f"fcs.{i + 1}",
                         norm_names=(f"norms.{i}",) if self.has_norm else ())
            sites.append(WidthSite(f"hidden.{i}", self.fcs[i], self.fcs[i + 1], norms,
                                   **(named if self.names else {})))
        return sites


class CNN(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> global pool -> fc."""

    def __init__(self, c=(6, 5)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c[0], 3, padding=1), nn.BatchNorm2d(c[0])
        self.conv2, self.bn2 = nn.Conv2d(c[0], c[1], 3, padding=1), nn.BatchNorm2d(c[1])
        self.fc = nn.Linear(c[1], 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

    def width_sites(self):
        return [WidthSite("c1", self.conv1, self.conv2, (self.bn1,), "conv1", "conv2", ("bn1",)),
                WidthSite("c2", self.conv2, self.fc, (self.bn2,), "conv2", "fc", ("bn2",))]


class NTKLinear(nn.Linear):
    """A Linear whose forward reads its fan-in from the weight, as NTK-parametrised layers do."""

    def forward(self, x):
        return F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)


def randomize_bn(model):
    # Non-trivial running statistics, so that a wrongly placed statistic would show.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(1, 0.2, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)


# --- function preservation ----------------------------------------------------------------------------


def summation_terms(model, batch, train):
    """Summation lengths along the longest chain: every Linear/Conv fan-in (times the kernel area), plus,
    for BatchNorm in training mode, the batch sums of its mean and variance."""
    terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return terms + (2 * batch * n_bn if train else 0)


@pytest.mark.numerics
@pytest.mark.parametrize("norm,train", [(None, False), ("bn", False), ("bn", True)])
@pytest.mark.parametrize("init_in", ["kaiming", "normal"])
def test_grow_with_zero_outgoing_weights_preserves_the_function_up_to_rounding(norm, train, init_in):
    torch.manual_seed(0)
    model = MLP(norm=norm)
    randomize_bn(model)
    model.train(train)
    x = torch.randn(BATCH, 5)
    with torch.no_grad():
        before = model(x)
    for name, n_new in (("hidden.0", 3), ("hidden.1", 9)):
        event = resize(model, name, n_new=n_new, init_in=init_in)
        assert event.widths == {name: model.width_sites()[int(name[-1])].width}
    with torch.no_grad():
        after = model(x)
    assert_equal_up_to_rounding(after, before, terms=summation_terms(model, BATCH, train),
                                magnitude=forward_magnitude(model, x))


@pytest.mark.numerics
def test_grow_conv_bn_site_preserves_the_function_up_to_rounding():
    torch.manual_seed(0)
    model = CNN()
    randomize_bn(model)
    model.eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    resize(model, "c1", n_new=4, init_in="normal")
    resize(model, "c2", n_new=3, init_in="normal")
    with torch.no_grad():
        after = model(x)
    # + 64: the global average pool sums 8 x 8 positions.
    assert_equal_up_to_rounding(after, before, terms=summation_terms(model, 16, False) + 64,
                                magnitude=forward_magnitude(model, x))
    assert model.conv1.out_channels == model.conv2.in_channels == model.bn1.num_features == 10
    assert model.conv2.out_channels == model.fc.in_features == model.bn2.num_features == 8


@pytest.mark.numerics
def test_dropping_units_with_zero_outgoing_weights_preserves_the_function_up_to_rounding():
    torch.manual_seed(0)
    model = MLP(widths=(10,), norm="bn").eval()
    randomize_bn(model)
    with torch.no_grad():
        model.fcs[1].weight[:, [2, 7]] = 0
    x = torch.randn(BATCH, 5)
    with torch.no_grad():
        before = model(x)
    magnitude = forward_magnitude(model, x)
    resize(model, "hidden.0", keep=[i for i in range(10) if i not in (2, 7)])
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), before, terms=summation_terms(model, BATCH, False) + 2,
                                    magnitude=magnitude)


@pytest.mark.numerics
def test_permutation_preserves_the_function():
    torch.manual_seed(0)
    model = MLP(widths=(12,), norm="bn").eval()
    randomize_bn(model)
    x = torch.randn(BATCH, 5)
    with torch.no_grad():
        hidden = model.norms[0](model.fcs[0](x))
        before = model(x)
    perm = torch.randperm(12)
    resize(model, "hidden.0", keep=perm)
    with torch.no_grad():
        # Producer rows are computed independently, so they are permuted exactly; the consumer sums the
        # units in a new order, so its outputs agree only up to rounding.
        assert torch.equal(model.norms[0](model.fcs[0](x)), hidden[:, perm])
        assert_equal_up_to_rounding(model(x), before, terms=summation_terms(model, BATCH, False),
                                    magnitude=forward_magnitude(model, x))


# --- what is kept, what is new ------------------------------------------------------------------------


def test_shrink_and_grow_keep_chosen_units_and_initialise_new_ones():
    torch.manual_seed(0)
    model = MLP(widths=(8,), norm="bn")
    randomize_bn(model)
    fc0, bn, fc1 = model.fcs[0], model.norms[0], model.fcs[1]
    old = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keep = torch.tensor([5, 0, 3])
    event = resize(model, "hidden.0", keep=keep, n_new=2)

    assert torch.equal(fc0.weight[:3], old["fcs.0.weight"][keep])
    assert torch.equal(fc0.bias[:3], old["fcs.0.bias"][keep])
    assert torch.equal(fc1.weight[:, :3], old["fcs.1.weight"][:, keep])
    assert torch.equal(fc1.weight[:, 3:], torch.zeros(3, 2))
    assert torch.equal(fc1.bias, old["fcs.1.bias"])
    for key, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        t = getattr(bn, key)
        assert torch.equal(t[:3], old[f"norms.0.{key}"][keep])
        assert torch.equal(t[3:], torch.full((2,), fill))
    bound = 1 / math.sqrt(5)
    assert fc0.weight[3:].abs().max() <= bound and fc0.bias[3:].abs().max() <= bound
    assert (fc0.out_features, fc1.in_features, bn.num_features) == (5, 5, 5)

    assert [p.name for p in event.params] == ["fcs.0.weight", "fcs.0.bias", "norms.0.weight",
                                              "norms.0.bias", "fcs.1.weight"]
    assert [p.dim for p in event.params] == [0, 0, 0, 0, 1]
    assert all(torch.equal(p.kept, keep) and p.n_new == 2 for p in event.params)
    current = dict(model.named_parameters())
    assert all(current[p.name] is p.new and p.old is not p.new for p in event.params)
    assert event.widths == {"hidden.0": 5}


def test_layernorm_site_is_resized_but_not_function_preserving():
    torch.manual_seed(0)
    model = MLP(widths=(6,), norm="ln")
    ln = model.norms[0]
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    old_w = ln.weight.detach().clone()
    x = torch.randn(BATCH, 5)
    before = model(x)
    event = resize(model, "hidden.0", keep=[4, 1, 2, 3, 0, 5], n_new=2)
    assert ln.normalized_shape == (8,)
    assert torch.equal(ln.weight[:6], old_w[[4, 1, 2, 3, 0, 5]])
    assert torch.equal(ln.weight[6:], torch.ones(2)) and torch.equal(ln.bias[6:], torch.zeros(2))
    assert "norms.0.weight" in [p.name for p in event.params]
    after = model(x)
    assert after.shape == before.shape
    # The mean and variance are over all units, so new units move every unit's normalised value.
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("init_in,init_out", [("zeros", "normal"), ("normal", "kaiming")])
def test_named_inits(init_in, init_out):
    torch.manual_seed(0)
    model = MLP(widths=(4,))
    resize(model, "hidden.0", n_new=400, init_in=init_in, init_out=init_out)
    w_in, b_in, w_out = model.fcs[0].weight[4:], model.fcs[0].bias[4:], model.fcs[1].weight[:, 4:]
    if init_in == "zeros":
        assert not w_in.any() and not b_in.any()
    else:
        assert abs(w_in.std().item() - 1) < 0.1 and abs(b_in.std().item() - 1) < 0.2
    if init_out == "normal":
        assert abs(w_out.std().item() - 1) < 0.15
    else:
        assert w_out.abs().max() <= 1 / math.sqrt(404) and w_out.std() > 0


def test_callable_inits_see_the_new_blocks_and_the_generator_is_used():
    model = MLP(widths=(4,))
    seen = {}

    def init_in(w, b):
        seen["in"] = (tuple(w.shape), tuple(b.shape))
        w.fill_(2.0)
        b.fill_(-1.0)

    def init_out(w):
        seen["out"] = tuple(w.shape)
        w.fill_(0.5)

    resize(model, "hidden.0", keep=[1, 2], n_new=3, init_in=init_in, init_out=init_out)
    assert seen == {"in": ((3, 5), (3,)), "out": (3, 3)}
    assert (model.fcs[0].weight[2:] == 2).all() and (model.fcs[0].bias[2:] == -1).all()
    assert (model.fcs[1].weight[:, 2:] == 0.5).all()

    draws = []
    for _ in range(2):
        m = MLP(widths=(4,))
        resize(m, "hidden.0", n_new=3, init_in="normal", generator=torch.Generator().manual_seed(7))
        draws.append(m.fcs[0].weight[4:].detach())
    assert torch.equal(*draws)


def test_conv_site_kept_channels_and_conv_to_linear_site():
    torch.manual_seed(0)
    model = CNN()
    w1, w2, wfc = model.conv1.weight.detach().clone(), model.conv2.weight.detach().clone(), \
        model.fc.weight.detach().clone()
    resize(model, "c1", keep=[4, 1], n_new=1)
    assert torch.equal(model.conv1.weight[:2], w1[[4, 1]])
    assert torch.equal(model.conv2.weight[:, :2], w2[:, [4, 1]])
    assert model.conv2.weight.shape == (5, 3, 3, 3) and not model.conv2.weight[:, 2:].any()
    resize(model, "c2", keep=torch.tensor([True, False, True, True, False]))
    assert torch.equal(model.fc.weight, wfc[:, [0, 2, 3]])
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# --- module identity, names, grads --------------------------------------------------------------------


def test_modules_hooks_and_ntk_subclass_survive():
    model = nn.Sequential(NTKLinear(3, 4), nn.ReLU(), NTKLinear(4, 2))
    producer = model[0]
    calls = []
    producer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    site = WidthSite("h", model[0], model[2])
    event = resize_site(site, keep=[0, 2], n_new=3, model=model, init_in="normal")
    assert model[0] is producer and type(producer) is NTKLinear
    assert model(torch.randn(7, 3)).shape == (7, 2)
    assert calls == [torch.Size([7, 5])]
    # Names come from the model when the site has none.
    assert [p.name for p in event.params] == ["0.weight", "0.bias", "2.weight"]
    # Without a model, the names are labels that cannot clash with real parameter names.
    event = resize_site(site, keep=[0])
    assert [p.name for p in event.params] == ["h:producer.weight", "h:producer.bias", "h:consumer.weight"]


def test_names_derived_when_site_leaves_them_empty():
    model = MLP(norm="bn", names=False)
    event = resize(model, "hidden.1", n_new=1)
    assert [p.name for p in event.params] == ["fcs.1.weight", "fcs.1.bias", "norms.1.weight",
                                              "norms.1.bias", "fcs.2.weight"]


def test_grads_are_carried_and_requires_grad_kept():
    torch.manual_seed(0)
    model = MLP(widths=(4,))
    model.fcs[0].bias.requires_grad_(False)
    model(torch.randn(BATCH, 5)).sum().backward()
    g0, g1 = model.fcs[0].weight.grad.clone(), model.fcs[1].weight.grad.clone()
    resize(model, "hidden.0", keep=[3, 1], n_new=2)
    assert torch.equal(model.fcs[0].weight.grad[:2], g0[[3, 1]])
    assert not model.fcs[0].weight.grad[2:].any()
    assert torch.equal(model.fcs[1].weight.grad[:, :2], g1[:, [3, 1]])
    assert model.fcs[0].bias.grad is None and not model.fcs[0].bias.requires_grad


def test_noop_returns_empty_event_and_changes_nothing():
    model = MLP()
    before = [p for p in model.parameters()]
    event = resize(model, "hidden.0", keep=torch.arange(8))
    assert not event and event.widths == {"hidden.0": 8}
    assert all(a is b for a, b in zip(before, model.parameters()))
    # Plain sequences and numpy arrays are indices too (an array's == compares elementwise).
    for keep in (list(range(8)), np.arange(8)):
        assert not resize(model, "hidden.0", keep=keep)
    assert all(a is b for a, b in zip(before, model.parameters()))
    assert resize(model, "hidden.0", keep=np.arange(4)).widths == {"hidden.0": 4}


def test_range_keep_equals_index_keep():
    """``keep=range(...)`` (checked without tensor operations) resizes exactly like the same indices."""
    for keep in (range(8), range(5), range(7, 1, -2)):
        a, b = MLP(), MLP()
        b.load_state_dict(a.state_dict())
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ea = resize(a, "hidden.0", keep=keep, n_new=2, init_in="normal", generator=g1)
        eb = resize(b, "hidden.0", keep=torch.tensor(list(keep)), n_new=2, init_in="normal", generator=g2)
        assert [p.name for p in ea.params] == [p.name for p in eb.params]
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    model = MLP()
    before = list(model.parameters())
    assert not resize(model, "hidden.0", keep=range(8))
    assert all(x is y for x, y in zip(before, model.parameters()))


def test_find_site():
    model = MLP()
    assert find_site(model, "hidden.1").producer is model.fcs[1]


# --- errors -------------------------------------------------------------------------------------------


def _params(model):
    return [id(p) for p in model.parameters()]


@pytest.mark.parametrize("keep,n_new,match", [
    ([0, 8], 0, r"\[0, 8\)"),
    ([-1], 0, r"\[0, 8\)"),
    ([1, 1], 0, "unique"),
    ([], 0, "width would be 0"),
    (None, -1, "n_new"),
    (None, 1.5, "n_new"),
    ([0.5], 0, "integer"),
    ([[0, 1]], 0, "1-D"),
    (torch.ones(7, dtype=torch.bool), 0, r"mask needs shape \(8,\)"),
    (range(3, 9), 0, r"\[0, 8\).*\[3, 8\]"),
    (range(5, -2, -1), 0, r"\[0, 8\).*\[-1, 5\]"),
    (range(0), 0, "width would be 0"),
])
def test_bad_arguments_name_the_site_and_change_nothing(keep, n_new, match):
    model = MLP()
    ids = _params(model)
    with pytest.raises(ValueError, match=match) as err:
        resize(model, "hidden.0", keep=keep, n_new=n_new)
    assert "'hidden.0'" in str(err.value)
    assert _params(model) == ids


def test_bad_init_changes_nothing():
    model = MLP()
    ids = _params(model)
    with pytest.raises(ValueError, match="init_in='xavier'"):
        resize(model, "hidden.0", n_new=1, init_in="xavier")
    with pytest.raises(ValueError, match="init_out"):
        resize(model, "hidden.0", n_new=1, init_out=lambda w: w.resize_(1))
    assert _params(model) == ids


@pytest.mark.parametrize("build,match", [
    (lambda: (nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 2, 1), ()), "grouped/depthwise"),
    (lambda: (nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), ()), "grouped/depthwise"),
    (lambda: (nn.Conv2d(3, 4, 3), nn.Linear(36, 2), ()), "flatten"),
    (lambda: (nn.Linear(3, 4), nn.Linear(4, 2), (nn.GroupNorm(2, 4),)), "GroupNorm is not supported"),
    (lambda: (nn.Linear(3, 4), nn.Linear(4, 2), (nn.BatchNorm1d(5),)), "5 features"),
    (lambda: (nn.Linear(3, 4), nn.Linear(4, 2), (nn.LayerNorm((2, 4)),)), "normalized_shape"),
    (lambda: (nn.ConvTranspose2d(3, 4, 3), nn.Conv2d(4, 2, 1), ()), "not a Linear"),
    (lambda: (nn.LazyLinear(4), nn.Linear(4, 2), ()), "lazy"),
    (lambda: (lambda m: (m, m, ()))(nn.Linear(4, 4)), "same module"),
])
def test_unsupported_sites(build, match):
    producer, consumer, norms = build()
    with pytest.raises(ValueError, match=match):
        resize_site(WidthSite("s", producer, consumer, norms), n_new=1)


def test_tied_parameters_are_refused():
    a, b = nn.Linear(3, 4), nn.Linear(4, 4)
    c = nn.Linear(3, 4)
    c.weight = a.weight
    model = nn.ModuleList([a, b, c])
    with pytest.raises(ValueError, match="shared"):
        resize_site(WidthSite("s", a, b), n_new=1, model=model)


def test_a_module_used_in_two_places_is_refused():
    a, b = nn.Linear(3, 4), nn.Linear(4, 4)
    inner = nn.Sequential(a, b)
    model = nn.ModuleDict({"first": inner, "again": inner})  # the same block twice
    with pytest.raises(ValueError, match="shared"):
        resize_site(WidthSite("s", a, b), n_new=1, model=model)
    resize_site(WidthSite("s", a, b), n_new=1, model=nn.Sequential(a, b))  # once: fine


def test_resize_needs_width_sites_and_a_known_name():
    with pytest.raises(TypeError, match="width_sites"):
        resize(nn.Linear(2, 2), "x")
    with pytest.raises(KeyError, match="hidden.0"):
        resize(MLP(), "nope")
