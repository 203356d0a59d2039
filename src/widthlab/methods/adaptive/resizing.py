"""Grow or shrink one adaptive site to a target width through the core width surgery (Errica et al. 2025,
Sec. 3).

* Grow: the new rows of W_l, new bias entries and new columns of W_{l+1} are appended at the end (the
  unimportant tail) and drawn i.i.d. N(0, 1) (``grow_init="normal"``, the paper's); existing weights are
  unchanged. Function preservation is approximate by construction (new tail units contribute
  p_new W_{l+1}[:, new] a_new, and every p_i is rescaled by Z_old / Z_new through the renormalisation).
* Shrink: keep the first D rows, bias entries and columns -- drop the least important tail.

A site whose width is tied to others (a :class:`~widthlab.nn.discovery.WidthGroup`: a residual stream)
is resized as one: every producer's rows, norm and consumer's columns (``nn.group_surgery.resize_group``).

Every changed tensor becomes a new Parameter (``nn.surgery.resize_site``), and the returned
:class:`~widthlab.nn.resize.ResizeEvent` carries the optimizer mode for ``nn.optim_surgery``:
``"reset"`` (faithful: the official code restarts Adam's state of every replaced tensor, including the
consumer's bias, which it re-wraps without changing it) or ``"keep"`` (slice surviving moments,
zero-pad new units, keep the step count).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveSite
from widthlab.nn.group_surgery import resize_group
from widthlab.nn.resize import ParamResize, ResizeEvent
from widthlab.nn.surgery import InitIn, InitOut, resize_site

OPTIMIZER_MODES = ("reset", "keep")


def _normal_in(g: torch.Generator):
    def init(w: torch.Tensor, b: torch.Tensor | None) -> None:
        # Drawn on the CPU from the callback's own generator, so that a CUDA run and a resumed run draw
        # the same units as an uninterrupted CPU run.
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32))
        if b is not None:
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float32))
    return init


def _normal_out(g: torch.Generator, std: float = 1.0):
    def init(w: torch.Tensor) -> None:
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)
    return init


def _kaiming_in(g: torch.Generator):
    def init(w: torch.Tensor, b: torch.Tensor | None) -> None:
        bound = 1.0 / math.sqrt(math.prod(w.shape[1:]))
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)
        if b is not None:
            b.copy_((torch.rand(b.shape, generator=g) * 2 - 1) * bound)
    return init


def _inits(asite: AdaptiveSite, D: int, g: torch.Generator):
    if asite.grow_init == "normal":
        return _normal_in(g), _normal_out(g)
    if asite.grow_init == "zeros":
        return "zeros", "zeros"
    # "kaiming": incoming like PyTorch's default, outgoing at the Kaiming+ std of the consumer (Sec. 3).
    with torch.no_grad():
        p = asite.scale.importance(D)
    area = math.prod(asite.site.consumer.weight.shape[2:])
    std = math.sqrt(2.0 / (float((p.double() ** 2).sum()) * area))
    return _kaiming_in(g), _normal_out(g, std)


def set_width(asite: AdaptiveSite, D: int, *, model: nn.Module | None = None,
              generator: torch.Generator | None = None, optimizer_mode: str = "reset") -> ResizeEvent:
    """Resize ``asite`` to ``D`` units: append fresh tail units or cut the tail.

    Args:
        asite: the adaptive site.
        D: the target width (>= 1).
        model: the model holding the site (names the parameters in the event).
        generator: CPU random source of new units (a fresh default one when None).
        optimizer_mode: ``"reset"`` or ``"keep"``, recorded on the event; ``"reset"`` also re-wraps
            the consumer's bias as the official code does, so its optimizer state restarts too.

    Returns:
        The event (falsy when D equals the current width).
    """
    if optimizer_mode not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer_mode must be one of {OPTIMIZER_MODES}, got {optimizer_mode!r}")
    old = asite.width
    if old == D:
        return ResizeEvent()
    g = generator if generator is not None else torch.Generator()
    if old < D:
        init_in, init_out = _inits(asite, D, g)
        event = resize_units(asite, range(old), D - old, init_in=init_in, init_out=init_out, model=model)
    else:
        event = resize_units(asite, range(D), 0, model=model)
    if optimizer_mode == "reset":
        for consumer, name in _consumers(asite, model):
            event = event.merge(_rewrap_bias(consumer, name))
    return dataclasses.replace(event, optimizer_mode=optimizer_mode,
                               widths={asite.name: D}, description=f"{asite.name}: {old} -> {D}")


def resize_units(asite: AdaptiveSite, keep, n_new: int, *, init_in: InitIn = "zeros",
                 init_out: InitOut = "zeros", model: nn.Module | None = None,
                 generator: torch.Generator | None = None) -> ResizeEvent:
    """Keep ``keep`` units of the site (or of every module of its group) and append ``n_new``; the
    arguments of :func:`widthlab.nn.surgery.resize_site`. A group needs ``model`` (it names modules)."""
    if asite.group is None:
        return resize_site(asite.site, keep=keep, n_new=n_new, init_in=init_in, init_out=init_out,
                           model=model, generator=generator)
    if model is None:
        raise ValueError(f"adaptive site {asite.name!r} is a group of tied widths: resizing it needs "
                         "the model")
    return resize_group(model, asite.group, keep, n_new, init_in=init_in, init_out=init_out,
                        generator=generator)


def _consumers(asite: AdaptiveSite, model: nn.Module | None) -> list[tuple[nn.Module, str]]:
    if asite.group is None or model is None:
        return [(asite.site.consumer, asite.site.consumer_name)]
    return [(model.get_submodule(n), n) for n in asite.group.consumers]


def _rewrap_bias(consumer: nn.Module, consumer_name: str) -> ResizeEvent:
    old = getattr(consumer, "bias", None)
    if not isinstance(old, nn.Parameter):
        return ResizeEvent()
    new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.clone()
    consumer.bias = new
    name = f"{consumer_name}.bias" if consumer_name else "bias"
    return ResizeEvent(params=(ParamResize(name, old, new, None, None),))
