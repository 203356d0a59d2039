"""Named per-width learning-rate presets: ``method: {name: widesparse, lr_preset: ntk-fig8}``.

Why a method option: a sweep is a grid, so one ``train.optimizer.lr`` cannot follow ``model.width``;
the wide & sparse method knows both the width w and the family's base width w0, which is what the
tables are keyed by. The preset's value *replaces* ``train.optimizer.lr`` (the optimizer type,
momentum, weight decay and schedule still come from ``train``), and the run's summary records it
as ``lr`` with ``lr_preset``.

``ntk-fig8`` is the table of the NTK-style MLP of Fig. 8 (Golubeva et al. 2021, App. A, Fig. 8, from the
official file ``optimized_LR_for_NTK_style_MLP1.pt``, tuned per width by the authors): one table for dense
nets and one per base width for the sparse family. A family member at w = w0 removes nothing and
is the dense base, so it gets the dense rate. Widths not in a table are an error, never an
interpolation: the rates were tuned, not derived.

Spelling: ``NAME`` picks the table from the run (dense at w = w0, else the sparse table of base w0);
``NAME:dense`` or ``NAME:sparse-w0=8`` name the table explicitly, for a family whose base differs
from the one the rates were tuned at (``widesparse-kernel-digits`` uses Fig. 8's widths from base
86 with ``ntk-fig8:sparse-w0=8``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

SPARSE_PREFIX = "sparse-w0="
# preset -> {"dense": {width: lr}, "sparse": {base_width: {width: lr}}}
LR_PRESETS: dict[str, dict[str, Any]] = {
    "ntk-fig8": {
        "dense": {8: 5.0, 32: 80.0, 128: 173.0, 216: 228.0, 328: 306.0, 512: 445.0, 635: 460.0},
        "sparse": {8: {32: 136.0, 128: 260.0, 216: 361.0, 328: 491.0, 512: 736.0, 635: 875.0}},
    },
}


def preset_lr(name: str, width: int, base_width: int | None = None) -> float:
    """The learning rate of preset ``name`` for a dense net (``base_width`` None or equal to
    ``width``) or for the sparse member at ``width`` of the family based at ``base_width``; a name
    with an explicit table (module docstring) ignores ``base_width``.

    Raises:
        ValueError: unknown preset or table, or a width the table has no rate for (the message lists
            the widths it has).
    """
    preset_name, _, table_name = name.partition(":")
    if preset_name not in LR_PRESETS:
        raise ValueError(f"unknown lr_preset {preset_name!r}; known: {', '.join(sorted(LR_PRESETS))}")
    preset = LR_PRESETS[preset_name]
    if not table_name:
        w0 = None if base_width is None or width == base_width else int(base_width)
    elif table_name == "dense":
        w0 = None
    elif table_name.startswith(SPARSE_PREFIX) and table_name[len(SPARSE_PREFIX):].isdigit():
        w0 = int(table_name[len(SPARSE_PREFIX):])
    else:
        raise ValueError(f"lr_preset {name!r}: the table after ':' must be 'dense' or "
                         f"'{SPARSE_PREFIX}<base width>'")
    if w0 is None:
        table, what = preset["dense"], "dense nets"
    elif w0 in preset["sparse"]:
        table, what = preset["sparse"][w0], f"the sparse family at base width {w0}"
    else:
        raise ValueError(f"lr_preset {name!r} has no sparse family at base width {w0}; base widths: "
                         f"{', '.join(map(str, sorted(preset['sparse'])))}")
    if width not in table:
        raise ValueError(f"lr_preset {name!r} has no rate for width {width} ({what}); widths: "
                         f"{', '.join(map(str, sorted(table)))}")
    return float(table[width])


class PresetLR:
    """Trainer callback that builds the configured optimizer with the preset's learning rate.

    Uses the trainer's ``make_optimizer`` hook (``train/callbacks.py``): ``default(params)`` builds
    the optimizer of the training config, whose rate is then replaced in every parameter group
    before any schedule is attached, so schedules scale the preset's rate.
    """

    def __init__(self, lr: float):
        self.lr = float(lr)

    def make_optimizer(self, model: nn.Module, default):
        opt = default(model.parameters())
        for group in opt.param_groups:
            group["lr"] = self.lr
        return opt
