"""Method names for study files -> builders that turn a model into (model, callbacks).

A method builder ``build(model, data, *, seed, **options) -> MethodPlan`` lives in its method's own
package (``widthlab.methods.<name>.plan``); its keyword-only options are what a study's ``method:``
section may set. ``dense`` trains the model as built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from widthlab._registry import Registry
from widthlab.data.base import TaskData
from widthlab.methods.base import MethodPlan

MethodBuilder = Callable[..., MethodPlan]
METHODS: Registry[MethodBuilder] = Registry("method")


@METHODS.register("dense")
def dense(model: nn.Module, data: TaskData, *, seed: int) -> MethodPlan:
    """Train the model as built: the baseline every width method is compared with."""
    return MethodPlan(model)


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
