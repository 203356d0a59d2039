"""The dense self-expanding CNN studies end to end through the study runner: the CIFAR-10 study for one
short epoch on test-written CIFAR batches, and the bundled-digits study for a few epochs (it grows
connections, channels and layers)."""

from __future__ import annotations

from fake_files import write_cifar
from widthlab.studies.executor import run_study
from widthlab.studies.load import load_study


def _run(study, over, tmp_path):
    out = run_study(load_study(study, ["seeds=[0]", "train.device=cpu", *over]), tmp_path / "out",
                    quiet=True).summaries
    assert out and all(s["status"] == "done" for s in out), [s["error"] for s in out]
    return out


def test_densecnn_cifar10_study_on_cifar_batches(tmp_path):
    path, _ = write_cifar(tmp_path, per_batch=8)
    (s,) = _run("expanding-densecnn-cifar10",
                [f"data.path={path}", "train.epochs=1", "train.batch_size=16", "train.checkpoint_every=1",
                 "method.dense.widths=[[4], [4], [4]]", "method.dense.bud_width=2",
                 "method.dense.max_width=8"], tmp_path)
    assert len(s["final_widths"]) == 3 and s["test_accuracy"] is not None
    assert s["final_layers"] >= 3 and s["counted_weights"] > 0


def test_densecnn_digits_study_grows(tmp_path):
    (s,) = _run("expanding-densecnn-digits",
                ["train.epochs=3", "method.dense.thaw_prob=0.05", "method.dense.depth_threshold=0"], tmp_path)
    assert s["active_connections"] > s["start_active_connections"] and s["thawed"] > 0
    assert s["channels_added"] > 0 or s["layers_added"] > 0
    assert s["final_layers"] > 2 and s["layers_added"] >= 1
    # the method's own work (statistics, decisions, growth) is timed against the fit
    assert 0 < s["expansion_seconds"] < s["wall_seconds"] and 0 < s["expansion_share"] < 1
    # and its FLOPs are charged next to the trainer's (a comparison adds them), one event per epoch
    assert s["expansion_events"] == 3 and s["method_flops"] == s["expansion_flops"] > 0
    assert s["widths"] == {f"blocks.{i}.{j}": w for i, b in enumerate(s["final_widths"])
                           for j, w in enumerate(b)}
