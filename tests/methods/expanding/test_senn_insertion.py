"""Function-preserving insertion of neurons, layers and channels (SENN, Mitchell et al. 2023).

A new neuron with zero outgoing weights adds nothing to the consumer's pre-activation, so outputs,
loss and the gradients of every old parameter are unchanged up to rounding: the consumer now sums one
more (exactly zero) term, and BLAS may block the longer inner product differently depending on the CPU's
instruction set, so these tests assert the rounding-error bound of tests/rounding.py (marked `numerics`)
rather than bitwise equality; its outgoing weights' gradient is
E[f eᵀ] = C + A_fa A⁻¹ ḡ, and the consumer's K-FAC η rises by exactly Δη (Schur identity). An inserted
layer with kernel I, bias 0 and identity rational activation is the identity map, bit for bit (no
product changes shape: x·1 + 0 is exact).
"""

from __future__ import annotations

import pytest
import torch

from rounding import assert_equal_up_to_rounding, forward_magnitude
from widthlab.methods.expanding import kfac, scores
from widthlab.methods.expanding.fisher import per_sample_loss
from widthlab.methods.expanding.insertion import full_rank, insert_layer, insert_units
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.nn.optim_surgery import assert_optimizer_matches, remap_optimizer
from widthlab.nn.rational import RationalActivation


