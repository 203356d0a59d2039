"""Figures of a comparison study: one panel per task, every compared method in each panel.

1. test metric vs training compute (FLOPs, log axis): each method's chosen model at the cost of its
   whole search (large marker, error bars = std over seeds); the members of a search are shown at
   their own cost (small markers joined by a thin line), so the grid's price is visible;
2. test metric vs nonzero weights of the chosen model (members of searches likewise);
3. total width over training of the chosen runs, mean over seeds (a search's choice is a constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from widthlab.report.compare import SEARCH, ArmResult, _name
from widthlab.report.plots import METHOD_COLORS, METHOD_MARKERS, Plot, _png, _scale, epoch_curve, metric_title
from widthlab.report.tables import stat

_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _panels(n: int) -> tuple[Figure, list]:
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.2 * cols, 4.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes


def _style(arms: Sequence[ArmResult]) -> dict[str, tuple[str, str]]:
    """Colour and marker per compared method name: the method's usual colour, else an extra one."""
    out: dict[str, tuple[str, str]] = {}
    extra = iter(_EXTRA_COLORS * 4)
    for a in arms:
        if a.arm in out:
            continue
        color = METHOD_COLORS.get(a.method)
        if color is None or color in {c for c, _ in out.values()}:  # two arms of one method
            color = next(extra)
        out[a.arm] = (color, METHOD_MARKERS.get(a.method, "o"))
    return out




def _scatter_panel(ax, arms: Sequence[ArmResult], styles, x_key: str, member_x: str) -> bool:
    """Chosen results (big markers, error bars) and search members (small, joined); True if any data."""
    drawn = False
    for a in arms:
        scale = _scale(a.metric)
        color, marker = styles[a.arm]
        if a.role == SEARCH and a.members_by_width:
            pts = []
            for width in sorted(a.members_by_width):
                ms = a.members_by_width[width]
                x, y = stat([m[member_x] for m in ms]).mean, stat([m[a.metric] for m in ms]).mean
                if x is not None and y is not None and x > 0:
                    pts.append((x, scale * y))
            if pts:
                ax.plot(*zip(*sorted(pts)), color=color, lw=0.8, alpha=0.55, marker=marker, markersize=3.5)
        x, y = a.stat(x_key), a.stat("test")
        if x.mean is None or y.mean is None or x.mean <= 0:
            continue
        ax.errorbar([x.mean], [scale * y.mean], xerr=[x.std or 0.0], yerr=[scale * (y.std or 0.0)],
                    color=color, marker=marker, markersize=9, capsize=3, lw=1.4, label=_name(a),
                    markeredgecolor="black", markeredgewidth=0.6)
        drawn = True
    if drawn:
        ax.set_xscale("log")
        if arms and arms[0].metric == "test_loss":
            ax.set_yscale("log")  # losses of a width search span decades
        ax.legend(fontsize=8, loc="best")
    return drawn


def _finish(fig, axes, drawn) -> bytes | None:
    if not any(drawn):
        return None
    for ax, d in zip(axes, drawn):
        if not d:
            ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def metric_vs(tasks: dict[str, list[ArmResult]], key: str, member_key: str, xlabel: str) -> bytes | None:
    """Test metric against ``key`` of each method's choice (``member_key`` of each search member)."""
    fig, axes = _panels(len(tasks))
    drawn = []
    for ax, (task, arms) in zip(axes, tasks.items()):
        drawn.append(_scatter_panel(ax, arms, _style(arms), key, member_key))
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_title(arms[0].metric))
    return _finish(fig, axes, drawn)


def width_over_training(tasks: dict[str, list[ArmResult]], epochs: dict[str, list[dict]]) -> bytes | None:
    fig, axes = _panels(len(tasks))
    drawn = []
    for ax, (task, arms) in zip(axes, tasks.items()):
        styles, any_line = _style(arms), False
        for a in arms:
            xs, ys = epoch_curve([epochs.get(c.run_id) or [] for c in a.choices], "total_width")
            if not xs:
                continue
            color, _ = styles[a.arm]
            ax.plot(xs, ys, color=color, lw=2.0, label=_name(a) + (" (chosen width)" if a.role == SEARCH
                                                                       else ""),
                    ls="--" if a.role == SEARCH else "-")
            any_line = True
        if any_line:
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.legend(fontsize=8, loc="best")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_ylabel("total hidden width (units)")
        drawn.append(any_line)
    return _finish(fig, axes, drawn)


def compare_plots(tasks: dict[str, list[ArmResult]], epochs: dict[str, list[dict]], stem: str) -> list[Plot]:
    """The comparison figures that have data, named ``<stem>-compare-*``."""
    specs: list[tuple[str, str, str, Callable[[], bytes | None]]] = [
        ("compare-compute", "Test metric vs training compute",
         "Each method's chosen model (large marker; mean ± std over seeds) at the training FLOPs of its "
         "whole search per seed: every width of the dense grid, every member of the wide & sparse "
         "family, the single adaptive or self-expanding run. Small joined markers: each member of a "
         "search at its own cost. Log x axis.",
         lambda: metric_vs(tasks, "flops", "train_flops",
                           "training FLOPs (whole search for grids and families)")),
        ("compare-weights", "Test metric vs weights",
         "Test metric against the nonzero weights (Linear and Conv weights, no biases) of the final "
         "model; large markers: each method's chosen model, small joined markers: the members of a "
         "search. Log x axis.",
         lambda: metric_vs(tasks, "weights", "nonzero_weights", "nonzero weights of the final model")),
        ("compare-width", "Width over training",
         "Total hidden width of the chosen runs at the end of each epoch, mean over seeds: learnt "
         "(adaptive) and grown (self-expanding) widths as they change, a search's chosen width as a "
         "dashed constant. Log2 y axis.",
         lambda: width_over_training(tasks, epochs)),
    ]
    out = []
    for suffix, title, caption, draw in specs:
        png = draw()
        if png:
            out.append(Plot(f"{stem}-{suffix}", title, caption, png))
    return out
