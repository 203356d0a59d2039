"""The user's own model in a study (``model: {name: custom, factory: ...}``): built from a file or an
importable module, run from the CLI by the dense, wide & sparse, adaptive and self-expanding methods,
and refused with one clear line when the factory is wrong."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from widthlab.cli import main
from widthlab.models import create_model
from widthlab.models.counting import count_weights

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class TwoPath(nn.Module):
        """A forward of the user's own: a hidden layer, a gated skip, a classifier."""

        def __init__(self, d, width, classes, gain):
            super().__init__()
            self.inp = nn.Linear(d, width)
            self.hid = nn.Linear(width, width)
            self.out = nn.Linear(width, classes)
            self.gain = gain

        def forward(self, x):
            h = torch.tanh(self.inp(x.flatten(1)))
            h = F.relu(self.hid(h)) * self.gain + h
            return self.out(h)


    def build(input_shape, num_outputs, width=8, gain=1.0):
        return TwoPath(input_shape[0], width, num_outputs, gain)


    def not_a_model(input_shape, num_outputs, width=8):
        return 3
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY)
    return path


def test_a_file_factory_gets_shape_outputs_and_every_key(factory_file):
    model = create_model("custom", input_shape=(4,), num_outputs=3, factory=f"{factory_file}:build",
                         width=6, gain=0.5)
    assert type(model).__name__ == "TwoPath" and model.gain == 0.5
    assert (model.inp.in_features, model.inp.out_features, model.out.out_features) == (4, 6, 3)
    assert model.widthlab_width == 6
    base = model.widthlab_rebuild(2)  # the same model at another width (wide & sparse base)
    assert base.inp.out_features == 2 and base.gain == 0.5
    assert count_weights(base) == 4 * 2 + 2 * 2 + 2 * 3


def test_an_importable_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models_pkg.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("custom", input_shape=(5,), num_outputs=2, factory="my_models_pkg:build", width=3)
    assert model.hid.in_features == 3
    sys.modules.pop("my_models_pkg", None)


@pytest.mark.parametrize("factory,message", [
    ("no_colon", "must be 'package.module:function'"),
    ("{dir}/missing.py:build", "no file"),
    ("{file}:nosuch", "has no 'nosuch'"),
    ("{file}:not_a_model", "returned a int, not a torch.nn.Module"),
    ("surely_no_such_module_xyz:build", "no module 'surely_no_such_module_xyz'"),
])
def test_a_bad_factory_is_one_clear_line(factory_file, factory, message):
    factory = factory.format(dir=factory_file.parent, file=factory_file)
    with pytest.raises(ValueError, match=message) as err:
        create_model("custom", input_shape=(4,), num_outputs=3, factory=factory)
    assert "option 'factory'" in str(err.value) and "\n" not in str(err.value)


def _study(tmp_path, factory: str, extra: str = "") -> str:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: custom-model
        description: the user's own model under three methods
        data: {{name: iris}}
        model: {{name: custom, factory: "{factory}", width: 12, gain: 0.5}}
        method: {{name: dense}}
        train: {{epochs: 2, batch_size: 32, optimizer: {{name: adam, lr: 0.01}}, checkpoint_every: 0}}
        seeds: [0]
        sweep:
          method: [{{name: dense}}, {{name: widesparse, base_width: 8}}, {{name: adaptive, sites: ["inp+1"]}},
                   {{name: expanding, architecture: model, optimizer: default, tau: 0.0, alpha: 0.0,
                     max_widths: [16], proposals: 4, mala_bursts: 2, max_additions: 2}}]
        {extra}"""))
    return str(path)


def test_a_study_runs_the_user_model_under_dense_widesparse_and_adaptive(tmp_path, factory_file,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the factory path is relative to the working directory
    out = tmp_path / "out"
    assert main(["run", _study(tmp_path, "user_model.py:build"), "--out", str(out), "--quiet"]) == 0
    runs = {s["method"]: s for s in json.loads((out / "summary.json").read_text())}
    assert set(runs) == {"dense", "widesparse", "adaptive", "expanding"}
    assert all(s["status"] == "done" for s in runs.values()), {m: s["error"] for m, s in runs.items()}
    # Iris: 4 features, 3 classes. Wide & sparse keeps the width-8 base's weights N(8) at width 12.
    assert runs["widesparse"]["nonzero_weights"] == 4 * 8 + 8 * 8 + 8 * 3
    dense_count = 4 * 12 + 12 * 12 + 12 * 3
    assert runs["dense"]["counted_weights"] == runs["widesparse"]["counted_weights"] == dense_count
    # The adaptive method adapts the residual width that inp and hid write together (the group named
    # in the study), starting at the built width.
    assert runs["adaptive"]["initial_widths"] == {"inp+1": 12}
    assert set(runs["adaptive"]["adaptive_widths"]) == {"inp+1"} and runs["adaptive"]["resizes"] >= 0
    assert runs["adaptive"]["widths"] == runs["adaptive"]["adaptive_widths"]
    assert runs["dense"]["widths"] == {"width": 12}
    # Self-expansion grows the same residual width (hid reads and writes it) from the built 12 units.
    grown = runs["expanding"]
    assert grown["sites"] == ["inp+1"] and grown["start_widths"] == [12]
    assert 12 < grown["final_widths"][0] <= 16 and grown["neurons_added"] == grown["final_widths"][0] - 12


def test_a_bad_factory_in_a_study_is_one_line_exit_2(tmp_path, factory_file, capsys):
    code = main(["run", _study(tmp_path, f"{tmp_path}/nope.py:build"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "factory" in err and "no file" in err and "\n" not in err
    # A model key the function does not take (a typo) is refused when the study is read, not mid-run.
    study = Path(_study(tmp_path, f"{factory_file}:build"))
    (tmp_path / "typo.yaml").write_text(study.read_text().replace("gain: 0.5", "gian: 0.5"))
    code = main(["run", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "gian" in err and "\n" not in err and not (tmp_path / "o2").exists()


def test_models_keep_their_own_modules_and_names(factory_file):
    model = create_model("custom", input_shape=(4,), num_outputs=3, factory=f"{factory_file}:build")
    assert [n for n, _ in model.named_children()] == ["inp", "hid", "out"]
    assert isinstance(model(torch.randn(2, 4)), torch.Tensor) and isinstance(model, nn.Module)
