"""Model registry: short names usable from a study file, and the one factory that validates options.

Every registered builder has the signature ``builder(input_shape, num_outputs, *, option=default, ...)``
and raises ``ValueError`` naming the option for a bad value. :func:`create_model` adds the model name to
that message and rejects unknown options before building anything.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Callable, Sequence

from torch import nn

from widthlab._registry import Registry

Builder = Callable[..., nn.Module]

MODELS: Registry[Builder] = Registry("model")


def _options(builder: Builder) -> list[str]:
    """Keyword-only parameters of a builder: the options a study may set."""
    sig = inspect.signature(builder)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def open_options(name: str) -> bool:
    """Whether model ``name`` takes options beyond its declared ones (``custom``: the user's function
    receives every key of the ``model:`` section)."""
    sig = inspect.signature(_get(name))
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def model_options(name: str) -> dict[str, object]:
    """Options of model ``name`` with their defaults (``inspect.Parameter.empty`` when required)."""
    builder = _get(name)
    sig = inspect.signature(builder)
    return {k: sig.parameters[k].default for k in _options(builder)}


def _get(name: str) -> Builder:
    try:
        return MODELS.get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def _check_input_shape(name: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"model {name!r}: input_shape must be a sequence of ints, got {input_shape!r}") \
            from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"model {name!r}: input_shape must hold positive ints, got {input_shape!r}")
    return tuple(int(d) for d in shape)


def create_model(name: str, *, input_shape: Sequence[int], num_outputs: int, **kwargs) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: registered name (see :func:`list_models`), e.g. ``"mlp"`` or ``"resnet18"``.
        input_shape: shape of one input, without the batch axis (``(1, 28, 28)``, ``(64,)``).
        num_outputs: number of classes or regression targets.
        **kwargs: the model's options (see :func:`model_options`).

    Returns:
        The model, in training mode, on the default device (use ``with torch.device("meta"):`` to
        build one without allocating its weights, e.g. only to count them).

    Raises:
        ValueError: unknown model name, unknown option, or an invalid value; the message names the
            model and the option (``model 'mlp': unknown option 'widht'; did you mean 'width'?``).
    """
    builder = _get(name)
    options = _options(builder)
    for key in kwargs if not open_options(name) else ():
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(options)}"
            raise ValueError(f"model {name!r}: unknown option {key!r}; {hint}")
    shape = _check_input_shape(name, input_shape)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"model {name!r}: num_outputs must be a positive int, got {num_outputs!r}")
    try:
        return builder(shape, num_outputs, **kwargs)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from e


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


# -- option checks shared by the model configs (they raise ValueError naming the option) --

def check_int(option: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools and floats are rejected, not coerced."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"option {option!r} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"option {option!r} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(option: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"option {option!r} must be one of {', '.join(map(repr, choices))}; "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def check_bool(option: str, value: object) -> bool:
    """``value`` if it is a bool (YAML ``true``/``false``), not a truthy string or int."""
    if not isinstance(value, bool):
        raise ValueError(f"option {option!r} must be true or false, got {value!r}")
    return value
