"""Every method with each of its models trains on CUDA, with and without mixed precision.

Skipped without a CUDA device. A case is a few optimizer steps through the real trainer on a small
bundled or synthetic task (the same builders the study runner calls): the run must finish, every
training loss must be finite, the model must live on the GPU, and where the method changes width the
widths must have changed. The width change is made certain rather than left to the dynamics of a few
steps: adaptive runs start from lam0 = 0.1 (25 units) under a lam floor (``boundary``) of 0.2, so the
fit-start check shrinks every adaptive MLP to D(0.2) = 13 on the GPU before the first step; expanding
runs accept every candidate (tau = alpha = 0, no cooldown), so they grow at the first event.
"""

from __future__ import annotations

import math

import pytest
import torch

from widthlab.data.registry import load_dataset
from widthlab.models import create_model
from widthlab.nn.masked import masked_layers
from widthlab.studies.methods import build_method
from widthlab.train.config import OptimConfig, TrainConfig
from widthlab.train.trainer import Trainer, seed_everything

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIGITS = ("digits", {"subset": 128})
IMAGES = ("digits", {"subset": 128, "as_image": True})  # 1 x 8 x 8
SEQS = ("digits_seq", {"subset": 128})
GRAPHS = ("synthetic_graphs", {"n_graphs": 96})
SEQ2SEQ = ("seq2seq", {"n_train": 96, "n_val": 32, "n_test": 32, "max_len": 6})
MOONS = ("moons", {"n_train": 64, "n_val": 32, "n_test": 64})

TINY_RESNET = {"width": 4}
RNN = {"hidden_size": 16, "depth": 1}
GIN = {"embed_dim": 16, "layers": 3}
TRANSFORMER = {"d_model": 16, "heads": 2, "layers": 1, "dropout": 0.0}
ADAPTIVE = {"lambda0": 0.1, "boundary": 0.2}  # module doc: a certain resize at fit start
EXPANDING = {"tau": 0.0, "alpha": 0.0, "alpha_layer": 0.0, "cooldown": 1, "proposals": 4,
             "layer_proposals": 4, "mala_bursts": 1, "mala_steps": 2, "cg_maxiter": 10,
             "kfac_stat_every": 1, "kfac_inv_every": 1}

# id: (method, data, model name, model options, method options, changes width)
CASES = {
    "dense-mlp": ("dense", DIGITS, "mlp", {"width": 16}, {}, False),
    "dense-resnet18": ("dense", IMAGES, "resnet18", TINY_RESNET, {}, False),
    "dense-resnet18_imagenet": ("dense", IMAGES, "resnet18_imagenet", TINY_RESNET, {}, False),
    "dense-resnet20": ("dense", IMAGES, "resnet20", TINY_RESNET, {}, False),
    "dense-rnn": ("dense", SEQS, "rnn", RNN, {}, False),
    "dense-gin": ("dense", GRAPHS, "gin", GIN, {}, False),
    "dense-transformer": ("dense", SEQ2SEQ, "transformer", TRANSFORMER, {}, False),
    "widesparse-mlp": ("widesparse", DIGITS, "mlp", {"width": 16},
                       {"base_width": 4, "fract_cl": 0.3}, False),
    "widesparse-mlp-csr": ("widesparse", DIGITS, "mlp", {"width": 16},
                           {"base_width": 4, "fract_cl": 0.3, "sparse_impl": "csr"}, False),
    "widesparse-resnet18": ("widesparse", IMAGES, "resnet18", TINY_RESNET, {"base_width": 2}, False),
    "widesparse-resnet18_imagenet": ("widesparse", IMAGES, "resnet18_imagenet", TINY_RESNET,
                                     {"base_width": 2}, False),
    "widesparse-resnet20": ("widesparse", IMAGES, "resnet20", TINY_RESNET, {"base_width": 2}, False),
    "widesparse-linear-bottleneck": ("widesparse", IMAGES, "resnet18", TINY_RESNET,
                                     {"base_width": 2, "variant": "linear_bottleneck"}, False),
    "widesparse-nonlinear-bottleneck": ("widesparse", IMAGES, "resnet18", TINY_RESNET,
                                        {"base_width": 2, "variant": "nonlinear_bottleneck"}, False),
    "adaptive-mlp": ("adaptive", DIGITS, "mlp", {"width": 8, "depth": 2}, ADAPTIVE, True),
    "adaptive-resnet20": ("adaptive", IMAGES, "resnet20", TINY_RESNET,
                          {**ADAPTIVE, "activation": "leaky_relu"}, True),
    "adaptive-resnet20-channels": ("adaptive", IMAGES, "resnet20", TINY_RESNET,
                                   {**ADAPTIVE, "activation": "leaky_relu", "adaptive_channels": True}, True),
    "adaptive-rnn": ("adaptive", SEQS, "rnn", RNN, ADAPTIVE, True),
    "adaptive-gin": ("adaptive", GRAPHS, "gin", GIN, {**ADAPTIVE, "activation": "leaky_relu"}, True),
    "adaptive-transformer": ("adaptive", SEQ2SEQ, "transformer", TRANSFORMER,
                             {**ADAPTIVE, "activation": "relu", "sigma_theta": None}, True),
    "expanding-mlp-default": ("expanding", MOONS, "mlp", {"width": 2},
                              {**EXPANDING, "start_widths": [2], "max_widths": [4], "optimizer": "default"},
                              True),
    "expanding-mlp-kfac": ("expanding", MOONS, "mlp", {"width": 2},
                           {**EXPANDING, "start_widths": [2], "max_widths": [4], "optimizer": "kfac"}, True),
    "expanding-mlp-cg": ("expanding", MOONS, "mlp", {"width": 2},
                         {**EXPANDING, "start_widths": [2], "max_widths": [4], "optimizer": "cg"}, True),
    "expanding-cnn": ("expanding", IMAGES, "mlp", {"width": 2},
                      {**EXPANDING, "architecture": "cnn", "start_widths": [2, 2], "max_widths": [3, 4],
                       "optimizer": "default"}, True),
}
AMPS = ["none", "fp16", "bf16"]


def train_case(case: str, device: str = "cuda", amp: str = "none", steps: int = 4):
    """Build the case as the study runner does and train ``steps`` optimizer steps; returns
    (fit result, model, widths before the fit)."""
    method, (dname, dopts), mname, mopts, opts, _ = CASES[case]
    seed_everything(0)
    data = load_dataset(dname, **dopts)
    model = create_model(mname, input_shape=data.input_shape, num_outputs=data.num_outputs, **mopts)
    plan = build_method(method, opts, model, data, seed=0)
    before = dict(plan.model.widths())
    cfg = TrainConfig(epochs=2, max_steps=steps, batch_size=32, device=device, amp=amp,
                      optimizer=OptimConfig(name="adam", lr=1e-2), select_best=False, checkpoint_every=0,
                      progress="none")
    res = Trainer(plan.model, data, cfg, plan.callbacks).fit()
    return res, plan.model, before


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_on_cuda(case, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    res, model, before = train_case(case, amp=amp)
    assert res.status == "done", res.error
    assert res.steps > 0 and res.history
    assert all(math.isfinite(h["train_loss"]) for h in res.history), [h["train_loss"] for h in res.history]
    assert all(p.device.type == "cuda" for p in model.parameters())
    if CASES[case][-1]:
        assert dict(model.widths()) != before, f"widths did not change from {before}"
    for name, layer in masked_layers(model):  # wide & sparse: still exactly zero off the mask
        assert not layer.weight.detach()[~layer.weight_mask].any(), name
