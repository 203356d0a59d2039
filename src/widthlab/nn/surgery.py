"""Width surgery: grow or shrink the units between a producer and its consumer.

A :class:`~widthlab.nn.resize.WidthSite` names the producer (Linear rows / Conv output channels, with
its bias), the per-unit norms in between (BatchNorm, InstanceNorm, LayerNorm/RMSNorm over the unit
axis) and the consumer (Linear columns / Conv input channels). :func:`resize_site` keeps a chosen subset
of the units in a chosen order, appends ``n_new`` fresh units, and returns a
:class:`~widthlab.nn.resize.ResizeEvent` from which ``widthlab.nn.optim_surgery`` remaps the optimizer.

Every changed tensor becomes a *new* ``nn.Parameter`` (so optimizers holding the old object notice),
but modules are edited in place and never replaced: forwards that read ``weight.shape`` (NTK-style
``Linear`` subclasses), forward hooks and the model's structure all survive.

Function preservation. With the default ``init_out="zeros"`` the new units feed nothing forward, and
dropping a unit whose outgoing weights are zero removes nothing, so the network computes the same
function in exact arithmetic. In floating point the outputs agree up to rounding, not bitwise: a
consumer that gained a zero column sums K + 1 terms instead of K, and BLAS may block the longer inner
product differently (which blocking it picks depends on the shapes and on the CPU's instruction set,
AVX-512 / AVX2 / SSE), so outputs can move by a few ulps of the layer's magnitude. Two cases are
*not* function preserving by construction:

* LayerNorm / RMSNorm over the unit axis: the statistics are taken over all units, so adding or
  removing units changes every unit's normalised value. Such sites are resized correctly (new units get
  weight 1, bias 0) but the function changes.
* Consumers whose forward scales by the fan-in (NTK parametrisation, ``W x / sqrt(fan_in)``): the
  fan-in changes, so every output is rescaled.

Example::

    event = resize_site(site, keep=torch.tensor([3, 0, 5]), n_new=2, init_in="normal", model=model)
    remap_optimizer(optimizer, event, mode="keep")
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from widthlab.nn.rational import RationalActivation
from widthlab.nn.resize import ParamResize, ResizeEvent, WidthSite

# Incoming init: fills the new producer rows (n_new, fan_in, *kernel) and bias (n_new,) or None in place.
InitIn = str | Callable[[torch.Tensor, torch.Tensor | None], object]
# Outgoing init: fills the new consumer columns (out, n_new, *kernel) in place.
InitOut = str | Callable[[torch.Tensor], object]

INIT_NAMES = ("kaiming", "normal", "zeros")

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                  nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_UNIT_AXIS_NORMS = (nn.LayerNorm, nn.RMSNorm)
# Values that make a new unit's norm an identity map on a standardised input.
_NORM_FILL = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
# A rational activation's new units start at the identity (v = c = 0, l = 1: σ(x) = x).
_RATIONAL_FILL = {"v": 0.0, "c": 0.0, "l": 1.0}


def resize_site(
    site: WidthSite,
    keep: torch.Tensor | Sequence[int] | None = None,
    n_new: int = 0,
    *,
    init_in: InitIn = "kaiming",
    init_out: InitOut = "zeros",
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> ResizeEvent:
    """Keep ``keep`` units of a width site, in that order, then append ``n_new`` fresh units.

    Args:
        site: the width to resize; its modules are edited in place.
        keep: int64 indices of the surviving units in their new order, a ``range`` of them (checked
            without tensor operations: the adaptive method keeps ``range(D)`` on most steps), or a bool
            mask of length ``site.width``; None keeps all units in order.
        n_new: number of units appended after the survivors.
        init_in: incoming weights and bias of the new units. ``"kaiming"``: PyTorch's default Linear/Conv
            init for the producer's fan-in, U(+-1/sqrt(fan_in)) for weight and bias; ``"normal"``: N(0, 1)
            for both, as the adaptive-width paper grows; ``"zeros"``; or a callable
            ``f(weight, bias)`` filling the zero-initialised blocks in place.
        init_out: outgoing (consumer) weights of the new units. ``"zeros"`` (default) preserves the
            function; ``"normal"``: N(0, 1); ``"kaiming"``: U(+-1/sqrt(new fan_in)); or a callable
            ``f(weight)`` filling the zero-initialised block in place.
        model: the model holding the site; used to name parameters the site leaves unnamed and to
            refuse parameters shared with other modules.
        generator: random source for the new units.

    Returns:
        The event: one :class:`ParamResize` per replaced tensor (producer weight/bias and norm
        parameters along dim 0, consumer weight along dim 1), in that order. The consumer's bias is
        untouched and not listed. Nothing changes (and the event is falsy) when all units are kept in
        order and none are added.

    Raises:
        ValueError: bad indices, sizes or init names, or modules this surgery cannot edit (grouped
            convolutions, unsupported norms, inconsistent widths); the message names the site. The
            model is left untouched on error.
    """
    width = _check_site(site, model)
    # (a range compared by value; an array's == would compare elementwise)
    identity = n_new == 0 and (keep is None or (isinstance(keep, range) and keep == range(width)))
    keep, n_new = _check_keep(site, keep, width, n_new)
    new_width = len(keep) + n_new
    widths = {site.name: new_width}
    if identity or (n_new == 0 and torch.equal(keep, torch.arange(width))):
        return ResizeEvent(description=f"{site.name}: unchanged ({width})", widths=widths)

    # Build every new tensor before touching the model, so a failing init callable changes nothing.
    producer, consumer = site.producer, site.consumer
    w_in, b_in = _new_incoming(site, n_new, init_in, generator)
    w_out = _new_outgoing(site, n_new, new_width, init_out, generator)

    names = _module_names(site, model)
    edits: list[Edit] = [
        (producer, "weight", names[0], 0, w_in),
        (producer, "bias", names[0], 0, b_in),
    ]
    for norm, name in zip(site.norms, names[1:-1]):
        edits += _norm_edits(norm, name, n_new)
    edits.append((consumer, "weight", names[-1], 1, w_out))

    resized = _apply_edits(edits, keep, n_new)
    _set_width_attributes(site, new_width)

    description = f"{site.name}: {width} -> {new_width} ({len(keep)} kept, {n_new} new)"
    return ResizeEvent(params=tuple(resized), description=description, widths=widths)


def resize(
    model: nn.Module,
    site_name: str,
    keep: torch.Tensor | Sequence[int] | None = None,
    n_new: int = 0,
    **kwargs,
) -> ResizeEvent:
    """Resize the site called ``site_name`` among ``model.width_sites()``; see :func:`resize_site`."""
    return resize_site(find_site(model, site_name), keep, n_new, model=model, **kwargs)


def find_site(model: nn.Module, site_name: str) -> WidthSite:
    """Return the site called ``site_name`` of a model that exposes ``width_sites()``."""
    if not callable(getattr(model, "width_sites", None)):
        raise TypeError(f"{type(model).__name__} has no width_sites() method; pass a WidthSite to "
                        "resize_site instead")
    sites = list(model.width_sites())
    for site in sites:
        if site.name == site_name:
            return site
    raise KeyError(f"no width site {site_name!r}; the model has {[s.name for s in sites]}")


# --- validation ---------------------------------------------------------------------------------------


def _check_site(site: WidthSite, model: nn.Module | None) -> int:
    """Check that the site's modules can be edited and agree on the width; return the width."""
    for role, module in (("producer", site.producer), ("consumer", site.consumer)):
        if not isinstance(module, _LAYERS):
            raise ValueError(f"site {site.name!r}: {role} {type(module).__name__} is not a Linear or "
                             "Conv1d/2d/3d")
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"site {site.name!r}: {role} is a grouped/depthwise convolution "
                             f"(groups={module.groups}); not supported")
        _check_plain_param(site, role, module, "weight")
    if site.producer is site.consumer:
        raise ValueError(f"site {site.name!r}: producer and consumer are the same module (a recurrence); "
                         "not supported")
    width = site.width
    consumer_in = site.consumer.weight.shape[1]
    if consumer_in != width:
        raise ValueError(f"site {site.name!r}: the consumer takes {consumer_in} inputs but the producer "
                         f"makes {width} units (a flatten between them is not supported)")
    for norm in site.norms:
        if isinstance(norm, RationalActivation):
            size = norm.num_units
        elif isinstance(norm, _CHANNEL_NORMS):
            size = norm.num_features
        elif isinstance(norm, _UNIT_AXIS_NORMS):
            shape = tuple(norm.normalized_shape)
            if len(shape) != 1:
                raise ValueError(f"site {site.name!r}: {type(norm).__name__} over {shape} mixes units with "
                                 "other axes; only a normalized_shape of (width,) is supported")
            size = shape[0]
        else:
            raise ValueError(f"site {site.name!r}: norm {type(norm).__name__} is not supported (use "
                             "BatchNorm, InstanceNorm, LayerNorm or RMSNorm over the unit axis)")
        if size != width:
            raise ValueError(f"site {site.name!r}: {type(norm).__name__} has {size} features, "
                             f"width is {width}")
        for attr in ("v", "c", "l") if isinstance(norm, RationalActivation) else ("weight", "bias"):
            _check_plain_param(site, "norm", norm, attr)
    if model is not None:
        _check_not_shared(site, model)
    return width


