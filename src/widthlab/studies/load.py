"""Study files -> validated :class:`StudySpec` -> the list of runs, each with a stable id.

Errors are :class:`StudyError` with one line per problem, each naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from widthlab.studies.schema import StudySpec

if TYPE_CHECKING:
    from widthlab.studies.compare import CompareSpec


class StudyError(ValueError):
    """A study file or override is invalid; the message names the file/key and the problem."""


BUILTIN_PACKAGE = "widthlab.studies.builtin"
QUOTE_LIMIT = 200  # characters of an offending value an error message quotes


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (an alias bomb's value would be megabytes)."""
    text = _bounded_repr(value, limit + 1)
    return text if len(text) <= limit else text[:limit] + "..."


def _bounded_repr(value: Any, budget: int) -> str:
    """repr that stops once ``budget`` characters are produced (never expands a huge nested value)."""
    if isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else value
        open_, close = ("{", "}") if isinstance(value, dict) else ("[", "]") if isinstance(value, list) \
            else ("(", ")")
        parts, used = [], 1
        for item in items:
            text = (f"{_bounded_repr(item[0], budget)}: {_bounded_repr(item[1], budget)}"
                    if isinstance(value, dict) else _bounded_repr(item, budget))
            parts.append(text)
            used += len(text) + 2
            if used > budget:
                break
        return open_ + ", ".join(parts) + close
    text = repr(value)
    return text[:budget]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (naming its line) instead of
    silently keeping the last value."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let PyYAML report it
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {quote(key, 60)} (first on line {first})",
                key_node.start_mark)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_YAML_VALUES = 200_000  # values of a study file once its aliases are expanded


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def yaml_load(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, refusing duplicate keys and alias bombs (aliases that expand
    to more than :data:`MAX_YAML_VALUES` values)."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML alias "
                "bomb?); refused", None)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line, without the quoted source snippet PyYAML appends."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{problem}{where}"
    return " ".join(str(e).split())[:QUOTE_LIMIT]


def builtin_studies() -> dict[str, Path]:
    """Built-in study name -> path of its YAML file."""
    root = resources.files(BUILTIN_PACKAGE)
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def study_headline(path: Path) -> str:
    """The study's one-line description (its ``description``'s first line)."""
    try:
        raw = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return "(unreadable YAML)"
    return str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""


