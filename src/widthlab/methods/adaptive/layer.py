"""The adaptive part of one hidden layer: rescaling by the importance vector, and its width site.

A hidden layer of an adaptive network computes (Errica et al. 2025, Sec. 3, the rescaling)::

    pre = W_l h + b_l ;  a = act(pre) ;  h = a ⊙ p_l  (;  h = act_outer(h) )

where p_l is the importance vector of the layer's distribution over its *live* width D_l, read from the
tensor's shape: the forward pass never asks the device for lam, so it never synchronises. Changing D_l is
the job of the controller (``controller.py``), which compares the width the distribution asks for with
the live one once per optimizer step and commits the change through the core width surgery.

:class:`AdaptiveScale` is the ⊙ p_l step; :class:`AdaptiveSite` ties it to the
:class:`~widthlab.nn.resize.WidthSite` (producer W_l, consumer W_{l+1}) whose units it scales, or to a
:class:`~widthlab.nn.discovery.WidthGroup` of widths that change together (a residual stream). widthlab's
adaptive models expose ``adaptive_sites() -> list[AdaptiveSite]``; in any other model made adaptive by
:func:`widthlab.methods.adaptive.any_model.make_adaptive` each width's scale is a submodule
``adaptive_scale`` of its (first) producer and knows its site (``entry``), which :func:`collect_sites`
reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from widthlab.methods.adaptive.distributions import ImportanceDistribution, scale_along
from widthlab.nn.discovery import WidthGroup
from widthlab.nn.resize import WidthSite

# How new units are drawn when a site grows (callback.py): "normal" is the paper's N(0, 1) (Sec. 3, growth);
# "kaiming" (U(±1/sqrt(fan_in)) in, Kaiming+ std out) suits the convolution channels we add beyond it.
GROW_INITS = ("normal", "kaiming", "zeros")


class AdaptiveScale(nn.Module):
    """Multiply the units of a layer by their importance p (Errica et al. 2025, Sec. 3), along axis ``dim``.

    Args:
        distribution: the layer's importance distribution (owns the learnable lam).
        k: the quantile that sets the width, D = floor(q_k) + 2 (0.9 everywhere in the paper).
        dim: the unit axis of the activations (-1 for Linear layers, 1 for conv channels).

    Attributes:
        support: None (normalise p over the live width), or an int >= width: normalise over that many
            units and use the first ``width`` entries -- truncation without renormalisation (Sec. 5).
        unit_mask: None, or a (width,) 0/1 tensor of units to silence: used by the truncation curves to
            remove arbitrary (e.g. random) units without moving the survivors' importances.
        renormalize_mask: with ``unit_mask``, renormalise p over the surviving units.
        adapt: False freezes lam and drops the rescaling: a plain layer of its current width (the
            official ``disable_adaptation``).
    """

    def __init__(self, distribution: ImportanceDistribution, k: float = 0.9, dim: int = -1):
        super().__init__()
        if not 0 < k < 1:
            raise ValueError(f"k must lie in (0, 1), got {k}")
        self.dist = distribution
        self.k = float(k)
        self.dim = dim
        self.support: int | None = None
        self.unit_mask: torch.Tensor | None = None
        self.renormalize_mask = False
        self.adapt = True

    def importance(self, D: int) -> torch.Tensor:
        """p over D units, with truncation ``support`` and ``unit_mask`` applied."""
        p = self.dist.importance(D, self.support)
        if self.unit_mask is not None:
            p = p * self.unit_mask.to(p)
            if self.renormalize_mask:
                p = p / p.sum()
        return p

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.rescale(a, self.dim) if self.adapt else a

    def rescale(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t ⊙ p along axis ``dim`` of ``t``, whose length is the layer's width: the activations
        (``dim`` = the unit axis) or the consumer's weight (W_{l+1} diag(p), ``dim`` = -1)."""
        if self.unit_mask is None:
            return self.dist.scale(t, dim, self.support)
        return scale_along(t, self.importance(t.shape[dim]), dim)

    def scale_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Forward pre-hook form: scale a consumer layer's input (``consumer.register_forward_pre_hook``).

        A bound method, so that deep copies of a model re-bind the hook to the copied scale.
        """
        return (self(args[0]), *args[1:])

    def target_width(self) -> torch.Tensor:
        """The width lam asks for, D = floor(q_k) + 2, as a device tensor (no sync)."""
        return self.dist.width_tensor(self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}"


@dataclass(frozen=True, eq=False)
class AdaptiveSite:
    """One adaptive width: the scale that weighs its units and the width site that holds them.

    Attributes:
        name: the width's label in records (``"hidden.0"``, ``"head.hidden.0"``, ``"enc.3.ffn.hidden.0"``).
        scale: the :class:`AdaptiveScale` applied to the site's units.
        site: producer -> (norms) -> consumer, for width surgery; for a group, its first producer and
            first consumer (the width is read from them).
        grow_init: how new units are drawn (one of :data:`GROW_INITS`).
        group: None for a single site; else every producer, norm and consumer sharing this width,
            resized together (``nn.group_surgery.resize_group``).
    """

    name: str
    scale: AdaptiveScale
    site: WidthSite
    grow_init: str = "normal"
    group: WidthGroup | None = None

    @property
    def width(self) -> int:
        return self.site.width


def prefixed(site: WidthSite, prefix: str, name: str | None = None) -> WidthSite:
    """``site`` with its label and module names qualified by ``prefix`` (a submodule's name)."""
    if not prefix:
        return site

    def q(n: str) -> str:
        return f"{prefix}.{n}" if n else prefix

    return WidthSite(name=name or f"{prefix}.{site.name}", producer=site.producer, consumer=site.consumer,
                     norms=site.norms, producer_name=q(site.producer_name),
                     consumer_name=q(site.consumer_name), norm_names=tuple(q(n) for n in site.norm_names))


def prefixed_sites(sites: list[AdaptiveSite], prefix: str, label: str | None = None) -> list[AdaptiveSite]:
    """Qualify the sites of a submodule called ``prefix``; their labels get ``label`` (default: the
    same prefix) in front."""
    if not prefix:
        return sites
    label = label or prefix
    if any(s.group is not None for s in sites):
        raise ValueError("prefixed_sites: groups carry module names of the model they were found in")
    return [AdaptiveSite(f"{label}.{s.name}", s.scale, prefixed(s.site, prefix, f"{label}.{s.name}"),
                         s.grow_init) for s in sites]


# The submodule name, on a width's (first) producer, of a scale inserted by make_adaptive. A submodule
# of the producer, not of the model, so that containers iterating their children (nn.Sequential) are
# unaffected.
ATTACHED = "adaptive_scale"


def attached_sites(model: nn.Module) -> list[AdaptiveSite]:
    """The sites of the scales :func:`~widthlab.methods.adaptive.any_model.make_adaptive` inserted."""
    out = []
    for m in model.modules():
        entry = getattr(m, "entry", None) if isinstance(m, AdaptiveScale) else None
        if isinstance(entry, AdaptiveSite):
            out.append(entry)
    return out


def collect_sites(model: nn.Module) -> list[AdaptiveSite]:
    """The adaptive sites of ``model``: its ``adaptive_sites()``, or those :func:`make_adaptive
    <widthlab.methods.adaptive.any_model.make_adaptive>` inserted."""
    fn = getattr(model, "adaptive_sites", None)
    if callable(fn):
        return list(fn())
    sites = attached_sites(model) if isinstance(model, nn.Module) else []
    if not sites:
        raise TypeError(f"{type(model).__name__} has no adaptive sites; make it adaptive with "
                        "widthlab.AdaptiveWidth(model, optimizer, example_inputs) or build an adaptive "
                        "architecture (widthlab.methods.adaptive)")
    return sites


def share_width_distribution(model: nn.Module) -> ImportanceDistribution:
    """Make every adaptive site of ``model`` use one importance distribution: one lam for all layers.

    The paper's variational model gives each adaptive layer its own latent lam_l; its official code
    offers a switch (``share_width_distribution``, off in every published configuration) under which
    all layers share one. The first site's distribution becomes every site's, so all widths follow the
    same D(lam), lam receives the sum of the gradients each layer sends it, and the lam prior counts it
    once. Done in place, before training (an optimizer built earlier would keep the dropped parameters).

    Returns:
        The shared distribution.

    Raises:
        ValueError: no adaptive site, or sites of different families, quantiles or current widths
            (e.g. adaptive convolution channels started at the trunk's widths).
    """
    sites = collect_sites(model)
    if not sites:
        raise ValueError("share_width_distribution: the model has no adaptive site")
    shared = sites[0].scale.dist
    for s in sites[1:]:
        other = s.scale
        if (other.dist.family, other.k, s.width) != (shared.family, sites[0].scale.k, sites[0].width):
            raise ValueError(
                f"share_width_distribution: site {s.name!r} ({other.dist.family}, k={other.k}, width "
                f"{s.width}) differs from {sites[0].name!r} ({shared.family}, k={sites[0].scale.k}, "
                f"width {sites[0].width}); one distribution needs sites of one family, k and width")
    for s in sites[1:]:
        s.scale.dist = shared
    return shared


def distribution_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of all importance distributions (lam's r, ...) of ``model``."""
    seen, out = set(), []
    for s in collect_sites(model):
        for p in s.scale.dist.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
