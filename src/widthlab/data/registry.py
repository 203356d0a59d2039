"""Dataset names for study files: ``load_dataset("mnist", path=..., subset=2048)`` -> :class:`TaskData`.

The table at the bottom is the whole registry: every entry names a loader (which only reads or generates
arrays) and the dataset's default split seed and normalisation. Options shared by every dataset are
validated and applied in one place (:func:`widthlab.data.build.build_task`):

    seed              seed of the split/subset draws (synthetic SENN sets: of the data draws); default
                      42 (the AWNN splits, Errica et al. 2025, experimental setup), 0 for ``moons`` and
                      ``teacher1d``
    val_fraction      share of the non-test data held out for validation (default 0.1); not for
                      ``moons``/``teacher1d``, whose validation set is a separate draw
    test_fraction     share of all data held out for test (default 0.2); only for datasets without an
                      official test split
    normalize         "none" | "feature" | "channel" | "mnist" | "cifar" | "imagenet" (fixed presets);
                      statistics fitted on the training split only
    subset            keep only this many training examples ...
    subset_mode       ... chosen "stratified" (seeded, default) or the "first" ones in file order
    flatten           images -> vectors (for MLPs)
    augment           attach the 32x32 random crop (pad 4) + horizontal flip; (3, 32, 32) images only
    normalize_target  standardise regression targets (regression datasets only)

An option given as None means "the dataset default", so a study schema can pass every key through.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from os import PathLike

from widthlab._registry import Registry
from widthlab.data import bundled, synthetic
from widthlab.data.base import TaskData
from widthlab.data.build import Source, build_task
from widthlab.data.readers import cifar, idx, svhn, tables
from widthlab.data.splits import NORMALIZE_MODES

DATASETS: Registry[Callable[..., TaskData]] = Registry("dataset")

COMMON_OPTIONS = ("seed", "val_fraction", "test_fraction", "normalize", "subset", "subset_mode", "flatten",
                  "augment", "normalize_target")
_LOADERS: dict[str, tuple[Callable[..., Source], dict]] = {}


def load_dataset(name: str, **options) -> TaskData:
    """Build the train/val/test :class:`TaskData` of a registered dataset.

    Args:
        name: a registered name (``DATASETS.names()``).
        **options: the common options of the module docstring plus the dataset's own
            (``dataset_options(name)``); None means the default.

    Raises:
        KeyError: unknown dataset name (the message lists the known ones).
        ValueError: unknown option, bad option value, or a bad data file (the message names it).
        FileNotFoundError: a data file or folder is missing (the message names it).
    """
    return DATASETS.get(name)(**options)


def dataset_options(name: str) -> dict[str, object]:
    """Every option of dataset ``name`` with its default (``inspect.Parameter.empty`` if required)."""
    DATASETS.get(name)  # a clear KeyError for unknown names
    loader, defaults = _LOADERS[name]
    out = {"seed": defaults["seed"], "val_fraction": None, "test_fraction": None,
           "normalize": defaults["normalize"], "subset": None, "subset_mode": "stratified",
           "flatten": False, "augment": False, "normalize_target": False}
    for p in inspect.signature(loader).parameters.values():
        if p.name != "seed":
            out[p.name] = p.default
    return out


def _check_common(name: str, o: dict) -> None:
    def bad(key: str, want: str):
        raise ValueError(f"dataset {name!r}: option {key}={o[key]!r} is invalid; expected {want}")

    if "seed" in o and (not isinstance(o["seed"], numbers.Integral) or isinstance(o["seed"], bool)):
        bad("seed", "an integer")
    for key in ("val_fraction", "test_fraction"):
        if key in o and (isinstance(o[key], bool) or not isinstance(o[key], numbers.Real)
                         or not 0 <= o[key] < 1):
            bad(key, "a number in [0, 1)")
    if "normalize" in o and o["normalize"] not in NORMALIZE_MODES:
        bad("normalize", " | ".join(NORMALIZE_MODES))
    if "subset" in o and (isinstance(o["subset"], bool) or not isinstance(o["subset"], numbers.Integral)
                          or o["subset"] < 1):
        bad("subset", "a positive integer")
    if "subset_mode" in o and o["subset_mode"] not in ("stratified", "first"):
        bad("subset_mode", "'stratified' or 'first'")
    for key in ("flatten", "augment", "normalize_target"):
        if key in o and not isinstance(o[key], bool):
            bad(key, "true or false")


def _check_own(name: str, p: inspect.Parameter, value: object) -> None:
    """Type-check a dataset-specific option against its default (required ones are paths)."""
    d = p.default
    if d is inspect.Parameter.empty or (d is None and p.name.endswith("path")):
        ok, want = isinstance(value, (str, PathLike)), "a path"
    elif isinstance(d, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(d, int):
        ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    elif isinstance(d, float):
        ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    elif isinstance(d, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(d, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and v > 0 for v in value)
        want = "a list of positive integers"
    else:
        ok, want = True, ""
    if not ok:
        raise ValueError(f"dataset {name!r}: option {p.name}={value!r} is invalid; expected {want}")


def check_dataset_options(name: str, options: dict) -> None:
    """Raise ValueError (naming the option) for an option of dataset ``name`` that loading would refuse,
    without reading any file: what a study checks when it is loaded."""
    DATASETS.get(name)
    loader, _ = _LOADERS[name]
    params = inspect.signature(loader).parameters
    _check_options(name, params, [p for p in params if p != "seed"],
                   {k: v for k, v in options.items() if v is not None})


def _check_options(name: str, params, own: list[str], options: dict) -> None:
    unknown = sorted(set(options) - set(COMMON_OPTIONS) - set(own))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option {unknown[0]!r}; its options are: "
                         f"{', '.join(sorted([*COMMON_OPTIONS, *own]))}")
    for p in own:
        if p in options:
            _check_own(name, params[p], options[p])
        elif params[p].default is inspect.Parameter.empty:
            raise ValueError(f"dataset {name!r} needs option {p!r}")
    _check_common(name, options)


def _factory(name: str, loader: Callable[..., Source], defaults: dict) -> Callable[..., TaskData]:
    params = inspect.signature(loader).parameters
    own = [p for p in params if p != "seed"]

    def factory(**options) -> TaskData:
        options = {k: v for k, v in options.items() if v is not None}
        _check_options(name, params, own, options)
        common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
        seed = int(common.pop("seed", defaults["seed"]))
        if "seed" in params:
            options["seed"] = seed
        for k in ("val_fraction", "test_fraction"):
            if k in common:
                common[k] = float(common[k])
        common.setdefault("normalize", defaults["normalize"])
        return build_task(name, loader(**options), seed=seed, val_fraction=common.pop("val_fraction", None),
                          test_fraction=common.pop("test_fraction", None), **common)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = loader.__doc__
    return factory


def _register(name: str, loader: Callable[..., Source], *, seed: int = 42, normalize: str = "none") -> None:
    defaults = {"seed": seed, "normalize": normalize}
    DATASETS.register(name)(_factory(name, loader, defaults))
    _LOADERS[name] = (loader, defaults)


# ---- the registry -------------------------------------------------------------------------------------
# Synthetic (Errica et al. 2025, experimental setup): raw coordinates, stratified 3600/400/1000
# (7200/800/2000) with seed 42.
_register("doublemoon", synthetic.load_doublemoon)
_register("spiral", synthetic.load_spiral)
_register("spiralhard", synthetic.load_spiralhard)
# Mitchell et al. 2023, experiment settings: separate draws for every split, raw coordinates.
_register("moons", synthetic.load_moons, seed=0)
_register("teacher1d", synthetic.load_teacher1d, seed=0)
# scikit-learn's bundled sets: features on very different scales, so z-scored by default.
_register("digits", bundled.load_digits, normalize="feature")
_register("breast_cancer", bundled.load_breast_cancer, normalize="feature")
_register("wine", bundled.load_wine, normalize="feature")
_register("iris", bundled.load_iris, normalize="feature")
_register("diabetes", bundled.load_diabetes, normalize="feature")
# Images from the user's files: official test split; pixels / 255, then per-channel standardisation
# fitted on the training split, which works for any image set; the papers' fixed constants are
# available as normalize="mnist" | "cifar" | "imagenet" for faithful reproductions.
_register("mnist", idx.load_mnist, normalize="channel")
_register("fashion_mnist", idx.load_fashion_mnist, normalize="channel")
_register("kmnist", idx.load_kmnist, normalize="channel")
_register("cifar10", cifar.load_cifar10, normalize="channel")
_register("cifar100", cifar.load_cifar100, normalize="channel")
_register("svhn", svhn.load_svhn, normalize="channel")
# A user's own table: used as given.
_register("table", tables.load_table)

# --- wide & sparse data (image folders) ---
# Lazily decoded image folders (ImageNet layout): a TaskData factory of its own, since in-memory Source
# arrays do not fit; listed in _LOADERS so that dataset_options() shows its options.
from widthlab.data.readers import imagefolder  # noqa: E402

DATASETS.register("imagefolder")(imagefolder.load_imagefolder)
_LOADERS["imagefolder"] = (imagefolder.load_imagefolder, {"seed": 0, "normalize": "imagenet"})
# --- adaptive-width data (sequences, graphs, seq2seq) ---
# Images read row by row (PMNIST from the user's MNIST files; bundled digits for tests), through the
# common Source path; graphs and token pairs are not float arrays, so their loaders return TaskData
# themselves (listed in _LOADERS so that dataset_options() shows their options).
from widthlab.data import graphs, seq2seq, sequences  # noqa: E402

_register("pmnist", sequences.load_pmnist)
_register("digits_seq", sequences.load_digits_seq)
DATASETS.register("tu")(graphs.load_tu)
_LOADERS["tu"] = (graphs.load_tu, {"seed": 42, "normalize": "none"})
DATASETS.register("synthetic_graphs")(graphs.load_synthetic_graphs)
_LOADERS["synthetic_graphs"] = (graphs.load_synthetic_graphs, {"seed": 42, "normalize": "none"})
DATASETS.register("seq2seq")(seq2seq.load_seq2seq)
_LOADERS["seq2seq"] = (seq2seq.load_seq2seq, {"seed": 0, "normalize": "none"})