def _format_validation(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        hide = e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
        shown = "" if hide else f" (got {quote(got)})"
        msg = msg if len(msg) <= 2 * QUOTE_LIMIT else msg[:2 * QUOTE_LIMIT] + "..."
        lines.append(f"{source}: {loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=5`` -> ``("train.epochs", 5)``; the value is read as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise StudyError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise StudyError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise StudyError(f"override {quote(text)}: value is not valid YAML ({_yaml_problem(e)})") from None
    return key, value


def set_dotted(d: dict, key: str, value: Any, source: str = "override") -> None:
    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise StudyError(f"{source} {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _get_dotted(d: dict, key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def study_device(spec: StudySpec | CompareSpec) -> str:
    """``cuda`` if any run of the study trains on a GPU, else ``cpu`` (for the process group)."""
    return "cuda" if any(r.spec.train.device.startswith("cuda") for r in expand_runs(spec)) else "cpu"


def read_study_file(ref: str) -> tuple[dict, str]:
    """Resolve ``ref`` (a built-in name or a YAML path) to its raw mapping and a source label."""
    path = Path(ref)
    if not path.suffix and not path.exists():
        studies = builtin_studies()
        if ref not in studies:
            known = ", ".join(sorted(studies))
            raise StudyError(f"unknown study {ref!r}: not a built-in study ({known}) nor a file")
        path = studies[ref]
    if not path.is_file():
        raise StudyError(f"{path}: study file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise StudyError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save the study file as UTF-8") from None
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror or e})") from None
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file must be a YAML mapping, got {type(raw).__name__}")
    return raw, str(path)


def validate_study(raw: dict, source: str) -> StudySpec | CompareSpec:
    """A ``kind: compare`` file validates as :class:`CompareSpec`, any other as :class:`StudySpec`."""
    from widthlab.studies.compare import CompareSpec

    try:
        if raw.get("kind") == "compare":
            return CompareSpec.model_validate(raw)
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise StudyError(_format_validation(source, e)) from None


def load_study(ref: str, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec | CompareSpec:
    """Read a study (built-in name or path), apply ``k=v`` overrides, validate, and check every run."""
    raw, source = read_study_file(ref)
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        head, sep, axis = ("", "sweep.", key[len("sweep."):]) if key.startswith("sweep.") \
            else key.partition(".sweep.")
        if sep and axis:  # an axis name is itself a dotted key: [methods.dense.]sweep.model.width=[...]
            path = f"{head}.sweep" if head else "sweep"
            sweep = _get_dotted(raw, path) or {}
            if not isinstance(sweep, dict):
                raise StudyError(f"override {text!r}: {path} is not a mapping")
            set_dotted(raw, path, {**sweep, axis: value})
        else:
            set_dotted(raw, key, value)
    if raw.get("kind", "train") != "compare" and ("tasks" in raw or "methods" in raw):
        raise StudyError(f"{source}: has tasks/methods sections but no 'kind: compare' (a comparison "
                         "study needs it; a plain study has data, model, method)")
    spec = validate_study(raw, source if not overrides else f"{source} (with overrides)")
    expand_runs(spec, source)  # validates every sweep point, so a bad sweep value fails before any run
    return spec


# ---------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: a fully resolved config and its stable id.

    ``run_id`` hashes everything that changes the result (data, model, method, train, seed) and
    nothing else, so re-running a study finds its finished runs; ``group`` is the same hash without the
    seed, shared by the seeds of one configuration.
    """

    run_id: str
    group: str
    position: int
    study: str
    seed: int
    axes: dict[str, Any]
    spec: StudySpec = field(repr=False)
    tags: dict[str, Any] = field(default_factory=dict)  # compare runs: task, arm, role (+ trial, ...)
    # A search arm's trial: what its pruner decides against (widthlab.search.pruning); not part of the
    # run's config or id (the trial number in ``tags`` is).
    search: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def config(self) -> dict[str, Any]:
        """The JSON-able resolved config recorded in the store and in ``runs/<id>/config.yaml``."""
        d = self.spec.model_dump(exclude={"sweep", "seeds", "description", "kind"})
        d.update(run_id=self.run_id, group=self.group, seed=self.seed, axes=self.axes, study=self.study)
        d.update(self.tags)
        return d


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand_runs(spec: StudySpec | CompareSpec, source: str = "study",
                tags: dict[str, str] | None = None) -> list[RunSpec]:
    """Grid over the sweep axes (in file order) x seeds; each point validated as a study of its own.
    A list of grids expands each in turn (their union; a point in two grids is a duplicate run).

    A comparison study expands into the runs of each of its (task, method) studies
    (:func:`widthlab.studies.compare.expand_compare`); ``tags`` label such runs and enter their ids.
    """
    from widthlab.studies.compare import CompareSpec, expand_compare

    if isinstance(spec, CompareSpec):
        return expand_compare(spec, source)
    tags = dict(tags or {})
    base = spec.model_dump(exclude={"sweep"})
    runs: list[RunSpec] = []
    points = (dict(zip(grid, values)) for grid in spec.sweep_grids()
              for values in (itertools.product(*grid.values()) if grid else [()]))
    for point in points:
        raw = copy.deepcopy(base)
        for key, value in point.items():
            set_dotted(raw, key, value, source="sweep")
        try:
            resolved = StudySpec.model_validate(raw)
        except ValidationError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise StudyError(_format_validation(f"{source} (sweep {where})", e)) from None
        check_components(resolved, source if not point else
                         f"{source} (sweep {', '.join(f'{k}={v!r}' for k, v in point.items())})")
        for seed in spec.seeds:
            ident = resolved.model_dump(include={"data", "model", "method", "train"})
            if tags:
                ident["tags"] = tags
            group = _hash(ident)
            run_id = _hash({**ident, "seed": seed})
            runs.append(RunSpec(run_id, group, len(runs), spec.name, seed, point, resolved, tags))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise StudyError(f"{source}: sweep produces duplicate runs (repeated axis values?)")
    return runs


def _check_options(source: str, section: str, kind: str, name: str, given: list[str],
                   known: dict[str, Any]) -> None:
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
            raise StudyError(f"{source}: {section}.{key}: unknown option for {kind} {name!r}; {hint}")


def check_components(spec: StudySpec, source: str) -> None:
    """Names and option keys of data, model and method exist, and their values pass the checks that
    building them would make (:mod:`widthlab.studies.validate`)."""
    from widthlab.data.registry import DATASETS, dataset_options
    from widthlab.models import list_models, model_options, open_options
    from widthlab.studies.methods import METHODS, method_options

    if spec.data.name not in DATASETS:
        raise StudyError(f"{source}: data.name: unknown dataset {spec.data.name!r}; "
                         f"known: {', '.join(DATASETS.names())}")
    _check_options(source, "data", "dataset", spec.data.name, list(spec.data.options()),
                   dataset_options(spec.data.name))
    if spec.model.name not in list_models():
        raise StudyError(f"{source}: model.name: unknown model {spec.model.name!r}; "
                         f"known: {', '.join(list_models())}")
    given = list(spec.model.options())
    given += [k for k in ("width", "widths") if getattr(spec.model, k) is not None]
    if not open_options(spec.model.name):  # model custom passes every key to the user's function
        _check_options(source, "model", "model", spec.model.name, given, model_options(spec.model.name))
    if spec.method.name not in METHODS:
        raise StudyError(f"{source}: method.name: unknown method {spec.method.name!r}; "
                         f"known: {', '.join(METHODS.names())}")
    _check_options(source, "method", "method", spec.method.name, list(spec.method.options()),
                   method_options(spec.method.name))
    from widthlab.studies.validate import check_values

    check_values(spec, source)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None)
