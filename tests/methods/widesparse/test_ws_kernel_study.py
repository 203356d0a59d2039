"""The kernel studies end to end: a tiny override of widesparse-kernel-digits runs from the CLI, each
run's summary holds the kernel distances, and the report carries the kernel figure.

The recorded values are checked against independent computations: the exact D of Theorem 1 (Golubeva
et al. 2021, §3) against a numpy evaluation written here from the arc-cosine kernels of degree 1 and 2
(Cho & Saul 2009) on masked inputs, with its own masks (numpy's generator, 25x as many), on the run's
(n, p, pairs) with p from the closed form (6,364 - 10 n)/(64 n), within the two standard errors; and
the empirical D against a numpy evaluation of Theta = (1/(n d)) sum_i relu(u_i.x) relu(u_i.y) and
the arc-cosine closed form Theta_inf = |x||y| (sin t + (pi - t) cos t) / (2 pi d), on the network
rebuilt at its initialisation (same seed) and on the trained weights saved in ``final.pt``.
"""

import json
import math

import numpy as np
import pytest
import torch

from widthlab.cli import main
from widthlab.data.registry import load_dataset
from widthlab.methods.widesparse.plan import build
from widthlab.models import create_model
from widthlab.report.kernel_plots import kernel_plots, kernel_series
from widthlab.theory import sample_pairs
from widthlab.train import checkpoint as ckpt

PAIRS, MASKS, WIDTHS = 60, 8192, (216, 512)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel") / "out"
    code = main(["run", "widesparse-kernel-digits", "--out", str(out), "--quiet", "seeds=[3]",
                 "train.epochs=2", f"sweep.model.width={list(WIDTHS)}", f"method.kernel.pairs={PAIRS}",
                 f"method.kernel.masks={MASKS}"])
    assert code == 0
    return out


def _numpy_distance(u: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    n, d = u.shape
    theta = (np.maximum(x @ u.T, 0) * np.maximum(y @ u.T, 0)).sum(1) / (n * d)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    t = np.arccos(np.clip((x * y).sum(1) / (nx * ny), -1, 1))
    theta_inf = nx * ny * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi * d)
    return float(((theta - theta_inf) ** 2).mean())


def _arccos(l, xx, yy, xy):
    """E_{w ~ N(0, I)}[relu(w.x)^l relu(w.y)^l] = |x|^l |y|^l J_l(t) / (2 pi) from the Gram entries
    x.x, y.y, x.y (Cho & Saul 2009, degrees 1 and 2)."""
    nn_ = np.sqrt(xx * yy)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(nn_ > 0, np.clip(xy / nn_, -1.0, 1.0), 1.0)  # a masked-out input: the kernel is 0
    t = np.arccos(c)
    J = {1: np.sin(t) + (np.pi - t) * c, 2: 3 * np.sin(t) * c + (np.pi - t) * (1 + 2 * c**2)}[l]
    return nn_**l * J / (2 * np.pi)


