"""The search arm's driver: one Optuna study per (task, arm, seed), asked and told in the study's
driver process while the executor trains the trials as ordinary runs.

* **Trials are runs.** Each trial is a run of the arm's study at the sampled width (and learning
  rate), tagged with its trial number; the executors (local workers, Ray) run it like any other and
  it lands in ``results.sqlite``: ``done``, ``failed``, or ``pruned`` (charged up to the pruning epoch).
* **Rounds.** The driver asks ``parallel`` trials at once, waits until all of them finished, tells
  Optuna, then asks the next round. Each ask uses a sampler seeded by (seed, trial number), and a
  round's pruning decisions read only the earlier rounds (``search/pruning.py``): the trial sequence
  is a function of the study file alone, not of the number of workers or of their timing.
* **Storage and resume.** Optuna's study lives in ``DIR/search/optuna.journal`` (a JournalStorage
  file, written by the driver alone). Its name hashes the arm's study and search settings except the
  budget, so a larger budget continues the same study. On ``--resume`` the told trials are kept;
  trials asked but not told are told from ``results.sqlite`` when their run finished, else run again
  (from their checkpoints) with the same parameters and snapshot. A failed trial is told as failed
  and not run again (the search has moved on from it).
* **Budget.** ``trials`` per seed, or ``flops``: no new round once the finished trials' training FLOPs
  (plus what the method computes besides) reach it.

TPE: Bergstra et al. 2011, "Algorithms for hyper-parameter optimization", NeurIPS (§4); Optuna:
Akiba et al. 2019, KDD.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from widthlab.search.pruning import frozen_record, import_optuna, make_pruner
from widthlab.search.spec import SearchSpec
from widthlab.studies.schema import StudySpec

JOURNAL = Path("search") / "optuna.journal"
WAIT = "wait"  # a source has no run to hand out until one of its runs in flight finishes
FINISHED = ("done", "pruned", "failed")


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trial_seed(seed: int, number: int, salt: str) -> int:
    """The sampler seed of one ask: a function of the run seed, the arm and the trial number."""
    return int(_hash([seed, number, salt]), 16) % 2**31


class LazyStorage:
    """The output folder's Optuna journal, opened (and created) on first use, so that a study refused
    before it starts writes nothing."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / JOURNAL
        self._storage = None

    def exists(self) -> bool:
        return self._storage is not None or self.path.is_file()

    def get(self):
        if self._storage is None:
            optuna = import_optuna()
            from optuna.storages.journal import JournalFileBackend

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._storage = optuna.storages.JournalStorage(JournalFileBackend(str(self.path)))
        return self._storage


