"""Make any ``nn.Module`` adaptive-width: importance rescaling at its discovered width sites.

Errica et al. (2025, Sec. 3) multiply each unit j of an adaptive layer by its importance f_l(j):
h_j = act(W_l h + b_l)_j f_l(j), so that low indices matter most and units grow or vanish at the
unimportant tail. :func:`make_adaptive` does this to a model it did not build:

* the widths come from the model's own ``width_sites()`` or from ``torch.fx`` discovery
  (:func:`widthlab.nn.discovery.discover`): every single producer -> (norms, element-wise ops) ->
  consumer chain, or, when named, a group of widths that change together (a residual stream);
* each width gets an :class:`~widthlab.methods.adaptive.layer.AdaptiveScale` holding its distribution
  (lam_l), applied as a forward pre-hook of every consumer of the width: the consumer reads h ⊙ p. That
  is the paper's rescaling when the units reach the consumer through per-unit operations only (what
  discovery guarantees), and for a residual stream it weighs the stream wherever a layer reads it;
* each scale is a submodule ``adaptive_scale`` of its width's (first) producer (e.g. ``"0.adaptive_scale"``
  in an ``nn.Sequential``), so lam's parameters are part of ``model.parameters()`` and ``state_dict()``
  while containers that call their children in turn are unaffected;
* the consumers are re-initialised for inputs scaled by p (Kaiming+, Sec. 3: N(0, 2 / sum p^2)), or
  rescaled by 1/p so that the model computes the same function as before (``consumer_init="preserve"``,
  for a trained model), or left alone.

:func:`fold_adaptive` undoes it: p is folded into the consumers' weights (W diag(p)) and the hooks and
scales are removed, leaving a plain model of the learned widths that computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from widthlab.methods.adaptive.distributions import make_distribution
from widthlab.methods.adaptive.layer import ATTACHED, GROW_INITS, AdaptiveScale, AdaptiveSite, attached_sites
from widthlab.methods.adaptive.resizing import set_width
from widthlab.nn.discovery import Discovery, DiscoveryError, WidthGroup, discover
from widthlab.nn.optim_surgery import remap_optimizer
from widthlab.nn.resize import ResizeEvent, WidthSite

CONSUMER_INITS = ("kaiming_plus", "preserve", "none")

__all__ = ["CONSUMER_INITS", "add_missing_parameters", "fold_adaptive", "make_adaptive"]


class _ScaleInput:
    """Forward pre-hook of a consumer: its input's units (axis ``dim``) times the importance p."""

    def __init__(self, scale: AdaptiveScale, dim: int):
        self.scale, self.dim = scale, dim

    def __call__(self, module: nn.Module, args: tuple):
        if not self.scale.adapt:
            return None
        return (self.scale.rescale(args[0], self.dim), *args[1:])


def _unit_axis(consumer: nn.Module) -> int:
    return -1 if isinstance(consumer, nn.Linear) else 1  # Linear: last axis; Conv: channels


def _group_site(model: nn.Module, group: WidthGroup) -> WidthSite:
    """A site standing for a group: its first producer and consumer (the width is read from them)."""
    consumer = next(c for c in group.consumers if c != group.producers[0])
    return WidthSite(group.name, model.get_submodule(group.producers[0]), model.get_submodule(consumer), (),
                     group.producers[0], consumer)


def _choose(model: nn.Module, example_inputs, names: Sequence[str] | None, leaf_modules
            ) -> list[tuple[WidthSite, WidthGroup | None]]:
    declared = list(model.width_sites()) if callable(getattr(model, "width_sites", None)) else None
    by_name = {s.name: s for s in declared or ()}
    found: Discovery | None = None

    def found_() -> Discovery:
        nonlocal found
        if found is None:
            if example_inputs is None:
                raise DiscoveryError(f"{type(model).__name__} declares no width_sites(): pass an example "
                                     "input (one batch) so that its width sites can be discovered")
            found = discover(model, example_inputs, leaf_modules=leaf_modules)
        return found

    if names is None:
        if declared is not None:
            return [(s, None) for s in declared]
        f = found_()
        if not f.sites:
            hint = (f"; name a group to adapt it (sites=[{', '.join(repr(g.name) for g in f.groups)}])"
                    if f.groups else "")
            fixed = "; ".join(f"{', '.join(x.producers)}: {x.reasons[0]}" for x in f.fixed[:3])
            raise DiscoveryError(f"{type(model).__name__} has no width site of its own to adapt{hint}"
                                 + (f" (fixed widths: {fixed})" if fixed else ""))
        return [(s, None) for s in f.sites]
    if isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        if n in by_name:
            out.append((by_name[n], None))
            continue
        group = next((g for g in found_().groups if g.name == n), None)
        out.append((_group_site(model, group), group) if group else (found_().site(n), None))
    if len({s.name for s, _ in out}) != len(out):
        raise ValueError(f"sites: a width is named twice in {list(names)}")
    return out


