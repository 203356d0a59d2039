"""Results tables: pure functions over the rows of :meth:`ResultStore.runs`.

A *group* is the set of runs that differ only by seed (the summary's ``group`` id). For each group we
report mean ± sample standard deviation (``ddof=1``) over its finished runs; a single run has no
standard deviation and shows ``–``. Failed runs are counted per group and listed with their error.

Width fraction [Golubeva et al. 2021, §4, Fig. 7]: for a wide & sparse group at width w
built from base width w0, ``(sparse - base) / (dense - base)``, where ``dense`` is the dense group at
width w and ``base`` the dense group at width w0 in the same setting (same study, model, dataset and
non-width sweep axes). 1 means the sparse net gets all of the dense net's gain from width, at the base
weight count. It is blank when either reference is missing or dense and base tie.

Every reader here tolerates missing keys: the database may hold runs written by older versions, runs
still in flight (no summary) and runs that failed before they had any metrics.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

# Display order of the methods; unknown methods sort after these, alphabetically.
METHOD_ORDER = {"dense": 0, "widesparse": 1, "adaptive": 2, "expanding": 3}
# Table columns holding text (left-aligned); all others are numbers.
TEXT_COLUMNS = ("group", "method", "chosen by")
# Per-run numbers aggregated over seeds.
STAT_FIELDS = ("test_accuracy", "test_loss", "train_accuracy", "val_accuracy", "nonzero_weights",
               "counted_weights", "total_width", "site_width", "wall_seconds")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one number over the seeds of a group.

    Attributes:
        mean: Arithmetic mean, or None when no run reported the number.
        std: Sample standard deviation (ddof=1); None when fewer than two values.
        n: How many runs reported the number.
    """

    mean: float | None
    std: float | None
    n: int


@dataclass
class GroupStats:
    """One row of the results table: the runs of one group (same config up to the seed)."""

    group: str
    label: str
    study: str
    method: str
    model: str
    dataset: str
    width: int | None
    base_width: int | None
    family: str | None
    connectivity: float | None
    context: str  # JSON of the setting shared with the dense references (see ``width_fraction``)
    n: int = 0  # finished runs
    failed: int = 0
    run_ids: list[str] = field(default_factory=list)  # finished runs, in study order
    stats: dict[str, Stat] = field(default_factory=dict)
    width_fraction: float | None = None

    @property
    def metric(self) -> str | None:
        """The headline number: test accuracy (classification) or test loss (regression)."""
        for key in ("test_accuracy", "test_loss"):
            if self.stats.get(key, Stat(None, None, 0)).mean is not None:
                return key
        return None

    def mean(self, key: str) -> float | None:
        s = self.stats.get(key)
        return s.mean if s else None