def _check_plain_param(site: WidthSite, role: str, module: nn.Module, attr: str) -> None:
    if parametrize.is_parametrized(module, attr):
        raise ValueError(f"site {site.name!r}: {role}.{attr} is parametrized; remove the "
                         "parametrization before resizing")
    if isinstance(getattr(module, attr, None), nn.parameter.UninitializedParameter):
        raise ValueError(f"site {site.name!r}: {role} is a lazy module that was never run")


def _check_not_shared(site: WidthSite, model: nn.Module) -> None:
    """Refuse tied parameters: replacing one would silently untie it from its other owners."""
    # Every (module, attribute) slot holding each parameter, a shared module counted once per place it
    # appears (as named_parameters(remove_duplicate=False) would, without building the names).
    counts: dict[int, int] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
        stack.extend(c for c in m._modules.values() if c is not None)
    for module in (site.producer, site.consumer, *site.norms):
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if p is not None and counts.get(id(p), 0) > 1:
                raise ValueError(f"site {site.name!r}: {type(module).__name__}.{attr} is shared with "
                                 "another module; tied parameters cannot be resized")


def _check_keep(site: WidthSite, keep, width: int, n_new) -> tuple[torch.Tensor, int]:
    """Return ``keep`` as validated int64 indices on the CPU, and ``n_new`` as an int."""
    try:
        ok = not isinstance(n_new, bool) and operator.index(n_new) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"site {site.name!r}: n_new must be an int >= 0, got {n_new!r}")
    n_new = operator.index(n_new)
    if keep is None:
        keep = range(width)
    if isinstance(keep, range):  # unique by construction; its ends bound it
        lo, hi = (min(keep[0], keep[-1]), max(keep[0], keep[-1])) if len(keep) else (0, -1)
        if lo < 0 or hi >= width:
            raise ValueError(f"site {site.name!r}: keep indices must lie in [0, {width}), got [{lo}, {hi}]")
        if len(keep) + n_new < 1:
            raise ValueError(f"site {site.name!r}: the new width would be 0; keep or add at least one unit")
        return torch.arange(keep.start, keep.stop, keep.step), n_new
    keep = torch.as_tensor(keep).detach().cpu()
    if keep.dtype == torch.bool:
        if keep.shape != (width,):
            raise ValueError(f"site {site.name!r}: a bool keep mask needs shape ({width},), "
                             f"got {tuple(keep.shape)}")
        keep = keep.nonzero().flatten()
    if keep.dim() != 1 or (keep.numel() and keep.is_floating_point()):
        raise ValueError(f"site {site.name!r}: keep must be 1-D integer indices or a bool mask")
    keep = keep.long()
    if keep.numel():
        if keep.min() < 0 or keep.max() >= width:
            raise ValueError(f"site {site.name!r}: keep indices must lie in [0, {width}), got "
                             f"[{int(keep.min())}, {int(keep.max())}]")
        if torch.unique(keep).numel() != keep.numel():
            raise ValueError(f"site {site.name!r}: keep indices must be unique")
    if keep.numel() + n_new < 1:
        raise ValueError(f"site {site.name!r}: the new width would be 0; keep or add at least one unit")
    return keep, n_new


