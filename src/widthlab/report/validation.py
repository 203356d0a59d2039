"""How many examples the validation split has, and whether it can separate a search's candidates.

A search keeps its member with the best validation accuracy. On a small split neighbouring widths
differ by one or two examples, which is noise: the report then warns that the split is too small to
separate the candidates (best and runner-up at most :data:`SEPARATION_EXAMPLES` example apart).

The split size is read from a run's summary (``val_examples``) when the store records it. Older
stores do not; the size is then inferred from the recorded validation accuracies, each of which is
``correct / n`` exactly: the least common denominator of all of a task's accuracies (every run of a
task validates on the same split). Too few values could give a divisor of the true size, which only
makes the warning fire more often, never less. Regression tasks (validation loss) have no such unit
and are not checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

from widthlab.report.tables import as_float

SEPARATION_EXAMPLES = 1  # best and runner-up this many examples apart or fewer: not separated
SIZE_KEYS = ("val_examples", "val_size", "n_val")
MAX_SPLIT = 10_000_000  # larger inferred denominators are float noise, not a split size
MIN_VALUES = 8  # fewer accuracies than this: do not guess a size


def recorded_size(summaries: Iterable[dict]) -> int | None:
    """The validation split size a run recorded (the first one found), or None."""
    for s in summaries:
        for key in SIZE_KEYS:
            v = as_float((s or {}).get(key))
            if v is not None and v >= 1:
                return int(v)
    return None


def inferred_size(accuracies: Iterable[float | None]) -> int | None:
    """The least common denominator of accuracies that are each ``k / n``; None when unsure."""
    den, count = 1, 0
    for a in accuracies:
        a = as_float(a)
        if a is None or not 0.0 <= a <= 1.0:
            continue
        frac = Fraction(a).limit_denominator(MAX_SPLIT)
        if abs(float(frac) - a) > 1e-12:
            return None  # not a ratio of small integers: not an accuracy over a split
        den = den * frac.denominator // math.gcd(den, frac.denominator)
        if den > MAX_SPLIT:
            return None
        count += 1
    return den if count >= MIN_VALUES and den > 1 else None


def split_size(summaries: list[dict], epochs: Iterable[list[dict]]) -> tuple[int | None, str]:
    """``(size, how)``: the validation split size of one task and ``"recorded"`` or ``"inferred"``."""
    n = recorded_size(summaries)
    if n is not None:
        return n, "recorded"
    values = [s.get("val_accuracy") for s in summaries]
    values += [e.get("val_accuracy") for eps in epochs for e in eps]
    n = inferred_size(values)
    return (n, "inferred") if n is not None else (None, "")


def examples_apart(best: float, other: float, n: int) -> float:
    """How many validation examples two accuracies on a split of ``n`` differ by."""
    return round(abs(best - other) * n, 6)


def separated(best: float, other: float, n: int) -> bool:
    return examples_apart(best, other, n) > SEPARATION_EXAMPLES
