"""Kernel distance and test error against width, for runs that recorded ``kernel_*`` summary keys.

The wide & sparse method's ``kernel`` option (``methods/widesparse/kernel.py``) records, per run, the
exact Theorem 1 distance D of its family member, the empirical distance of its own network at
initialisation and after training, and the run records its test accuracy. The Fig. 8 protocol of
Golubeva et al. 2021, App. A, Fig. 8 plots the theoretical D, the empirical D and the test error against width
and asks whether the minimum of D and the maximum of accuracy sit at similar widths. One figure per
(study, family), three panels sharing a log2 width axis:

1. exact D: mean over seeds; error bars are its Monte-Carlo standard error, combined over the seeds'
   independent mask samples, sqrt(sum se_i^2) / S (pairs fixed, as recorded);
2. empirical D at initialisation (mean ± std over seeds, i.e. over initialisations) with the exact D
   as a thin reference line, and after training (dashed) where recorded;
3. test error 1 - accuracy (mean ± std over seeds), log scale.

Dotted vertical lines mark the width of minimal exact D and of maximal mean test accuracy; the caption
states both. Only finished runs count; missing keys never raise.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from widthlab.report.plots import Plot, _png
from widthlab.report.tables import as_float

EXACT_COLOR, EMPIRICAL_COLOR, ERROR_COLOR = "#1f77b4", "#ff7f0e", "#d62728"


@dataclass(frozen=True)
class Spread:
    """Mean and sample std (ddof=1; None for one value) of one number over seeds."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class WidthPoint:
    """One width of a family, aggregated over its finished seeds.

    Attributes:
        width: n.
        p: first-layer connectivity (mean over seeds; equal for exact-count masks).
        D: exact Theorem 1 distance, mean over seeds.
        D_se: its combined Monte-Carlo standard error.
        empirical_init: empirical D of the instances at initialisation.
        empirical_final: empirical D after training (None where not recorded).
        test_accuracy: test accuracy (None where not recorded).
    """

    width: int
    p: float
    D: float
    D_se: float
    empirical_init: Spread | None
    empirical_final: Spread | None
    test_accuracy: Spread | None


