"""The verdict of a comparison: per task, which width, found by which method, at what cost.

Rule (stated in the report, :data:`VERDICT_RULE`):

1. **Seed noise.** Two methods *tie* when their mean test metrics differ by no more than twice the
   standard error of the difference of the means over seeds, ``2 sqrt(s1²/n1 + s2²/n2)`` (sample
   stds; a method with one seed borrows the other's std). With one seed on both sides the noise is
   unknown and no tie is called.
2. **Recommendation.** Among the methods that tie with the best mean test metric (the best included),
   the one that was cheapest to run (training FLOPs of its whole search, then wall seconds) is
   recommended, with its width as chosen per seed (median: the lower middle value, a width some seed
   chose).
3. **Cost** is relative to the dense grid and, when the study has one, to the search arm (e.g. Optuna
   over the width), per task.

``verdict_text(DIR)`` is what the command line prints after ``run`` and ``demo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from widthlab.report.compare import ArmResult, compare_results, dense_reference, ratio, search_reference
from widthlab.report.compare_tables import median_low, per_seed, small_validation_note
from widthlab.report.tables import Stat, _fmt

NOISE_SE = 2.0

VERDICT_RULE = (
    "How the verdict is reached: two methods tie (within seed noise) when their mean test metrics differ "
    f"by no more than {NOISE_SE:g} standard errors of the difference of the means over seeds, "
    f"{NOISE_SE:g}·sqrt(s1²/n1 + s2²/n2) (a method with one seed borrows the other's spread; with one "
    "seed each, no tie is called). Among the methods that tie with the best mean, the cheapest to run "
    "(training FLOPs of its whole search, then wall seconds) is recommended, with the width it chose "
    "per seed. Costs are relative to the dense grid, and to the search arm where the study has one.")


@dataclass
class Verdict:
    """The verdict of one task (see the module docstring for the rule)."""

    task: str
    metric: str
    recommended: ArmResult
    best: ArmResult  # best mean test metric
    ties: list[ArmResult] = field(default_factory=list)  # within seed noise of the best (not recommended)
    behind: list[tuple[ArmResult, float]] = field(default_factory=list)  # beyond noise, with the gap
    untested: list[tuple[ArmResult, float]] = field(default_factory=list)  # noise unknown
    width: float | None = None  # median of the recommended method's chosen widths
    caveats: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return verdict_line(self)


def within_noise(a: Stat, b: Stat) -> bool | None:
    """True when the means of ``a`` and ``b`` differ by at most NOISE_SE standard errors; None when
    neither has a spread (one seed each)."""
    if a.mean is None or b.mean is None:
        return None
    if a.mean == b.mean:
        return True
    sa, sb = a.std, b.std
    if sa is None and sb is None:
        return None
    sa = sb if sa is None else sa
    sb = sa if sb is None else sb
    se = math.sqrt(sa * sa / a.n + sb * sb / b.n)
    return abs(a.mean - b.mean) <= NOISE_SE * se


def _cost(a: ArmResult) -> tuple[float, float]:
    f, w = a.stat("flops").mean, a.stat("wall").mean
    return (math.inf if f is None else f, math.inf if w is None else w)


def task_verdict(task: str, arms: list[ArmResult]) -> Verdict | None:
    """The :class:`Verdict` of one task's arms; None when no method has a test metric."""
    done = [a for a in arms if a.stat("test").mean is not None]
    if not done:
        return None
    maximise = done[0].metric == "test_accuracy"
    sign = 1.0 if maximise else -1.0
    best = max(done, key=lambda a: (sign * a.stat("test").mean, -_cost(a)[0]))
    tied = [a for a in done if a is best or within_noise(a.stat("test"), best.stat("test"))]
    rec = min(tied, key=_cost)
    v = Verdict(task, best.metric, rec, best)
    for a in done:
        if a is rec:
            continue
        gap = a.stat("test").mean - rec.stat("test").mean
        noise = within_noise(a.stat("test"), rec.stat("test"))
        if a in tied or noise:
            v.ties.append(a)
        elif noise is None:
            v.untested.append((a, gap))
        else:
            v.behind.append((a, gap))
    v.behind.sort(key=lambda ag: abs(ag[1]))  # closest first
    v.untested.sort(key=lambda ag: abs(ag[1]))
    widths = [c.total_width for c in rec.choices if c.total_width is not None]
    v.width = median_low(widths) if widths else None
    bad = [c for c in rec.choices if c.path.settled is False]
    if bad:
        v.caveats.append(f"its learned width had not settled in {len(bad)} of {len(rec.choices)} seeds "
                         f"(training ended at {per_seed([c.end_width for c in rec.choices])})")
    if rec.unmetered:
        v.caveats.append(f"its FLOPs leave out {rec.unmetered}")
    if small_validation_note(arms):
        v.caveats.append("the validation split is too small to separate some searches' candidates "
                         "(see the warning under the table)")
    return v


