"""Option *values* of data, model and method, checked when a study is loaded (not when a run starts).

A bad value found only at run time fails the run and leaves a run in the output folder that a corrected
study no longer has; checked here it is a one-line :class:`StudyError` (exit 2) naming the key, before
anything is written.

- data: the registry's own option checks (:func:`widthlab.data.registry.check_dataset_options`), which
  read no file;
- model: the model is built on the ``meta`` device (no memory, no weights) for a few probe input shapes;
  an error that names an option and that every probe hits is the option's fault, not the probe's;
- method: each option is checked against the builder's type annotation (a string for an int, a boolean
  for a number), and the wide & sparse method's documented ranges and choices.
"""

from __future__ import annotations

import functools
import json
import numbers
import typing
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from widthlab.studies.load import StudyError, quote
from widthlab.studies.schema import StudySpec

# Input shapes a model may be built for: images, small images, vectors, sequences, token pairs.
PROBE_SHAPES = ((3, 32, 32), (16,), (16, 8), (2, 8), (1, 28, 28))


def _short(msg: str, limit: int = 400) -> str:
    return msg if len(msg) <= limit else msg[:limit] + "..."


def check_values(spec: StudySpec, source: str) -> None:
    """Raise :class:`StudyError` for an option value that building the run would refuse."""
    from widthlab.data.registry import check_dataset_options

    try:
        check_dataset_options(spec.data.name, spec.data.options())
    except (ValueError, KeyError) as e:
        raise StudyError(f"{source}: data: {_short(str(e.args[0] if e.args else e))}") from None
    model_kw = dict(spec.model.options())
    for key in ("width", "widths"):
        if getattr(spec.model, key) is not None:
            model_kw[key] = getattr(spec.model, key)
    problem = _model_problem(spec.model.name, _freeze(model_kw))
    if problem:
        raise StudyError(f"{source}: model: {problem}")
    problem = method_problem(spec.method.name, spec.method.options())
    if problem:
        raise StudyError(f"{source}: method.{problem}")
    from widthlab.studies.methods import preset_kernel_problem  # needs model.width: not in method_problem

    problem = preset_kernel_problem(spec.method.name, spec.method.options(), spec.model.width)
    if problem:
        raise StudyError(f"{source}: method.{problem}")


def _freeze(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


@functools.lru_cache(maxsize=256)
def _model_problem(name: str, frozen: str) -> str | None:
    from widthlab.models import create_model

    kw = json.loads(frozen)
    errors = []
    for shape in PROBE_SHAPES:
        try:
            with torch.device("meta"):
                create_model(name, input_shape=shape, num_outputs=4, **kw)
            return None
        except ValueError as e:
            errors.append(str(e))
        except Exception:  # a probe the model cannot take in another way: not the options' fault
            errors.append("")
    named = [e for e in errors if "option '" in e]
    return _short(named[0]) if named else None


def _hints(fn) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: skip the type check
        return {}


def _accepts_bool(hint: Any) -> bool:
    if hint is bool or hint is Any:
        return True
    return any(_accepts_bool(a) for a in typing.get_args(hint))


def _type_problem(key: str, hint: Any, value: Any) -> str | None:
    if isinstance(value, bool) and not _accepts_bool(hint):
        return f"{key}: expected {_hint_text(hint)}, got a boolean ({value!r})"
    try:
        TypeAdapter(hint).validate_python(value, strict=isinstance(value, str))
    except ValidationError:
        return f"{key}: expected {_hint_text(hint)}, got {quote(value)}"
    except Exception:  # a hint pydantic cannot check
        return None
    return None


def _hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


# The wide & sparse method's documented ranges (methods/widesparse/plan.py, families.py).
def _widesparse_ranges() -> dict[str, Any]:
    from widthlab.methods.widesparse.plan import VARIANTS
    from widthlab.methods.widesparse.sparsify import INITS, SPARSE_IMPLS

    def unit(lo_open: bool, hi_open: bool):
        def check(v):
            if not isinstance(v, numbers.Real):
                return None
            ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
            return None if ok else (f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, "
                                    f"got {v}")
        return check

    def choice(options):
        return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}; " \
                                                  f"got {quote(v)}"

    def positive(v):
        return None if not isinstance(v, numbers.Integral) or v >= 1 else f"must be >= 1, got {v}"

    return {"base_width": positive, "fract_cl": unit(False, True),
            "classifier_connectivity": unit(True, False),
            "variant": choice(VARIANTS), "init": choice(INITS), "sparse_impl": choice(SPARSE_IMPLS),
            "bottleneck_match": choice(("dense", "factorized"))}


_RANGES = {"widesparse": _widesparse_ranges}


def method_problem(name: str, options: dict[str, Any]) -> str | None:
    """``key: problem`` for the first bad option value of method ``name`` (None: all fine)."""
    from widthlab.studies.methods import METHODS

    builder = METHODS.get(name)
    hints = _hints(builder)
    ranges = _RANGES[name]() if name in _RANGES else {}
    for key, value in options.items():
        if value is None:
            continue
        if key in hints:
            problem = _type_problem(key, hints[key], value)
            if problem:
                return problem
        if key in ranges:
            problem = ranges[key](value)
            if problem:
                return f"{key}: {problem}"
    return None
