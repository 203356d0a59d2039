"""Resize invariants (specs/awnn.md §9 test 5), truncation (§5) and dense export."""

import pytest
import torch

from widthlab.methods.adaptive.distributions import EPS, Exponential
from widthlab.methods.adaptive.layer import collect_sites
from widthlab.methods.adaptive.mlp import adaptive_mlp
from widthlab.methods.adaptive.resizing import set_width
from widthlab.methods.adaptive.truncation import (
    export_dense,
    removable_fraction,
    truncate,
    truncation_curve,
)
from widthlab.models.mlp import MLP


def model(lam=0.2, **kw):
    torch.manual_seed(0)
    return adaptive_mlp(3, 4, lam0=lam, **kw).double()


def x_batch(n=32):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def Z(lam, D):
    i = torch.arange(D, dtype=torch.float64)
    return float((torch.exp(-lam * i) * (1 - torch.exp(torch.tensor(-lam, dtype=torch.float64))) + EPS).sum())


def test_growth_keeps_the_prefix_bitwise_and_only_renormalises():
    m = model()
    x = x_batch()
    (site,) = collect_sites(m)
    D_old = site.width
    W1, b1, W2 = (t.detach().clone() for t in (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight))
    before = m(x).detach()
    ev = set_width(site, D_old + 7, model=m, generator=torch.Generator().manual_seed(3))
    assert ev and m.widths() == {"hidden.0": D_old + 7}
    assert torch.equal(m.layers[0].weight[:D_old], W1) and torch.equal(m.layers[0].bias[:D_old], b1)
    assert torch.equal(m.layers[1].weight[:, :D_old], W2)
    # New units are N(0, 1) (§3 "Grow"): clearly not Kaiming-scaled.
    assert m.layers[0].weight[D_old:].abs().max() > 0.3
    with torch.no_grad():
        m.layers[1].weight[:, D_old:] = 0
    after = m(x).detach()
    lam = float(m.scales[0].dist.lam.detach())
    ratio = Z(lam, D_old) / Z(lam, D_old + 7)  # every p_i scales by Z_old / Z_new
    b2 = m.layers[1].bias.detach()
    assert torch.allclose(after - b2, ratio * (before - b2), atol=1e-12, rtol=1e-10)


def test_shrinking_keeps_a_prefix():
    m = model()
    (site,) = collect_sites(m)
    D = site.width
    W1, W2 = m.layers[0].weight.detach().clone(), m.layers[1].weight.detach().clone()
    set_width(site, D - 5, model=m)
    assert torch.equal(m.layers[0].weight, W1[:D - 5]) and torch.equal(m.layers[1].weight, W2[:, :D - 5])
    assert m.layers[0].out_features == D - 5 and m.layers[1].in_features == D - 5


def test_removing_a_zero_tail_unit_is_exact_without_renormalisation():
    m = model()
    x = x_batch()
    with torch.no_grad():
        m.layers[1].weight[:, -1] = 0
    before = m(x).detach()
    D = m.widths()["hidden.0"]
    truncate(m, {"hidden.0": D - 1}, renormalize=False)
    assert torch.equal(m(x).detach(), before)
    # With renormalisation the survivors' importances grow by Z_D / Z_{D-1}.
    m2 = model()
    with torch.no_grad():
        m2.layers[1].weight[:, -1] = 0
    truncate(m2, {"hidden.0": D - 1}, renormalize=True)
    assert not torch.equal(m2(x).detach(), before)


def test_truncation_curve_and_export():
    m = model(lam=0.05, hidden_layers=2)
    x = x_batch(64)
    y = m(x).argmax(1)  # labels the full model gets right
    curve = truncation_curve(m, x, y, [1.0, 0.9, 0.5, 0.1], mode="tail")
    assert curve[0]["metric"] == 1.0 and curve[-1]["widths"]["hidden.0"] == round(0.1 * 48)
    rnd = truncation_curve(m, x, y, [1.0, 0.5], mode="random", seed=0)
    assert rnd[0]["metric"] == 1.0 and rnd[1]["widths"] == curve[2]["widths"]
    assert 0 <= removable_fraction(curve) <= 0.9
    assert m.widths() == {"hidden.0": 48, "hidden.1": 48}  # the curve works on copies
    # Tail masking equals tail surgery (both without renormalisation).
    from widthlab.methods.adaptive.truncation import mask_units
    a = model(lam=0.05)
    b = model(lam=0.05)
    truncate(a, fraction=0.5, renormalize=False)
    mask_units(b.scales[0], torch.arange(24), 48, renormalize=False)
    assert torch.allclose(a(x), b(x), atol=1e-12)
    # Export: a plain MLP computing the same function, at the truncated width.
    dense = export_dense(a)
    assert isinstance(dense, MLP) and dense.widths() == {"hidden.0": 24}
    assert torch.allclose(dense.double()(x), a(x), atol=1e-10)
    assert not any("dist" in n for n, _ in dense.named_parameters())


def test_export_with_homogeneous_outer_activation():
    m = model(act_outer="leaky_relu")
    x = x_batch()
    assert torch.allclose(export_dense(m).double()(x), m(x), atol=1e-10)
    with pytest.raises(ValueError, match="cannot export"):
        export_dense(model(activation="leaky_relu", act_outer="leaky_relu"))


def test_kaiming_plus_initialisation_scale():
    torch.manual_seed(0)
    m = adaptive_mlp(20, 500, lam0=0.01)
    p = Exponential(0.01).importance(232).detach()
    std = m.layers[1].weight.std().item()
    assert std == pytest.approx((2 / (p**2).sum().item()) ** 0.5, rel=0.02)  # ≈ 18.1
    assert m.layers[0].weight.std().item() == pytest.approx((2 / 20) ** 0.5, rel=0.05)


def test_removable_fraction_is_the_contiguous_prefix_of_the_curve():
    """Removing 20 % keeps accuracy, 40 % loses it, 60 % happens to recover: only 20 % is removable
    (a point past the first failure does not count), whatever order the curve is given in."""
    curve = [{"kept_fraction": f, "metric": a} for f, a in
             [(0.4, 0.95), (1.0, 0.95), (0.6, 0.60), (0.8, 0.95), (0.2, 0.5)]]
    assert removable_fraction(curve) == pytest.approx(0.2)
    assert removable_fraction(curve, tolerance=0.4) == pytest.approx(0.6)  # 0.60 >= 0.95 - 0.4; 0.5 not
    assert removable_fraction([{"kept_fraction": 1.0, "metric": 0.9},
                               {"kept_fraction": 0.9, "metric": 0.8}]) == 0.0