def _spread(values: Sequence[float | None]) -> Spread | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return Spread(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def kernel_series(runs: Sequence[dict]) -> dict[tuple[str, str], list[WidthPoint]]:
    """Finished runs with a recorded exact D, grouped by (study, family), aggregated per width.

    Args:
        runs: rows of :meth:`ResultStore.runs` (``status``, ``study``, ``summary``).

    Returns:
        (study, family label) -> points sorted by width.
    """
    by_key: dict[tuple[str, str, int], list[dict]] = {}
    for row in runs:
        s = row.get("summary") or {}
        width = as_float(s.get("width"))
        if row.get("status") != "done" or as_float(s.get("kernel_D")) is None or width is None:
            continue
        key = (str(row.get("study") or s.get("study") or ""), str(s.get("family") or s.get("method") or ""),
               int(width))
        by_key.setdefault(key, []).append(s)
    series: dict[tuple[str, str], list[WidthPoint]] = {}
    for (study, family, width), ss in sorted(by_key.items()):
        D = [as_float(s["kernel_D"]) for s in ss]
        se = [as_float(s.get("kernel_D_se")) or 0.0 for s in ss]
        series.setdefault((study, family), []).append(WidthPoint(
            width=width,
            p=statistics.fmean(as_float(s.get("kernel_p")) or 0.0 for s in ss),
            D=statistics.fmean(D),
            D_se=math.sqrt(sum(e * e for e in se)) / len(se),
            empirical_init=_spread([as_float(s.get("kernel_D_empirical_init")) for s in ss]),
            empirical_final=_spread([as_float(s.get("kernel_D_empirical_final")) for s in ss]),
            test_accuracy=_spread([as_float(s.get("test_accuracy")) for s in ss]),
        ))
    return series


def extremes(points: Sequence[WidthPoint]) -> tuple[int, int | None]:
    """(width of minimal exact D, width of maximal mean test accuracy or None)."""
    d_min = min(points, key=lambda q: q.D).width
    acc = [q for q in points if q.test_accuracy is not None]
    return d_min, (max(acc, key=lambda q: q.test_accuracy.mean).width if acc else None)


def _errorbar(ax, xs, spreads, scale=1.0, **kw) -> None:
    pts = [(x, s) for x, s in zip(xs, spreads) if s is not None]
    if pts:
        ax.errorbar([x for x, _ in pts], [s.mean * scale for _, s in pts],
                    yerr=[(s.std or 0.0) * scale for _, s in pts], capsize=3, markersize=5, **kw)


def kernel_figure(points: Sequence[WidthPoint]) -> bytes:
    """The three-panel PNG of the module docstring."""
    fig = Figure(figsize=(7.5, 8.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    xs = [q.width for q in points]
    exact = [q.D for q in points]
    d_min, acc_max = extremes(points)

    ax = axes[0]
    ax.errorbar(xs, exact, yerr=[q.D_se for q in points], color=EXACT_COLOR, marker="o", capsize=3,
                markersize=5, label="exact D (Theorem 1)")
    ax.set_ylabel("exact D")

    ax = axes[1]
    ax.plot(xs, exact, color=EXACT_COLOR, lw=0.8, alpha=0.6, label="exact D")
    _errorbar(ax, xs, [q.empirical_init for q in points], color=EMPIRICAL_COLOR, marker="s",
              label="empirical D at init (mean ± std over seeds)")
    if any(q.empirical_final is not None for q in points):
        _errorbar(ax, xs, [q.empirical_final for q in points], color=EMPIRICAL_COLOR, marker="^",
                  linestyle="--", alpha=0.7, label="empirical D after training")
    ax.set_ylabel("empirical D")

    ax = axes[2]
    _errorbar(ax, xs, [None if q.test_accuracy is None else
                       Spread(1.0 - q.test_accuracy.mean, q.test_accuracy.std, q.test_accuracy.n)
                       for q in points], scale=100.0, color=ERROR_COLOR, marker="D", label="test error")
    ax.set_ylabel("test error (%)")
    ax.set_xlabel("width n (log2; connectivity p of the first layer below)")

    for i, ax in enumerate(axes):
        # Log scales: D spans decades, and an error of a few % beside one of ~50% stays readable.
        ax.set_yscale("log")
        ax.axvline(d_min, color=EXACT_COLOR, linestyle=":", lw=1.2,
                   label=f"min exact D (n={d_min})" if i == 0 else None)
        if acc_max is not None:
            ax.axvline(acc_max, color=ERROR_COLOR, linestyle=":", lw=1.2,
                       label=f"max test accuracy (n={acc_max})" if i == 2 else None)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax = axes[2]
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{q.width}\n{q.p:.3g}" for q in points]))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    fig.align_ylabels(axes)
    return _png(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "study"


def kernel_plots(runs: Sequence[dict]) -> list[Plot]:
    """One figure per (study, family) whose finished runs recorded a kernel distance; [] otherwise."""
    plots: list[Plot] = []
    used: set[str] = set()
    for (study, family), points in kernel_series(runs).items():
        name = f"{_slug(study)}-kernel"
        while name in used:  # several families in one study
            name += "-x"
        used.add(name)
        d_min, acc_max = extremes(points)
        acc_text = f"maximal mean test accuracy at n = {acc_max}" if acc_max is not None else \
            "no test accuracy recorded"
        caption = (f"Family {family}: exact Theorem 1 distance D (error bars: Monte-Carlo standard error, "
                   "combined over seeds), the empirical distance of each network at initialisation (mean "
                   "± std over seeds; dashed: after training, same units) and the test error (mean ± std "
                   "over seeds) against width n; tick labels give n and the first layer's connectivity "
                   f"p. Minimal exact D at n = {d_min}; {acc_text}.")
        plots.append(Plot(name, f"{study}: kernel distance and test error vs width", caption,
                          kernel_figure(points)))
    return plots