def _distribution(width: int, lambda0: float | None, k: float, distribution: str, options, boundary):
    if distribution != "exponential":
        if lambda0 is not None:
            raise ValueError(f"lambda0 is the exponential's rate; distribution {distribution!r} starts from "
                             "its distribution_options")
        return make_distribution(distribution, boundary=boundary, options=options)
    if lambda0 is None:
        # D(lam) = floor(c / lam) + 2 with c = -ln(1 - k) (Sec. 3): c / (w - 1.5) starts at D = w.
        lambda0 = -math.log1p(-k) / (max(width, 2) - 1.5)
    return make_distribution("exponential", lam0=float(lambda0), boundary=boundary, options=options)


@torch.no_grad()
def _init_consumer(consumer: nn.Module, p: torch.Tensor, how: str, generator: torch.Generator) -> None:
    if how == "kaiming_plus":
        # Kaiming+ (Sec. 3): inputs a ⊙ p have variance sum(p^2) E[a^2] instead of fan_in E[a^2], so the
        # weights get N(0, 2 / (sum p^2 · kernel area)); drawn on the CPU from the seeded generator.
        w = consumer.weight
        std = math.sqrt(2.0 / (float((p.detach().double() ** 2).sum()) * math.prod(w.shape[2:])))
        w.copy_(torch.randn(w.shape, generator=generator, dtype=torch.float32) * std)
    elif how == "preserve":
        w = consumer.weight
        w.div_(p.to(w).reshape(1, -1, *([1] * (w.dim() - 2))))


