"""Masked weights stay exactly zero through real training (the static masks of Golubeva et al. 2021).

200 optimizer steps through the real Trainer with SGD (momentum 0.9, Nesterov, weight decay 5e-4),
Adam and AdamW under LR schedules: the masked weights and their optimizer state stay exactly 0 and
the free weights move. Then the same after a state-dict round trip and a checkpoint resume, and under
mixed precision with a gradient scaler.
"""

import copy
from dataclasses import replace

import pytest
import torch

from conftest import make_blobs_task
from widthlab.methods.widesparse.callback import MaskCallback
from widthlab.methods.widesparse.plan import build
from widthlab.models import count_nonzero_weights, create_model
from widthlab.nn.masked import masked_layers
from widthlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from widthlab.train.trainer import Trainer

OPTIMIZERS = {
    "sgd_nesterov_wd": (OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                        ScheduleConfig(name="multistep", milestones=(4, 9), gamma=0.1)),
    "adam_wd": (OptimConfig(name="adam", lr=0.01, weight_decay=5e-4), ScheduleConfig(name="cosine")),
    "adamw": (OptimConfig(name="adamw", lr=0.01, weight_decay=0.05), ScheduleConfig(name="onecycle")),
}


def sparse_mlp(seed=0, width=32):
    torch.manual_seed(100 + seed)
    model = create_model("mlp", input_shape=(8,), num_outputs=3, widths=[width, width])
    # Two hidden layers: the cap rule spreads T over the 32x32 and 8x32 layers (T = 944, m = 2).
    plan = build(model, None, seed=seed, base_width=16)
    assert plan.summary["weight_mismatch"] == 0 and plan.summary["layers_sparsified"] >= 2
    return plan


def config(optim, schedule, **kw):
    base = TrainConfig(epochs=13, batch_size=16, optimizer=optim, schedule=schedule, max_steps=200,
                       select_best=False, checkpoint_every=0, progress="none", num_threads=1, seed=0)
    return replace(base, **kw)


def assert_masked_state_zero(model, optimizer):
    for name, layer in masked_layers(model):
        off = ~layer.weight_mask
        assert torch.all(layer.weight[off] == 0), name
        for key, buf in optimizer.state[layer.weight].items():
            if torch.is_tensor(buf) and buf.shape == layer.weight.shape:
                assert torch.all(buf[off] == 0), (name, key)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_masks_persist_under_optimizers_and_schedules(opt):
    plan = sparse_mlp()
    model = plan.model
    before = {n: layer.weight.detach().clone() for n, layer in masked_layers(model)}
    nonzero = count_nonzero_weights(model)
    trainer = Trainer(model, make_blobs_task(d=8), config(*OPTIMIZERS[opt]), plan.callbacks)
    result = trainer.fit()
    assert result.status == "done" and result.steps == 200
    assert trainer.optimizer.state, "the optimizer holds state for the masked weights"
    assert_masked_state_zero(model, trainer.optimizer)
    for n, layer in masked_layers(model):
        free = layer.weight_mask
        assert (layer.weight[free] != before[n][free]).float().mean() > 0.9, n  # free weights train
    assert count_nonzero_weights(model) == nonzero == plan.summary["target_weights"]
    assert result.history[-1]["connectivity"] == pytest.approx(plan.summary["connectivity"])


def test_persistence_after_state_dict_round_trip():
    plan = sparse_mlp()
    data = make_blobs_task(d=8)
    opt, sched = OPTIMIZERS["adamw"]
    Trainer(plan.model, data, config(opt, sched, max_steps=50), plan.callbacks).fit()
    saved = copy.deepcopy(plan.model.state_dict())
    other = sparse_mlp(seed=5)  # other masks, replaced by the loaded ones
    other.model.load_state_dict(saved)
    trainer = Trainer(other.model, data, config(opt, sched, max_steps=100), other.callbacks)
    trainer.fit()
    assert_masked_state_zero(other.model, trainer.optimizer)
    for (_, a), (_, b) in zip(masked_layers(plan.model), masked_layers(other.model)):
        assert torch.equal(a.weight_mask, b.weight_mask)


def test_checkpoint_resume_is_exact(tmp_path):
    data = make_blobs_task(d=8)
    opt, sched = OPTIMIZERS["sgd_nesterov_wd"]
    cfg = config(opt, sched, epochs=4, max_steps=None, checkpoint_every=1)
    full = sparse_mlp()
    Trainer(full.model, data, cfg, full.callbacks, run_dir=tmp_path / "full").fit()
    half = sparse_mlp()
    Trainer(half.model, data, replace(cfg, epochs=2), half.callbacks, run_dir=tmp_path / "cut").fit()
    resumed = sparse_mlp()
    trainer = Trainer(resumed.model, data, cfg, resumed.callbacks, run_dir=tmp_path / "cut")
    trainer.fit(resume=True)
    assert trainer.resumed
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert_masked_state_zero(resumed.model, trainer.optimizer)


def test_resume_rejects_a_differently_sparsified_model():
    cb = MaskCallback({"layers.0": 10})
    with pytest.raises(ValueError, match="sparsified differently"):
        cb.load_state_dict({"removals": {"layers.0": 11}}, None)


def test_mixed_precision_with_grad_scaler_keeps_zeros():
    # CPU autocast (bfloat16) with a GradScaler, driving the callback's hooks as the trainer does.
    plan = sparse_mlp()
    model, cb = plan.model, plan.callbacks[0]
    data = make_blobs_task(d=8)
    x, y = data.train.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    holder = type("T", (), {"model": model})()
    cb.on_fit_start(holder)
    for step in range(30):
        idx = slice(16 * (step % 16), 16 * (step % 16) + 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        cb.on_after_backward(holder)  # before unscale_: zero stays zero under scaling
        scaler.step(opt)
        scaler.update()
        cb.on_step_end(holder)
    assert_masked_state_zero(model, opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_amp_through_trainer():
    plan = sparse_mlp()
    opt, sched = OPTIMIZERS["sgd_nesterov_wd"]
    trainer = Trainer(plan.model, make_blobs_task(d=8), config(opt, sched, device="cuda", amp="fp16"),
                      plan.callbacks)
    trainer.fit()
    assert_masked_state_zero(plan.model, trainer.optimizer)
