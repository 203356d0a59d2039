"""The Ray executor against a local Ray instance started by the test (marked `ray`)."""

import json

import pytest
from study_files import tiny_study

from widthlab.studies.executor import run_study
from widthlab.studies.load import load_study
from widthlab.studies.store import ResultStore

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytestmark = pytest.mark.ray

COMPARED = ("status", "test_accuracy", "train_accuracy", "val_accuracy", "epochs", "counted_weights",
            "nonzero_weights", "widths", "best_epoch", "group", "label", "seed")


def _entries(out):
    return {e["run_id"]: e for e in json.loads((out / "summary.json").read_text())}


def test_ray_and_local_give_the_same_summary(tmp_path):
    spec = load_study(str(tiny_study(tmp_path, epochs=4)))
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_study(spec, local, quiet=True)
    ckpt = tmp_path / "shared-ckpt"
    run_study(spec, remote, quiet=True, executor="ray", runs_root=ckpt,
              ray_init={"num_cpus": 2, "include_dashboard": False})
    a, b = _entries(local), _entries(remote)
    assert a.keys() == b.keys() and len(a) == 4
    for run_id in a:
        for key in COMPARED:
            va, vb = a[run_id].get(key), b[run_id].get(key)
            assert va == pytest.approx(vb, rel=1e-6) if isinstance(va, float) else va == vb, (run_id, key)
    # The driver alone wrote the database; checkpoints went to the shared folder.
    with ResultStore(remote, create=False) as store:
        assert all(len(store.epochs(r)) == 4 for r in b)
    assert all((ckpt / r / "checkpoint.pt").is_file() for r in b)
    assert not (remote / "runs").exists()

    # --resume keeps everything finished.
    again = run_study(spec, remote, quiet=True, resume=True, executor="ray", runs_root=ckpt,
                      ray_init={"num_cpus": 2, "include_dashboard": False})
    assert again.skipped == 4 and again.summaries == []
