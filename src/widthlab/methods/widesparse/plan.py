"""The study-facing builder of the wide & sparse method: ``method: {name: widesparse, base_width: w0}``.

The runner builds the dense model at the run's width w (``model.width``) and hands it here with the
method's options. :func:`build` computes the base count N(w0) from the same architecture at w0,
removes T = N(w) - N(w0) weights by the cap rule (Golubeva et al. 2021, App. B) or the MLP split (§2.3),
draws the masks from the run's seed and returns the sparsified model with :class:`MaskCallback`. The
bottleneck variants (Golubeva et al. 2021, §2.2) rebuild the network instead of masking it.

Dense references in the same study file: sweep the whole ``method`` section, e.g. ::

    model: {name: mlp, width: 4}
    sweep:
      model.width: [4, 8, 16, 32]
      method: [{name: dense}, {name: widesparse, base_width: 4}]

Each sweep value replaces the method section, so the dense runs are ordinary ``dense`` runs (what
the report's width fraction (sparse - base)/(dense - base) looks up) and the sparse family shares
one ``family`` label. The sparse member at w = w0 removes nothing and equals the dense base.

Two options serve the NTK-style family of Fig. 8 (Golubeva et al. 2021, App. A, Fig. 8): ``lr_preset`` picks
the per-width learning rate from a named table (:mod:`.lr_presets`), and ``kernel`` records the exact
and empirical GP-kernel distances of the run's network in its summary (:mod:`.kernel`).
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from widthlab.data.base import TaskData
from widthlab.methods.base import MethodPlan
from widthlab.methods.widesparse.bottleneck import KINDS, bottleneck_member
from widthlab.methods.widesparse.callback import MaskCallback
from widthlab.methods.widesparse.families import allocate, rebuild_at_width
from widthlab.methods.widesparse.kernel import KernelOptions, KernelRecorder, check_kernel_model, split_inputs
from widthlab.methods.widesparse.lr_presets import PresetLR, preset_lr
from widthlab.methods.widesparse.sparsify import INITS, SPARSE_IMPLS, sparsify
from widthlab.models.counting import count_nonzero_weights, count_weights
from widthlab.models.mlp import MLP
from widthlab.models.resnet import ResNet

VARIANTS = ("sparse", *KINDS)


def build(model: nn.Module, data: TaskData, *, seed: int, base_width: int | None = None,
          variant: str = "sparse", fract_cl: float | None = None,
          classifier_connectivity: float | None = None, io_only: bool = False,
          init: str = "fan_in_corrected", sparse_impl: str = "auto", mask_seed: int | None = None,
          bottleneck_match: str = "factorized", lr_preset: str | None = None,
          kernel: dict | bool | None = None) -> MethodPlan:
    """Make the wide & sparse member at the model's width from the family based at ``base_width``.

    Args:
        model: the dense widthlab MLP or ResNet built at the run's width w.
        data: the task (read only by the ``kernel`` option, for its input pairs).
        seed: the run's seed; masks and the fan-in-corrected init draw from it (or ``mask_seed``).
        base_width: w0 <= w, the base whose counted weight count N(w0) every member keeps (required).
        variant: ``"sparse"`` (random static masks, the paper's method), ``"linear_bottleneck"`` or
            ``"nonlinear_bottleneck"`` (ResNet-18 only, Golubeva et al. 2021, §2.2).
        fract_cl: MLP split of Golubeva et al. 2021, §2.3: the classifier loses min(T, floor(N_cl fract_cl))
            weights, the other layers the rest; None uses the cap rule.
        classifier_connectivity: the classifier keeps exactly this fraction of its weights.
        io_only: remove whole kernels ((out, in) channel pairs, Golubeva et al. 2021, §2.3 variant).
        init: ``"fan_in_corrected"`` (the official code's fan-in correction), ``"rescale"`` (keep the model's
            init family, weights x 1/sqrt(c_l)) or ``"none"``.
        sparse_impl: ``"auto"``, ``"masked"`` or ``"csr"`` (see :func:`.sparsify.sparsify`).
        mask_seed: draw the masks from this seed instead of the run's.
        bottleneck_match: the linear bottleneck's target count: ``"factorized"`` (default) the
            factorised base (w0, d_b = min(d_i, d_o)), which has the dense base's functions except that
            its 3x3 stage-entry convs d_i -> 2 d_i are limited to rank d_i (paper §2.2, Fig. 3a; see
            :mod:`widthlab.models.bottleneck`); ``"dense"`` the dense base N(w0), the sparse family's
            count, which rank-constrains even the w = w0 member. ``target_weights`` stays N(w0).
        lr_preset: name of a per-width learning-rate table (e.g. ``"ntk-fig8"``, Golubeva et al. 2021, App.
            A, Fig. 8); its rate for (w0, w) replaces ``train.optimizer.lr`` (:mod:`.lr_presets`).
        kernel: record the GP-kernel distances (one-hidden-layer ReLU MLPs): a mapping of
            :class:`.kernel.KernelOptions` (``pairs``, ``masks``, ``split``, ``pair_seed``,
            ``after_training``), or true for the defaults.

    Returns:
        the plan; its summary holds ``base_width``, ``family``, ``connectivity`` (N(w0)/N(w) for a
        sparse member), ``sparse_impl``, ``target_weights`` N(w0), ``removed_weights`` T,
        ``layers_sparsified``, ``cap``, ``classifier_connectivity`` and ``weight_mismatch`` (for a
        bottleneck member: counted weights minus ``bottleneck_target``, the count it is matched to);
        with ``lr_preset`` also ``lr_preset`` and ``lr``; with ``kernel`` the ``kernel_*`` keys.

    Raises:
        ValueError: a missing or bad option, w < w0, or a budget that cannot be allocated.
    """
    w0 = _positive_int("base_width", base_width)
    _choice("variant", variant, VARIANTS)
    _choice("init", init, INITS)
    _choice("sparse_impl", sparse_impl, SPARSE_IMPLS)
    _choice("bottleneck_match", bottleneck_match, ("dense", "factorized"))
    if not isinstance(io_only, bool):
        raise ValueError(f"option 'io_only' must be true or false, got {io_only!r}")
    for name, v in (("fract_cl", fract_cl), ("classifier_connectivity", classifier_connectivity)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"option {name!r} must be a number, got {v!r}")
    w = model_width(model)
    if w < w0:
        raise ValueError(f"width {w} is below base_width {w0}: a family only widens its base")
    base = rebuild_at_width(model, w0)
    N0, N = count_weights(base), count_weights(model)
    summary: dict[str, Any] = {"base_width": w0, "target_weights": N0,
                               "family": family_label(model, w0, variant, fract_cl, classifier_connectivity,
                                                      io_only)}
    # Checked before any work, so a bad option fails the run at once.
    lr = None if lr_preset is None else preset_lr(str(lr_preset), w, w0)
    kernel_opts = None if kernel is None or kernel is False else KernelOptions.parse(kernel)
    if kernel_opts is not None:
        check_kernel_model(model)
    if variant != "sparse" and (lr is not None or kernel_opts is not None):
        raise ValueError(f"options 'lr_preset' and 'kernel' are for the sparse variant, not {variant!r}")
    if variant != "sparse":
        new, sizes = bottleneck_member(model, w0, variant, bottleneck_match)
        summary.update(connectivity=sizes.counted / N, sparse_impl="dense", removed_weights=N - sizes.counted,
                       weight_mismatch=sizes.mismatch, bottleneck_target=sizes.target,
                       bottleneck_dims=sizes.dims)
        return MethodPlan(new, [], summary)
    alloc = allocate(model, N0, fract_cl=None if fract_cl is None else float(fract_cl),
                     classifier_connectivity=None if classifier_connectivity is None
                     else float(classifier_connectivity))
    removals = {n: k for n, k in alloc.removals.items() if k}
    result = sparsify(model, removals, seed=seed if mask_seed is None else int(mask_seed), io_only=io_only,
                      init=init, sparse_impl=sparse_impl)
    nonzero = count_nonzero_weights(model)
    cl = list(alloc.sizes)[-1]
    summary.update(connectivity=nonzero / N, sparse_impl=result.impl, removed_weights=result.removed,
                   layers_sparsified=alloc.m, layers=len(alloc.sizes), cap=alloc.cap,
                   classifier_connectivity=1.0 - alloc.removals[cl] / alloc.sizes[cl],
                   weight_mismatch=nonzero - N0)
    callbacks: list[Any] = [MaskCallback(removals)]
    if lr is not None:
        summary.update(lr_preset=str(lr_preset), lr=lr)
        callbacks.append(PresetLR(lr))
    if kernel_opts is not None:
        # The recorder fills this same summary dict during the fit; the runner merges it afterwards.
        callbacks.append(KernelRecorder(summary, split_inputs(data, kernel_opts.split), kernel_opts,
                                        seed=seed, init=init))
    return MethodPlan(model, callbacks, summary)


def model_width(model: nn.Module) -> int:
    """The nominal width w of a widthlab MLP (its common hidden width) or ResNet (stem channels)."""
    if getattr(model, "widthlab_width", None) is not None:  # model custom (widthlab.models.custom)
        return int(model.widthlab_width)
    cfg = getattr(model, "config", None)
    if isinstance(model, MLP) and len(set(cfg.widths)) == 1:
        return int(cfg.widths[0])
    if isinstance(model, ResNet):
        return int(cfg.width)
    raise ValueError(f"widesparse needs a widthlab MLP of equal hidden widths or a ResNet, got "
                     f"{type(model).__name__}; for other models use "
                     f"widthlab.methods.widesparse.sparsify directly")


def family_label(model: nn.Module, base_width: int, variant: str = "sparse", fract_cl: float | None = None,
                 classifier_connectivity: float | None = None, io_only: bool = False) -> str:
    """A string shared by the members of one family: architecture, base width, allocation variant."""
    parts = [f"{_arch(model)}-w0={base_width}"]
    if variant != "sparse":
        parts.append(variant)
    if fract_cl is not None:
        parts.append(f"fract_cl={fract_cl:g}")
    if classifier_connectivity is not None:
        parts.append(f"c_cl={classifier_connectivity:g}")
    if io_only:
        parts.append("io_only")
    return "-".join(parts)


def _arch(model: nn.Module) -> str:
    if isinstance(model, MLP):
        return "mlp"
    if isinstance(model, ResNet):
        cfg = model.config
        if cfg.stem == "imagenet":
            return "resnet18_imagenet"
        return "resnet20" if tuple(cfg.blocks) == (3, 3, 3) else "resnet18"
    return type(model).__name__.lower()


def _positive_int(name: str, v: object) -> int:
    if v is None:
        raise ValueError(f"widesparse needs option {name!r} (the width whose weight count the family keeps)")
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"option {name!r} must be a positive int, got {v!r}")
    return int(v)


def _choice(name: str, v: object, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ValueError(f"option {name!r} must be one of {', '.join(choices)}; got {v!r}")
