"""Folding p_l into the next layer's columns (AdaptiveMLP._folds) computes the same function and
gradients as rescaling the activations, and steps aside when hooks watch the consumer."""

import pytest
import torch

from widthlab.methods.adaptive.mlp import AdaptiveMLP, adaptive_mlp


def _both_ways(m: AdaptiveMLP, x: torch.Tensor):
    """(outputs, grads) with folding as chosen, then with folding switched off."""
    results = []
    for fold in (True, False):
        m._fold_ok = fold and m.config.act_outer in (None, "relu", "leaky_relu")
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    return results


@pytest.mark.parametrize("act_outer", [None, "leaky_relu"])
@pytest.mark.parametrize("hidden", [1, 2])
def test_fold_matches_rescaling(act_outer, hidden):
    torch.manual_seed(0)
    m = adaptive_mlp(3, 2, lam0=0.1, hidden_layers=hidden, act_outer=act_outer).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    assert m._folds(m.scales[-1], m.layers[-1], torch.zeros(64, m.layers[-1].in_features))
    (o1, g1), (o2, g2) = _both_ways(m, x)
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-12)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-12), n


def test_fold_with_truncation_mask_and_support():
    torch.manual_seed(0)
    m = adaptive_mlp(3, 2, lam0=0.1).double()
    s = m.scales[0]
    s.support = m.layers[0].out_features + 5
    s.unit_mask = (torch.rand(m.layers[0].out_features) > 0.3).double()
    (o1, g1), (o2, g2) = _both_ways(m, torch.randn(32, 3, dtype=torch.float64))
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g1["scales.0.dist.r"], g2["scales.0.dist.r"], rtol=1e-10)


def test_no_fold_when_hooks_watch_the_consumer_or_it_is_wider_than_the_batch():
    m = adaptive_mlp(3, 2, lam0=0.1)
    x = torch.randn(8, 3)
    seen = []
    h = m.layers[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    out = m(x)
    h.remove()
    assert seen == [(8, m.layers[0].out_features)]
    assert torch.allclose(out, m(x), atol=1e-5)
    deep = adaptive_mlp(3, 2, lam0=0.1, hidden_layers=2)  # D x D consumer, batch 8: rescale the batch
    a = torch.zeros(8, deep.layers[0].out_features)
    assert not deep._folds(deep.scales[0], deep.layers[1], a)
    assert deep._folds(deep.scales[1], deep.layers[2], a)
    assert not adaptive_mlp(3, 2, act_outer="tanh")._fold_ok
