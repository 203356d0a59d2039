"""Comparison studies (``kind: compare``): which width, found how, at what cost.

Pure functions over the rows of :meth:`ResultStore.runs` (and, where given, each run's per-epoch
records). For each task and compared method and seed:

* a **search** (a method with a sweep, e.g. the dense width grid or the wide & sparse family, or a
  search arm such as Optuna's) selects its member with the best validation metric (highest validation
  accuracy; lowest validation loss for regression) and is charged for **all** members, failed and
  pruned ones included: the search is what it costs to find that width;
* a **single** run (adaptive, self-expanding) is its own choice and cost; its **fixed retrain**
  control (a dense net of the widths it selected, trained from scratch; arm ``<arm>_retrain``) is
  shown right after it as ``<arm> → fixed retrain`` and charged its own run plus the run that found
  the width;
* a **search arm** (Optuna TPE, or random sampling as its control; trials tagged with their sampler
  and pruner) is a search whose members are its trials, pruned trials charged up to their pruning
  epoch and never chosen.

**Tie rule.** Members whose validation metrics are equal (to :data:`TIE_RTOL`) tie; the cheaper model
wins: fewer nonzero weights, then fewer training FLOPs, then fewer dense-equivalent FLOPs, then the
earlier member in the study's order. Every tie is reported.

A member's cost is its training FLOPs (``train_flops``: 3 x forward FLOPs per example x examples, at
the widths in use at each step; see ``train/compute.py``) plus ``method_flops`` when the run records
what its method computes besides (natural-gradient solves, expansion scoring), its wall seconds and,
when recorded, its process CPU seconds (``cpu_seconds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from widthlab.report.settle import WidthPath, width_path
from widthlab.report.tables import Stat, as_float, run_info, stat
from widthlab.report.validation import split_size

SEARCH = "search"
TIE_RTOL = 1e-9
# Arms that are a hyper-parameter search over the width (Optuna TPE, random search): the reference
# "search arm" of the verdict, next to the dense grid.
SEARCH_ARMS = ("search",)
SEARCH_METHODS = ("search", "optuna")
# Methods whose FLOPs leave something out unless the run records ``method_flops``.
UNMETERED = {"expanding": "natural-gradient solves and expansion scoring"}


@dataclass
class Choice:
    """One seed of one compared method: the chosen run and what the whole search cost."""

    seed: Any
    run_id: str
    members: int  # runs of the search for this seed, failed and pruned ones included
    test: float | None
    total_width: float | None  # of the selected model (the best-validation epoch)
    widths: dict[str, int]
    weights: float | None
    flops: float | None  # finished members' FLOPs (a failed member's were not metered)
    wall: float | None  # all members' wall seconds, failed ones included
    selected_by: str  # "validation", "only run", or "test (no validation metric)"
    failed_members: int = 0
    pruned_members: int = 0
    cpu: float | None = None  # all members' process CPU seconds, when every member recorded them
    width: int | None = None  # nominal width of the chosen member
    val: float | None = None  # its validation metric
    runner_up: dict | None = None  # the best other candidate of the seed (searches)
    ties: list[dict] = field(default_factory=list)  # other candidates with the chosen validation metric
    best_epoch: int | None = None
    epochs: int | None = None
    path: WidthPath = WidthPath(None, False, None, None)

    @property
    def end_width(self) -> float | None:
        return self.path.end if self.path.end is not None else self.total_width


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
    members: list[dict] = field(default_factory=list)  # every finished run, all seeds (Pareto view)
    val_examples: int | None = None  # the task's validation split size
    val_examples_how: str = ""  # "recorded" or "inferred"
    unmetered: str = ""  # what this arm's FLOPs leave out, if anything
    sampler: str = ""  # a search arm's sampler (tpe, random) and pruner, from its runs' tags
    pruner: str = ""
    retrain_of: str = ""  # a fixed retrain control: the learned-width arm whose width it trains

    def stat(self, key: str) -> Stat:
        return stat([getattr(c, key) for c in self.choices])

    @property
    def selected_by(self) -> str:
        return ", ".join(sorted({c.selected_by for c in self.choices}))

    @property
    def incomplete(self) -> bool:
        """A search with failed members: its FLOPs are a lower bound."""
        return any(c.failed_members for c in self.choices)

    @property
    def is_search_arm(self) -> bool:
        return is_search_arm(self)

    @property
    def name(self) -> str:
        return _name(self)


def is_compare(runs: list[dict]) -> bool:
    return any((r.get("config") or {}).get("arm") for r in runs)


def is_search_arm(a: ArmResult) -> bool:
    """A hyper-parameter search over the width (a search arm's runs carry their sampler)."""
    return bool(a.sampler) or a.arm in SEARCH_ARMS or a.method in SEARCH_METHODS


SAMPLER_LABELS = {"tpe": "Optuna TPE", "random": "random sampling"}
PRUNER_LABELS = {"hyperband": "Hyperband", "successive_halving": "successive halving", "none": ""}


def _tags(row: dict) -> tuple[str, str, str]:
    cfg = row.get("config") or {}
    return str(cfg.get("task", "")), str(cfg.get("arm", "")), str(cfg.get("role", "single"))


def _is_pruned(row: dict) -> bool:
    s = row.get("summary") or {}
    return row.get("status") == "pruned" or s.get("pruned") is True or s.get("stop_reason") == "pruned"


def _sum(values: list[float | None], *, all_needed: bool) -> float | None:
    have = [v for v in values if v is not None]
    if not have or (all_needed and len(have) < len(values)):
        return None
    return sum(have)


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_RTOL * max(1.0, abs(a), abs(b))


def _cost_key(m: dict) -> tuple:
    """Cheaper first: nonzero weights, training FLOPs, dense-equivalent FLOPs, study order."""
    def val(k):
        return m[k] if m.get(k) is not None else math.inf
    return (val("nonzero_weights"), val("flops"), val("train_flops_dense"), m["position"])


def _choice(members: list[dict], failed: list[dict], pruned: list[dict], metric: str) -> Choice | None:
    """The member chosen by validation and the summed cost of all members of one seed (None when no
    member finished)."""
    if not members:
        return None
    maximise = metric == "test_accuracy"
    val_key = "val_accuracy" if maximise else "val_loss"
    scored = [m for m in members if m[val_key] is not None]
    ties: list[dict] = []
    runner_up = None
    if len(members) + len(failed) + len(pruned) == 1:
        chosen, how = members[0], "only run"
    elif scored:
        best = (max if maximise else min)(m[val_key] for m in scored)
        tied = sorted((m for m in scored if _tied(m[val_key], best)), key=_cost_key)
        chosen, how, ties = tied[0], "validation", tied[1:]
        rest = [m for m in scored if m is not chosen]
        if rest:
            runner_up = min(rest, key=lambda m: ((-m[val_key] if maximise else m[val_key]),
                                                 *_cost_key(m)))
    else:
        pool = [m for m in members if m[metric] is not None] or members
        chosen = (max if maximise else min)(pool, key=lambda m: m[metric] if m[metric] is not None else 0)
        how = "test (no validation metric)"
    charged = members + pruned
    return Choice(seed=chosen["seed"], run_id=chosen["run_id"],
                  members=len(members) + len(failed) + len(pruned), test=chosen[metric],
                  total_width=chosen["total_width"], widths=chosen["widths"],
                  weights=chosen["nonzero_weights"],
                  flops=_sum([m["flops"] for m in charged], all_needed=True),
                  wall=_sum([m["wall_seconds"] for m in charged + failed], all_needed=False),
                  cpu=_sum([m["cpu_seconds"] for m in charged + failed], all_needed=True),
                  selected_by=how, failed_members=len(failed), pruned_members=len(pruned),
                  width=chosen["width"], val=chosen[val_key], runner_up=runner_up, ties=ties,
                  best_epoch=chosen["best_epoch"], epochs=chosen["epochs"])


def _member(row: dict) -> dict:
    info = run_info(row)
    s = row.get("summary") or {}
    train = as_float(s.get("train_flops"))
    extra = as_float(s.get("method_flops"))
    info.update(train_flops=train, method_flops=extra,
                flops=None if train is None else train + (extra or 0.0),
                train_flops_dense=as_float(s.get("train_flops_dense")),
                cpu_seconds=as_float(s.get("cpu_seconds")), val_loss=as_float(s.get("val_loss")),
                widths=s.get("widths") if isinstance(s.get("widths"), dict) else {},
                best_epoch=int(b) if (b := as_float(s.get("best_epoch"))) is not None else None,
                epochs=int(e) if (e := as_float(s.get("epochs"))) is not None else None,
                has_method_flops="method_flops" in s)
    return info


def compare_results(runs: list[dict], epochs: dict[str, list[dict]] | None = None
                    ) -> dict[str, list[ArmResult]]:
    """Task name -> one :class:`ArmResult` per compared method, in the study's method order.

    The headline metric is decided once per task (test accuracy if any run of the task reports one,
    else test loss), so every method of a task is chosen and shown by the same number.

    Args:
        runs: Rows of :meth:`ResultStore.runs` (non-compare rows are ignored).
        epochs: Per-epoch records by run id; they give the width at the end of training, whether a
            learned width settled, and (when the store does not record it) the validation split size.
    """
    epochs = epochs or {}
    by_arm: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(runs, key=lambda r: r.get("position") or 0):
        task, arm, role = _tags(row)
        status = row.get("status")
        if not arm or status not in ("done", "failed", "pruned"):
            continue
        info = _member(row)
        cfg = row.get("config") or {}
        entry = by_arm.setdefault((task, arm), {"role": role, "method": info["method"], "seeds": {},
                                                "order": len(by_arm), "summaries": [],
                                                "sampler": str(cfg.get("sampler") or ""),
                                                "pruner": str(cfg.get("pruner") or ""),
                                                "retrain_of": str(cfg.get("retrain_of") or "")})
        entry["summaries"].append(row.get("summary") or {})
        done, failed, pruned = entry["seeds"].setdefault(info["seed"], ([], [], []))
        if _is_pruned(row):
            pruned.append(info)
        else:
            (done if status == "done" else failed).append(info)
    classification = {task for (task, _), e in by_arm.items()
                      if any(m["test_accuracy"] is not None for d, _, _ in e["seeds"].values() for m in d)}
    val_sizes = {}
    for task in {t for t, _ in by_arm}:
        summaries = [s for (t, _), e in by_arm.items() if t == task for s in e["summaries"]]
        ids = [s.get("run_id") for s in summaries]
        val_sizes[task] = split_size(summaries, [epochs.get(i) or [] for i in ids]) \
            if task in classification else (None, "")
    out: dict[str, list[ArmResult]] = {}
    order = {key: e["order"] for key, e in by_arm.items()}
    for (task, _arm), e in by_arm.items():  # a retrain control right after the arm it retrains
        if e["retrain_of"] and (task, e["retrain_of"]) in order:
            e["order"] = order[(task, e["retrain_of"])] + 0.5
    for (task, arm), e in sorted(by_arm.items(), key=lambda kv: kv[1]["order"]):
        metric = "test_accuracy" if task in classification else "test_loss"
        res = ArmResult(task, arm, e["method"], e["role"], metric,
                        failed=sum(len(f) for _, f, _ in e["seeds"].values()),
                        sampler=e["sampler"], pruner=e["pruner"], retrain_of=e["retrain_of"])
        res.val_examples, res.val_examples_how = val_sizes[task]
        for seed in sorted(e["seeds"], key=lambda s: (s is None, s)):
            done, failed, pruned = e["seeds"][seed]
            if (c := _choice(done, failed, pruned, metric)) is not None:
                c.path = width_path(epochs.get(c.run_id) or [])
                res.choices.append(c)
            res.members.extend(done)
            if e["role"] == SEARCH:
                for m in done:
                    width = m["width"] if m["width"] is not None else -1
                    res.members_by_width.setdefault(width, []).append(m)
        if e["method"] in UNMETERED and not any(m["has_method_flops"] for m in res.members):
            res.unmetered = UNMETERED[e["method"]]
        out.setdefault(task, []).append(res)
    for arms in out.values():
        charge_retrains(arms)
    return out


def charge_retrains(arms: list[ArmResult]) -> None:
    """A fixed retrain control is charged its own run **plus** the run that found its width (per
    seed): the width was not free. A seed whose finding run has no cost recorded keeps its own."""
    by_name = {a.arm: a for a in arms}
    for a in arms:
        src = by_name.get(a.retrain_of)
        if src is None:
            continue
        found = {c.seed: c for c in src.choices}
        for c in a.choices:
            f = found.get(c.seed)
            if f is None:
                continue
            c.flops = None if c.flops is None or f.flops is None else c.flops + f.flops
            c.wall = None if c.wall is None or f.wall is None else c.wall + f.wall
            c.cpu = None if c.cpu is None or f.cpu is None else c.cpu + f.cpu
            c.members += f.members


def dense_reference(arms: list[ArmResult]) -> ArmResult | None:
    """The dense width grid of a task: the reference for relative compute."""
    dense = [a for a in arms if a.method == "dense" and a.role == SEARCH and a.choices
             and not is_search_arm(a)]
    return dense[0] if dense else None


def search_reference(arms: list[ArmResult]) -> ArmResult | None:
    """The task's hyper-parameter search arm (e.g. Optuna over the width), when the study has one."""
    found = [a for a in arms if is_search_arm(a) and a.choices]
    found.sort(key=lambda a: a.sampler != "tpe")  # the model-based search first, random the control
    return found[0] if found else None


def ratio(x: Stat, ref: ArmResult | None, key: str) -> float | None:
    """Mean of ``x`` over the mean of ``key`` of the reference arm (None when either is missing)."""
    if ref is None or x.mean is None:
        return None
    base = ref.stat(key).mean
    return x.mean / base if base else None


def _name(a: ArmResult) -> str:
    if a.retrain_of:
        return f"{a.retrain_of} → fixed retrain"
    if a.sampler:
        pruner = PRUNER_LABELS.get(a.pruner, a.pruner)
        return f"{a.arm} ({SAMPLER_LABELS.get(a.sampler, a.sampler)}{' + ' + pruner if pruner else ''})"
    if a.role != SEARCH or is_search_arm(a):
        return a.arm + (" arm" if is_search_arm(a) and a.arm == "search" else "")
    return a.arm + {"dense": " grid", "widesparse": " family"}.get(a.method, " search")


# The tables and the verdict live in their own modules; these names stay importable from here.
def compare_table(arms: list[ArmResult]) -> tuple[list[str], list[list[str]]]:
    from widthlab.report.compare_tables import compare_table as table

    return table(arms)


def format_comparison(rows: list[dict], epochs: dict[str, list[dict]] | None = None) -> str:
    from widthlab.report.compare_tables import format_comparison as fmt

    return fmt(rows, epochs)
