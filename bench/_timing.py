"""Shared timing helper for the benches: interleaved repeats, warm-up, medians, ratios.

The machines these benches run on are shared and noisy: a kernel's time can double from one second to
the next because another process woke up. Absolute times are therefore never compared across runs.
Instead every variant of one comparison is timed *in the same loop*, round-robin (one sample of each
variant per round, in a rotating order), so that a slow spell hits all variants alike, and the
comparison is reported as a ratio of medians.

Typical use::

    times = time_interleaved({"dense": step_dense, "sparse": step_sparse}, rounds=9)
    print(times["dense"].median / times["sparse"].median)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Timing", "time_interleaved", "ratio", "markdown_table"]


@dataclass(frozen=True)
class Timing:
    """Per-call wall times of one variant, in seconds (each sample averages ``inner`` calls)."""

    samples: tuple[float, ...]
    inner: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Relative half-width of the inter-quartile range: a quick noise gauge (0.05 = +-5%)."""
        if len(self.samples) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / (2 * self.median)

    @property
    def ms(self) -> float:
        return 1e3 * self.median


def _calibrate(fn: Callable[[], object], min_sample_s: float, max_inner: int) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (timer and jitter floor)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if dt <= 0:
        return max_inner
    return max(1, min(max_inner, int(min_sample_s / dt) + 1))


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.02,
    max_inner: int = 1000,
    sync: Callable[[], object] | None = None,
    period: Mapping[str, int] | None = None,
) -> dict[str, Timing]:
    """Time several variants round-robin and return each one's per-call samples.

    Args:
        fns: name -> zero-argument callable doing one unit of work (e.g. one training step).
        rounds: samples per variant; the median is robust to a few slow rounds.
        warmup: untimed calls of each variant first (allocator, lazy init, caches, thread pools).
        min_sample_s: each sample repeats a call until it lasts about this long, so very fast calls
            are not dominated by timer resolution and scheduling jitter.
        max_inner: cap on those repeats.
        sync: called before reading the clock (e.g. ``torch.cuda.synchronize``) for asynchronous
            devices; None on CPU.
        period: name -> the period of a variant whose calls differ in cost on a cycle (an optimizer
            that refreshes statistics every k steps): its samples hold whole cycles, so each one
            amortises the periodic work exactly instead of holding one or two of its calls by chance.

    Returns:
        name -> :class:`Timing`, in the order of ``fns``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if sync is not None:
        sync()
    inner = {n: _calibrate(fns[n], min_sample_s, max_inner) for n in names}
    for n, k in (period or {}).items():
        if n not in inner or not isinstance(k, int) or k < 1:
            raise ValueError(f"period: a positive integer per timed variant, got {n!r}: {k!r}")
        inner[n] = -(-inner[n] // k) * k  # may exceed max_inner: whole cycles come first
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        # Rotate the order each round so no variant always runs right after the same neighbour
        # (cache state, turbo/thermal state and background bursts then even out).
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fn, k = fns[n], inner[n]
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            if sync is not None:
                sync()
            samples[n].append((time.perf_counter() - t0) / k)
    return {n: Timing(tuple(samples[n]), inner[n]) for n in names}


def ratio(numerator: Timing, denominator: Timing) -> float:
    """Ratio of medians, e.g. ``ratio(masked, sparse)`` = how many times faster sparse is."""
    return numerator.median / denominator.median


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table; floats are printed with 3 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
