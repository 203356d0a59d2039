"""Pruning inside a trial's run: a trainer callback that reports each epoch's validation metric to
Optuna's pruner and stops the run when the pruner says so.

The decision is made in the worker process that trains the trial, against a snapshot of the search's
earlier rounds that the driver put into the run (every trial of a round sees the same finished
trials). Optuna's own pruner (Hyperband, Li et al. 2018, JMLR 18(185), Alg. 1; asynchronous
successive halving, Li et al. 2020, MLSys, Alg. 2) runs on an in-memory copy of those trials under
the search's study name and this trial's number, so Hyperband assigns the same bracket as in the
driver's study. Nothing is shared between processes at run time: local workers, Ray tasks and a
resumed run reach the same decisions, and the trial sequence does not depend on timing.

Scores are maximised: the validation accuracy, or minus the validation loss (``sign``).
"""

from __future__ import annotations

from typing import Any

OPTUNA_MISSING = ("the search arm needs Optuna: pip install 'widthlab[search]' (with torch pinned, e.g. "
                  "pip install -c constraints.txt 'widthlab[search]')")


class OptunaMissing(ImportError):
    pass


def import_optuna():
    """Optuna, quiet (its per-trial INFO lines would interleave with the study's progress)."""
    try:
        import optuna
    except ImportError:
        raise OptunaMissing(OPTUNA_MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class TrialPruned(Exception):
    """Raised from ``on_epoch_end`` when the pruner stops the trial; the runner records ``pruned``."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


def make_pruner(cfg: dict[str, Any]):
    """The Optuna pruner of a search: ``cfg`` has pruner, min_epochs, reduction_factor, epochs."""
    optuna = import_optuna()
    name, lo, eta = cfg["pruner"], int(cfg["min_epochs"]), int(cfg["reduction_factor"])
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=lo, max_resource=max(lo, int(cfg["epochs"])),
                                              reduction_factor=eta)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=lo, reduction_factor=eta)
    return optuna.pruners.NopPruner()


def frozen_record(trial) -> dict[str, Any]:
    """A finished Optuna trial as plain data (what a snapshot carries to the worker)."""
    return {"state": trial.state.name, "value": trial.value,
            "intermediate": {str(k): v for k, v in trial.intermediate_values.items()},
            "system_attrs": dict(trial.system_attrs)}


class PruneCallback:
    """Trainer callback of one trial: report the epoch's score, stop the run when pruned.

    Args:
        snapshot: ``study_name``, ``number`` (this trial), ``trials`` (the earlier rounds, as
            :func:`frozen_record` rows, numbers 0..), and the pruner settings of :func:`make_pruner`.
    """

    run_totals = True  # nothing to restore with the best epoch's snapshot

    def __init__(self, snapshot: dict[str, Any]):
        self.snapshot = snapshot
        self.trial = None
        self.scores: dict[int, float] = {}
        self.pruned_at: int | None = None
        self.sign = 1.0

    def _open(self) -> None:
        optuna = import_optuna()
        from optuna.trial import TrialState, create_trial

        snap = self.snapshot
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name=snap["study_name"],
                                    direction="maximize", pruner=make_pruner(snap),
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        for t in snap["trials"]:
            study.add_trial(create_trial(
                state=TrialState[t["state"]], value=t["value"] if t["state"] == "COMPLETE" else None,
                intermediate_values={int(k): float(v) for k, v in t["intermediate"].items()},
                system_attrs=t["system_attrs"]))
        # Trials of this round asked before this one: placeholders, so that this trial keeps its number
        # (Hyperband's bracket is a hash of the study name and the number); pruners ignore failed trials.
        while len(study.get_trials(deepcopy=False)) < int(snap["number"]):
            study.add_trial(create_trial(state=TrialState.FAIL))
        self.trial = study.ask()
        assert self.trial.number == int(snap["number"])

    def _report(self, trainer, record: dict[str, Any]) -> bool:
        step = int(record["epoch"])
        score = self.sign * float(trainer._monitor_value(record))
        self.scores[step] = score
        self.trial.report(score, step)
        return self.trial.should_prune()

    def on_epoch_end(self, trainer) -> None:
        if self.trial is None:
            self.sign = 1.0 if trainer.monitor_mode == "max" else -1.0
            self._open()
            for old in trainer.history[:-1]:  # a resumed run: replay the epochs before its checkpoint
                self._report(trainer, old)
        if self._report(trainer, trainer.history[-1]):
            self.pruned_at = trainer.epoch
            raise TrialPruned(trainer.epoch)

    def summary(self, trainer) -> dict[str, Any]:
        """What the driver tells Optuna's study: the scores per epoch, the pruner's rung records, and
        the value of the model the run keeps (its best epoch)."""
        best = trainer._best
        attrs = {}
        if self.trial is not None:
            attrs = dict(self.trial.study._storage.get_trial(self.trial._trial_id).system_attrs)
        return {"search_trial": int(self.snapshot["number"]),
                "search_scores": {str(k): v for k, v in self.scores.items()},
                "search_system_attrs": attrs,
                "search_value": self.sign * float(best["value"]) if best else None,
                "pruned_at": self.pruned_at}