class SearchDriver:
    """Asks and tells the Optuna study of one (task, arm, seed) of a comparison."""

    def __init__(self, *, study: StudySpec, search: SearchSpec, task: str, arm: str, seed: int,
                 position: int, storage):
        self.sub, self.search, self.task, self.arm, self.seed = study, search, task, arm, seed
        self.position = position
        ident = {"study": study.model_dump(include={"data", "model", "method", "train"}),
                 "search": search.identity(), "seed": seed}
        self.study_name = f"{study.name}/{task}/{arm}/seed{seed}/{_hash(ident)}"
        self._storage = storage  # a LazyStorage
        self.handed: set[int] = set()
        self._study = None
        self.pruner_cfg = {"pruner": search.pruner, "min_epochs": search.min_epochs,
                           "reduction_factor": search.reduction_factor, "epochs": study.train.epochs}

    # ------------------------------------------------------------------ Optuna objects

    @property
    def storage(self):
        return self._storage.get()

    def study(self):
        if self._study is None:
            optuna = import_optuna()
            self._study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                              direction="maximize", load_if_exists=True,
                                              pruner=make_pruner(self.pruner_cfg))
        return self._study

    def _sampler(self, number: int):
        optuna = import_optuna()
        seed = trial_seed(self.seed, number, f"{self.task}/{self.arm}")
        if self.search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.search.startup_trials)

    def _distributions(self) -> dict[str, Any]:
        optuna = import_optuna()
        d = {"width": optuna.distributions.IntDistribution(*self.search.width, log=True)}
        if self.search.lr is not None:
            d["lr"] = optuna.distributions.FloatDistribution(*self.search.lr, log=True)
        return d

    # ------------------------------------------------------------------ trials as runs

    def run_for(self, number: int, params: dict[str, Any], round_start: int):
        """The :class:`RunSpec` of trial ``number``: the arm's study at its sampled values."""
        from widthlab.studies.load import expand_runs

        sweep: dict[str, list[Any]] = {"model.width": [int(params["width"])]}
        if "lr" in params:
            sweep["train.optimizer.lr"] = [float(params["lr"])]
        sub = self.sub.model_copy(update={"sweep": sweep, "seeds": [self.seed]})
        tags = {"task": self.task, "arm": self.arm, "role": "search", "sampler": self.search.sampler,
                "pruner": self.search.pruner, "trial": number}
        [run] = expand_runs(sub, f"search {self.task}/{self.arm}", tags=tags)
        finished = [t for t in self.study().get_trials(deepcopy=False) if t.number < round_start]
        snapshot = {"study_name": self.study_name, "number": number, **self.pruner_cfg,
                    "trials": [frozen_record(t) for t in sorted(finished, key=lambda t: t.number)]}
        return dataclasses.replace(run, position=self.position + number, search=snapshot)

    def _run_of(self, trial):
        return self.run_for(trial.number, trial.params, int(trial.user_attrs["round_start"]))

    def known_run_ids(self) -> set[str]:
        """Run ids of the trials asked so far (none, without writing, when the study is new)."""
        if not self._storage.exists():
            return set()
        optuna = import_optuna()
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:  # no such study in the journal yet
            return set()
        return {t.user_attrs["run_id"] for t in study.get_trials(deepcopy=False) if "run_id" in t.user_attrs}

    # ------------------------------------------------------------------ the schedule's interface

    def next_run(self, store):
        """The next trial to run, :data:`WAIT` while the round's trials are in flight, None when done."""
        from optuna.trial import TrialState

        self._tell_finished(store)
        trials = self.study().get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        for t in running:
            if t.number not in self.handed:
                self.handed.add(t.number)
                return self._run_of(t)
        if running:
            return WAIT
        if self._exhausted(trials, store):
            return None
        start = len(trials)
        study = self.study()
        for number in range(start, start + min(self.search.parallel, self.search.budget_trials - start)):
            study.sampler = self._sampler(number)
            trial = study.ask(self._distributions())
            assert trial.number == number, (trial.number, number)
            trial.set_user_attr("round_start", start)
            trial.set_user_attr("run_id", self.run_for(number, trial.params, start).run_id)
        return self.next_run(store)

    def _exhausted(self, trials, store) -> bool:
        if len(trials) >= self.search.budget_trials:
            return True
        if self.search.flops is None:
            return False
        spent = 0.0
        for t in trials:
            s = store.summary(t.user_attrs.get("run_id", "")) or {}
            spent += float(s.get("train_flops") or 0.0) + float(s.get("method_flops") or 0.0)
        return spent >= self.search.flops

    def _tell_finished(self, store) -> None:
        """Tell Optuna every asked trial whose run has finished (live, or before a resume)."""
        from optuna.trial import TrialState

        study = self.study()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = t.user_attrs.get("run_id")
            status = store.status(run_id) if run_id else None
            if status not in FINISHED:
                continue
            s = store.summary(run_id) or {}
            for step, value in (s.get("search_scores") or {}).items():
                self.storage.set_trial_intermediate_value(t._trial_id, int(step), float(value))
            for key, value in (s.get("search_system_attrs") or {}).items():
                self.storage.set_trial_system_attr(t._trial_id, key, value)
            value = s.get("search_value")
            if status == "done" and isinstance(value, (int, float)):
                study.tell(t.number, float(value))
            elif status == "pruned":
                study.tell(t.number, state=TrialState.PRUNED)
            else:
                study.tell(t.number, state=TrialState.FAIL)
            self.handed.discard(t.number)
