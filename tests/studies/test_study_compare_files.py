"""The GPU-scale comparison studies run end to end on miniature copies of the user's data files."""

import json

import pytest

from fake_files import mnist_folder, write_cifar
from widthlab.cli import main


def _run(args, out):
    assert main(["run", *args, "--out", str(out), "--quiet", "train.epochs=1", "seeds=[0]",
                 "methods.expanding.method.proposals=4"]) == 0
    entries = json.loads((out / "summary.json").read_text())
    assert all(e["status"] == "done" for e in entries), [e["error"] for e in entries]
    arms = {e["arm"] for e in entries}
    # The fixed retrain controls of the learned widths exist where the task's model takes ``widths``.
    assert {"dense", "widesparse", "adaptive", "expanding"} <= arms
    assert arms <= {"dense", "widesparse", "adaptive", "expanding", "adaptive_retrain", "expanding_retrain"}
    assert "## Comparison" in (out / "report.md").read_text()
    return arms


def test_compare_mnist_on_idx_files(tmp_path):
    mnist_folder(tmp_path / "mnist", gz=True, n=200, n_test=50)
    arms = _run(["compare-mnist", f"tasks.mnist.data.path={tmp_path / 'mnist'}", "train.device=cpu",
                 "methods.dense.sweep={model.width: [16]}",
                 "methods.widesparse.sweep={model.width: [64, 128]}",
                 "methods.expanding.method.mala_bursts=2", "methods.expanding.method.score_batch=64"],
                tmp_path / "out")
    assert {"adaptive_retrain", "expanding_retrain"} <= arms  # an MLP task: both retrained


@pytest.mark.slow  # about a minute of CPU for five ResNet-20 / CNN runs
def test_compare_cifar10_on_python_batches(tmp_path):
    path, _ = write_cifar(tmp_path, per_batch=8)
    _run(["compare-cifar10", f"tasks.cifar10.data.path={path}", "train.device=cpu", "train.batch_size=16",
          "methods.dense.sweep={model.width: [8]}", "methods.widesparse.sweep={model.width: [16, 32]}",
          "methods.expanding.method.ascent_steps=2", "methods.expanding.method.start_widths=[4, 4, 4]",
          "methods.expanding.method.max_widths=[8, 8, 8]", "methods.expanding.method.max_additions=2"],
         tmp_path / "out")
