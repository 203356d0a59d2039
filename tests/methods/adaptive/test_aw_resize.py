"""Width growth and shrinkage invariants of AWNN (Errica et al. 2025), post-training truncation and dense
export."""

import pytest
import torch

from rounding import assert_equal_up_to_rounding, forward_magnitude
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


def test_growth_keeps_the_prefix_bitwise_draws_new_units_from_n01_and_only_renormalises():
    """Growth (Errica et al. 2025; the official code draws new units N(0, 1)): old rows and columns
    are copied (bitwise); new incoming rows, biases and outgoing columns are i.i.d. N(0, 1). At fan-in
    400 the alternatives are far apart: PyTorch's/Kaiming's U(±1/sqrt(400)) has std 0.029 and the
    Kaiming+ outgoing std sqrt(2 / sum p^2) is about 4, while the sample std of n N(0, 1) draws is
    within 6 / sqrt(2 n) of 1 (and the mean within 6 / sqrt(n) of 0) except with probability ~1e-9."""
    torch.manual_seed(0)
    m = adaptive_mlp(400, 50, lam0=0.2).double()
    x = torch.randn(32, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (site,) = collect_sites(m)
    D_old, n_new = site.width, 40
    assert D_old == 13  # floor(ln 10 / 0.2) + 2
    W1, b1, W2 = (t.detach().clone() for t in (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight))
    before = m(x).detach()
    ev = set_width(site, D_old + n_new, model=m, generator=torch.Generator().manual_seed(3))
    assert ev and m.widths() == {"hidden.0": D_old + n_new}
    assert torch.equal(m.layers[0].weight[:D_old], W1) and torch.equal(m.layers[0].bias[:D_old], b1)
    assert torch.equal(m.layers[1].weight[:, :D_old], W2)
    for new in (m.layers[0].weight[D_old:], m.layers[0].bias[D_old:], m.layers[1].weight[:, D_old:]):
        n = new.numel()
        assert abs(new.std().item() - 1) < 6 / (2 * n) ** 0.5, (new.shape, new.std().item())
        assert abs(new.mean().item()) < 6 / n**0.5, (new.shape, new.mean().item())
    with torch.no_grad():
        m.layers[1].weight[:, D_old:] = 0
    after = m(x).detach()
    lam = float(m.scales[0].dist.lam.detach())
    ratio = Z(lam, D_old) / Z(lam, D_old + n_new)  # every p_i scales by Z_old / Z_new
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


@pytest.mark.numerics
def test_removing_a_zero_tail_unit_preserves_the_function_up_to_rounding_without_renormalisation():
    """Cutting a tail unit whose outgoing column is zero leaves the output unchanged in exact
    arithmetic when p is sliced without renormalising (the official evaluation path). In floating
    point the consumer's inner products have D - 1 terms instead of D (the dropped term an exact zero),
    which BLAS may block differently on another instruction set, so the outputs agree up to rounding,
    not bitwise."""
    m = model()
    x = x_batch()
    with torch.no_grad():
        m.layers[1].weight[:, -1] = 0
    before = m(x).detach()
    D = m.widths()["hidden.0"]
    magnitude = forward_magnitude(m, x)
    truncate(m, {"hidden.0": D - 1}, renormalize=False)
    # Summation chain: layer 0 (3 inputs + bias), the product by p, layer 1 (D inputs + bias).
    assert_equal_up_to_rounding(m(x).detach(), before, terms=(3 + 1) + 1 + (D + 1), magnitude=magnitude)
    # With renormalisation the survivors' importances grow by Z_D / Z_{D-1}: far beyond rounding.
    m2 = model()
    with torch.no_grad():
        m2.layers[1].weight[:, -1] = 0
    truncate(m2, {"hidden.0": D - 1}, renormalize=True)
    b2 = m2.layers[1].bias.detach()
    lam = float(m2.scales[0].dist.lam.detach())
    ratio = Z(lam, D) / Z(lam, D - 1)
    assert ratio > 1 + 1e-3
    assert torch.allclose(m2(x).detach() - b2, ratio * (before - b2), atol=1e-12, rtol=1e-10)


def test_truncation_curve_and_export():
    m = model(lam=0.05, hidden_layers=2)
    x = x_batch(64)
    y = m(x).argmax(1)  # labels the full model gets right
    curve = truncation_curve(m, x, y, [1.0, 0.9, 0.5, 0.1], mode="tail")
    assert curve[0]["metric"] == 1.0 and curve[-1]["widths"]["hidden.0"] == round(0.1 * 48)
    rnd = truncation_curve(m, x, y, [1.0, 0.5], mode="random", seed=0)
    assert rnd[0]["metric"] == 1.0 and rnd[1]["widths"] == curve[2]["widths"]
    # Tail removal beats random removal: the tail holds the least important units. Measured as
    # the mean squared change of the outputs (untrained: no accuracy to lose); seeds 0-4 of random
    # subsets. Seen: tail 0.076 / 0.124 vs random mean 0.357 / 0.633 at 70 % / 50 % kept.
    xs = torch.randn(256, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = m(xs).detach()

    def distortion(mod, a, b):
        with torch.no_grad():
            return float(((mod(a) - b) ** 2).mean())

    kept = [1.0, 0.7, 0.5]
    tail = [r["metric"] for r in truncation_curve(m, xs, full, kept, mode="tail", metric=distortion)]
    rand = torch.tensor([[r["metric"] for r in truncation_curve(m, xs, full, kept, mode="random", seed=s,
                                                                 metric=distortion)] for s in range(5)])
    assert tail[0] == 0 and rand[:, 0].eq(0).all()
    for i in (1, 2):
        assert tail[i] < 0.5 * rand[:, i].mean().item(), (kept[i], tail[i], rand[:, i].tolist())
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
