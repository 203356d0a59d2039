"""The wide & sparse studies: shipped files expand as documented; a tiny study runs end to end and
its summary and report carry the family, the exact weight count and the width fraction (the paper's Fig. 7
metric)."""

import json

import pytest

from widthlab.cli import main
from widthlab.report.tables import aggregate
from widthlab.studies.load import builtin_studies, expand_runs, load_study
from widthlab.studies.store import ResultStore

WIDESPARSE = sorted(n for n in builtin_studies() if n.startswith("widesparse-") and "-kernel-" not in n)


def test_all_widesparse_studies_are_shipped():
    assert WIDESPARSE == ["widesparse-bottleneck-cifar10", "widesparse-mlp-digits", "widesparse-mlp-mnist",
                          "widesparse-resnet18-cifar10", "widesparse-resnet18-cifar100",
                          "widesparse-resnet18-imagenet", "widesparse-resnet18-svhn"]


@pytest.mark.parametrize("name", WIDESPARSE)
def test_each_study_holds_dense_references_and_a_family(name):
    runs = expand_runs(load_study(name))
    methods = {r.spec.method.name for r in runs}
    assert methods == {"dense", "widesparse"}
    dense_widths = {r.spec.model.width for r in runs if r.spec.method.name == "dense"}
    base = {r.spec.method.options()["base_width"] for r in runs if r.spec.method.name == "widesparse"}
    assert len(base) == 1 and base <= dense_widths  # the base is among the dense references
    if name != "widesparse-mlp-digits":
        assert "path" in load_study(name).data.options()  # user files, overridable as data.path=...


def test_digits_study_size():
    runs = expand_runs(load_study("widesparse-mlp-digits"))
    assert len(runs) == 2 * 4 * 2 * 3  # activation x width x (dense, sparse) x seeds


STUDY = """\
name: ws-tiny
description: tiny wide & sparse study for tests
data: {name: digits}
model: {name: mlp, width: 4}
train: {epochs: 2, batch_size: 100, optimizer: {name: sgd, lr: 0.1}, checkpoint_every: 0}
seeds: [0]
sweep:
  model.width: [4, 8]
  method:
    - {name: dense}
    - {name: widesparse, base_width: 4, fract_cl: 0.3}
"""


def test_tiny_study_end_to_end(tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    entries = json.loads((out / "summary.json").read_text())
    assert len(entries) == 4 and all(e["status"] == "done" for e in entries), entries
    sparse8 = [e for e in entries if e["method"] == "widesparse" and e["width"] == 8]
    for e in sparse8:
        assert e["family"] == "mlp-w0=4-fract_cl=0.3" and e["base_width"] == 4
        assert e["nonzero_weights"] == 296 == e["target_weights"] and e["counted_weights"] == 592
        assert e["connectivity"] == 0.5 and e["weight_mismatch"] == 0
        assert e["train_accuracy"] is not None and e["test_accuracy"] is not None
    with ResultStore(out, create=False) as store:
        groups = aggregate(store.runs())
    g = next(g for g in groups if g.method == "widesparse" and g.width == 8)
    assert g.width_fraction is not None  # dense w=8 and dense base w=4 were found in the same study
    assert "width fraction" in (out / "report.md").read_text()
