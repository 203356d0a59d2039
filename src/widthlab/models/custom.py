"""The user's own model in a study: ``model: {name: custom, factory: "module:function", ...}``.

``factory`` names a function that builds the model, either importable (``"mypackage.models:build"``)
or in a Python file (``"path/to/model.py:build"``, relative to the working directory). It is called as
``function(input_shape, num_outputs, **other_model_keys)``: ``input_shape`` is one example's shape
without the batch axis (``(64,)`` for digits), ``num_outputs`` the classes or regression targets, and
every other key of the ``model:`` section is passed on by name, ``width`` included. It must return an
``nn.Module``.

``model.width`` is the width the methods change: the wide & sparse method rebuilds the model at its
``base_width`` by calling the function again with ``width=base_width`` (the weight budget N(w0)), and
sweeps over ``model.width`` work as for built-in models. The adaptive method inserts its importance
rescaling at the width sites found by tracing the model (``widthlab.nn.discovery``).

A file is loaded once per process (again when it changes) as a module of its own, so that the models it
builds can be deep-copied and pickled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from widthlab.models._registry import MODELS

_LOADED: dict[tuple[str, int], Any] = {}  # (resolved path, mtime_ns) -> module


def _bad(message: str) -> ValueError:
    return ValueError(f"option 'factory': {message}")


def load_factory(factory: object) -> Callable[..., nn.Module]:
    """The function named by ``"package.module:function"`` or ``"path/to/file.py:function"``.

    Raises:
        ValueError: a malformed string, a missing file or module, a module that fails to import, or a
            missing or non-callable attribute; one line naming the problem.
    """
    if not isinstance(factory, str) or factory.count(":") < 1:
        raise _bad(f"must be 'package.module:function' or 'path/to/file.py:function', got {factory!r}")
    where, _, name = factory.rpartition(":")
    if not where or not name.isidentifier():
        raise _bad(f"must be 'package.module:function' or 'path/to/file.py:function', got {factory!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise _bad(f"no module {e.name!r} (in {factory!r})") from None
        except Exception as e:  # the user's module failed while importing
            raise _bad(f"importing {where!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise _bad(f"{where!r} has no {name!r}")
    if not callable(fn):
        raise _bad(f"{where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(path: Path):
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise _bad(f"no file {str(path)!r} (looked for {str(resolved)!r})")
    key = (str(resolved), resolved.stat().st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    digest = hashlib.sha1(key[0].encode()).hexdigest()[:10]
    mod_name = f"widthlab_user_models.{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise _bad(f"{str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise _bad(f"running {str(path)!r} failed: {type(e).__name__}: {e}") from None
    _LOADED[key] = module
    return module


class Rebuild:
    """``width -> the same user model at another width`` (the wide & sparse base at ``base_width``)."""

    def __init__(self, factory: str, input_shape: tuple[int, ...], num_outputs: int, options: dict):
        self.factory, self.input_shape = factory, input_shape
        self.num_outputs, self.options = num_outputs, options

    def __call__(self, width: int) -> nn.Module:
        return build(self.input_shape, self.num_outputs, self.factory, {**self.options, "width": int(width)})


class Widths:
    """``model.widths()`` of a user model (the run's recorded widths): its adaptive widths once the adaptive
    method made it adaptive, else its nominal ``width``."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> dict[str, int]:
        from widthlab.methods.adaptive.layer import attached_sites

        sites = attached_sites(self.model)
        if sites:
            return {s.name: s.width for s in sites}
        width = getattr(self.model, "widthlab_width", None)
        return {} if width is None else {"width": int(width)}


def build(input_shape: tuple[int, ...], num_outputs: int, factory: str, options: dict[str, Any]) -> nn.Module:
    """Call the factory and check that it returned a module; tag it with its width and a rebuild."""
    fn = load_factory(factory)
    try:  # the study's keys against the function's parameters, before calling it
        inspect.signature(fn).bind(tuple(input_shape), int(num_outputs), **options)
    except TypeError as e:
        raise _bad(f"{factory} does not take the model keys given: {e}") from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    model = fn(tuple(input_shape), int(num_outputs), **options)
    if not isinstance(model, nn.Module):
        raise _bad(f"{factory} returned a {type(model).__name__}, not a torch.nn.Module")
    width = options.get("width")
    # Plain attributes (not modules or parameters): read by the wide & sparse method.
    model.widthlab_width = width
    model.widthlab_rebuild = Rebuild(factory, tuple(input_shape), int(num_outputs),
                                     {k: v for k, v in options.items() if k != "width"})
    if not callable(getattr(model, "widths", None)):
        model.widths = Widths(model)
    return model


@MODELS.register("custom")
def custom(input_shape: tuple[int, ...], num_outputs: int, *, factory: str | None = None,
           **options: Any) -> nn.Module:
    """The model built by the user's ``factory`` function (module docstring); every other key of the
    study's ``model:`` section, ``width`` included, is passed to it by name."""
    if factory is None:
        raise _bad("model custom needs factory: 'package.module:function' or 'path/to/file.py:function'")
    return build(input_shape, num_outputs, factory, options)
