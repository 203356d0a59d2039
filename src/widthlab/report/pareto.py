"""The Pareto view of a task: every trained model of every method, as (cost, metric) points, and the
non-dominated front.

A point is one finished run (every member of every search, every seed), at its own training FLOPs or
nonzero weights. A point is on the front when no other point is at least as cheap and at least as good
with one of the two strictly better (higher accuracy, or lower loss for regression). Identical points
do not dominate each other: both are on the front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from widthlab.report.compare import ArmResult

COSTS = {"flops": "training FLOPs of the run", "weights": "nonzero weights"}
_MEMBER_KEY = {"flops": "flops", "weights": "nonzero_weights"}


@dataclass(frozen=True)
class Point:
    cost: float
    value: float  # the headline metric as recorded (accuracy fraction or loss)
    arm: str
    run_id: str
    seed: Any
    chosen: bool  # the method's chosen model for this seed


def points(arms: list[ArmResult], cost: str) -> list[Point]:
    """Every finished run of the task with a positive cost and a metric, chosen ones flagged."""
    chosen = {c.run_id for a in arms for c in a.choices}
    out = []
    for a in arms:
        for m in a.members:
            x, y = m.get(_MEMBER_KEY[cost]), m.get(a.metric)
            if x is None or y is None or x <= 0:
                continue
            out.append(Point(float(x), float(y), a.arm, m["run_id"], m["seed"], m["run_id"] in chosen))
    return out


def front(pts: list[Point], maximise: bool) -> list[Point]:
    """The non-dominated points, cheapest first (ties in cost: better first)."""
    sign = 1.0 if maximise else -1.0
    order = sorted(pts, key=lambda p: (p.cost, -sign * p.value))
    out: list[Point] = []
    best = None
    for p in order:
        v = sign * p.value
        if best is None or v > best:
            out.append(p)
            best = v
        elif v == best and out and out[-1].cost == p.cost and sign * out[-1].value == v:
            out.append(p)  # an identical point: neither dominates the other
    return out
