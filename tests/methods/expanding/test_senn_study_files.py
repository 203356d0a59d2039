"""The GPU-scale self-expanding studies (MNIST depth and width, CIFAR-10 CNN) run end to end through the
study runner on miniature copies of the user's data files (real IDX / CIFAR formats), with tiny budgets."""

from __future__ import annotations

import pytest

from fake_files import mnist_folder, write_cifar
from widthlab.studies.executor import run_study
from widthlab.studies.load import load_study

TINY = ["train.epochs=1", "seeds=[0]", "train.device=cpu", "train.checkpoint_every=1", "method.cooldown=1"]


def _run(study, over, tmp_path):
    out = run_study(load_study(study, [*TINY, *over]), tmp_path / "out", quiet=True).summaries
    assert out and all(s["status"] == "done" for s in out), [s["error"] for s in out]
    for s in out:
        assert s["method"] == "expanding" and s["final_widths"] == list(s["widths"].values())
        assert s["expansion_events"] >= 1 and s["test_accuracy"] is not None
    return out


@pytest.mark.parametrize("study, extra", [
    ("expanding-mnist-depth", ["method.proposals=4", "method.layer_proposals=4", "method.ascent_steps=2",
                               "method.score_batch=32", "method.max_widths=[12, 12, 12]"]),
    ("expanding-mnist-width", ["method.proposals=4", "method.mala_bursts=1", "method.mala_steps=2",
                               "method.score_batch=32", "sweep.data.subset=[40, 60]"]),
])
def test_mnist_studies_on_idx_files(tmp_path, study, extra):
    mnist_folder(tmp_path / "mnist", gz=True, n=80, n_test=20)
    out = _run(study, [f"data.path={tmp_path / 'mnist'}", "train.batch_size=32", *extra], tmp_path)
    if study == "expanding-mnist-width":
        assert sorted(s["axes"]["data.subset"] for s in out) == [40, 60]


def test_cnn_study_on_cifar_batches(tmp_path):
    path, _ = write_cifar(tmp_path, per_batch=8)
    (s,) = _run("expanding-cnn-cifar10",
                [f"data.path={path}", "train.batch_size=16", "method.start_widths=[4, 4, 4]",
                 "method.max_widths=[6, 6, 6]", "method.proposals=2", "method.ascent_steps=2",
                 "method.score_batch=16", "method.max_additions=2"], tmp_path)
    assert len(s["final_widths"]) == 3 and all(4 <= w <= 6 for w in s["final_widths"])


def test_cnn_digits_study_adds_depth(tmp_path):
    """The CPU-sized CNN study on bundled digits images, with zero thresholds and a tiny budget: the
    first event grows channels and inserts stages (identity, no pooling) up to the depth cap."""
    (s,) = _run("expanding-cnn-digits",
                ["method.tau=0", "method.alpha=0", "method.alpha_layer=0", "method.layer_cooldown=0",
                 "method.proposals=2", "method.layer_proposals=2", "method.ascent_steps=2",
                 "method.score_batch=32", "method.max_additions=4", "method.max_widths=[10, 10, 10]"],
                tmp_path)
    assert s["layers_added"] >= 1 and s["final_layers"] == len(s["final_widths"]) >= 2
