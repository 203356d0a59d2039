"""The trainer on small in-memory tasks: learning, schedules, selection, stopping, failures, hooks."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import make_blobs_task, make_regression_task
from widthlab.train.checkpoint import CheckpointError, load_file
from widthlab.train.config import OptimConfig, ScheduleConfig, TrainConfig
from widthlab.train.trainer import Trainer


def mlp(d=8, h=32, c=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def cfg(**kw):
    kw.setdefault("progress", "none")
    kw.setdefault("epochs", 5)
    kw.setdefault("batch_size", 32)
    return TrainConfig(**kw)


@pytest.mark.parametrize("opt", [
    OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    OptimConfig(name="adam", lr=1e-2),
    OptimConfig(name="adamw", lr=1e-2, weight_decay=0.05),
])
def test_learns_blobs(blobs, opt):
    res = Trainer(mlp(), blobs, cfg(optimizer=opt)).fit()
    assert res.status == "done" and res.epochs == 5
    assert res.final["test_accuracy"] > 0.9
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_regression_reports_loss():
    data = make_regression_task()
    model = nn.Linear(4, 1)
    res = Trainer(model, data, cfg(epochs=30, optimizer=OptimConfig(name="adam", lr=0.05))).fit()
    assert "test_loss" in res.final and "test_accuracy" not in res.final
    assert res.final["test_loss"] < 1e-2


def lrs(res):
    return [r["lr"] for r in res.history]


def test_multistep_schedule_matches_closed_form(blobs):
    res = Trainer(mlp(), blobs, cfg(epochs=6, optimizer=OptimConfig(lr=0.1),
                                    schedule=ScheduleConfig(name="multistep", milestones=(2, 4),
                                                            gamma=0.1))).fit()
    # lr recorded during epoch e (1-based) is 0.1 * 0.1^(number of milestones < e)
    expect = [0.1 * 0.1 ** sum(m < e for m in (2, 4)) for e in range(1, 7)]
    assert lrs(res) == pytest.approx(expect)


def test_cosine_schedule_matches_closed_form(blobs):
    res = Trainer(mlp(), blobs, cfg(epochs=4, optimizer=OptimConfig(lr=0.2),
                                    schedule=ScheduleConfig(name="cosine"))).fit()
    expect = [0.2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs(res) == pytest.approx(expect)


def test_onecycle_peaks_then_anneals(blobs):
    res = Trainer(mlp(), blobs, cfg(epochs=6, optimizer=OptimConfig(lr=0.5),
                                    schedule=ScheduleConfig(name="onecycle", pct_start=0.3))).fit()
    lr = lrs(res)
    assert max(lr) <= 0.5 + 1e-9 and lr[-1] < lr[2] and lr[0] < lr[2]


def test_plateau_schedule_reduces_when_stalled(blobs):
    # lr ~0 -> the monitored metric never improves after epoch 1, so lr is cut after `patience` epochs.
    res = Trainer(mlp(), blobs, cfg(epochs=5, optimizer=OptimConfig(lr=1e-6),
                                    schedule=ScheduleConfig(name="plateau", patience=1, factor=0.5))).fit()
    assert lrs(res)[-1] < 1e-6


def test_early_stopping(blobs):
    res = Trainer(mlp(), blobs, cfg(epochs=50, early_stopping=2, optimizer=OptimConfig(lr=0.0))).fit()
    assert res.stop_reason == "early_stopping" and res.epochs == 3


def test_best_validation_selection_restores_weights(blobs):
    class Sabotage:
        """Destroys the weights after epoch 3 so that the best epoch is an early one."""

        def on_epoch_end(self, trainer):
            if trainer.epoch == 3:
                with torch.no_grad():
                    for p in trainer.model.parameters():
                        p.mul_(0)

    model = mlp()
    res = Trainer(model, blobs, cfg(epochs=5, optimizer=OptimConfig(name="adam", lr=1e-2)),
                  [Sabotage()]).fit()
    assert res.best_epoch <= 3
    assert res.final == res.history[res.best_epoch - 1]
    assert any(p.abs().sum() > 0 for p in model.parameters())


def test_nonfinite_loss_stops_with_reason(blobs):
    class Poison:
        def extra_loss(self, model, outputs, targets):
            return torch.tensor(float("nan"))

    res = Trainer(mlp(), blobs, cfg(), [Poison()]).fit()
    assert res.status == "failed" and "non-finite" in res.error and res.epochs == 0


def test_grad_clip_bounds_the_update(blobs):
    model = mlp()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    Trainer(model, blobs, cfg(epochs=1, max_steps=1, grad_clip=1e-3, optimizer=OptimConfig(lr=1.0))).fit()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 1e-3 * (1 + 1e-5)


def test_hooks_order_extra_loss_and_optimizer_factory(blobs):
    calls = []

    class Spy:
        def on_fit_start(self, t):
            calls.append("fit_start")

        def on_after_backward(self, t):
            calls.append("after_backward")

        def on_step_end(self, t):
            calls.append("step_end")

        def on_epoch_end(self, t):
            calls.append("epoch_end")

        def on_fit_end(self, t):
            calls.append("fit_end")

        def make_optimizer(self, model, default):
            self.opt = default(model.parameters())
            return self.opt

        def metrics(self, t):
            return {"spy_steps": t.step}

    spy = Spy()
    t = Trainer(mlp(), make_blobs_task(n=64), cfg(epochs=1, batch_size=32, select_best=False), [spy])
    res = t.fit()
    assert calls == ["fit_start", "after_backward", "step_end", "after_backward", "step_end", "epoch_end",
                     "fit_end"]
    assert t.optimizer is spy.opt
    assert res.history[0]["spy_steps"] == 2


def test_extra_loss_changes_gradients(blobs):
    class L2:
        def extra_loss(self, model, outputs, targets):
            return 1e3 * sum((p ** 2).sum() for p in model.parameters())

    model = mlp()
    Trainer(model, blobs, cfg(epochs=3, select_best=False, optimizer=OptimConfig(lr=1e-4)), [L2()]).fit()
    # Gradient descent on 1e3*|p|^2 with lr 1e-4 shrinks every weight by (1 - 0.2) per step.
    assert max(p.abs().max() for p in model.parameters()) < 0.01


def test_checkpoint_and_final_written_atomically(tmp_path, blobs):
    Trainer(mlp(), blobs, cfg(epochs=2), run_dir=tmp_path).fit()
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint.pt", "final.pt", "metrics.jsonl"}
    assert not list(tmp_path.glob(".*tmp"))
    assert load_file(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_corrupt_checkpoint_error_names_file(tmp_path, blobs):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_file(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        Trainer(mlp(), blobs, cfg(), run_dir=tmp_path).fit(resume=True)


def test_amp_on_cpu_is_a_clear_error(blobs):
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(mlp(), blobs, cfg(amp="bf16"))


def test_log_lines_when_not_a_terminal(blobs, capsys):
    import io

    stream = io.StringIO()
    Trainer(mlp(), blobs, cfg(epochs=2, progress="auto"), stream=stream).fit()
    out = stream.getvalue().splitlines()
    assert len(out) == 2 and out[0].startswith("epoch 1/2 train_loss")


def test_tensorboard_scalars_when_installed(tmp_path, blobs):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(mlp(), blobs, cfg(epochs=3, tensorboard=True), run_dir=tmp_path).fit()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("val_accuracy")
    assert [e.step for e in events] == [1, 2, 3]
    history = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [round(e.value, 6) for e in events] == [round(json.loads(h)["val_accuracy"], 6) for h in history]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_cuda_training_with_mixed_precision(blobs, amp):
    model = mlp()
    config = cfg(device="cuda", amp=amp, optimizer=OptimConfig(name="adam", lr=1e-2))
    res = Trainer(model, blobs, config).fit()
    assert res.status == "done" and res.final["test_accuracy"] > 0.9
    assert next(model.parameters()).device.type == "cuda"