def as_float(v: Any) -> float | None:
    """A finite float, or None (the store writes inf as a string and NaN as null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _cfg_name(cfg: dict, key: str) -> str:
    part = cfg.get(key)
    if isinstance(part, dict):
        return str(part.get("name", ""))
    return str(part or "")


def _is_width_axis(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in ("width", "widths", "base_width") or key == "seed"


def context_key(row: dict) -> str:
    """The setting a run shares with its dense references: study, model, data, non-width sweep axes.

    Method axes are left out on purpose: a wide & sparse run and its dense reference differ in
    exactly the method and the width.
    """
    cfg = row.get("config") or {}
    axes = cfg.get("axes") or {}
    other = {k: v for k, v in axes.items() if not _is_width_axis(k) and not k.startswith("method")}
    return json.dumps([row.get("study"), _cfg_name(cfg, "model"), _cfg_name(cfg, "data"), other],
                      sort_keys=True, default=str)


def run_info(row: dict) -> dict[str, Any]:
    """Flatten one store row into the fields the report uses, with fallbacks from the config."""
    cfg = row.get("config") or {}
    s = row.get("summary") or {}
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    method = s.get("method") or _cfg_name(cfg, "method") or "?"
    model = s.get("model") or _cfg_name(cfg, "model") or "?"
    dataset = s.get("dataset") or _cfg_name(cfg, "data") or "?"
    width = s.get("width", model_cfg.get("width"))
    width = int(width) if as_float(width) is not None else None
    if s.get("group"):
        group = str(s["group"])
    else:
        # Same config up to the seed: drop the seed from the config and its axes.
        rest = {k: v for k, v in cfg.items() if k not in ("seed", "axes")}
        rest["axes"] = {k: v for k, v in (cfg.get("axes") or {}).items() if k != "seed"}
        group = json.dumps([row.get("study"), rest], sort_keys=True, default=str)
    label = s.get("label") or f"{method} {model}" + (f" w={width}" if width is not None else "")
    info: dict[str, Any] = {
        "run_id": row.get("run_id"), "study": row.get("study") or "", "status": row.get("status"),
        "error": row.get("error") or s.get("error"), "position": row.get("position") or 0,
        "method": str(method), "model": str(model), "dataset": str(dataset), "width": width,
        "group": group, "label": str(label), "seed": s.get("seed", cfg.get("seed")),
        "base_width": int(bw) if (bw := as_float(s.get("base_width"))) is not None else None,
        "family": None if s.get("family") is None else str(s["family"]),
        "connectivity": as_float(s.get("connectivity")), "context": context_key(row),
    }
    for key in STAT_FIELDS:
        info[key] = as_float(s.get(key))
    if info["wall_seconds"] is None:
        info["wall_seconds"] = as_float(row.get("wall_seconds"))
    widths = s.get("widths")
    if info["total_width"] is None and isinstance(widths, dict) and widths:
        info["total_width"] = as_float(sum(v for v in widths.values() if as_float(v) is not None))
    # Mean final width per site puts width-changing runs on the same axis as nominal widths.
    if isinstance(widths, dict) and widths and info["total_width"] is not None:
        info["site_width"] = info["total_width"] / len(widths)
    return info


def stat(values: list[float | None]) -> Stat:
    """Mean and sample std (ddof=1) of the values that are not None."""
    xs = [v for v in values if v is not None]
    if not xs:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def _sort_key(g: GroupStats) -> tuple:
    return (g.study, METHOD_ORDER.get(g.method, len(METHOD_ORDER)), g.method, g.model, g.dataset,
            g.base_width if g.base_width is not None else -1, g.width if g.width is not None else -1,
            g.label)


def aggregate(runs: list[dict]) -> list[GroupStats]:
    """Group finished and failed runs by ``group`` and aggregate each group over its seeds.

    Args:
        runs: Rows of :meth:`ResultStore.runs`.

    Returns:
        One :class:`GroupStats` per group with at least one finished or failed run, sorted by study,
        method, model, dataset, base width and width; width fractions filled in.
    """
    infos: dict[str, list[dict]] = {}
    failed: dict[str, int] = {}
    for row in runs:
        if row.get("status") not in ("done", "failed"):
            continue
        info = run_info(row)
        infos.setdefault(info["group"], [])
        if row["status"] == "done":
            infos[info["group"]].append(info)
        else:
            failed[info["group"]] = failed.get(info["group"], 0) + 1
            infos[info["group"]].append({**info, "_failed": True})
    groups = []
    for gid, members in infos.items():
        done = [m for m in members if not m.get("_failed")]
        first = (done or members)[0]
        g = GroupStats(group=gid, label=first["label"], study=first["study"], method=first["method"],
                       model=first["model"], dataset=first["dataset"], width=first["width"],
                       base_width=first["base_width"], family=first["family"],
                       connectivity=first["connectivity"], context=first["context"], n=len(done),
                       failed=failed.get(gid, 0), run_ids=[m["run_id"] for m in done])
        g.stats = {key: stat([m[key] for m in done]) for key in STAT_FIELDS}
        groups.append(g)
    groups.sort(key=_sort_key)
    add_width_fractions(groups)
    return groups


def _dense_at(groups: list[GroupStats], like: GroupStats, width: int, metric: str) -> GroupStats | None:
    """The dense group at ``width`` in the setting of ``like``; unique match on model/data as fallback."""
    dense = [g for g in groups if g.method == "dense" and g.width == width and g.n > 0
             and g.mean(metric) is not None]
    exact = [g for g in dense if g.context == like.context]
    if len(exact) == 1:
        return exact[0]
    loose = [g for g in dense if (g.study, g.model, g.dataset) == (like.study, like.model, like.dataset)]
    return loose[0] if len(loose) == 1 else None


def width_fraction(sparse: float, base: float, dense: float) -> float | None:
    """``(sparse - base) / (dense - base)`` [Golubeva et al. 2021, §4]; None when dense and base tie."""
    denom = dense - base
    if abs(denom) <= 1e-12 * max(1.0, abs(dense), abs(base)):
        return None
    return (sparse - base) / denom


def add_width_fractions(groups: list[GroupStats]) -> None:
    """Fill ``width_fraction`` of each wide & sparse group whose dense references exist (in place)."""
    for g in groups:
        metric = g.metric
        if g.method != "widesparse" or metric is None or g.width is None or g.base_width is None:
            continue
        if g.width == g.base_width:
            continue  # the base itself: 0/0
        dense = _dense_at(groups, g, g.width, metric)
        base = _dense_at(groups, g, g.base_width, metric)
        if dense is None or base is None:
            continue
        g.width_fraction = width_fraction(g.mean(metric), base.mean(metric), dense.mean(metric))


def failed_runs(runs: list[dict]) -> list[dict[str, Any]]:
    """The failed runs, in study order, as dicts with run_id, study, label, seed and error."""
    out = []
    for row in runs:
        if row.get("status") == "failed":
            info = run_info(row)
            out.append({k: info[k] for k in ("run_id", "study", "label", "seed")}
                       | {"error": info["error"] or "(no error recorded)"})
    return out


def status_counts(runs: list[dict]) -> dict[str, int]:
    """How many runs are in each status; always has done, failed, running and pending."""
    counts = {"done": 0, "failed": 0, "running": 0, "pending": 0}
    for row in runs:
        st = str(row.get("status") or "pending")
        counts[st] = counts.get(st, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------- formatting

def _fmt(s: Stat | None, kind: str) -> str:
    """``mean ± std`` in the unit of ``kind``: pct (fractions shown as %), int, sec or loss."""
    if s is None or s.mean is None:
        return ""
    if kind == "pct":
        fmt, scale = "{:.2f}", 100.0
    elif kind == "int":
        fmt, scale = "{:,.0f}", 1.0
    elif kind == "sec":
        fmt, scale = "{:.1f}", 1.0
    else:
        # Losses span decades: four significant digits of the mean, std to the same decimal place.
        mag = math.floor(math.log10(abs(s.mean))) if s.mean else 0
        fmt, scale = f"{{:.{min(12, max(0, 3 - mag))}f}}", 1.0
    if s.std is None:
        return f"{fmt.format(scale * s.mean)} ± –"
    if kind == "int" and s.std == 0:
        return fmt.format(s.mean)  # identical weight counts over seeds: "± 0" is noise on the page
    return f"{fmt.format(scale * s.mean)} ± {fmt.format(scale * s.std)}"


# (header, stat key, format kind); columns that are blank in every row are dropped.
_STAT_COLUMNS = (
    ("test acc (%)", "test_accuracy", "pct"),
    ("test loss", "test_loss", "loss"),
    ("train acc (%)", "train_accuracy", "pct"),
    ("nonzero weights", "nonzero_weights", "int"),
    ("total width", "total_width", "int"),
)


def table_cells(groups: list[GroupStats]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of one results table (shared by Markdown, terminal and HTML)."""
    header = ["group", "n"]
    rows = [[g.label, str(g.n)] for g in groups]
    for title, key, kind in _STAT_COLUMNS:
        header.append(title)
        for row, g in zip(rows, groups):
            row.append(_fmt(g.stats.get(key), kind))
    header += ["connectivity", "width fraction", "wall s", "failed"]
    for row, g in zip(rows, groups):
        row.append("" if g.connectivity is None else f"{g.connectivity:.4g}")
        row.append("" if g.width_fraction is None else f"{g.width_fraction:.2f}")
        row.append(_fmt(g.stats.get("wall_seconds"), "sec"))
        row.append(str(g.failed) if g.failed else "")
    keep = [j for j in range(len(header)) if header[j] in ("group", "n") or any(r[j] for r in rows)]
    return [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def study_tables(groups: list[GroupStats]) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per study (its columns fit the study's task), as ``(study, header, rows)``."""
    studies = sorted({g.study for g in groups})
    return [(st, *table_cells([g for g in groups if g.study == st])) for st in studies]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table, padded so that it also reads well in a terminal."""

    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    cells = [[esc(c) for c in header]] + [[esc(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    # Numbers right-aligned, text left.
    text_cols = {j for j, h in enumerate(header) if h in TEXT_COLUMNS}

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if j in text_cols else c.rjust(w)
                                 for j, (c, w) in enumerate(zip(r, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if j not in text_cols else ("-" * (w + 2))
                          for j, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def format_results_table(rows: list[dict]) -> str:
    """The results table of a study's runs as Markdown (also readable as plain text in a terminal).

    Args:
        rows: Rows of :meth:`ResultStore.runs`.

    Returns:
        The table (one per study, each under a ``## study`` heading, when there are several), or a
        one-line note when no run has finished or failed yet.
    """
    tables = study_tables(aggregate(rows))
    if not tables:
        return "(no finished runs yet)"
    if len(tables) == 1:
        return markdown_table(*tables[0][1:])
    return "\n\n".join(f"## {study}\n\n{markdown_table(header, cells)}" for study, header, cells in tables)
