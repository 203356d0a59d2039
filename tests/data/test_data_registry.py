"""The name -> dataset registry: names, option validation, defaults."""

from __future__ import annotations

import pytest
import torch

from widthlab.data.base import TaskData
from widthlab.data.registry import DATASETS, dataset_options, load_dataset

NAMES = ["breast_cancer", "cifar10", "cifar100", "diabetes", "digits", "digits_seq", "doublemoon",
         "fashion_mnist", "imagefolder", "iris", "kmnist", "mnist", "moons", "pmnist", "seq2seq", "spiral",
         "spiralhard", "svhn", "synthetic_graphs", "table", "teacher1d", "tu", "wine"]


def test_every_dataset_is_registered():
    assert DATASETS.names() == NAMES


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown dataset 'mnsit'.*mnist"):
        load_dataset("mnsit")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="'doublemoon' has no option 'nosie'"):
        load_dataset("doublemoon", nosie=0.1)


@pytest.mark.parametrize("options, match", [
    ({"seed": 1.5}, "seed=1.5"),
    ({"val_fraction": 1.0}, r"val_fraction=1.0 .*\[0, 1\)"),
    ({"normalize": "zscore"}, "normalize='zscore'"),
    ({"subset": 0}, "subset=0"),
    ({"subset_mode": "last"}, "subset_mode"),
    ({"flatten": "yes"}, "flatten='yes'"),
    ({"noise": "high"}, "noise='high' is invalid; expected a number"),
    ({"n_per_class": 2.5}, "n_per_class=2.5"),
])
def test_bad_option_values_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("spiral", **options)


def test_required_path_is_asked_for():
    with pytest.raises(ValueError, match="'mnist' needs option 'path'"):
        load_dataset("mnist")


def test_none_means_default():
    a = load_dataset("iris", seed=None, normalize=None, subset=None, val_fraction=None)
    b = load_dataset("iris")
    assert isinstance(a, TaskData) and torch.equal(a.train.tensors[0], b.train.tensors[0])


def test_augment_needs_32x32_colour_images():
    with pytest.raises(ValueError, match=r"needs \(3, 32, 32\) images"):
        load_dataset("digits", augment=True)


def test_dataset_options_lists_defaults():
    opts = dataset_options("spiralhard")
    assert opts["seed"] == 42 and opts["n_per_class"] == 5000 and opts["normalize"] == "none"
    assert dataset_options("moons")["seed"] == 0


def test_registry_entries_build_task_data():
    t = DATASETS.get("iris")(seed=1)
    assert isinstance(t, TaskData) and t.meta["seed"] == 1 and t.meta["sizes"]["test"] == 30
