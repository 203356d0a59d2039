"""``kernel_distance_summary``: what ``widthlab kernel --json`` prints (issue 5 acceptance)."""

import json
import math

import pytest
import torch

from widthlab.theory import format_kernel_summary, kernel_distance_summary

KEYS = {"d", "width", "connectivity", "pairs", "D", "D_se", "bias_sq", "bias_sq_se", "variance_term",
        "variance_term_se", "approx_eq4", "approx_variance_only", "p_star", "seconds"}


def test_acceptance_setting_is_fast_and_near_spec_value():
    """d = 784, n = 200, p = 0.1 on Gaussian inputs: D within MC error of 1.2e-3, in seconds."""
    out = kernel_distance_summary(784, 200, 0.1)
    assert out.keys() >= KEYS
    json.dumps(out)  # plain types only
    assert abs(out["D"] - 1.2e-3) < 3 * math.hypot(out["D_se"], out["D_pairs_se"])
    assert out["D_se"] < 0.01 * out["D"]
    assert out["seconds"] < 30  # ~0.5 s alone; generous for a shared CI core
    assert out["p_star"] == pytest.approx((200 * 0.1 / (4 * 784)) ** 0.5)
    assert out["D"] == pytest.approx(out["bias_sq"] + out["variance_term"], rel=1e-12)


def test_network_check_and_real_inputs():
    out = kernel_distance_summary(784, 64, 1.0, pairs=10, networks=50)
    assert abs(out["D"] - out["D_network"]) < 3 * math.hypot(out["D_se"], out["D_network_se"])
    X = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = kernel_distance_summary(None, 50, 0.3, pairs=20, masks=512, inputs=X)
    assert out["d"] == 64 and out["inputs"] == "given (100 examples)"
    with pytest.raises(ValueError):
        kernel_distance_summary(10, 50, 0.3, inputs=X)


def test_printed_text_carries_the_network_check_when_asked():
    out = kernel_distance_summary(100, 50, 0.2, pairs=5, masks=256, networks=40)
    text = format_kernel_summary(out)
    assert text.splitlines()[0].startswith(f"D = {out['D']:.4g} +- ")
    assert f"network check: D = {out['D_network']:.4g}" in text and "40 sampled networks" in text
    assert "network check" not in format_kernel_summary(kernel_distance_summary(100, 50, 0.2, pairs=5,
                                                                                masks=256))


def test_deterministic_given_seed():
    a = kernel_distance_summary(100, 50, 0.2, pairs=5, masks=256, seed=3)
    b = kernel_distance_summary(100, 50, 0.2, pairs=5, masks=256, seed=3)
    c = kernel_distance_summary(100, 50, 0.2, pairs=5, masks=256, seed=4)
    assert a["D"] == b["D"] != c["D"]
