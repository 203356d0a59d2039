"""Figures of a comparison study: one panel per task, every compared method in each panel.

1. test metric vs the cost of each method's whole search: training FLOPs, wall seconds and, when the
   store records them, process CPU seconds (log x axes);
2. test metric vs nonzero weights of the chosen model;
3. width over training of the chosen runs, one line per seed (a search's chosen widths as dashed
   constants), the selected epoch marked;
4. the Pareto view (``pareto-*``): every trained model of every method at its own FLOPs or weights,
   the non-dominated front drawn, each method's chosen models marked.

Per-seed values are drawn as small markers and never averaged on a log axis: a method's large marker
sits at the median of its seeds' costs (the lower middle one for an even count: a value some seed had),
its horizontal bar spans their min to max (always positive), and its vertical bar is ± one std of the
test metric on a linear axis (min to max on a log axis), so no bar can run off a log axis.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from widthlab.report.compare import SEARCH, ArmResult
from widthlab.report.pareto import front, points
from widthlab.report.plots import (
    METHOD_COLORS,
    METHOD_MARKERS,
    Plot,
    _png,
    _scale,
    epoch_curve,
    metric_title,
)
from widthlab.report.tables import stat

_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
SEED_DASHES = ((None, None), (5, 2), (2, 1.5), (6, 2, 1, 2), (1, 1))


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
        if color is None or color in {c for c, _ in out.values()} or a.is_search_arm:
            color = next(extra)
        out[a.arm] = (color, "P" if a.is_search_arm else METHOD_MARKERS.get(a.method, "o"))
    return out


def log_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of positive values: a bar that stays on a log axis. The median is the lower
    middle value for an even count, so the marker sits at a value some seed had (two seeds choosing
    32 and 256 put it at 32, not at a width 144 that no run had)."""
    return statistics.median_low(sorted(values)), min(values), max(values)


def linear_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, mean - std, mean + std)."""
    s = stat(list(values))
    d = s.std or 0.0
    return s.mean, s.mean - d, s.mean + d


def _bar(center: float, lo: float, hi: float) -> list[list[float]]:
    return [[center - lo], [hi - center]]


def draw_metric_vs(ax, arms: Sequence[ArmResult], key: str, member_key: str) -> bool:
    """One panel: each method's seeds (small markers), its median cost and metric spread (large marker
    and bars), the members of searches at their own cost (small joined markers). True if any data."""
    styles = _style(arms)
    log_y = bool(arms) and arms[0].metric == "test_loss"  # losses of a width search span decades
    drawn = False
    for a in arms:
        scale = _scale(a.metric)
        color, marker = styles[a.arm]
        if a.role == SEARCH and a.members_by_width:
            pts = []  # in width order
            for width in sorted(a.members_by_width):
                ms = a.members_by_width[width]
                xs = [m[member_key] for m in ms if m.get(member_key) is not None and m[member_key] > 0]
                ys = [m[a.metric] for m in ms if m.get(a.metric) is not None]
                if xs and ys and (not log_y or min(ys) > 0):
                    pts.append((statistics.median_low(sorted(xs)), scale * stat(ys).mean))
            if pts:
                # Joined in width order where the cost grows with the width (FLOPs, weights); wall
                # seconds of small nets are noise, so those members are left unjoined.
                # A search arm's trials are not a grid: never joined.
                joined = not a.is_search_arm and all(x0 < x1 for (x0, _), (x1, _) in zip(pts, pts[1:]))
                ax.plot(*zip(*pts), color=color, lw=0.8 if joined else 0, alpha=0.5, marker=marker,
                        markersize=3)
        seeds = [(getattr(c, key), c.test) for c in a.choices]
        seeds = [(x, scale * y) for x, y in seeds if x is not None and y is not None and x > 0
                 and (not log_y or y > 0)]
        if not seeds:
            continue
        xs, ys = [x for x, _ in seeds], [y for _, y in seeds]
        ax.scatter(xs, ys, s=22, facecolors="none", edgecolors=color, linewidths=1.0, zorder=3)
        cx, xlo, xhi = log_spread(xs)
        cy, ylo, yhi = (log_spread if log_y else linear_spread)(ys)
        ax.errorbar([cx], [cy], xerr=_bar(cx, xlo, xhi), yerr=_bar(cy, ylo, yhi), color=color,
                    marker=marker, markersize=9, capsize=3, lw=1.4, label=a.name, zorder=4,
                    markeredgecolor="black", markeredgewidth=0.6)
        drawn = True
    if drawn:
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        _legend(ax, len(arms))
    return drawn


def _legend(ax, n: int) -> None:
    """A few methods: inside; more (searches and retrain controls): below the axes, off the data."""
    if n <= 4:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def _finish(fig, axes, drawn) -> bytes | None:
    if not any(drawn):
        return None
    for ax, d in zip(axes, drawn):
        if not d:
            ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def _per_task(tasks: dict[str, list[ArmResult]], draw: Callable, xlabel: str, ylabel=None) -> bytes | None:
    fig, axes = _panels(len(tasks))
    drawn = []
    for ax, (task, arms) in zip(axes, tasks.items()):
        drawn.append(draw(ax, arms))
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or metric_title(arms[0].metric))
    return _finish(fig, axes, drawn)


def metric_vs(tasks: dict[str, list[ArmResult]], key: str, member_key: str, xlabel: str) -> bytes | None:
    """Test metric against ``key`` of each method's choice (``member_key`` of each search member)."""
    return _per_task(tasks, lambda ax, arms: draw_metric_vs(ax, arms, key, member_key), xlabel)


