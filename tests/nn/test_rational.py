"""Rational activation of the SENN MLPs (Mitchell et al. 2023): exact identity, scale invariance."""

from __future__ import annotations

import pytest
import torch

from widthlab.nn.rational import RationalActivation, rational


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-30, 30, 7, dtype=torch.float64).to(dtype)  # tiny to overflowing x²
    x = torch.randn(64, 7, generator=g, dtype=dtype) * scales
    return torch.cat([x, torch.tensor([[0.0, 1.0, -1.0, 1e-38, -3.0e38, 7.5, 2.0]], dtype=dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps_mode", ["floor", "add"])
def test_identity_is_exact(dtype, eps_mode):
    act = RationalActivation(7, init="identity", eps_mode=eps_mode, dtype=dtype)
    x = _inputs(dtype)
    y = act(x)
    if eps_mode == "add" and dtype == torch.float64:
        # the official SENN code's normalisation: x / sqrt(1 + 1e-8), within 1e-8 relative
        assert not torch.equal(y, x)
        assert torch.allclose(y, x, rtol=1e-8, atol=0)
        return
    assert y.dtype == dtype and torch.equal(y, x)
    # bitwise too, for every input except zero (+0 and -0 compare equal but differ in the sign bit)
    nz = x != 0
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(y[nz].view(bits), x[nz].view(bits))


def test_matches_the_spec_formula():
    g = torch.Generator().manual_seed(1)
    v, c, l = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    want = (l * x + (2 * v * x + c) / (1 + x**2)) / torch.sqrt(v**2 + c**2 + l**2 + 1e-8)
    assert torch.allclose(rational(x, v, c, l, eps_mode="add"), want, rtol=1e-15, atol=0)
    assert torch.allclose(rational(x, v, c, l), want, rtol=1e-7)  # floor vs add: O(eps / q)


@pytest.mark.parametrize("k", [1e-3, 0.5, 3.0, 1e4, -2.0])
def test_scale_invariance_of_the_coefficients(k):
    g = torch.Generator().manual_seed(2)
    v, c, l = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    a = rational(x, v, c, l)
    b = rational(x, k * v, k * c, k * l)
    # a negative k flips the sign: only the direction of (v, c, l) matters, up to that sign
    assert torch.allclose(b, a * (1 if k > 0 else -1), rtol=1e-12, atol=1e-14)


def test_normal_init_per_unit_and_gradients():
    act = RationalActivation(50, generator=torch.Generator().manual_seed(0))
    assert act.v.shape == act.c.shape == act.l.shape == (50,)
    assert 0.5 < act.v.std().item() < 1.5 and len(set(act.l.tolist())) == 50
    x = torch.randn(8, 50, requires_grad=True)
    act(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (act.v, act.c, act.l, x))
    same = RationalActivation(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.v, act.v)


def test_channel_dimension_for_feature_maps():
    act = RationalActivation(3, dim=1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 4, 4)
    y = act(x)
    for ch in range(3):
        want = rational(x[:, ch].reshape(-1, 1), act.v[ch:ch + 1], act.c[ch:ch + 1], act.l[ch:ch + 1])
        assert torch.allclose(y[:, ch].reshape(-1, 1), want)
    act.reset_parameters("identity")
    assert torch.equal(act(x), x)


def test_zero_coefficients_stay_finite_and_bad_arguments_are_refused():
    z = torch.zeros(3)
    assert torch.isfinite(rational(torch.randn(4, 3), z, z, z)).all()
    with pytest.raises(ValueError, match="init"):
        RationalActivation(3, init="uniform")
    with pytest.raises(ValueError, match="eps_mode"):
        RationalActivation(3, eps_mode="mul")
