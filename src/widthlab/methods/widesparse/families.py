"""Families at a fixed weight count: from a base width w0 and widths w > w0 (Golubeva et al. 2021, §2).

Each wide & sparse member is the dense width-w network with exactly T = N(w) - N(w0) counted
weights removed, so it holds exactly N(w0) nonzero counted weights; the dense members of the same
widths are the reference. Counting uses ``meta``-device models, so ImageNet widths (180M weights at
w = 256) cost no memory; only :func:`build_member` allocates a real network.

A member's allocation is the cap rule (§3.2) unless the classifier's removals are fixed, which is
the MLP split of §3.6 (``fract_cl``, official) or an explicit classifier connectivity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from widthlab.methods.widesparse.budget import Allocation, BudgetError, cap_allocation, fixed_allocation
from widthlab.methods.widesparse.sparsify import Init, SparseImpl, SparsifyResult, sparsify
from widthlab.models import create_model
from widthlab.models.counting import count_weights, counted_layers
from widthlab.models.mlp import MLP
from widthlab.models.resnet import ResNet

Builder = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Member:
    """One network of a family (sizes only; build it with :func:`build_member`).

    Attributes:
        width: w.
        kind: ``"sparse"`` (N(w0) nonzero weights) or ``"dense"`` (all N(w)).
        counted: N(w), the dense weight count at this width.
        nonzero: nonzero counted weights: N(w0) for a sparse member, N(w) for a dense one.
        allocation: k_l per layer for a sparse member; None for a dense one.
    """

    width: int
    kind: str
    counted: int
    nonzero: int
    allocation: Allocation | None = None

    @property
    def connectivity(self) -> float:
        """c = nonzero / N(w) = N(w0) / N(w) for a sparse member."""
        return self.nonzero / self.counted


def rebuild_at_width(model: nn.Module, width: int, *, device: str | torch.device = "meta") -> nn.Module:
    """The same architecture as ``model`` at another width, built on ``device`` (meta: no memory).

    Supports widthlab's MLP (all hidden widths equal) and ResNet models, read from their configs.

    Raises:
        ValueError: a model whose width cannot be changed this way (a user's own module: pass a
            builder to :func:`family` instead).
    """
    cfg = getattr(model, "config", None)
    with torch.device(device):
        if callable(getattr(model, "widthlab_rebuild", None)):  # model custom: the user's function again
            return model.widthlab_rebuild(width)
        if isinstance(model, MLP) and cfg is not None:
            if len(set(cfg.widths)) != 1:
                raise ValueError(f"MLP hidden widths {cfg.widths} differ: a single base width does not "
                                 f"define its base")
            return MLP(dataclasses.replace(cfg, widths=(width,) * len(cfg.widths)))
        if type(model) is ResNet and cfg is not None:
            return ResNet(dataclasses.replace(cfg, width=width))
    raise ValueError(f"cannot rebuild a {type(model).__name__} at another width; build the family from "
                     f"a builder (widthlab.methods.widesparse.families.family)")


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """N_l per counted layer, in module order (works on meta models)."""
    return {name: int(m.weight.numel()) for name, m in counted_layers(model)}


def classifier_name(model: nn.Module) -> str:
    """The last counted layer in module order: the output Linear of widthlab's MLPs and ResNets."""
    names = list(layer_sizes(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no counted layers")
    return names[-1]


def allocate(model: nn.Module, N0: int, *, fract_cl: float | None = None,
             classifier_connectivity: float | None = None) -> Allocation:
    """Removals that bring ``model`` (at width w) down to exactly ``N0`` counted weights.

    Args:
        model: the dense member at width w (a meta model is fine).
        N0: N(w0), the base's counted weights.
        fract_cl: MLP split (Golubeva et al. 2021, §2.3): the classifier loses k_cl = min(T, floor(N_cl
            fract_cl)), the other layers share the rest by the cap rule.
        classifier_connectivity: the classifier keeps exactly round(c N_cl) weights (an error if
            that removes more than T); the other layers share the rest.

    Raises:
        BudgetError: T < 0, or T cannot be allocated (the message gives Lambda and the numbers).
    """
    if fract_cl is not None and classifier_connectivity is not None:
        raise ValueError("give fract_cl or classifier_connectivity, not both")
    sizes = layer_sizes(model)
    T = sum(sizes.values()) - int(N0)
    if fract_cl is None and classifier_connectivity is None:
        return cap_allocation(sizes, T)
    cl = classifier_name(model)
    N_cl = sizes[cl]
    if fract_cl is not None:
        if not 0.0 <= fract_cl < 1.0:
            raise BudgetError(f"fract_cl must be in [0, 1), got {fract_cl}")
        k_cl = min(T, int(N_cl * fract_cl))
    else:
        if not 0.0 < classifier_connectivity <= 1.0:
            raise BudgetError(f"classifier_connectivity must be in (0, 1], got {classifier_connectivity}")
        k_cl = N_cl - round(classifier_connectivity * N_cl)
        if k_cl > T:
            raise BudgetError(f"classifier_connectivity={classifier_connectivity} removes {k_cl:,} "
                              f"classifier weights but only T = {T:,} are to be removed")
    return fixed_allocation(sizes, T, {cl: max(0, k_cl)})


def family(builder: Builder, base_width: int, widths: Sequence[int], *, dense: bool = True,
           fract_cl: float | None = None, classifier_connectivity: float | None = None) -> list[Member]:
    """The sparse members (and, with ``dense``, the dense members) of a family, sizes only.

    Args:
        builder: ``width -> model``; called under ``torch.device("meta")``.
        base_width: w0.
        widths: member widths (>= w0; the base itself has T = 0).
        dense: also list the dense member of each width (and the base).
        fract_cl, classifier_connectivity: see :func:`allocate`.

    Returns:
        dense base first, then for each width its sparse and (optionally) dense member.
    """
    with torch.device("meta"):
        base = builder(base_width)
        N0 = count_weights(base)
        out = [Member(base_width, "dense", N0, N0)] if dense else []
        for w in widths:
            if w < base_width:
                raise BudgetError(f"width {w} < base width {base_width}")
            m = builder(w)
            N = count_weights(m)
            alloc = allocate(m, N0, fract_cl=fract_cl, classifier_connectivity=classifier_connectivity)
            out.append(Member(w, "sparse", N, N0, alloc))
            if dense and w != base_width:
                out.append(Member(w, "dense", N, N))
    return out


def model_builder(name: str, *, input_shape: Sequence[int], num_outputs: int, **options) -> Builder:
    """``width -> create_model(name, width=width, ...)`` for a registered model."""
    def build(width: int) -> nn.Module:
        return create_model(name, input_shape=input_shape, num_outputs=num_outputs, width=width, **options)
    return build


def build_member(builder: Builder, base_width: int, width: int, *, seed: int, io_only: bool = False,
                 init: Init = "fan_in_corrected", sparse_impl: SparseImpl = "masked",
                 fract_cl: float | None = None, classifier_connectivity: float | None = None,
                 ) -> tuple[nn.Module, Allocation, SparsifyResult]:
    """Build the sparse member at ``width`` for real: a dense model, its allocation, its masks.

    The model is built with torch's global generator as it stands (seed it first for a reproducible
    dense init); masks and the fan-in-corrected re-initialisation draw from ``seed``.
    """
    with torch.device("meta"):
        N0 = count_weights(builder(base_width))
    model = builder(width)
    alloc = allocate(model, N0, fract_cl=fract_cl, classifier_connectivity=classifier_connectivity)
    result = sparsify(model, {n: k for n, k in alloc.removals.items() if k}, seed=seed, io_only=io_only,
                      init=init, sparse_impl=sparse_impl)
    return model, alloc, result
