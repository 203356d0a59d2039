"""Comparison studies (``kind: compare``): which width, found how, at what cost.

Pure functions over the rows of :meth:`ResultStore.runs`. For each task and compared method and seed:

* a **search** (a method with a sweep, e.g. the dense width grid or the wide & sparse family) selects
  its member with the best validation metric (highest validation accuracy; lowest validation loss for
  regression) and is charged for **all** members: the search is what it costs to find that width;
* a **single** run (adaptive, self-expanding) is its own choice and cost.

The chosen run's test metric, final widths and nonzero weights, and the summed training FLOPs
(``train_flops``: 3 x forward FLOPs per example x examples, at the widths in use at each step; see
``train/compute.py``) and wall seconds are then averaged over seeds (mean ± sample std). Compute is
also shown relative to the dense grid of the same task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from widthlab.report.tables import METHOD_ORDER, Stat, _fmt, as_float, run_info, stat

SEARCH = "search"


@dataclass
class Choice:
    """One seed of one compared method: the chosen run and what the whole search cost."""

    seed: Any
    run_id: str
    members: int  # runs of the search for this seed, failed ones included
    test: float | None
    total_width: float | None
    widths: dict[str, int]
    weights: float | None
    flops: float | None  # finished members' FLOPs (a failed member's were not metered)
    wall: float | None  # all members' wall seconds, failed ones included
    selected_by: str  # "validation", "only run", or "test (no validation metric)"
    failed_members: int = 0


@dataclass
class ArmResult:
    """One row of a task's comparison table."""

    task: str
    arm: str
    method: str
    role: str
    metric: str
    choices: list[Choice] = field(default_factory=list)
    failed: int = 0
    members_by_width: dict[float, list[dict]] = field(default_factory=dict)  # search members (plots)

    def stat(self, key: str) -> Stat:
        return stat([getattr(c, key) for c in self.choices])

    @property
    def selected_by(self) -> str:
        return ", ".join(sorted({c.selected_by for c in self.choices}))

    @property
    def incomplete(self) -> bool:
        """A search with failed members: its FLOPs are a lower bound."""
        return any(c.failed_members for c in self.choices)


def is_compare(runs: list[dict]) -> bool:
    return any((r.get("config") or {}).get("arm") for r in runs)


def _tags(row: dict) -> tuple[str, str, str]:
    cfg = row.get("config") or {}
    return str(cfg.get("task", "")), str(cfg.get("arm", "")), str(cfg.get("role", "single"))


def _choice(members: list[dict], failed: list[dict], metric: str) -> Choice | None:
    """The member chosen by validation and the summed cost of all members of one seed (None when every
    member failed)."""
    if not members:
        return None
    maximise = metric == "test_accuracy"
    val_key = "val_accuracy" if maximise else "val_loss"
    scored = [m for m in members if m[val_key] is not None]
    if len(members) + len(failed) == 1:
        chosen, how = members[0], "only run"
    elif scored:
        # Ties go to the smaller model (fewer nonzero weights; unknown counts last), then study order.
        def key(m):
            v = m[val_key] if maximise else -m[val_key]
            w = m["nonzero_weights"]
            return (v, -(w if w is not None else math.inf), -m["position"])
        chosen, how = max(scored, key=key), "validation"
    else:
        pool = [m for m in members if m[metric] is not None] or members
        chosen = (max if maximise else min)(pool, key=lambda m: m[metric] if m[metric] is not None else 0)
        how = "test (no validation metric)"
    flops = [m["train_flops"] for m in members]
    walls = [m["wall_seconds"] for m in members + failed]
    return Choice(seed=chosen["seed"], run_id=chosen["run_id"], members=len(members) + len(failed),
                  test=chosen[metric], total_width=chosen["total_width"], widths=chosen["widths"],
                  weights=chosen["nonzero_weights"],
                  flops=sum(flops) if all(f is not None for f in flops) else None,
                  wall=sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None,
                  selected_by=how, failed_members=len(failed))


def compare_results(runs: list[dict]) -> dict[str, list[ArmResult]]:
    """Task name -> one :class:`ArmResult` per compared method, in the study's method order.

    The headline metric is decided once per task (test accuracy if any run of the task reports one,
    else test loss), so every method of a task is chosen and shown by the same number.

    Args:
        runs: Rows of :meth:`ResultStore.runs` (non-compare rows are ignored).
    """
    by_arm: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(runs, key=lambda r: r.get("position") or 0):
        task, arm, role = _tags(row)
        if not arm or row.get("status") not in ("done", "failed"):
            continue
        info = run_info(row)
        s = row.get("summary") or {}
        info["train_flops"] = as_float(s.get("train_flops"))
        info["val_loss"] = as_float(s.get("val_loss"))
        info["widths"] = s.get("widths") if isinstance(s.get("widths"), dict) else {}
        entry = by_arm.setdefault((task, arm), {"role": role, "method": info["method"], "seeds": {},
                                                "order": len(by_arm)})
        done, failed = entry["seeds"].setdefault(info["seed"], ([], []))
        (done if row["status"] == "done" else failed).append(info)
    classification = {task for (task, _), e in by_arm.items()
                      if any(m["test_accuracy"] is not None for d, _ in e["seeds"].values() for m in d)}
    out: dict[str, list[ArmResult]] = {}
    for (task, arm), e in sorted(by_arm.items(), key=lambda kv: kv[1]["order"]):
        metric = "test_accuracy" if task in classification else "test_loss"
        res = ArmResult(task, arm, e["method"], e["role"], metric,
                        failed=sum(len(f) for _, f in e["seeds"].values()))
        for seed in sorted(e["seeds"], key=lambda s: (s is None, s)):
            done, failed = e["seeds"][seed]
            if (c := _choice(done, failed, metric)) is not None:
                res.choices.append(c)
            if e["role"] == SEARCH:
                for m in done:
                    width = m["width"] if m["width"] is not None else -1
                    res.members_by_width.setdefault(width, []).append(m)
        out.setdefault(task, []).append(res)
    return out


