"""The comparison table of each task and the notes under it (ties, small validation split, widths that
had not settled), shared by Markdown, HTML and the terminal.

Widths and weight counts are shown **per seed** (and a width's median, the lower middle value for an
even count, so it is always a width some seed chose), never as a mean: a grid's seeds may choose 32 and
256, and no model has width 144.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from widthlab.report.compare import (
    SEARCH,
    ArmResult,
    Choice,
    compare_results,
    dense_reference,
    ratio,
    search_reference,
)
from widthlab.report.settle import SETTLE_FRACTION, SETTLE_NOTE
from widthlab.report.tables import METHOD_ORDER, _fmt, markdown_table
from widthlab.report.validation import SEPARATION_EXAMPLES, examples_apart, separated

MAX_LISTED_SEEDS = 4  # more seeds than this: "median (min–max)" instead of the list

TIE_RULE = ("Tie rule: a search keeps the member with the best validation metric; members with equal "
            "validation metrics tie, and the cheaper model is kept (fewer nonzero weights, then fewer "
            "training FLOPs, then fewer dense-equivalent FLOPs, then the earlier member of the sweep).")

COMPARE_NOTES = (
    "Per seed, a search (a method with a sweep: the dense width grid, the wide & sparse family, a "
    "search arm) keeps its member with the best validation metric and is charged for all its members, "
    "failed and pruned ones included (a failed member's wall seconds; its FLOPs were not metered, so "
    "the total is a lower bound, ≥); adaptive and self-expanding methods are one run per seed; a "
    "fixed retrain control (a dense net of the width such a run selected, trained from scratch with "
    "the same recipe) is charged its own run plus the run that found the width. "
    + TIE_RULE + " Widths and weights are listed per seed (seed order), with the median width (the "
    "lower middle value for an even number of seeds: a width some seed chose); other values are "
    "mean ± sample std over seeds; accuracies in %. The selected width is that of the model kept "
    "(the best-validation epoch); the end width is where training ended. " + SETTLE_NOTE + " Train "
    "FLOPs estimate the training steps' forward + backward passes (3 x forward FLOPs per example, at "
    "the widths and sparsity in use at each step; multiply-adds counted as 2 FLOPs) plus what a method "
    "records it computes besides (method_flops); they leave out evaluation. Wall and CPU seconds "
    "include everything. Relative columns divide by the dense grid (and the search arm) of the same "
    f"task. The validation split cannot separate two candidates {SEPARATION_EXAMPLES} example or less "
    "apart; such selections are flagged (classification only).")


def median_low(values: Sequence[float]) -> float:
    return statistics.median_low(sorted(values))


def per_seed(values: Sequence[float | None], fmt=lambda v: f"{v:,.0f}") -> str:
    """``a · b · c`` for a few seeds, ``median m (min–max)`` for many; blank when nothing is known."""
    have = [v for v in values if v is not None]
    if not have:
        return ""
    if len(set(have)) == 1 and len(have) == len(values):
        return fmt(have[0])
    if len(values) <= MAX_LISTED_SEEDS:
        return " · ".join("–" if v is None else fmt(v) for v in values)
    return f"median {fmt(median_low(have))} ({fmt(min(have))}–{fmt(max(have))})"


def _settled_text(choices: list[Choice]) -> str:
    flags = [c.path.settled for c in choices]
    if all(f is None for f in flags):
        return ""
    bad = [c for c in choices if c.path.settled is False]
    if not bad:
        return "settled"
    if len(bad) == len(choices):
        return "not settled"
    return "not settled: seed " + ", ".join(str(c.seed) for c in bad)


def width_cells(a: ArmResult) -> tuple[str, str, str]:
    """(selected width per seed and their median, selected epoch per seed, end width per seed +
    settled)."""
    sel = [c.total_width for c in a.choices]
    known = [w for w in sel if w is not None]
    if not known:
        return "", "", "", ""
    layouts = {tuple(c.widths.values()) for c in a.choices if c.widths}
    text = per_seed(sel)
    if len(layouts) == 1 and len(next(iter(layouts))) > 1:
        text += " (" + "-".join(str(w) for w in next(iter(layouts))) + ")"
    if len(set(known)) > 1 and len(known) <= MAX_LISTED_SEEDS:
        text += f" (median {median_low(known):,.0f})"
    changing = any(c.path.changes for c in a.choices)
    if not changing:
        return text, "", ""
    epochs = per_seed([c.best_epoch for c in a.choices], str)
    last = {c.epochs for c in a.choices if c.epochs is not None}
    if epochs and len(last) == 1:
        epochs += f" of {next(iter(last))}"
    end = per_seed([c.end_width for c in a.choices])
    flag = _settled_text(a.choices)
    return text, epochs, end + (f", {flag}" if flag else "")


def _rel(x, ref, key) -> str:
    r = ratio(x, ref, key)
    return "" if r is None else f"{r:.3g}×"


def sorted_arms(arms: Sequence[ArmResult]) -> list[ArmResult]:
    """Methods in the usual order, search arms last, a fixed retrain control right after its arm."""
    method = {a.arm: a.method for a in arms}

    def key(a: ArmResult):
        m = method.get(a.retrain_of, a.method) if a.retrain_of else a.method
        return (a.is_search_arm, METHOD_ORDER.get(m, len(METHOD_ORDER)), bool(a.retrain_of))
    return sorted(arms, key=key)


def compare_table(arms: list[ArmResult]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's comparison table (shared by Markdown, terminal and HTML)."""
    if not arms:
        return [], []
    metric = arms[0].metric
    ref, sref = dense_reference(arms), search_reference(arms)
    header = ["method", "runs/seed", "seeds", "test acc (%)" if metric == "test_accuracy" else "test loss",
              "selected width", "selected at epoch", "end width",
              "nonzero weights", "train FLOPs", "wall s", "CPU s", "FLOPs vs dense grid",
              "wall vs dense grid", "CPU vs dense grid", "FLOPs vs search arm", "wall vs search arm",
              "chosen by", "val ties", "failed", "pruned"]
    rows = []
    for a in sorted_arms(arms):
        flops, wall, cpu = a.stat("flops"), a.stat("wall"), a.stat("cpu")
        lower = "≥ " if a.incomplete else ""  # a failed member's FLOPs were never metered
        mark = " †" if a.unmetered else ""
        members = sorted({c.members for c in a.choices})
        ties = [len(c.ties) for c in a.choices]
        pruned = sum(c.pruned_members for c in a.choices)
        rows.append([
            a.name, "–".join(str(n) for n in (members[0], members[-1]) if members)
            if len(members) > 1 else (str(members[0]) if members else ""), str(len(a.choices)),
            _fmt(a.stat("test"), "pct" if metric == "test_accuracy" else "loss"),
            *width_cells(a), per_seed([c.weights for c in a.choices]),
            "" if flops.mean is None else f"{lower}{flops.mean:.3g}{mark}", _fmt(wall, "sec"),
            _fmt(cpu, "sec"), _rel(flops, ref, "flops"), _rel(wall, ref, "wall"), _rel(cpu, ref, "cpu"),
            _rel(flops, sref, "flops"), _rel(wall, sref, "wall"), a.selected_by,
            " · ".join(str(t) for t in ties) if any(ties) else "",
            str(a.failed) if a.failed else "", str(pruned) if pruned else "",
        ])
    keep = [j for j in range(len(header)) if j < 4 or any(r[j] for r in rows)]
    return [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def _member_name(m: dict) -> str:
    return f"w={m['width']}" if m.get("width") is not None else str(m.get("label", m.get("run_id")))


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _val(a: ArmResult, v: float | None) -> str:
    return _pct(v) if a.metric == "test_accuracy" else ("" if v is None else f"{v:.4g}")


def unsettled_note(a: ArmResult) -> str:
    bad = [c for c in a.choices if c.path.settled is False]
    if not bad:
        return ""
    n_seeds = len([c for c in a.choices if c.path.settled is not None])
    moved = ", ".join(f"{100 * c.path.moved:.0f}%" for c in bad)
    sel = ", ".join(f"{c.total_width:,.0f} (epoch {c.best_epoch})" if c.best_epoch else
                    f"{c.total_width:,.0f}" for c in bad if c.total_width is not None)
    end = ", ".join(f"{c.end_width:,.0f}" for c in bad if c.end_width is not None)
    return (f"{a.name}: the learned width had not settled in {len(bad)} of {n_seeds} seeds (total moved "
            f"{moved} over the last {SETTLE_FRACTION:.0%} of training); the selected model has {sel} "
            f"units, training ended at {end}.")


def tie_notes(a: ArmResult) -> list[str]:
    out = []
    for c in a.choices:
        if c.ties:
            names = ", ".join(_member_name(m) for m in c.ties)
            out.append(f"{a.name} seed {c.seed}: {names} tie with the kept w={c.width} at validation "
                       f"{_val(a, c.val)}; the cheaper model was kept.")
    return out


def small_validation_note(arms: Sequence[ArmResult]) -> str:
    """One warning when some search's best and runner-up are at most one validation example apart."""
    n = next((a.val_examples for a in arms if a.val_examples), None)
    if not n:
        return ""
    how = next(a.val_examples_how for a in arms if a.val_examples)
    cases = []
    for a in sorted_arms(arms):
        for c in a.choices:
            r = c.runner_up
            if r is None or c.val is None or a.metric != "test_accuracy":
                continue
            other = r["val_accuracy"]
            if separated(c.val, other, n):
                continue
            k = examples_apart(c.val, other, n)
            cases.append(f"{a.name} seed {c.seed} kept w={c.width} ({_pct(c.val)}) over "
                         f"{_member_name(r)} ({_pct(other)}), {k:g} example{'s' if k != 1 else ''} apart")
    if not cases:
        return ""
    src = "recorded" if how == "recorded" else "inferred from the recorded accuracies"
    return (f"Warning: the validation split ({n:,} examples, {src}; one example is "
            f"{100 / n:.2g} points of accuracy) is too small to separate the candidates: "
            + "; ".join(cases) + ".")


def pareto_note(arms: Sequence[ArmResult]) -> str:
    """Which methods have models on the front of metric vs training FLOPs and vs weights."""
    from widthlab.report.pareto import front, points

    parts = []
    for cost, what in (("flops", "training FLOPs"), ("weights", "nonzero weights")):
        pts = points(list(arms), cost)
        if not pts:
            continue
        fr = front(pts, maximise=arms[0].metric == "test_accuracy")
        names = {a.arm: a.name for a in arms}
        counts = {arm: sum(p.arm == arm for p in fr) for arm in dict.fromkeys(p.arm for p in fr)}
        chosen = sum(p.chosen for p in fr)
        parts.append(f"against {what}, {len(fr)} models (" + ", ".join(f"{names[a]} {n}" for a, n in
                                                             counts.items())
                     + f"; {chosen} of them chosen by their method)")
    if not parts:
        return ""
    return "On the Pareto front of every trained model: " + "; ".join(parts) + "."


def task_notes(arms: Sequence[ArmResult]) -> list[str]:
    """The notes under a task's table: unsettled widths, ties, an unseparating validation split, and
    the FLOPs that leave something out."""
    notes = [n for a in sorted_arms(arms) if (n := unsettled_note(a))]
    ties = [t for a in sorted_arms(arms) for t in tie_notes(a)]
    if ties:
        notes.append("Ties on validation: " + " ".join(ties))
    if warn := small_validation_note(arms):
        notes.append(warn)
    if front_note := pareto_note(arms):
        notes.append(front_note)
    for a in sorted_arms(arms):
        if a.unmetered:
            notes.append(f"† {a.name}: its FLOPs leave out {a.unmetered} (the runs record no "
                         "method_flops); its wall and CPU seconds include them.")
    return notes


def format_comparison(rows: list[dict], epochs: dict[str, list[dict]] | None = None) -> str:
    """The comparison tables of a study's runs, with their notes, as Markdown (readable in a terminal)."""
    tasks = compare_results(rows, epochs)
    if not tasks:
        return "(no finished runs yet)"
    parts = []
    for task, arms in tasks.items():
        notes = "\n\n".join(task_notes(arms))
        table = markdown_table(*compare_table(arms))
        parts.append(f"## {task}\n\n{table}" + (f"\n\n{notes}" if notes else ""))
    return "\n\n".join(parts)


__all__ = ["COMPARE_NOTES", "SEARCH", "TIE_RULE", "compare_table", "format_comparison", "per_seed",
           "task_notes"]
