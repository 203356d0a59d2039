"""Checkpoints are verified on read: checksums, the run and architecture they belong to, their entries."""

import shutil

import pytest
import torch
from torch import nn

from conftest import make_blobs_task
from widthlab.train import checkpoint as ckpt
from widthlab.train.config import OptimConfig, TrainConfig
from widthlab.train.trainer import Trainer


def _model(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))


def _cfg(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, progress="none", checkpoint_every=1, seed=1,
                       select_best=False, optimizer=OptimConfig(name="adam", lr=1e-2))


def _fit(run_dir, epochs: int, resume: bool = False, width: int = 16, run_id: str = "run-a",
         repair: bool = False):
    """Fit; ``repair``: first make the folder's checkpoint the last good one, as the study runner does."""
    trainer = Trainer(_model(width), make_blobs_task(n=128), _cfg(epochs), run_dir=run_dir,
                      identity={"run_id": run_id})
    trainer.resume_notes = []
    if repair:
        trainer.resume_notes = ckpt.prepare_resume(run_dir / "checkpoint.pt",
                                                   {**trainer.identity, "epochs": epochs})
    result = trainer.fit(resume=resume)
    return trainer, result


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    ref, _ = _fit(tmp_path / "ref", 4)
    run = tmp_path / "run"
    _fit(run, 3)  # an interrupted 4-epoch run: checkpoint.pt at epoch 3, checkpoint.prev.pt at epoch 2
    assert (run / "checkpoint.prev.pt").is_file()
    _truncate(run / "checkpoint.pt")
    with pytest.raises(ckpt.DamagedCheckpoint, match="cannot be read"):
        _fit(run, 4, resume=True)  # the trainer alone does not guess
    resumed, result = _fit(run, 4, resume=True, repair=True)
    notes = " ".join(resumed.resume_notes)
    assert "checkpoint.pt" in notes and "damaged" in notes and "previous good checkpoint" in notes
    assert result.status == "done" and [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert _same(_weights(resumed), _weights(ref))  # resumed from epoch 2: same weights as never stopped


def test_damaged_checkpoints_without_a_good_one_restart_from_the_beginning(tmp_path):
    ref, _ = _fit(tmp_path / "ref", 3)
    run = tmp_path / "run"
    _fit(run, 2)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _truncate(run / name, 0.9)
    resumed, result = _fit(run, 3, resume=True, repair=True)
    assert "starts again from the beginning" in resumed.resume_notes[-1]
    assert not resumed.resumed and result.status == "done"
    assert _same(_weights(resumed), _weights(ref))


def test_flipped_byte_fails_the_checksum(tmp_path):
    _fit(tmp_path, 1)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert ckpt.checksum_problem(path) is not None
    with pytest.raises(ckpt.DamagedCheckpoint, match="checksum"):
        ckpt.load_file(path)


def test_truncated_final_model_is_detected(tmp_path):
    _fit(tmp_path, 1)
    assert ckpt.checksum_problem(tmp_path / "final.pt") is None
    _truncate(tmp_path / "final.pt")
    assert ckpt.checksum_problem(tmp_path / "final.pt") is not None


def _copy_checkpoint(src, dst) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pt", "checksums.json"):
        shutil.copy(src / name, dst / name)


def test_checkpoint_of_another_architecture_is_refused_naming_both(tmp_path):
    _fit(tmp_path / "narrow", 1, width=8, run_id="run-a")
    _copy_checkpoint(tmp_path / "narrow", tmp_path / "wide")
    with pytest.raises(ckpt.CheckpointError) as e:
        _fit(tmp_path / "wide", 3, resume=True, width=64, run_id="run-a")
    msg = str(e.value)
    narrow = sum(p.numel() for p in _model(8).parameters())
    wide = sum(p.numel() for p in _model(64).parameters())
    assert "checkpoint.pt" in msg and f"{narrow} parameters" in msg and f"{wide} parameters" in msg
    assert "\n" not in msg


def test_checkpoint_of_another_run_is_refused_naming_both(tmp_path):
    _fit(tmp_path / "a", 1, run_id="run-a")
    _copy_checkpoint(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ckpt.CheckpointError, match="run-a.*run-b"):
        _fit(tmp_path / "b", 3, resume=True, run_id="run-b")


def test_checkpoint_claiming_an_impossible_epoch_is_refused(tmp_path):
    _fit(tmp_path, 1)
    path = tmp_path / "checkpoint.pt"
    state = ckpt.load_file(path)
    state["epoch"] = 1000
    ckpt.atomic_save(state, path)  # a consistent checksum: only the epoch is wrong
    with pytest.raises(ckpt.CheckpointError, match="epoch 1000 of a 30-epoch run"):
        _fit(tmp_path, 30, resume=True)


@pytest.mark.parametrize("edit", ["missing", "wrong_type"])
def test_checkpoint_entry_errors_name_the_file(tmp_path, edit):
    _fit(tmp_path, 1)
    path = tmp_path / "checkpoint.pt"
    state = ckpt.load_file(path)
    if edit == "missing":
        del state["optimizer"]
    else:
        state["history"] = "not a list"
    ckpt.atomic_save(state, path)
    with pytest.raises(ckpt.CheckpointError) as e:
        _fit(tmp_path, 3, resume=True)
    assert str(path) in str(e.value) and ("optimizer" in str(e.value) or "history" in str(e.value))


def test_a_checkpoint_that_needs_code_is_refused_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_file(path)
    msg = str(e.value)
    assert "\n" not in msg and "not a widthlab checkpoint" in msg and "not loaded" in msg
    assert "weights_only" not in msg


class Evil:
    pass


def test_wall_seconds_accumulate_across_a_resume(tmp_path):
    _, first = _fit(tmp_path, 5)
    _, resumed = _fit(tmp_path, 6, resume=True)  # one more epoch after the 5 already paid for
    assert resumed.wall_seconds >= first.wall_seconds
