"""Which run goes next: a study's fixed runs plus the runs a comparison decides while it runs.

Most runs are known before a study starts (``expand_runs``). A comparison also has **dynamic
sources**, whose runs depend on results:

* a search arm's Optuna study (:class:`widthlab.search.driver.SearchDriver`), one per task and seed;
* the **fixed retrain control** of a learned-width arm (adaptive, self-expanding): once the arm's run
  of a seed finished, a dense net of the hidden widths it selected, trained from scratch with the
  arm's training recipe (its ``train`` section: optimizer, epochs, schedule; not a method's own
  optimizer such as K-FAC), in the spirit of the adaptive-width paper's fixed-width comparison
  (Errica et al. 2025). Arm ``<arm>_retrain``, tag ``retrain_of``. Default on for adaptive and
  expanding arms of MLP tasks; ``retrain: false`` on the arm turns it off.

:class:`Schedule` hands out a source's run first (a search is a chain of rounds: keeping it moving
shortens the study), else the next fixed run; :data:`WAIT` when every source waits for runs in flight.
Each source reads ``results.sqlite`` to learn what finished, so a resumed study continues where the
store and the Optuna journal say it stopped.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path
from typing import Any

from widthlab.search.driver import WAIT, LazyStorage, SearchDriver
from widthlab.studies.load import RunSpec, expand_runs
from widthlab.studies.store import ResultStore

SLOT = 100_000  # positions reserved per dynamic source (trials of one search and seed)


def run_summary(store: ResultStore, run_id: str) -> dict[str, Any] | None:
    import json

    row = store.conn.execute("SELECT summary FROM runs WHERE run_id=?", (run_id,)).fetchone()
    return json.loads(row[0]) if row and row[0] else None


class _StoreView:
    """The two reads a source needs from the results database."""

    def __init__(self, store: ResultStore):
        self.store = store

    def status(self, run_id: str) -> str | None:
        return self.store.status(run_id)

    def summary(self, run_id: str) -> dict[str, Any] | None:
        return run_summary(self.store, run_id)


def ordered_widths(widths: dict[str, int]) -> list[int]:
    """``{"hidden.1": 5, "hidden.0": 9}`` -> ``[9, 5]`` (layer order, not text order)."""
    def key(name: str):
        tail = name.rsplit(".", 1)[-1]
        return (name.rsplit(".", 1)[0], int(tail) if tail.isdigit() else 0)
    return [int(widths[k]) for k in sorted(widths, key=key)]


class RetrainSource:
    """The fixed retrain control of one learned-width run (see the module docstring)."""

    def __init__(self, arm_run: RunSpec, position: int):
        self.arm_run, self.position = arm_run, position
        self.handed = False
        self.expected = 1

    def retrain_run(self, widths: dict[str, int]) -> RunSpec | None:
        s = self.arm_run.spec
        model = s.model.model_dump(exclude={"width", "widths", "depth"}, exclude_none=True)
        model.pop("depth", None)
        from widthlab.models import model_options

        activation = s.method.options().get("activation")
        if activation is not None and "activation" in model_options(s.model.name):
            model["activation"] = activation  # the learned net's nonlinearity
        model["widths"] = ordered_widths(widths)
        sub = s.model_copy(update={"model": type(s.model).model_validate(model),
                                   "method": type(s.method).model_validate({"name": "dense"}),
                                   "seeds": [self.arm_run.seed], "sweep": {}})
        arm = self.arm_run.tags["arm"]
        tags = {"task": self.arm_run.tags["task"], "arm": arm + "_retrain", "role": "single",
                "retrain_of": arm}
        [run] = expand_runs(sub, f"retrain of {arm}", tags=tags)
        return dataclasses.replace(run, position=self.position)

    def _ready(self, store) -> RunSpec | None | str:
        status = store.status(self.arm_run.run_id)
        if status in ("failed",):
            return None
        if status != "done":
            return WAIT
        widths = (store.summary(self.arm_run.run_id) or {}).get("widths")
        if not isinstance(widths, dict) or not widths:
            return None
        return self.retrain_run(widths)

    def known_run_ids(self, store) -> set[str]:
        r = self._ready(store)
        return {r.run_id} if isinstance(r, RunSpec) else set()

    def next_run(self, store):
        if self.handed:
            return None
        r = self._ready(store)
        if isinstance(r, RunSpec):
            self.handed = True
            if store.status(r.run_id) == "done":  # finished in an earlier session of the study
                return None
        return r


class Schedule:
    """Hands out runs: dynamic sources first, then the fixed runs (see the module docstring)."""

    def __init__(self, static: list[RunSpec], sources: list, out_dir: Path):
        self.static = deque(static)
        self.sources = list(sources)
        self.out_dir = Path(out_dir)
        self._turn = 0

    @property
    def expected(self) -> int:
        return len(self.static) + sum(getattr(s, "expected", 1) for s in self.sources)

    def next(self):
        """A run, :data:`WAIT`, or None when nothing is left to run."""
        if self.sources:
            with ResultStore(self.out_dir) as store:
                view = _StoreView(store)
                n = len(self.sources)
                for i in range(n):
                    src = self.sources[(self._turn + i) % n]
                    got = src.next_run(view)
                    if got is None:
                        self.sources.remove(src)
                        return self.next()
                    if got is not WAIT:
                        self._turn = (self._turn + i + 1) % max(1, len(self.sources))
                        return got
        if self.static:
            return self.static.popleft()
        return WAIT if self.sources else None


def build_sources(spec, out_dir: Path, runs: list[RunSpec]) -> list:
    """The dynamic sources of a comparison study (none for a plain study)."""
    from widthlab.models import model_options
    from widthlab.studies.compare import CompareSpec, arm_studies

    if not isinstance(spec, CompareSpec):
        return []
    sources: list = []
    base = len(runs)
    storage = LazyStorage(out_dir)
    for a in arm_studies(spec):
        for seed in a.study.seeds:
            position = base + (len(sources) + 1) * SLOT
            if a.search is not None:
                d = SearchDriver(study=a.study, search=a.search, task=a.task, arm=a.arm, seed=seed,
                                 position=position, storage=storage)
                d.expected = a.search.budget_trials if a.search.flops is None else a.search.parallel
                sources.append(d)
            elif a.retrain and "widths" in model_options(a.study.model.name):
                mine = [r for r in runs if r.tags.get("task") == a.task and r.tags.get("arm") == a.arm
                        and r.seed == seed]
                if len(mine) == 1:  # one learned-width run per seed (not a sweep of them)
                    sources.append(RetrainSource(mine[0], position))
    return sources


def known_dynamic_ids(sources: list, out_dir: Path) -> set[str]:
    """Run ids the sources already decided (asked trials, retrains of finished runs)."""
    out: set[str] = set()
    if not sources or not (Path(out_dir) / "results.sqlite").exists():
        return out
    with ResultStore(out_dir) as store:
        view = _StoreView(store)
        for s in sources:
            out |= s.known_run_ids(view) if isinstance(s, RetrainSource) else s.known_run_ids()
    return out