def _numpy_theorem1(x, y, n, p, masks, seed):
    """D = mean_j [(K~1 - K1)^2 / d^2 + (K~2 - K~1^2) / (d^2 n)], K~_l = E_s[K_l(s x, s y)] / p^l over
    Bernoulli(p) masks s of one row (weights N(0, 1/p) where kept). Returns (D, its standard error from
    20 batches of masks). The squared mean is debiased by its Monte-Carlo variance."""
    rng = np.random.default_rng(seed)
    P, d = x.shape
    K1 = _arccos(1, (x * x).sum(1), (y * y).sum(1), (x * y).sum(1))
    batches = []
    for _ in range(20):
        s = (rng.random((masks // 20, d)) < p).astype(np.float64)  # (M, d): one row's mask per draw
        gram = [s @ (x * x).T, s @ (y * y).T, s @ (x * y).T]  # (M, P) each: Gram entries of (s x, s y)
        k1, k2 = _arccos(1, *gram) / p, _arccos(2, *gram) / p**2
        m1, m2, v1 = k1.mean(0), k2.mean(0), k1.var(0, ddof=1) / k1.shape[0]
        batches.append((((m1 - K1) ** 2 - v1) / d**2 + (m2 - m1**2 + v1) / (d**2 * n)).mean())
    batches = np.array(batches)
    return batches.mean(), batches.std(ddof=1) / np.sqrt(len(batches))


def test_summary_records_width_connectivity_accuracy_and_kernel(study_out):
    entries = json.loads((study_out / "summary.json").read_text())
    assert sorted(e["width"] for e in entries) == list(WIDTHS)
    data = load_dataset("digits", val_fraction=0.0, normalize="feature")
    x, y = sample_pairs(PAIRS, inputs=data.train.tensors[0], seed=0)  # kernel.split=train, pair_seed 0
    for e in entries:
        n = e["width"]
        assert e["status"] == "done" and e["nonzero_weights"] == 6364 and 0 <= e["test_accuracy"] <= 1
        p = (6364 - 10 * n) / (64 * n)
        assert e["kernel_p"] == pytest.approx(p, rel=1e-12) and e["kernel_d"] == 64
        assert (e["kernel_pairs"], e["kernel_masks"], e["kernel_split"]) == (PAIRS, MASKS, "train")
        D_ind, se_ind = _numpy_theorem1(x.numpy(), y.numpy(), n, p, masks=25 * MASKS, seed=n)
        assert 0 < e["kernel_D_se"] < 0.03 * e["kernel_D"]
        assert abs(e["kernel_D"] - D_ind) < 4 * math.hypot(e["kernel_D_se"], se_ind), (e["kernel_D"], D_ind)
        assert e["kernel_bias_sq"] + e["kernel_variance_term"] == pytest.approx(e["kernel_D"], rel=1e-9)

        # The network at initialisation, rebuilt as the runner builds it (seed 3).
        torch.manual_seed(3)
        model = create_model("mlp", input_shape=(64,), num_outputs=10, width=n, parametrization="ntk",
                             bias=False)
        build(model, data, seed=3, base_width=86, fract_cl=0.0, sparse_impl="masked")
        u0 = model.layers[0].weight.detach().double().numpy()  # N(0, 1/p) slab: already u
        assert e["kernel_D_empirical_init"] == pytest.approx(_numpy_distance(u0, x.numpy(), y.numpy()),
                                                             rel=1e-9)
        final = ckpt.load_file(study_out / "runs" / e["run_id"] / "final.pt")["model"]
        u1 = final["layers.0.weight"].double().numpy()
        assert not np.allclose(u1, u0)  # training moved the weights (lr 361 / 736)
        assert e["kernel_D_empirical_final"] == pytest.approx(_numpy_distance(u1, x.numpy(), y.numpy()),
                                                              rel=1e-9)
        assert e["lr"] == {216: 361.0, 512: 736.0}[n]


def test_report_has_the_kernel_figure(study_out):
    md = (study_out / "report.md").read_text()
    assert "widesparse-kernel-digits: kernel distance and test error vs width" in md
    png = study_out / "plots" / "widesparse-kernel-digits-kernel.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots/widesparse-kernel-digits-kernel.png" in md


def _row(width, seed, D, se, emp, acc, study="s", family="f", status="done"):
    return {"study": study, "status": status,
            "summary": {"width": width, "family": family, "seed": seed, "kernel_p": 8 / width, "kernel_D": D,
                        "kernel_D_se": se, "kernel_D_empirical_init": emp, "test_accuracy": acc}}


def test_kernel_series_aggregates_over_seeds():
    rows = [_row(16, 0, 2e-3, 3e-5, 1e-3, 0.90), _row(16, 1, 4e-3, 4e-5, 3e-3, 0.94),
            _row(32, 0, 1e-3, 1e-5, 1e-3, 0.97), _row(64, 0, 5e-3, 1e-5, 6e-3, 0.95),
            _row(64, 1, 9.0, 1.0, 9.0, 0.0, status="failed"),  # failed runs do not count
            {"study": "s", "status": "done", "summary": {"width": 8, "test_accuracy": 0.5}}]  # no kernel
    (key, points), = kernel_series(rows).items()
    assert key == ("s", "f") and [q.width for q in points] == [16, 32, 64]
    q = points[0]
    assert math.isclose(q.D, 3e-3, rel_tol=1e-12)
    assert q.D_se == pytest.approx(5e-5 / 2)  # sqrt(3^2 + 4^2) / 2
    assert q.empirical_init.mean == pytest.approx(2e-3)
    assert q.empirical_init.std == pytest.approx(math.sqrt(2) * 1e-3)
    assert q.test_accuracy.mean == pytest.approx(0.92) and points[2].test_accuracy.std is None
    (plot,) = kernel_plots(rows)
    assert "Minimal exact D at n = 32; maximal mean test accuracy at n = 32" in plot.caption
    assert plot.png[:4] == b"\x89PNG" and plot.name == "s-kernel"
    assert kernel_plots(rows[-1:]) == []