def _test(a: ArmResult) -> str:
    s = a.stat("test")
    pct = a.metric == "test_accuracy"
    return _fmt(s, "pct" if pct else "loss") + ("%" if pct else "")


def _gap(a: ArmResult, gap: float) -> str:
    if a.metric == "test_accuracy":
        return f"{100 * gap:+.2f} points"
    return f"{gap:+.3g} loss"


def _relative(v: Verdict, arms: list[ArmResult]) -> str:
    rec = v.recommended
    parts = []
    for ref, what in ((dense_reference(arms), "the dense grid"), (search_reference(arms), "the search arm")):
        if ref is None:
            continue
        if ref is rec:
            parts.append(f"it is {what}")
            continue
        costs = (("flops", "training FLOPs"), ("wall", "wall seconds"), ("cpu", "CPU seconds"))
        rel = []
        for key, label in costs:
            r = ratio(rec.stat(key), ref, key)
            if r is not None:
                rel.append(f"{r:.3g}× {'its' if rel else what + chr(39) + 's'} {label}")
        if rel:
            parts.append(", ".join(rel))
    return "; ".join(parts)


def verdict_line(v: Verdict, arms: list[ArmResult] | None = None) -> str:
    """The verdict of one task as one paragraph of plain text."""
    rec = v.recommended
    if arms is None:
        arms = [rec, *v.ties, *(a for a, _ in v.behind), *(a for a, _ in v.untested)]
    seeds = len([c for c in rec.choices if c.test is not None])
    width = ""
    if v.width is not None:
        per = per_seed([c.total_width for c in rec.choices])
        width = f" at width {v.width:,.0f}"
        if per != f"{v.width:,.0f}":
            width += f" (chosen per seed: {per})"
    out = [f"{v.task}: use {rec.name}{width}; test {'accuracy' if v.metric == 'test_accuracy' else 'loss'} "
           f"{_test(rec)} over {seeds} seed{'s' if seeds != 1 else ''}"
           + (" (the best mean)." if rec is v.best else f" (ties with the best mean, {v.best.name}, "
              "and is cheaper).")]
    if rel := _relative(v, arms):
        out.append(f"Cost: {rel}.")
    if v.ties:
        out.append("Tie (within seed noise): " + ", ".join(f"{a.name} {_test(a)}" for a in v.ties) + ".")
    if v.behind:
        out.append("Behind, beyond seed noise: " + ", ".join(f"{a.name} {_test(a)} ({_gap(a, g)})"
                                                             for a, g in v.behind) + ".")
    if v.untested:
        out.append("One seed each, noise unknown: " + ", ".join(f"{a.name} {_test(a)} ({_gap(a, g)})"
                                                                for a, g in v.untested) + ".")
    if v.caveats:
        out.append("Caveats: " + "; ".join(v.caveats) + ".")
    return " ".join(out)


def verdicts(tasks: dict[str, list[ArmResult]]) -> list[tuple[Verdict, str]]:
    """``(verdict, paragraph)`` of every task that has a test metric, in task order."""
    out = []
    for task, arms in tasks.items():
        if (v := task_verdict(task, arms)) is not None:
            out.append((v, verdict_line(v, arms)))
    return out


def _load(out_dir: str | Path) -> tuple[list[dict], dict[str, list[dict]]]:
    from widthlab.studies.store import ResultStore

    with ResultStore(Path(out_dir), create=False) as store:
        runs = store.runs()
        epochs = {r["run_id"]: store.epochs(r["run_id"]) for r in runs if r["status"] == "done"}
    return runs, epochs


def verdict_text(out_dir: str | Path) -> str:
    """The verdict of every task of the comparison study in ``out_dir`` (empty when it is not one)."""
    runs, epochs = _load(out_dir)
    lines = [line for _, line in verdicts(compare_results(runs, epochs))]
    return "Verdict\n\n" + "\n\n".join(lines) if lines else ""


def comparison_text(out_dir: str | Path) -> str:
    """What ``run``/``demo`` print for a comparison: the verdict, then each task's table and notes."""
    from widthlab.report.compare_tables import format_comparison

    runs, epochs = _load(out_dir)
    lines = [line for _, line in verdicts(compare_results(runs, epochs))]
    head = "Verdict\n\n" + "\n\n".join(lines) + "\n\n" if lines else ""
    return head + format_comparison(runs, epochs)