def make_adaptive(model: nn.Module, example_inputs: torch.Tensor | tuple | None = None, *,
                  sites: Sequence[str] | None = None, lambda0: float | None = None, k: float = 0.9,
                  distribution: str = "exponential", distribution_options: dict | None = None,
                  boundary: float | None = None, consumer_init: str = "kaiming_plus",
                  grow_init: str = "kaiming", leaf_modules: Sequence[type] = (), optimizer_mode: str = "keep",
                  generator: torch.Generator | None = None) -> tuple[list[AdaptiveSite], list[ResizeEvent]]:
    """Insert the importance rescaling into ``model`` (in place) at its width sites.

    Args:
        model: any ``nn.Module``; its own ``width_sites()`` are used when it declares them, else sites
            are discovered by tracing it on ``example_inputs`` (``torch.fx``; no branching on values).
        example_inputs: one batch, a tensor or a tuple of the forward's positional inputs.
        sites: names of the widths to adapt: site names (the producer's module name, e.g. ``"ff.0"``) or
            group names (e.g. ``"conv1+2"``: a residual stream, its blocks resized together); None:
            every single site.
        lambda0: initial rate of every exponential; None starts each width at its current size
            (lam0 = c / (w - 1.5), c = -ln(1 - k), so that D(lam0) = w). A given rate resizes every width
            to D(lam0) at once (0.01 -> 232 units, the paper's start).
        k: the width quantile, D = floor(q_k) + 2 (0.9 in the paper).
        distribution, distribution_options, boundary: the importance family (``exponential``,
            ``power_law``, ``uniform``, ``sigmoid``), its options, and the exponential's rate floor.
        consumer_init: ``"kaiming_plus"`` (the paper's init of a layer reading rescaled units, Sec. 3:
            N(0, 2 / (sum p^2 · kernel area))), ``"preserve"`` (W / p: the model computes the same
            function as before, for a trained model) or ``"none"``.
        grow_init: how units added later are drawn: ``"kaiming"`` (incoming as PyTorch's default init,
            outgoing at the Kaiming+ std; the default, as convolution channels need), ``"normal"``
            (N(0, 1) both ways, the paper's for its MLPs) or ``"zeros"``.
        leaf_modules: module classes discovery treats as opaque.
        optimizer_mode: recorded on the initial resize events (``"keep"`` or ``"reset"``).
        generator: random source of the Kaiming+ draws.

    Returns:
        (the adaptive sites, the resize events of the initial resize to D(lam0); empty when
        ``lambda0`` is None).

    Raises:
        DiscoveryError: the model cannot be traced (naming the module) or a named width cannot be
            adapted (with the reason: tied to others, the model's output...).
        ValueError: a bad option, or a model that is already adaptive.
    """
    if callable(getattr(model, "adaptive_sites", None)) or any(isinstance(m, AdaptiveScale)
                                                                  for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already adaptive")
    if consumer_init not in CONSUMER_INITS:
        raise ValueError(f"consumer_init must be one of {', '.join(CONSUMER_INITS)}, got {consumer_init!r}")
    if grow_init not in GROW_INITS:
        raise ValueError(f"grow_init must be one of {', '.join(GROW_INITS)}, got {grow_init!r}")
    if not 0 < k < 1:
        raise ValueError(f"k must lie in (0, 1), got {k}")
    chosen = _choose(model, example_inputs, sites, leaf_modules)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    entries = []
    for site, _ in chosen:
        if ATTACHED in site.producer._modules:
            raise ValueError(f"site {site.name!r}: its producer already has a submodule {ATTACHED!r}")
    for site, group in chosen:
        dist = _distribution(site.width, lambda0, k, distribution, distribution_options, boundary)
        dist.to(site.producer.weight.device)
        consumers = ([model.get_submodule(n) for n in group.consumers] if group is not None
                     else [site.consumer])
        scale = AdaptiveScale(dist, k=k, dim=_unit_axis(consumers[0]))
        scale.entry = AdaptiveSite(site.name, scale, site, grow_init, group)  # found by collect_sites
        site.producer.add_module(ATTACHED, scale)
        entries.append(scale.entry)
    # Bring every width to D(lam0), then initialise the consumers for the importances of that width.
    events = []
    for asite in entries:
        D = int(asite.scale.dist.width(k))
        if asite.width != D:
            events.append(set_width(asite, D, model=model, generator=generator,
                                    optimizer_mode=optimizer_mode))
    for asite in entries:
        consumers = ([model.get_submodule(n) for n in asite.group.consumers] if asite.group is not None
                     else [asite.site.consumer])
        with torch.no_grad():
            p = asite.scale.importance(asite.width)
        for c in consumers:
            _init_consumer(c, p, consumer_init, generator)
            c.register_forward_pre_hook(_ScaleInput(asite.scale, _unit_axis(c)))
    return entries, events


def add_missing_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Put the trainable parameters of ``model`` that ``optimizer`` lacks (lam's, after
    :func:`make_adaptive`) into its first param group with empty state, as the paper trains lam with
    the weights."""

    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    added = tuple((n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in held)
    if added:
        remap_optimizer(optimizer, ResizeEvent(added=added), added_group=0)


@torch.no_grad()
def fold_adaptive(model: nn.Module) -> nn.Module:
    """Fold each importance vector into its consumers' weights (W diag(p)) and remove the rescaling:
    ``model`` becomes a plain network of its learned widths computing the same function (in place).

    Returns:
        The model, without the ``adaptive_scale`` submodules (hence without lam's parameters).
    """
    sites = attached_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} was not made adaptive by make_adaptive")
    for asite in sites:
        consumers = ([model.get_submodule(n) for n in asite.group.consumers] if asite.group is not None
                     else [asite.site.consumer])
        p = asite.scale.importance(asite.width) if asite.scale.adapt else None
        for c in consumers:
            for key, hook in list(c._forward_pre_hooks.items()):
                if isinstance(hook, _ScaleInput) and hook.scale is asite.scale:
                    del c._forward_pre_hooks[key]
            if p is not None:
                w = c.weight
                w.mul_(p.to(w).reshape(1, -1, *([1] * (w.dim() - 2))))
        del asite.site.producer._modules[ATTACHED]
    return model
