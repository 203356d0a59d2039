"""The kernel studies end to end: a tiny override of widesparse-kernel-digits runs from the CLI, each
run's summary holds the kernel distances, and the report carries the kernel figure.

The recorded values are checked against independent computations: the exact D against
``theorem1_distance`` on the run's (n, p, pairs) with p from the closed form (6,364 - 10 n)/(64 n),
and the empirical D against a numpy evaluation of Theta = (1/(n d)) sum_i relu(u_i.x) relu(u_i.y) and
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
from widthlab.theory import sample_pairs, theorem1_distance
from widthlab.train import checkpoint as ckpt

PAIRS, MASKS, WIDTHS = 60, 32, (216, 512)


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
        ref = theorem1_distance(x, y, n, p, num_masks=MASKS, seed=3)  # masks from the run's seed
        assert e["kernel_D"] == pytest.approx(ref.D, rel=1e-9)
        assert e["kernel_D_se"] == pytest.approx(ref.D_se, rel=1e-9) and e["kernel_D_se"] > 0
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
