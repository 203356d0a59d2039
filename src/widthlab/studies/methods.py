"""Method names for study files -> builders that turn a model into (model, callbacks).

A method builder ``build(model, data, *, seed, **options) -> MethodPlan`` lives in its method's own
package (``widthlab.methods.<name>.plan``); its keyword-only options are what a study's ``method:``
section may set. ``dense`` trains the model as built; its two options serve dense references that follow
a per-width protocol (the NTK-style MLPs of Golubeva et al. 2021, Fig. 8): ``lr_preset`` takes the
learning rate from a named per-width table's dense column, ``kernel`` records the GP-kernel distances
of the network (one-hidden-layer ReLU MLPs, p = 1), exactly as the wide & sparse method does for its
members (:mod:`widthlab.methods.widesparse.lr_presets`, :mod:`widthlab.methods.widesparse.kernel`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from widthlab._registry import Registry
from widthlab.data.base import TaskData
from widthlab.methods.base import MethodPlan
from widthlab.methods.widesparse.kernel import KernelOptions, KernelRecorder, check_kernel_model, split_inputs
from widthlab.methods.widesparse.lr_presets import PresetLR, preset_lr

MethodBuilder = Callable[..., MethodPlan]
METHODS: Registry[MethodBuilder] = Registry("method")


@METHODS.register("dense")
def dense(model: nn.Module, data: TaskData, *, seed: int, lr_preset: str | None = None,
          kernel: dict | bool | None = None) -> MethodPlan:
    """Train the model as built: the baseline every width method is compared with.

    Args:
        lr_preset: a per-width learning-rate table (e.g. ``"ntk-fig8"``, Golubeva et al. 2021, App. A);
            its dense rate at the model's width replaces ``train.optimizer.lr``. ``NAME`` and
            ``NAME:dense`` both read the dense table; a sparse table is refused.
        kernel: record the GP-kernel distances of the network (one-hidden-layer ReLU MLP), as the wide
            & sparse method's ``kernel`` option: a mapping of its options, or true for the defaults.

    Returns:
        the plan; with ``lr_preset`` its summary holds ``lr_preset`` and ``lr``, with ``kernel`` the
        ``kernel_*`` keys.

    Raises:
        ValueError: an unknown preset, a width the table has no rate for, a sparse table, or a kernel
            option that is bad or asked of a model that is not a one-hidden-layer ReLU MLP.
    """
    summary: dict[str, Any] = {}
    callbacks: list[Any] = []
    if lr_preset is not None:
        lr = dense_preset_lr(str(lr_preset), _dense_width(model))
        summary.update(lr_preset=str(lr_preset), lr=lr)
        callbacks.append(PresetLR(lr))
    if kernel is not None and kernel is not False:
        opts = KernelOptions.parse(kernel)
        check_kernel_model(model)
        callbacks.append(KernelRecorder(summary, split_inputs(data, opts.split), opts, seed=seed))
    return MethodPlan(model, callbacks, summary)


def dense_preset_lr(name: str, width: int) -> float:
    """The dense rate of preset ``name`` at ``width`` (``NAME`` or ``NAME:dense``).

    Raises:
        ValueError: a sparse table named, an unknown preset or a width without a rate.
    """
    table = name.partition(":")[2]
    if table not in ("", "dense"):
        raise ValueError(f"option 'lr_preset' {name!r}: a dense net reads the dense table ('NAME' or "
                         f"'NAME:dense'), not {table!r}")
    return preset_lr(name, width)


def _dense_width(model: nn.Module) -> int:
    try:
        from widthlab.methods.widesparse.plan import model_width

        return model_width(model)
    except ValueError:
        raise ValueError(f"option 'lr_preset' needs a model with one nominal width (a widthlab MLP of "
                         f"equal hidden widths or a ResNet), got {type(model).__name__}") from None


def preset_kernel_problem(method: str, options: dict[str, Any], width: int | None) -> str | None:
    """``key: problem`` for an ``lr_preset`` or ``kernel`` value of the dense or wide & sparse method
    that building the run would refuse, found at load time from the study alone (``width`` is
    ``model.width``; None skips the rate look-up). Other methods and options: None."""
    if method not in ("dense", "widesparse"):
        return None
    preset, kernel, w0 = options.get("lr_preset"), options.get("kernel"), options.get("base_width")
    if kernel is not None and kernel is not False:
        try:
            KernelOptions.parse(kernel)
        except (ValueError, TypeError) as e:
            return f"kernel: {e}"
    if not isinstance(preset, str) or not _is_int(width):
        return None
    try:
        if method == "dense":
            dense_preset_lr(preset, width)
        elif _is_int(w0) and 1 <= w0 <= width:  # other base widths fail on their own check
            preset_lr(preset, width, w0)
    except ValueError as e:
        return f"lr_preset: {e}"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- method registrations: one line each, added as each method lands -----------------------------
from widthlab.methods.widesparse.plan import build as _widesparse  # noqa: E402, I001
METHODS.register("widesparse")(_widesparse)
from widthlab.methods.adaptive.plan import build as _adaptive  # noqa: E402, I001
METHODS.register("adaptive")(_adaptive)
from widthlab.methods.expanding.plan import build as _expanding  # noqa: E402, I001
METHODS.register("expanding")(_expanding)


# (method, model) pairs whose ``model.width`` is not used: the adaptive MLP learns its widths from lambda0
# (methods/adaptive/plan.py), so a run label showing the plain model's width would mislead.
_WIDTH_NOT_USED = {("adaptive", "mlp")}


def model_width_used(method: str, model: str) -> bool:
    """Whether ``model.width``/``model.widths`` shape the network that method ``method`` trains."""
    return (method, model) not in _WIDTH_NOT_USED


def method_options(name: str) -> dict[str, Any]:
    """Keyword options of method ``name`` (besides ``seed``) with their defaults."""
    sig = inspect.signature(METHODS.get(name))
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "seed"}


def build_method(name: str, options: dict[str, Any], model: nn.Module, data: TaskData, *,
                 seed: int) -> MethodPlan:
    return METHODS.get(name)(model, data, seed=seed, **options)
