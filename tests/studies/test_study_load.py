"""Study files: validation errors name the key, overrides are type-checked, run ids are stable."""

import pytest
from study_files import tiny_study

from widthlab.cli import main
from widthlab.studies.load import StudyError, builtin_studies, expand_runs, load_study


@pytest.mark.parametrize("name", sorted(builtin_studies()))
def test_every_shipped_study_validates(name):
    spec = load_study(name)
    runs = expand_runs(spec)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    text = builtin_studies()[name].read_text()
    assert text.startswith("# widthlab "), "each study file opens with the command that runs it"


def test_grid_times_seeds_and_stable_ids(tmp_path):
    spec = load_study(str(tiny_study(tmp_path)))
    runs = expand_runs(spec)
    assert [(r.axes["model.width"], r.seed) for r in runs] == [(4, 0), (4, 1), (16, 0), (16, 1)]
    again = expand_runs(load_study(str(tiny_study(tmp_path))))
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert runs[0].group == runs[1].group != runs[2].group
    assert runs[0].spec.model.width == 4 and runs[2].spec.model.width == 16
    # The description is not part of the identity; the learning rate is.
    other = expand_runs(load_study(str(tiny_study(tmp_path)), ["description=changed"]))
    assert [r.run_id for r in other] == [r.run_id for r in runs]
    lr = expand_runs(load_study(str(tiny_study(tmp_path)), ["train.optimizer.lr=0.02"]))
    assert not {r.run_id for r in lr} & {r.run_id for r in runs}


def test_overrides_are_typed(tmp_path):
    spec = load_study(str(tiny_study(tmp_path)), ["train.epochs=7", "seeds=[3]", "train.grad_clip=1.5"])
    assert spec.train.epochs == 7 and spec.seeds == [3] and spec.train.grad_clip == 1.5


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
    ("train.optimizer.name=rmsprop", "train.optimizer.name"),
    ("train.epoch=3", "train.epoch: unknown key"),
    ("model.widht=3", "model.widht: unknown option for model 'mlp'; did you mean 'width'?"),
    ("data.name=nope", "data.name: unknown dataset 'nope'"),
    ("method.name=nope", "method.name: unknown method 'nope'"),
    ("sweep.model.width=[4, x]", "(sweep model.width='x'): model.width: Input should be a valid integer"),
    ("epochs", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises(StudyError, match=None) as e:
        load_study(str(tiny_study(tmp_path)), [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(StudyError, match="bad.yaml: invalid YAML"):
        load_study(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(StudyError, match="must be a YAML mapping"):
        load_study(str(bad))
    bad.write_text("name: x\nmodel: {name: mlp}\n")
    with pytest.raises(StudyError, match="bad.yaml: data: Field required"):
        load_study(str(bad))
    with pytest.raises(StudyError, match="unknown study 'nosuch'"):
        load_study("nosuch")
    with pytest.raises(StudyError, match="not found"):
        load_study(str(tmp_path / "missing.yaml"))


def test_cli_exits_nonzero_with_one_line_reason(tmp_path, capsys):
    assert main(["show", str(tiny_study(tmp_path)), "train.epochs=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("widthlab show: error:") and "train.epochs" in err and "\n" not in err
    assert main(["run", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_show_and_studies(tmp_path, capsys):
    assert main(["studies"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["show", str(tiny_study(tmp_path)), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "# 4 run(s):" in out