def draw_width(ax, arms: Sequence[ArmResult], epochs: dict[str, list[dict]]) -> bool:
    """Total width per epoch of each chosen run (one line per seed); a star at the selected epoch;
    a search's chosen widths as dashed constants labelled with their seeds. A fixed retrain control
    is left out: its width is its arm's selected width (the star)."""
    styles, drawn = _style(arms), False
    for a in arms:
        if a.retrain_of:
            continue
        color, _ = styles[a.arm]
        if a.role == SEARCH:
            by_width: dict[float, list] = {}
            for c in a.choices:
                if c.total_width:
                    by_width.setdefault(c.total_width, []).append(c.seed)
            for w, seeds in sorted(by_width.items()):
                ax.axhline(w, color=color, lw=1.6, ls="--",
                           label=f"{a.name}: chose {w:,.0f} (seed {', '.join(map(str, seeds))})")
                drawn = True
            continue
        for i, c in enumerate(a.choices):
            xs, ys = epoch_curve([epochs.get(c.run_id) or []], "total_width")
            if not xs:
                continue
            dash = SEED_DASHES[i % len(SEED_DASHES)]
            line, = ax.plot(xs, ys, color=color, lw=1.8, label=f"{a.name} seed {c.seed}"
                            + (" (not settled)" if c.path.settled is False else ""))
            if dash[0] is not None:
                line.set_dashes(dash)
            if c.best_epoch in xs:
                ax.plot([c.best_epoch], [ys[xs.index(c.best_epoch)]], marker="*", markersize=11,
                        color=color, markeredgecolor="black", markeredgewidth=0.6, ls="none")
            drawn = True
    if drawn:
        ax.plot([], [], marker="*", color="0.5", markeredgecolor="black", ls="none", label="selected epoch")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        # One entry per seed and per chosen width: below the axes, in two columns, off the curves.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return drawn


def draw_pareto(ax, arms: Sequence[ArmResult], cost: str) -> bool:
    """Every run of every method at its own cost, the non-dominated front, the chosen models marked."""
    pts = points(list(arms), cost)
    if not pts:
        return False
    metric = arms[0].metric
    scale, styles = _scale(metric), _style(arms)
    log_y = metric == "test_loss" and all(p.value > 0 for p in pts)
    for a in arms:
        color, marker = styles[a.arm]
        mine = [p for p in pts if p.arm == a.arm]
        if not mine:
            continue
        ax.scatter([p.cost for p in mine], [scale * p.value for p in mine], s=16, color=color, marker=marker,
                   alpha=0.55, label=a.name, zorder=2)
        chosen = [p for p in mine if p.chosen]
        ax.scatter([p.cost for p in chosen], [scale * p.value for p in chosen], s=70, color=color,
                   marker=marker, edgecolors="black", linewidths=1.0, zorder=4)
    fr = front(pts, maximise=metric != "test_loss")
    ax.step([p.cost for p in fr], [scale * p.value for p in fr], where="post", color="black", lw=1.1,
            alpha=0.8, label="Pareto front", zorder=3)
    ax.scatter([], [], s=70, facecolors="0.8", edgecolors="black", label="chosen (per seed)")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    _legend(ax, len(arms) + 2)
    return True


def compare_plots(tasks: dict[str, list[ArmResult]], epochs: dict[str, list[dict]], stem: str) -> list[Plot]:
    """The comparison figures that have data, named ``<stem>-compare-*`` and ``<stem>-pareto-*``."""
    seeds_note = ("Small hollow markers: each seed's choice; large marker: the median cost of the seeds "
                  "(horizontal bar: their min to max) and the mean test metric (vertical bar: ± std over "
                  "seeds; min to max for losses). Small markers: each member of a search at its own cost "
                  "(joined in width order where the cost grows with the width). Log x axis.")
    specs: list[tuple[str, str, str, Callable[[], bytes | None]]] = [
        ("compare-compute", "Test metric vs training compute",
         "Each method's chosen model at the training FLOPs of its whole search per seed: every width of "
         "the dense grid, every member of the wide & sparse family or of a search arm, the single "
         "adaptive or self-expanding run. " + seeds_note,
         lambda: metric_vs(tasks, "flops", "flops", "training FLOPs (whole search for grids and families)")),
        ("compare-wall", "Test metric vs wall seconds",
         "As above, against the wall seconds of the whole search per seed. " + seeds_note,
         lambda: metric_vs(tasks, "wall", "wall_seconds", "wall seconds (whole search)")),
        ("compare-cpu", "Test metric vs process CPU seconds",
         "As above, against the process CPU seconds of the whole search per seed (less sensitive than "
         "wall time to other work on a shared machine). " + seeds_note,
         lambda: metric_vs(tasks, "cpu", "cpu_seconds", "process CPU seconds (whole search)")),
        ("compare-weights", "Test metric vs weights",
         "Test metric against the nonzero weights (Linear and Conv weights, no biases) of the chosen "
         "model. " + seeds_note,
         lambda: metric_vs(tasks, "weights", "nonzero_weights", "nonzero weights of the chosen model")),
        ("pareto-flops", "Pareto view: test metric vs training FLOPs",
         "Every trained model of every method (each member of each search, each seed) at its own "
         "training FLOPs; the black staircase is the non-dominated front (no other model is as cheap "
         "and at least as good); black-edged markers are each method's chosen model per seed. Log x.",
         lambda: _per_task(tasks, lambda ax, arms: draw_pareto(ax, arms, "flops"),
                           "training FLOPs of the run")),
        ("pareto-weights", "Pareto view: test metric vs weights",
         "As above, against each model's nonzero weights.",
         lambda: _per_task(tasks, lambda ax, arms: draw_pareto(ax, arms, "weights"), "nonzero weights")),
        ("compare-width", "Width over training",
         "Total hidden width of each chosen run at the end of each epoch, one line per seed: learnt "
         "(adaptive) and grown (self-expanding) widths as they change, with a star at the epoch whose "
         "model was selected (best validation) and '(not settled)' where the width still moved at the "
         "end; a search's chosen widths as dashed constants, with the seeds that chose each. Log2 y.",
         lambda: _per_task(tasks, lambda ax, arms: draw_width(ax, arms, epochs), "epoch",
                           "total hidden width (units)")),
    ]
    out = []
    for suffix, title, caption, draw in specs:
        png = draw()
        if png:
            out.append(Plot(f"{stem}-{suffix}", title, caption, png))
    return out
