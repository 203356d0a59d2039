"""Wide & sparse: wider networks with the same number of weights (Golubeva et al. 2021).

Library use::

    from widthlab.methods.widesparse import allocate, sparsify, rebuild_at_width
    alloc = allocate(model, N0)                      # cap rule (§3.2): k_l per layer, sum = T
    sparsify(model, alloc.removals, seed=0)          # exact-k masks (§3.3), fan-in init (§3.4)

Studies use ``method: {name: widesparse, base_width: w0}`` (:func:`.plan.build`); during training
:class:`MaskCallback` keeps the masked weights exactly zero (§3.5). For the NTK-style family of Fig. 8,
``lr_preset`` picks per-width learning rates (§6.2) and ``kernel`` records the GP-kernel distances
(§5.5) of each run.
"""

from widthlab.methods.widesparse.budget import (
    Allocation,
    BudgetError,
    cap_allocation,
    fixed_allocation,
    mlp_split,
    mlp_split_grid,
)
from widthlab.methods.widesparse.callback import MaskCallback
from widthlab.methods.widesparse.families import (
    Member,
    allocate,
    build_member,
    family,
    model_builder,
    rebuild_at_width,
)
from widthlab.methods.widesparse.kernel import KernelOptions, KernelRecorder
from widthlab.methods.widesparse.lr_presets import LR_PRESETS, PresetLR, preset_lr
from widthlab.methods.widesparse.masks import layer_generator, random_mask
from widthlab.methods.widesparse.sparsify import SparsifyResult, sparsify

__all__ = [
    "LR_PRESETS",
    "Allocation",
    "BudgetError",
    "KernelOptions",
    "KernelRecorder",
    "MaskCallback",
    "Member",
    "PresetLR",
    "SparsifyResult",
    "allocate",
    "build_member",
    "cap_allocation",
    "family",
    "fixed_allocation",
    "layer_generator",
    "mlp_split",
    "mlp_split_grid",
    "model_builder",
    "preset_lr",
    "random_mask",
    "rebuild_at_width",
    "sparsify",
]