# --- new units ----------------------------------------------------------------------------------------


def _new_incoming(site, n_new, init, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = site.producer.weight
    bias = site.producer.bias
    w_new = w.new_zeros((n_new, *w.shape[1:]))
    b_new = None if bias is None else bias.new_zeros((n_new,))
    if n_new == 0:
        return w_new, b_new
    with torch.no_grad():
        if callable(init):
            init(w_new, b_new)
            _check_block(site, "init_in weight", w_new, (n_new, *w.shape[1:]))
            if b_new is not None:
                _check_block(site, "init_in bias", b_new, (n_new,))
        else:
            fan_in = math.prod(w.shape[1:])
            for t in (w_new, b_new):
                if t is not None:
                    _fill(site, t, init, fan_in, generator, "init_in")
    return w_new, b_new


def _new_outgoing(site, n_new, new_width, init, generator) -> torch.Tensor:
    w = site.consumer.weight
    shape = (w.shape[0], n_new, *w.shape[2:])
    w_new = w.new_zeros(shape)
    if n_new == 0:
        return w_new
    with torch.no_grad():
        if callable(init):
            init(w_new)
            _check_block(site, "init_out", w_new, shape)
        else:
            # The consumer's fan-in after the resize, as its default init would see it.
            fan_in = new_width * math.prod(w.shape[2:])
            _fill(site, w_new, init, fan_in, generator, "init_out")
    return w_new


def _fill(site, t: torch.Tensor, init: str, fan_in: int, generator, arg: str) -> None:
    if init == "zeros":
        t.zero_()
    elif init == "normal":
        t.normal_(0.0, 1.0, generator=generator)
    elif init == "kaiming":
        # kaiming_uniform_(a=sqrt(5)), nn.Linear's default, reduces to U(+-1/sqrt(fan_in)); so does its bias.
        bound = 1.0 / math.sqrt(fan_in)
        t.uniform_(-bound, bound, generator=generator)
    else:
        raise ValueError(f"site {site.name!r}: {arg}={init!r} is not one of {INIT_NAMES} or a callable")


def _check_block(site, what: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"site {site.name!r}: {what} changed the block's shape to {tuple(t.shape)}; "
                         f"fill the {tuple(shape)} tensor in place")


# --- editing ------------------------------------------------------------------------------------------

# (module, attribute, module name, resized dim, block of new units or None)
Edit = tuple[nn.Module, str, str, int, "torch.Tensor | None"]


def _norm_edits(norm: nn.Module, name: str, n_new: int) -> list[Edit]:
    """A per-unit norm's parameters and running statistics, new units filled to act as identities."""
    fill = _RATIONAL_FILL if isinstance(norm, RationalActivation) else _NORM_FILL
    edits = []
    for attr, value in fill.items():
        t = getattr(norm, attr, None)
        if t is not None:
            edits.append((norm, attr, name, 0, torch.full((n_new,), value, dtype=t.dtype, device=t.device)))
    return edits


def _apply_edits(edits: list[Edit], keep: torch.Tensor, n_new: int) -> list[ParamResize]:
    """Replace each tensor by its survivors (``keep`` along the dim) followed by its block of new units."""
    resized = []
    for module, attr, prefix, dim, block in edits:
        old = getattr(module, attr, None)
        if old is None:
            continue
        new = _select_cat(old.detach(), dim, keep, block)
        if isinstance(old, nn.Parameter):
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            if old.grad is not None:
                # A resize between backward and step must not make the next step skip this tensor.
                param.grad = _select_cat(old.grad, dim, keep, _zeros_like_block(old.grad, dim, n_new))
            setattr(module, attr, param)
            resized.append(ParamResize(_join(prefix, attr), old, param, dim, keep.clone(), n_new))
        else:
            setattr(module, attr, new)  # a buffer: the optimizer never sees it
    return resized


def _select_cat(t: torch.Tensor, dim: int, keep: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
    """Survivors of ``t`` along ``dim`` in ``keep`` order, followed by ``block`` (always a fresh tensor)."""
    kept = t.index_select(dim, keep.to(t.device))
    if block is None or block.shape[dim] == 0:
        return kept
    return torch.cat([kept, block.to(dtype=t.dtype, device=t.device)], dim)


def _zeros_like_block(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = n
    return t.new_zeros(shape)


def _set_width_attributes(site: WidthSite, new_width: int) -> None:
    """Keep the modules' size attributes (used by repr, init and some forwards) in step with the weights."""
    p, c = site.producer, site.consumer
    if isinstance(p, nn.Linear):
        p.out_features = new_width
    else:
        p.out_channels = new_width
    if isinstance(c, nn.Linear):
        c.in_features = new_width
    else:
        c.in_channels = new_width
    for norm in site.norms:
        if isinstance(norm, RationalActivation):
            norm.num_units = new_width
        elif isinstance(norm, _CHANNEL_NORMS):
            norm.num_features = new_width
        else:
            norm.normalized_shape = (new_width,)


def _module_names(site: WidthSite, model: nn.Module | None) -> list[str]:
    """Qualified names of producer, norms..., consumer; looked up in ``model`` when the site has none."""
    given = [site.producer_name, *site.norm_names, site.consumer_name]
    modules = [site.producer, *site.norms, site.consumer]
    if len(site.norm_names) != len(site.norms):
        given = [site.producer_name, *([""] * len(site.norms)), site.consumer_name]
    lookup = {id(m): n for n, m in model.named_modules()} if model is not None and not all(given) else {}
    roles = ["producer", *(f"norms.{i}" for i in range(len(site.norms))), "consumer"]
    names = []
    for name, module, role in zip(given, modules, roles):
        if not name:
            # The root module is named "" by named_modules(); its parameters are then "weight", "bias".
            name = lookup.get(id(module), f"{site.name}:{role}")
        names.append(name)
    return names


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr
