"""Report plots as PNG bytes, from the aggregated groups and per-epoch metrics.

Figures are built with matplotlib's object-oriented API on an Agg canvas, never through pyplot, so
making a report neither needs a display nor changes the backend of a user who already chose one.

One figure set per study and headline metric (test accuracy for classification, test loss for
regression):

1. metric vs width, one line per method (per base width for wide & sparse families), error bars are
   the standard deviation over seeds, log2 width axis;
2. metric vs number of nonzero weights, all methods, log axis;
3. learning curves, validation and test metric per epoch, mean over seeds per group;
4. total width over training, for groups whose width changed.

A plot without data is skipped; missing keys never raise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from widthlab.report.tables import METHOD_ORDER, GroupStats, as_float, stat

# Same colour for a method in every figure, so a reader learns it once.
METHOD_COLORS = {"dense": "#1f77b4", "widesparse": "#ff7f0e", "adaptive": "#2ca02c", "expanding": "#d62728"}
METHOD_MARKERS = {"dense": "o", "widesparse": "s", "adaptive": "^", "expanding": "D"}
# Wide & sparse families (one per base width) in shades of the method's orange.
FAMILY_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#9467bd", "#7f7f7f")


@dataclass(frozen=True)
class Plot:
    """One figure of the report.

    Attributes:
        name: File stem, unique within the report (``[a-z0-9_-]``).
        title: Heading shown above the figure.
        caption: What is shown, in a sentence or two.
        png: The PNG file contents.
    """

    name: str
    title: str
    caption: str
    png: bytes


def _figure(width: float = 7.5, height: float = 4.3) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk: the bytes then depend only on the data, so re-rendering is reproducible.
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _legend(ax, n_entries: int) -> None:
    # Many groups crowd the axes: put the legend outside on the right beyond a handful of entries.
    if n_entries <= 6:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncol=1 if n_entries <= 18 else 2)


def metric_title(metric: str) -> str:
    return {"test_accuracy": "test accuracy (%)", "test_loss": "test loss"}.get(metric, metric)


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


def _context_parts(g: GroupStats) -> dict[str, str]:
    """Model, dataset and non-width sweep axes of a group, to tell series apart in legends."""
    try:
        _, model, data, axes = json.loads(g.context)
    except (ValueError, TypeError):
        model, data, axes = g.model, g.dataset, {}
    parts = {"model": str(model or g.model), "data": str(data or g.dataset)}
    parts.update({k: f"{k}={v}" for k, v in (axes or {}).items()})
    return parts


def _series_labels(keys: Sequence[tuple], heads: Sequence[str], groups: Sequence[GroupStats]) -> list[str]:
    """Legend labels: the head (method, family) plus only those context parts that vary."""
    parts = [_context_parts(g) for g in groups]
    varying = {k for p in parts for k in p if len({q.get(k) for q in parts}) > 1}
    return [" ".join([h] + [p[k] for k in sorted(p) if k in varying]) for h, p in zip(heads, parts)]


# ------------------------------------------------------------------------------------- per-epoch data

def epoch_curve(runs_epochs: Sequence[Sequence[dict]], key: str) -> tuple[list[int], list[float]]:
    """Mean of ``key`` over runs at each epoch where at least one run has it."""
    by_epoch: dict[int, list[float]] = {}
    for epochs in runs_epochs:
        for i, e in enumerate(epochs):
            v = as_float(e.get(key))
            if key == "total_width" and v is None and isinstance(e.get("widths"), dict):
                v = as_float(sum(x for x in e["widths"].values() if as_float(x) is not None))
            ep = e.get("epoch")
            ep = int(ep) if as_float(ep) is not None else i + 1
            if v is not None:
                by_epoch.setdefault(ep, []).append(v)
    xs = sorted(by_epoch)
    return xs, [stat(by_epoch[x]).mean for x in xs]


def width_changes(runs_epochs: Sequence[Sequence[dict]]) -> bool:
    """True when the total width of some run takes more than one value over its epochs."""
    for epochs in runs_epochs:
        _, ys = epoch_curve([epochs], "total_width")
        if len(set(ys)) > 1:
            return True
    return False


# --------------------------------------------------------------------------------------------- plots

def metric_vs_width(groups: Sequence[GroupStats], metric: str, changing: set[str]) -> bytes | None:
    """Plot 1: metric vs width, one line per method (and per family for wide & sparse)."""
    points: dict[tuple, list[tuple[float, GroupStats]]] = {}
    for g in groups:
        s = g.stats.get(metric)
        if s is None or s.mean is None:
            continue
        # Width-changing methods sit at their final mean width per site; the rest at nominal width.
        x = g.mean("site_width") if g.group in changing else (g.width or g.mean("site_width"))
        if not x or x <= 0:
            continue
        fam = (g.family or g.base_width) if g.method == "widesparse" else None
        points.setdefault((g.method, g.context, str(fam) if fam is not None else ""), []).append((x, g))
    if not points:
        return None
    # A family's line starts at its dense base, the network whose weight count it keeps.
    for (method, context, _), pts in points.items():
        bw = pts[0][1].base_width if method == "widesparse" else None
        if bw is None or any(x == bw for x, _ in pts):
            continue
        base = [g for g in groups if g.method == "dense" and g.width == bw and g.context == context
                and g.mean(metric) is not None]
        if base:
            pts.append((float(bw), base[0]))
    keys = sorted(points, key=lambda k: (METHOD_ORDER.get(k[0], 9), k[0], k[1], k[2]))
    heads = []
    for key in keys:
        g0 = points[key][0][1]
        heads.append(f"widesparse base w0={g0.base_width}" if key[0] == "widesparse" and g0.base_width
                     else key[0] + (" (final width)" if g0.group in changing else ""))
    labels = _series_labels(keys, heads, [points[k][0][1] for k in keys])
    fig, ax = _figure()
    fam_i = 0
    nominal: set[float] = set()
    for key, label in zip(keys, labels):
        pts = sorted(points[key], key=lambda p: p[0])
        xs = [x for x, _ in pts]
        if pts[0][1].group not in changing:
            nominal.update(xs)
        ys = [g.stats[metric].mean * _scale(metric) for _, g in pts]
        es = [(g.stats[metric].std or 0.0) * _scale(metric) for _, g in pts]
        color = METHOD_COLORS.get(key[0])
        if key[0] == "widesparse":
            color = FAMILY_COLORS[fam_i % len(FAMILY_COLORS)]
            fam_i += 1
        ax.errorbar(xs, ys, yerr=es, label=label, color=color, marker=METHOD_MARKERS.get(key[0], "o"),
                    capsize=3, linestyle="-" if len(xs) > 1 else "none", markersize=5)
    ax.set_xscale("log", base=2)
    # Ticks at the swept widths (not at learned ones, which would crowd them), when they are few.
    if 0 < len(nominal) <= 12:
        ax.set_xticks(sorted(nominal))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("width (log2)")
    ax.set_ylabel(metric_title(metric))
    _legend(ax, len(keys))
    return _png(fig)


def metric_vs_weights(groups: Sequence[GroupStats], metric: str) -> bytes | None:
    """Plot 2: metric vs number of nonzero weights, all methods."""
    series: dict[tuple, list[tuple[float, GroupStats]]] = {}
    for g in groups:
        x = g.mean("nonzero_weights") or g.mean("counted_weights")
        if not x or x <= 0 or g.mean(metric) is None:
            continue
        series.setdefault((g.method, g.context), []).append((x, g))
    if not series:
        return None
    keys = sorted(series, key=lambda k: (METHOD_ORDER.get(k[0], 9), k[0], k[1]))
    labels = _series_labels(keys, [k[0] for k in keys], [series[k][0][1] for k in keys])
    fig, ax = _figure()
    for key, label in zip(keys, labels):
        pts = sorted(series[key], key=lambda p: p[0])
        ys = [g.stats[metric].mean * _scale(metric) for _, g in pts]
        es = [(g.stats[metric].std or 0.0) * _scale(metric) for _, g in pts]
        # Only dense points form a curve; the others are scattered (a wide & sparse family is a
        # vertical strip at one weight count).
        ax.errorbar([x for x, _ in pts], ys, yerr=es, label=label, color=METHOD_COLORS.get(key[0]),
                    marker=METHOD_MARKERS.get(key[0], "o"), capsize=3, markersize=5,
                    linestyle="-" if key[0] == "dense" and len(pts) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("nonzero weights (log)")
    ax.set_ylabel(metric_title(metric))
    _legend(ax, len(keys))
    return _png(fig)


# Groups of one method share a hue (light to dark by width), so method and size read off the colour.
METHOD_CMAPS = {"dense": "Blues", "widesparse": "Oranges", "adaptive": "Greens", "expanding": "Reds"}


def _group_colors(groups: Sequence[GroupStats]) -> list:
    from matplotlib import colormaps

    by_method: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_method.setdefault(g.method, []).append(i)
    colors: list = [None] * len(groups)
    others = iter(f"C{i}" for i in range(4, 1000))  # C0-C3 look like the method hues
    for method, idx in by_method.items():
        if method not in METHOD_CMAPS:
            for i in idx:
                colors[i] = next(others)
            continue
        cmap = colormaps[METHOD_CMAPS[method]]
        for rank, i in enumerate(idx):
            colors[i] = cmap(0.45 + 0.5 * rank / max(1, len(idx) - 1)) if len(idx) > 1 else cmap(0.75)
    return colors


def learning_curves(groups: Sequence[GroupStats], epochs: dict[str, list[dict]], metric: str) -> bytes | None:
    """Plot 3: validation (solid) and test (dashed) metric per epoch, mean over seeds, per group."""
    stem = metric.split("_", 1)[1]  # accuracy | loss
    curves = []
    for g in groups:
        runs_epochs = [epochs.get(r) or [] for r in g.run_ids]
        lines = [(split, *epoch_curve(runs_epochs, f"{split}_{stem}")) for split in ("val", "test")]
        lines = [ln for ln in lines if ln[1]]
        if not lines:  # no held-out curve recorded: fall back to the training curve
            lines = [(s, *epoch_curve(runs_epochs, f"{s}_{stem}")) for s in ("train",)]
            lines = [ln for ln in lines if ln[1]]
        if lines:
            curves.append((g, lines))
    if not curves:
        return None
    fig, ax = _figure(8.5 if len(curves) > 6 else 7.5)
    styles = {"val": "-", "test": "--", "train": ":"}
    for (g, lines), color in zip(curves, _group_colors([g for g, _ in curves])):
        for i, (split, xs, ys) in enumerate(lines):
            ax.plot(xs, [y * _scale(metric) for y in ys], linestyle=styles[split], color=color,
                    marker="." if len(xs) < 30 else None, label=g.label if i == 0 else None)
    # Grey proxies explain the line styles once instead of per group.
    splits = sorted({split for _, lines in curves for split, _, _ in lines}, key=list(styles).index)
    for split in splits:
        ax.plot([], [], color="0.4", linestyle=styles[split], label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{stem}" + (" (%)" if stem == "accuracy" else ""))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    _legend(ax, len(curves) + len(splits))
    return _png(fig)


def site_curves(runs_epochs: Sequence[Sequence[dict]]) -> dict[str, tuple[list[int], list[float]]]:
    """Per-layer width per epoch (mean over runs), from each epoch's ``widths`` dict."""
    sites = sorted({k for epochs in runs_epochs for e in epochs if isinstance(e.get("widths"), dict)
                    for k in e["widths"]})
    out = {}
    for site in sites:
        flat = [[{"epoch": e.get("epoch"), "w": (e.get("widths") or {}).get(site)} for e in epochs]
                for epochs in runs_epochs]
        xs, ys = epoch_curve(flat, "w")
        if xs:
            out[site] = (xs, ys)
    return out


def width_over_training(groups: Sequence[GroupStats], epochs: dict[str, list[dict]],
                        changing: set[str]) -> bytes | None:
    """Plot 4: width per epoch, mean over seeds, for the groups whose width changed: the total (thick)
    and, where a model has several resizable layers, each layer (thin, dashed)."""
    curves = []
    for g in groups:
        if g.group not in changing:
            continue
        runs = [epochs.get(r) or [] for r in g.run_ids]
        xs, ys = epoch_curve(runs, "total_width")
        if xs:
            curves.append((g, xs, ys, site_curves(runs)))
    if not curves:
        return None
    fig, ax = _figure()
    per_layer = False
    for (g, xs, ys, sites), color in zip(curves, _group_colors([c[0] for c in curves])):
        ax.plot(xs, ys, color=color, lw=2.0, marker="o" if len(xs) < 30 else None, markersize=4,
                label=g.label)
        if len(sites) > 1:
            per_layer = True
            for (sx, sy), dash in zip(sites.values(), ((4, 2), (1, 1), (6, 2, 1, 2), (2, 2))):
                ax.plot(sx, sy, color=color, lw=0.9, alpha=0.8, dashes=dash)
    if per_layer:
        ax.plot([], [], color="0.3", lw=0.9, dashes=(4, 2), label="single layers (thin)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("width (units)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    _legend(ax, len(curves) + per_layer)
    return _png(fig)


# ------------------------------------------------------------------------------------- orchestration

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "study"


def make_plots(groups: Sequence[GroupStats], epochs: dict[str, list[dict]]) -> list[Plot]:
    """All report figures: for each study and headline metric, the four plots that have data.

    Args:
        groups: Output of :func:`widthlab.report.tables.aggregate`.
        epochs: Per-epoch metric dicts of each finished run, by run id.

    Returns:
        The figures in report order; file stems are unique.
    """
    plots: list[Plot] = []
    used: set[str] = set()
    keys = sorted({(g.study, g.metric) for g in groups if g.metric and g.n})
    multi_metric = {s for s, _ in keys if sum(1 for t, _ in keys if t == s) > 1}
    for study, metric in keys:
        gs = [g for g in groups if g.study == study and g.metric == metric and g.n]
        changing = {g.group for g in gs
                    if width_changes([epochs.get(r) or [] for r in g.run_ids])}
        stem = _slug(study) + (f"-{_slug(metric)}" if study in multi_metric else "")
        while stem in used:  # two study names with the same slug
            stem += "-x"
        used.add(stem)
        what = metric_title(metric)
        specs: list[tuple[str, str, str, Callable[[], bytes | None]]] = [
            ("vs-width", f"{study}: {what} vs width",
             f"Final {what}, mean ± std over seeds (error bars), against width on a log2 axis; one "
             "line per method, and one per base width w0 for wide & sparse families (every member "
             "keeps the weight count of the dense net at w0, where the line starts). Methods that "
             "change width are placed at their final mean width per layer.",
             partial(metric_vs_width, gs, metric, changing)),
            ("vs-weights", f"{study}: {what} vs number of weights",
             f"Final {what}, mean ± std over seeds, against the number of nonzero weights (Linear and "
             "Conv weights, no biases) on a log axis; dense nets are joined by a line.",
             partial(metric_vs_weights, gs, metric)),
            ("learning-curves", f"{study}: learning curves",
             f"Validation (solid) and test (dashed) {metric.split('_', 1)[1]} per epoch, mean over "
             "seeds, one colour per group (training curve, dotted, where neither was recorded).",
             partial(learning_curves, gs, epochs, metric)),
            ("width", f"{study}: width over training",
             "Total width (units summed over all resizable layers, thick) and, for models with several "
             "resizable layers, each layer's width (thin, dashed) at the end of each epoch, mean over "
             "seeds, for the groups whose width changed during training.",
             partial(width_over_training, gs, epochs, changing)),
        ]
        for suffix, title, caption, draw in specs:
            png = draw()
            if png:
                plots.append(Plot(f"{stem}-{suffix}", title, caption, png))
    return plots
