"""Did a learned width settle? The width of the selected model against the width where training went.

An adaptive or self-expanding run changes its width while it trains, and the trainer keeps the epoch
with the best validation metric, so two widths describe one run: the **selected** width (the model
that is tested and reported) and the **end** width (after the last epoch). A width is **not settled**
when its total over the hidden layers moved by more than :data:`SETTLE_TOLERANCE` of its end value
over the last :data:`SETTLE_FRACTION` of training: the epochs ``E - k .. E`` with
``k = max(1, ceil(E * SETTLE_FRACTION))`` (the epoch before the window is included, so the window
always holds at least one change). A longer run would have ended elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from widthlab.report.plots import epoch_curve

SETTLE_FRACTION = 0.1  # the last tenth of training
SETTLE_TOLERANCE = 0.05  # relative movement of the total width allowed in that window

SETTLE_NOTE = (f"A learned width is flagged as not settled when its total moved by more than "
               f"{SETTLE_TOLERANCE:.0%} of its end value over the last {SETTLE_FRACTION:.0%} of the "
               "epochs (max − min over those epochs and the one before them).")


@dataclass(frozen=True)
class WidthPath:
    """The width facts of one run, read from its per-epoch records.

    Attributes:
        end: Total width after the last recorded epoch (None when no epoch recorded a width).
        changes: The total width took more than one value over training.
        moved: ``(max - min) / end`` of the total width over the last tenth of training.
        settled: None when the width never changed (nothing to settle); else ``moved <= tolerance``.
    """

    end: float | None
    changes: bool
    moved: float | None
    settled: bool | None


def width_path(epochs: Sequence[dict]) -> WidthPath:
    """The :class:`WidthPath` of one run's per-epoch records (empty or width-less records allowed)."""
    xs, ys = epoch_curve([epochs], "total_width")
    if not ys:
        return WidthPath(None, False, None, None)
    end = ys[-1]
    if len(set(ys)) == 1:
        return WidthPath(end, False, 0.0, None)
    k = max(1, math.ceil(len(ys) * SETTLE_FRACTION))
    window = ys[-(k + 1):]
    moved = (max(window) - min(window)) / end if end > 0 else math.inf
    return WidthPath(end, True, moved, moved <= SETTLE_TOLERANCE)