def dense_reference(arms: list[ArmResult]) -> ArmResult | None:
    """The dense width grid of a task: the reference for relative compute."""
    dense = [a for a in arms if a.method == "dense" and a.role == SEARCH and a.choices]
    return dense[0] if dense else None


def _ratio(x: Stat, ref: ArmResult | None, key: str) -> str:
    if ref is None or x.mean is None:
        return ""
    base = ref.stat(key).mean
    return f"{x.mean / base:.3g}×" if base else ""


def _widths_text(arm: ArmResult) -> str:
    """Final width: mean ± std of the total, with the per-layer widths when they are few and equal."""
    s = arm.stat("total_width")
    if s.mean is None:
        return ""
    layouts = {tuple(c.widths.values()) for c in arm.choices if c.widths}
    text = _fmt(s, "int")
    if len(layouts) == 1 and len(next(iter(layouts))) > 1:
        text += " (" + "-".join(str(w) for w in next(iter(layouts))) + ")"
    return text


def compare_table(arms: list[ArmResult]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's comparison table (shared by Markdown, terminal and HTML)."""
    if not arms:
        return [], []
    metric = arms[0].metric
    ref = dense_reference(arms)
    header = ["method", "runs/seed", "seeds", "test acc (%)" if metric == "test_accuracy" else "test loss",
              "final width", "nonzero weights", "train FLOPs", "wall s", "FLOPs vs dense grid",
              "wall vs dense grid", "chosen by", "failed"]
    rows = []
    for a in sorted(arms, key=lambda a: METHOD_ORDER.get(a.method, len(METHOD_ORDER))):
        flops, wall = a.stat("flops"), a.stat("wall")
        lower = "≥ " if a.incomplete else ""  # a failed member's FLOPs were never metered
        members = sorted({c.members for c in a.choices})
        rows.append([
            _name(a), "–".join(str(n) for n in (members[0], members[-1]) if members)
            if len(members) > 1 else (str(members[0]) if members else ""), str(len(a.choices)),
            _fmt(a.stat("test"), "pct" if metric == "test_accuracy" else "loss"),
            _widths_text(a), _fmt(a.stat("weights"), "int"),
            "" if flops.mean is None else f"{lower}{flops.mean:.3g}", _fmt(wall, "sec"),
            _ratio(flops, ref, "flops"), _ratio(wall, ref, "wall"), a.selected_by,
            str(a.failed) if a.failed else "",
        ])
    keep = [j for j in range(len(header)) if j < 4 or any(r[j] for r in rows)]
    return [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def verdict(arms: list[ArmResult]) -> str:
    """One factual line per task: who has the best test metric, and who spent the least FLOPs, the
    least wall time and the fewest weights (each with its own number)."""
    done = [a for a in arms if a.stat("test").mean is not None]
    if not done:
        return ""
    maximise = done[0].metric == "test_accuracy"
    best = (max if maximise else min)(done, key=lambda a: a.stat("test").mean)
    test = _fmt(best.stat("test"), "pct" if maximise else "loss") + ("%" if maximise else "")
    parts = [f"best test {'accuracy' if maximise else 'loss'}: {_name(best)} ({test})"]
    ref = dense_reference(arms)
    for key, what, show in (("flops", "fewest training FLOPs", lambda v: f"{v:.3g}"),
                            ("wall", "least wall time", lambda v: f"{v:.1f} s"),
                            ("weights", "fewest weights", lambda v: f"{v:,.0f}")):
        have = [a for a in done if a.stat(key).mean is not None]
        if have:
            a = min(have, key=lambda a: a.stat(key).mean)
            rel = _ratio(a.stat(key), ref, key) if key != "weights" and a is not ref else ""
            parts.append(f"{what}: {_name(a)} ({show(a.stat(key).mean)}"
                         + (f", {rel} the dense grid" if rel else "") + ")")
    return "; ".join(parts) + "."


def _name(a: ArmResult) -> str:
    if a.role != SEARCH:
        return a.arm
    return a.arm + {"dense": " grid", "widesparse": " family"}.get(a.method, " search")


COMPARE_NOTES = (
    "Per seed, a search (a method with a sweep: the dense width grid, the wide & sparse family) keeps "
    "its member with the best validation metric and is charged for all its members, failed ones "
    "included (their wall seconds; their FLOPs were not metered, so the total is a lower bound, ≥); "
    "adaptive and self-expanding methods are one run per seed. Values are mean ± sample std over "
    "seeds; accuracies in %. Train FLOPs estimate the training steps' forward + backward passes "
    "(3 x forward FLOPs per example, at the widths and sparsity in use at each step; multiply-adds "
    "counted as 2 FLOPs); they leave out evaluation, natural-gradient solves and expansion scoring, "
    "which the wall seconds include. Relative columns divide by the dense grid of the same task.")


def format_comparison(rows: list[dict]) -> str:
    """The comparison tables of a study's runs as Markdown (readable as plain text in a terminal)."""
    from widthlab.report.tables import markdown_table

    tasks = compare_results(rows)
    if not tasks:
        return "(no finished runs yet)"
    return "\n\n".join(f"## {task}\n\n{markdown_table(*compare_table(arms))}\n\n{verdict(arms)}"
                       for task, arms in tasks.items())
