"""The kernel recorder and the theory's weight reader find u by its role (the first layer), whatever
the layer's implementation: masked dense, or CSR where ``sparse_impl`` picks it (paper §3, Theorem 1
is about the first layer; Fig. 8 family of App. A).

Numbers come from the paper's count: MLP 784 -> 160 -> 10, base width 8, classifier dense
(fract_cl = 0), so the first layer keeps 794 * 8 - 10 * 160 = 4,752 of its 784 * 160 weights,
p = 4752 / 125440; d = 784. The empirical distance is recomputed here in numpy from the first layer's
weights (Theta = (1/(n d)) sum_i relu(u_i.x) relu(u_i.y) against the arc-cosine closed form).
"""

import types

import numpy as np
import pytest
import torch

from widthlab.methods.widesparse.plan import build
from widthlab.models import create_model
from widthlab.theory.empirical import first_layer_weight

N_HIDDEN, BASE, D = 160, 8, 784
P_FC = (794 * BASE - 10 * N_HIDDEN) / (D * N_HIDDEN)


def _numpy_distance(u: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    n, d = u.shape
    theta = (np.maximum(x @ u.T, 0) * np.maximum(y @ u.T, 0)).sum(1) / (n * d)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    t = np.arccos(np.clip((x * y).sum(1) / (nx * ny), -1, 1))
    theta_inf = nx * ny * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi * d)
    return float(((theta - theta_inf) ** 2).mean())


def _plan(impl: str):
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(1, 28, 28), num_outputs=10, width=N_HIDDEN)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    data = types.SimpleNamespace(test=torch.utils.data.TensorDataset(x, torch.zeros(64)))
    plan = build(model, data, seed=5, base_width=BASE, fract_cl=0.0, sparse_impl=impl,
                 kernel={"pairs": 40, "masks": 16, "after_training": False})
    recorder = plan.callbacks[-1]
    recorder.on_fit_start(types.SimpleNamespace(model=plan.model))
    return plan, recorder


@pytest.mark.parametrize("impl", ["csr", "auto"])  # auto: CSR on a CPU (125,440 weights, c = 3.8%)
def test_recorder_reads_the_first_layer_whatever_its_implementation(impl):
    plan, rec = _plan(impl)
    assert type(plan.model.layers[0]).__name__ == "CSRLinear"
    s = plan.summary
    assert s["kernel_d"] == D
    assert s["kernel_p"] == pytest.approx(P_FC, rel=1e-12)
    # The same seed draws the same mask and weights for the masked layer: u from its weights,
    # scaled by the init law's std 1/sqrt(3 d) (U(+-1/sqrt(d c)) on the mask, paper App. A).
    masked, _ = _plan("masked")
    fc = masked.model.layers[0]
    u = (fc.weight * fc.weight_mask).detach().double().numpy() * (3 * D) ** 0.5
    assert int((u != 0).sum()) == 794 * BASE - 10 * N_HIDDEN
    ref = _numpy_distance(u, rec.x.numpy(), rec.y.numpy())
    assert s["kernel_D_empirical_init"] == pytest.approx(ref, rel=1e-9)


def test_theory_reads_the_csr_first_layer():
    plan, _ = _plan("csr")
    W = first_layer_weight(plan.model)
    assert tuple(W.shape) == (N_HIDDEN, D)
    assert int((W != 0).sum()) == 794 * BASE - 10 * N_HIDDEN
