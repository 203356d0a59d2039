"""Small reproductions of SENN experiments 2 and 4 (Mitchell et al. 2023); slow, CPU minutes.

* expanding-moons from a linear start adds at least one layer and reaches a test accuracy at least that
  of a fixed network of its final size trained the same way (same model family, optimiser, data, epochs
  and selection: both studies report their best-validation epoch, and the expanding run's "final"
  network is the one of that epoch, whose architecture the controller restores), mean over 3 seeds.
  The last-epoch accuracies of both are printed too (the grown network keeps growing after its best
  epoch and overfits the 200 noisy points; see bench/results/expanding-cpu.md).
* expanding-digits-datasize: the final hidden width (mean over 3 seeds) increases with the training-set
  size over at least 4 sizes.

Both run the shipped studies through the study runner, exactly as ``widthlab run`` does.
"""

from __future__ import annotations

import json
import statistics

import pytest

from widthlab.studies.executor import run_study
from widthlab.studies.load import load_study


@pytest.mark.slow
def test_moons_grows_layers_and_matches_a_fixed_net_of_its_final_size(tmp_path):
    grown = run_study(load_study("expanding-moons"), tmp_path / "grown", quiet=True).summaries
    assert all(s["status"] == "done" for s in grown), [s["error"] for s in grown]
    fixed_acc = []
    for s in grown:
        assert s["final_layers"] >= 1 and s["layers_added"] >= 1
        over = [f"method.start_widths={s['final_widths']}", f"seeds=[{s['seed']}]", "sweep={}"]
        (f,) = run_study(load_study("expanding-moons-fixed", over), tmp_path / f"fixed{s['seed']}",
                         quiet=True).summaries
        assert f["widths"] == s["widths"]
        fixed_acc.append(f["test_accuracy"])
    grown_acc = [s["test_accuracy"] for s in grown]
    last = [json.loads((tmp_path / "grown" / "runs" / s["run_id"] / "metrics.jsonl").read_text()
                       .splitlines()[-1]).get("test_accuracy") for s in grown]
    print("expanding", grown_acc, "fixed", fixed_acc, "expanding at the last epoch", last)
    assert statistics.mean(grown_acc) >= statistics.mean(fixed_acc)


@pytest.mark.slow
def test_digits_final_width_grows_with_the_data(tmp_path):
    out = run_study(load_study("expanding-digits-datasize"), tmp_path, quiet=True).summaries
    assert all(s["status"] == "done" for s in out), [s["error"] for s in out]
    by_size: dict[int, list[int]] = {}
    for s in out:
        by_size.setdefault(s["axes"]["data.subset"], []).append(s["final_neurons"])
    sizes = sorted(by_size)
    means = [statistics.mean(by_size[n]) for n in sizes]
    print(dict(zip(sizes, means)))
    assert len(sizes) >= 4
    assert all(a < b for a, b in zip(means, means[1:])), dict(zip(sizes, means))