def _mlp(dtype, widths=(5, 4), seed=0):
    return ExpandableMLP(3, 2, widths, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _batch(dtype, n=32, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randint(0, 2, (n,), generator=g)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = per_sample_loss("cross_entropy", out, y).mean()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _candidate(d_in, k=1, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, d_in, generator=g).to(dtype), torch.randn(k, generator=g).to(dtype),
            {n: torch.randn(k, generator=g).to(dtype) for n in "vcl"})


def _chain_terms(model) -> int:
    """Summation lengths along the longest chain of a forward and backward pass: each Linear sums
    fan-in + 1 terms forward and fan-out terms backward."""
    return sum(2 * lay.in_features + lay.out_features + 2 for lay in model.layers)


def _grad_magnitudes(model, x, y) -> dict[str, float]:
    """Per parameter: max entry of (1/N) Σ_n |∂ℓ_n/∂θ|, the magnitude the batch gradient's sum cancels."""
    acc: dict[str, torch.Tensor] = {}
    for xi, yi in zip(x, y):
        model.zero_grad(set_to_none=True)
        per_sample_loss("cross_entropy", model(xi[None]), yi[None]).mean().backward()
        for n, p in model.named_parameters():
            acc[n] = acc.get(n, 0) + p.grad.abs()
    model.zero_grad(set_to_none=True)
    return {n: float(v.max()) / len(x) for n, v in acc.items()}


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", [0, 1])
def test_neuron_insertion_preserves_the_function_up_to_rounding(dtype, index):
    model = _mlp(dtype)
    x, y = _batch(dtype)
    out0, loss0, g0 = _grads(model, x, y)
    old_shapes = {n: p.shape for n, p in model.named_parameters()}
    w, b, rat = _candidate(model.layers[index].in_features, k=2, dtype=dtype)
    ev = insert_units(model, index, w, b, rat)
    assert model.hidden_widths()[index] == (5, 4)[index] + 2
    out1, loss1, g1 = _grads(model, x, y)
    terms = _chain_terms(model)
    fwd = forward_magnitude(model, x)
    assert_equal_up_to_rounding(out1, out0, terms=terms, magnitude=fwd)
    # the loss: a log-sum-exp of the logits (1-Lipschitz) averaged over N samples
    assert_equal_up_to_rounding(loss1, loss0, terms=terms + len(x), magnitude=fwd + float(loss0))
    mags = _grad_magnitudes(model, x, y)
    for name, g in g0.items():
        new = g1[name]
        if new.shape != old_shapes[name]:  # the resized tensors: the old block's gradient is unchanged
            new = new[tuple(slice(0, s) for s in old_shapes[name])]
        # backward rounding per sample scales with the forward's (through the softmax, gain <= 1)
        assert_equal_up_to_rounding(new, g, terms=terms + len(x), magnitude=mags[name] * max(1.0, fwd))
    names = {pr.name for pr in ev.params}
    assert {f"layers.{index}.weight", f"layers.{index}.bias", f"layers.{index + 1}.weight",
            f"acts.{index}.v", f"acts.{index}.c", f"acts.{index}.l"} == names


def test_new_outgoing_gradient_and_eta_increase_match_the_scores():
    """grad of the new outgoing weights = E[f eᵀ] = C + A_fa A⁻¹ḡ; consumer η rises by Δη (Schur)."""
    dt = torch.float64
    model = _mlp(dt, widths=(5,))
    x, y = _batch(dt, n=40)
    obs0 = kfac.observe(model, x, y, "cross_entropy")
    cons = obs0.layers["layers.1"]
    a, e, n = cons.a_rows, cons.e_rows["grad"], obs0.n
    A_inv = torch.linalg.inv(cons.factors.A)
    G_inv = torch.linalg.inv(scores.damp(cons.factors.G, 0.1))
    gbar = a.T @ e / n
    w, b, rat = _candidate(3, k=1)
    f = RationalActivation(1, dtype=dt)
    with torch.no_grad():
        f.v.copy_(rat["v"]), f.c.copy_(rat["c"]), f.l.copy_(rat["l"])
        feats = f(x @ w.T + b)  # the candidate neuron reads the input of hidden layer 0
    r_perp = scores.residual_rows(a, e, A_inv, gbar)
    st = scores.candidate_stats(feats, r_perp, n, a)
    d_exact = scores.delta_eta(st.C, scores.schur_complement(st.A_f, st.A_fa, A_inv), G_inv)
    eta0 = scores.layer_eta(gbar, A_inv, G_inv)

    insert_units(model, 0, w, b, rat)
    _, _, g1 = _grads(model, x, y)
    new_col = g1["layers.1.weight"][:, -1]  # (m,)
    torch.testing.assert_close(new_col, (feats.T @ e / n)[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(new_col, (st.C + st.A_fa @ A_inv @ gbar)[0], rtol=1e-8, atol=1e-12)

    obs1 = kfac.observe(model, x, y, "cross_entropy")
    c1 = obs1.layers["layers.1"]
    torch.testing.assert_close(c1.e_rows["grad"], e, rtol=0, atol=0)
    # the new input sits before the bias column in the augmented rows
    eta1 = scores.layer_eta(c1.a_rows.T @ e / n, torch.linalg.inv(c1.factors.A), G_inv)
    torch.testing.assert_close(eta1 - eta0, d_exact, rtol=1e-7, atol=1e-12)


@pytest.mark.numerics
def test_adam_step_of_old_parameters_is_unchanged_up_to_rounding():
    """One Adam step after insertion (state transplanted, new units m = 0) moves old parameters as a
    run without the neuron, up to rounding: the gradients agree to the bound of the test above, and
    Adam's update lr·m̂/(√v̂ + ε) moves by at most lr·|δg|·((1−β1) + (1−β2)·|m̂|/√v̂)/(bias terms·√v̂)
    for a gradient error δg, bounded here by 4·lr·|δg|/√v̂."""
    x, y = _batch(torch.float32)
    ref, grown = _mlp(torch.float32), _mlp(torch.float32)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (ref, grown)]
    for _ in range(2):  # build up some Adam state
        for m, o in zip((ref, grown), opts):
            o.zero_grad()
            per_sample_loss("cross_entropy", m(x), y).mean().backward()
            o.step()
    ev = insert_units(grown, 0, *_candidate(3, dtype=torch.float32))
    remap_optimizer(opts[1], ev, "keep")
    assert_optimizer_matches(opts[1], grown)
    terms = _chain_terms(grown) + len(x)
    mags = _grad_magnitudes(ref, x, y)
    fwd = forward_magnitude(grown, x)
    lr, eps32 = 0.01, torch.finfo(torch.float32).eps
    # √v̂ per entry for the step (v after the step ≥ β2·v before; bias correction of step 3)
    root_v = {n: (opts[0].state[p]["exp_avg_sq"] * 0.999 / (1 - 0.999 ** 3)).sqrt()
              for n, p in ref.named_parameters()}
    for m, o in zip((ref, grown), opts):
        o.zero_grad()
        per_sample_loss("cross_entropy", m(x), y).mean().backward()
        o.step()
    for (name, p), q in zip(ref.named_parameters(), grown.parameters()):
        sl = tuple(slice(0, s) for s in p.shape)
        dg = terms * eps32 * mags[name] * max(1.0, fwd)
        tol = 4 * lr * dg / (root_v[name] + 1e-8) + eps32 * (p.detach().abs() + 4 * terms * lr)
        diff = (q.detach()[sl] - p.detach()).abs()
        assert (diff <= tol).all(), (name, float((diff - tol).max()))
    # the new unit's outgoing weight moved from 0 (it has a gradient), its state started at zero
    assert grown.layers[1].weight[:, -1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rational_identity_and_scale_invariance(dtype):
    """Identity coefficients give σ(x) = x exactly; σ is invariant to scaling (v, c, l)."""
    act = RationalActivation(6, init="identity", dtype=dtype)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).to(dtype) * 10
    assert torch.equal(act(x), x)
    act2 = RationalActivation(6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        y = act2(x)
        for p in (act2.v, act2.c, act2.l):
            p.mul_(3.7)
        tol = 1e-6 if dtype == torch.float32 else 1e-13  # cancellation near σ = 0 needs an absolute part
        torch.testing.assert_close(act2(x), y, rtol=tol, atol=tol * float(y.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_identity_layer_insertion_is_exact(dtype, position):
    """Layer insertion with W = I, β = 0 (identity rational): outputs bit-identical."""
    model = _mlp(dtype)
    x, _ = _batch(dtype)
    with torch.no_grad():
        before = model(x)
    ev = insert_layer(model, position)
    assert model.depth == 3
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert len(ev.added) == 5 and not ev.params


def test_layer_insertion_into_a_linear_model():
    """Experiment 2 starts linear: the first inserted layer has the input's width."""
    model = ExpandableMLP(2, 2, (), generator=torch.Generator().manual_seed(0))
    x, _ = _batch(torch.float32, d=2)
    with torch.no_grad():
        before = model(x)
    insert_layer(model, 0)
    assert model.hidden_widths() == [2]
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_basis_change_insertion_is_exact_to_rounding():
    """Layer insertion by a basis change, an invertible B and shift β: max|Δy| < 1e-5·max|y| (float32)."""
    model = _mlp(torch.float32)
    x, _ = _batch(torch.float32)
    with torch.no_grad():
        before = model(x)
    g = torch.Generator().manual_seed(5)
    B = full_rank(torch.randn(4, 4, generator=g))
    insert_layer(model, 2, basis=B, shift=torch.randn(4, generator=g))
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() < 1e-5 * before.abs().max()


@pytest.mark.numerics
@pytest.mark.parametrize("stage", [0, 1])
def test_cnn_channel_growth_leaves_logits_unchanged_up_to_rounding(stage):
    """CNN channel growth: new channels with zero outgoing weights leave the logits unchanged up to rounding
    (the consumer convolution sums 9 more zero terms per new channel)."""
    model = ExpandableCNN((3, 8, 8), 5, (4, 6), generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    c_in = model.convs[stage].in_channels
    g = torch.Generator().manual_seed(2)
    ev = insert_units(model, stage, torch.randn(3, c_in, 3, 3, generator=g), torch.randn(3, generator=g),
                      {n: torch.randn(3, generator=g) for n in "vcl"})
    assert model.hidden_widths()[stage] == (4, 6)[stage] + 3
    with torch.no_grad():
        after = model(x)
    # conv fan-ins (C_in·9 + 1), the 2×2 pools and the global mean (H·W terms), the head's fan-in + 1
    terms = sum(c.in_channels * 9 + 1 for c in model.convs) + 8 * 8 + model.head.in_features + 1
    assert_equal_up_to_rounding(after, before, terms=terms, magnitude=forward_magnitude(model, x))
    assert ev.widths == model.widths()
