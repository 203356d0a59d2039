"""Dense references at every width (Golubeva et al. 2021, App. A): the dense method takes the per-width
learning-rate table and the kernel recorder; the Fig. 8 study holds dense and sparse members at each
width; the Fig. 5 study reaches n = 640 through a union of sweep grids, with only the classifier
fractions that can reach it. Numbers come from the paper's tables and from the weight counts 784 n + 10 n.
"""

import json

import pytest

from widthlab.cli import main
from widthlab.studies.load import StudyError, expand_runs, load_study

# Golubeva et al. 2021, App. A (the authors' tuned rates of the NTK-style MLP), dense nets.
FIG8_DENSE = {8: 5.0, 32: 80.0, 128: 173.0, 216: 228.0, 328: 306.0, 512: 445.0, 635: 460.0}
FIG8_WIDTHS = [8, 32, 128, 216, 328, 512, 635]
FIG5_WIDTHS = [5, 10, 20, 40, 80, 160, 320, 640]
FIG5_FRACTIONS = [0.0, 0.18, 0.36, 0.54, 0.72, 0.9]


def test_fig8_study_has_dense_and_sparse_members_at_every_width():
    runs = expand_runs(load_study("widesparse-kernel-mnist"))
    assert len(runs) == 2 * len(FIG8_WIDTHS) * 10  # (dense, sparse) x widths x 10 seeds
    for method in ("dense", "widesparse"):
        members = [r for r in runs if r.spec.method.name == method]
        assert sorted({r.spec.model.width for r in members}) == FIG8_WIDTHS
        for r in members:
            opts = r.spec.method.options()
            assert opts["lr_preset"] == "ntk-fig8" and opts["kernel"]["pairs"] == 10_000


def _fig5_pairs():
    runs = expand_runs(load_study("widesparse-mlp-mnist"))
    pairs = {(r.spec.model.options()["activation"], r.spec.model.width, r.spec.method.name,
              r.spec.method.options().get("fract_cl")) for r in runs}
    return runs, pairs


def _first_layer_can_absorb(n: int, fract_cl: float, base: int = 5) -> bool:
    """The MLP split: the classifier (10 n weights) loses floor(10 n fract_cl), the first layer (784 n)
    the rest of T = 794 (n - base) and keeps at least one weight."""
    T = 794 * (n - base)
    k_cl = min(T, int(10 * n * fract_cl))
    return T - k_cl <= 784 * n - 1


def test_fig5_study_reaches_640_with_only_the_valid_fractions():
    runs, pairs = _fig5_pairs()
    assert sorted({r.spec.model.width for r in runs}) == FIG5_WIDTHS
    for act in ("relu", "linear"):
        for n in FIG5_WIDTHS:
            assert (act, n, "dense", None) in pairs
            swept = {f for a, w, m, f in pairs if (a, w, m) == (act, n, "widesparse")}
            assert swept == {f for f in FIG5_FRACTIONS if _first_layer_can_absorb(n, f)}
    assert {f for _, w, m, f in pairs if w == 640 and m == "widesparse"} == {0.54, 0.72, 0.9}
    assert len(runs) == 3 * 2 * (7 * 7 + 4)  # seeds x activations x (valid configurations)


def test_fig5_members_at_640_keep_the_base_count():
    from widthlab.methods.widesparse.plan import build
    from widthlab.models import create_model
    from widthlab.models.counting import count_nonzero_weights

    runs, _ = _fig5_pairs()
    for r in runs:
        if r.spec.model.width == 640 and r.spec.method.name == "widesparse" and r.seed == 0:
            model = create_model("mlp", input_shape=(1, 28, 28), num_outputs=10, width=640,
                                 **r.spec.model.options())
            build(model, None, seed=0, **r.spec.method.options())
            assert count_nonzero_weights(model) == 794 * 5 == 3970


DENSE_STUDY = """\
name: dense-preset
data: {{name: digits, val_fraction: 0.0, normalize: feature}}
model: {{name: mlp, width: {width}, parametrization: ntk, bias: false}}
method: {{name: dense, lr_preset: {preset}, kernel: {{pairs: 20, masks: 8, split: train}}}}
train: {{epochs: 1, batch_size: 256, optimizer: {{name: sgd, lr: 1.0}}, checkpoint_every: 0}}
seeds: [0]
"""


def test_tiny_dense_run_gets_the_tables_rate_and_records_its_kernel(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(DENSE_STUDY.format(width=32, preset="ntk-fig8"))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (entry,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert entry["status"] == "done" and entry["method"] == "dense"
    assert entry["lr"] == FIG8_DENSE[32] and entry["lr_preset"] == "ntk-fig8"
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == FIG8_DENSE[32]  # the optimizer trained at the table's rate, not 1.0
    assert entry["kernel_p"] == 1.0 and entry["kernel_d"] == 64 and entry["kernel_D"] > 0


@pytest.mark.parametrize("width, preset, words", [
    (33, "ntk-fig8", "no rate for width 33"),
    (32, "ntk-fig8:sparse-w0=8", "dense table"),
    (32, "nope", "unknown lr_preset"),
])
def test_bad_dense_preset_is_refused_at_load(tmp_path, capsys, width, preset, words):
    path = tmp_path / "d.yaml"
    path.write_text(DENSE_STUDY.format(width=width, preset=preset))
    with pytest.raises(StudyError, match="method.lr_preset"):
        load_study(str(path))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_widesparse_preset_width_is_checked_at_load(tmp_path):
    text = DENSE_STUDY.format(width=33, preset="ntk-fig8").replace(
        "name: dense,", "name: widesparse, base_width: 8, fract_cl: 0.0,")
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(StudyError, match="method.lr_preset.*base width 8"):
        load_study(str(path))


def test_bad_dense_kernel_option_is_refused_at_load(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(DENSE_STUDY.format(width=32, preset="ntk-fig8").replace("pairs: 20", "pair: 20"))
    with pytest.raises(StudyError, match="method.kernel"):
        load_study(str(path))


UNION = """\
name: union
data: {name: digits}
model: {name: mlp, width: 4}
train: {epochs: 1}
sweep:
  - {model.width: [4, 8], method: [{name: dense}]}
  - {model.width: [16]}
"""


def test_a_list_of_sweep_grids_is_their_union(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text(UNION)
    runs = expand_runs(load_study(str(path)))
    assert [(r.spec.model.width, r.axes) for r in runs] == [
        (4, {"model.width": 4, "method": {"name": "dense"}}),
        (8, {"model.width": 8, "method": {"name": "dense"}}),
        (16, {"model.width": 16})]
    overlap = "  - {model.width: [8], method: [{name: dense}]}"
    path.write_text(UNION.replace("  - {model.width: [16]}", overlap))
    with pytest.raises(StudyError, match="duplicate runs"):
        load_study(str(path))
    path.write_text(UNION.split("sweep:")[0] + "sweep: []\n")
    with pytest.raises(StudyError, match="at least one grid"):
        load_study(str(path))
