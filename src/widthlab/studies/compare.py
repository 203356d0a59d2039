"""Study kind ``compare``: every width method on the same tasks, splits and seeds.

A comparison file names the tasks (data + base model), the methods (each a partial study: its model,
method and train sections and, for a search such as the dense width grid, a sweep) and one shared
training recipe; every (task, method) pair becomes an ordinary study whose runs carry ``task`` and
``arm`` tags. The executors run them like any other runs (local workers, Ray, torchrun); the report
(``report/compare.py``) selects, per seed, the best member of a search by validation and charges the
search for all of its members::

    name: compare-digits
    kind: compare
    seeds: [0, 1, 2]
    train: {epochs: 40, batch_size: 64, optimizer: {name: adam, lr: 0.003}}   # shared recipe
    tasks:
      digits: {data: {name: digits}, model: {name: mlp, width: 16}}
    methods:
      dense:                                       # the usual search: every width trained
        sweep: {model.width: [8, 16, 32, 64, 128]}
      widesparse:                                  # the family at the base's weight count
        method: {name: widesparse, base_width: 8}
        sweep: {model.width: [8, 16, 32, 64]}
      adaptive: {method: {name: adaptive}}         # one run per seed (+ its fixed retrain control)
      expanding: {method: {name: expanding, start_widths: [4]}}
      search:                                      # Optuna TPE over the width, Hyperband pruning
        search: {width: [4, 256], trials: 12}
      random_search: {search: {width: [4, 256], trials: 12}}   # its control: random widths

A **search arm** (a ``search:`` section, or the arm names ``search`` / ``random_search``) has no fixed
runs: its trials are asked from an Optuna study while the study runs (``widthlab.search``), each an
ordinary run tagged with its trial number, sampler and pruner; it takes no sweep, and its trials train
the arm's method (default dense) at the sampled width (and learning rate, with ``lr: [low, high]``).

**Fixed retrain control.** Each adaptive and self-expanding arm (one run per seed, on a model that
takes ``widths``) also gets, per seed, a dense net of the hidden widths its run selected, trained from
scratch with the arm's training recipe (arm ``<arm>_retrain``, shown as ``<arm> → fixed retrain``):
is the found width good, or only the method's training path? On by default; ``retrain: false`` on
the arm turns it off, ``retrain: true`` asks for it on another single-run arm.

Merge order (later wins, mappings merged key by key): the shared ``train``; the task's ``data``,
``model`` and ``train``; the method's ``model``, ``method`` and ``train``; the task's
``methods.<name>`` overrides. A method's ``method.name`` defaults to its key, and a wide & sparse
family's ``base_width`` to the task model's ``width``. Task and method names enter every run id.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from widthlab.search.spec import DEFAULT_SAMPLER, IMPLICIT_ARMS, SearchSpec
from widthlab.studies.schema import Seed, StudySpec, distinct_seeds

# The roles of compare runs, recorded in each run's config and summary.
SEARCH, SINGLE = "search", "single"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodEntry(_Strict):
    """One compared method: a partial study (merged over the task) and an optional search sweep."""

    model: dict[str, Any] = {}
    method: dict[str, Any] = {}
    train: dict[str, Any] = {}
    sweep: dict[str, list[Any]] = {}
    search: SearchSpec | None = None  # a search arm (Optuna): widthlab.search
    retrain: bool | None = None  # learned-width arms: also train a fixed net of the found width


class TaskEntry(_Strict):
    """One task: its data and base model, optional train overrides, per-method overrides."""

    data: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any] = {}
    methods: dict[str, MethodEntry] = {}


class CompareSpec(_Strict):
    """A ``kind: compare`` study file, validated (each (task, method) study is validated on expansion)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    kind: Literal["compare"] = "compare"
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    train: dict[str, Any] = {}
    tasks: dict[str, TaskEntry] = Field(min_length=1)
    methods: dict[str, MethodEntry] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        return distinct_seeds(v)

    @field_validator("tasks", "methods")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for key in v:
            if not key or "/" in key or key != key.strip():
                raise ValueError(f"bad name {key!r}: a non-empty name without '/' or surrounding spaces")
        return v


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Learned-width methods whose found width gets a fixed retrain control by default.
RETRAIN_METHODS = ("adaptive", "expanding")
RETRAIN_SUFFIX = "_retrain"


def search_of(spec: CompareSpec, task: str, arm: str) -> SearchSpec | None:
    """The search section of a search arm (None for any other arm); the task may override it."""
    m = spec.methods[arm]
    over = spec.tasks[task].methods.get(arm, MethodEntry())
    section = over.search or m.search
    if section is None:
        if arm not in IMPLICIT_ARMS:
            return None
        section = SearchSpec()
    if "sampler" not in section.model_fields_set and arm in DEFAULT_SAMPLER:
        section = section.model_copy(update={"sampler": DEFAULT_SAMPLER[arm]})
    return section


def retrain_of(spec: CompareSpec, task: str, arm: str, method_name: str) -> bool:
    """Whether the arm gets a fixed retrain control: ``retrain:`` if given, else learned-width methods."""
    m = spec.methods[arm]
    over = spec.tasks[task].methods.get(arm, MethodEntry())
    given = over.retrain if over.retrain is not None else m.retrain
    return given if given is not None else method_name in RETRAIN_METHODS


def study_of(spec: CompareSpec, task: str, arm: str) -> dict[str, Any]:
    """The raw study mapping of one (task, method) pair, before validation."""
    t, m = spec.tasks[task], spec.methods[arm]
    over = t.methods.get(arm, MethodEntry())
    if task_only := set(t.methods) - set(spec.methods):
        raise ValueError(f"tasks.{task}.methods names unknown method(s) {sorted(task_only)}; "
                         f"known: {', '.join(spec.methods)}")
    search = search_of(spec, task, arm)
    # A search arm's trials train the method named in its method section (default dense), at the width
    # (and learning rate) each trial samples.
    method = deep_merge({"name": "dense" if search else arm}, deep_merge(m.method, over.method))
    model = deep_merge(deep_merge(t.model, m.model), over.model)
    if method["name"] == "widesparse" and "base_width" not in method and "width" in t.model:
        method["base_width"] = t.model["width"]  # the family keeps the task's base model's weights
    sweep = deep_merge(m.sweep, over.sweep)
    if search is not None:
        if sweep:
            raise ValueError(f"method {arm} is a search arm (it samples the width): it takes no sweep")
        model.pop("widths", None)
        model["width"] = search.width[0]
    return {
        "name": spec.name,
        "data": copy.deepcopy(t.data),
        "model": model,
        "method": method,
        "train": deep_merge(deep_merge(deep_merge(spec.train, t.train), m.train), over.train),
        "seeds": list(spec.seeds),
        "sweep": sweep,
    }


def expand_compare(spec: CompareSpec, source: str = "study") -> list:
    """Every run of every (task, method) study, tagged with ``task``, ``arm`` and ``role``."""
    from widthlab.studies.load import RunSpec, StudyError, _format_validation, expand_runs

    runs: list[RunSpec] = []
    for task in spec.tasks:
        for arm in spec.methods:
            where = f"{source} (task {task}, method {arm})"
            try:
                raw = study_of(spec, task, arm)
                sub = StudySpec.model_validate(raw)
            except ValidationError as e:
                raise StudyError(_format_validation(where, e)) from None
            except ValueError as e:
                raise StudyError(f"{where}: {e}") from None
            if (search := search_of(spec, task, arm)) is not None:
                check_search_arm(sub, search, where)
                continue  # its trials are asked while the study runs (widthlab.search.driver)
            if (arm + RETRAIN_SUFFIX) in spec.methods:
                raise StudyError(f"{where}: method name {arm + RETRAIN_SUFFIX!r} is taken by the fixed "
                                 f"retrain control of {arm!r}; rename it")
            role = SEARCH if sub.sweep else SINGLE
            for r in expand_runs(sub, where, tags={"task": task, "arm": arm, "role": role}):
                runs.append(dataclasses.replace(r, position=len(runs)))
    return runs


def check_search_arm(sub: StudySpec, search: SearchSpec, where: str) -> None:
    """A search arm's study is valid at both ends of its ranges, and Optuna is installed."""
    from widthlab.search.pruning import OptunaMissing, import_optuna
    from widthlab.studies.load import StudyError, expand_runs

    try:
        import_optuna()
    except OptunaMissing as e:
        raise StudyError(f"{where}: {e}") from None
    if sub.model.name and not _width_used(sub):
        raise StudyError(f"{where}: method {sub.method.name!r} does not use model.width, so a search over "
                         "the width cannot change it")
    sweep = {"model.width": list(dict.fromkeys(search.width))}
    if search.lr is not None:
        sweep["train.optimizer.lr"] = list(dict.fromkeys(search.lr))
    expand_runs(sub.model_copy(update={"sweep": sweep, "seeds": sub.seeds[:1]}), where)


def _width_used(sub: StudySpec) -> bool:
    from widthlab.studies.methods import model_width_used

    return model_width_used(sub.method.name, sub.model.name)


@dataclasses.dataclass(frozen=True)
class ArmStudy:
    """One (task, method) pair of a comparison, validated: what the dynamic run sources start from."""

    task: str
    arm: str
    study: StudySpec
    search: SearchSpec | None
    retrain: bool


def arm_studies(spec: CompareSpec) -> list[ArmStudy]:
    """Every (task, method) pair in study order (the comparison was validated by :func:`expand_compare`)."""
    out = []
    for task in spec.tasks:
        for arm in spec.methods:
            sub = StudySpec.model_validate(study_of(spec, task, arm))
            search = search_of(spec, task, arm)
            out.append(ArmStudy(task, arm, sub, search,
                                search is None and retrain_of(spec, task, arm, sub.method.name)))
    return out
