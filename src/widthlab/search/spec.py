"""The ``search:`` section of a comparison's search arm (validated; Optuna is not imported here).

::

    methods:
      search:                       # Optuna's TPE over the width, Hyperband pruning on validation curves
        search: {width: [4, 256], trials: 12}
      random_search:                # the control: random sampling, same pruner, same budget
        search: {sampler: random, width: [4, 256], trials: 12}

An arm keyed ``search`` or ``random_search`` may leave the section out (``{}``: the defaults below;
``random_search`` samples at random).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from widthlab.studies.schema import Float, Int

DEFAULT_TRIALS = 12


class SearchSpec(BaseModel):
    """A hyper-parameter search over the width (and optionally the learning rate).

    Attributes:
        sampler: ``tpe`` (Optuna's tree-structured Parzen estimator; Bergstra et al. 2011) or ``random``.
        pruner: ``hyperband`` (Li et al. 2018), ``successive_halving`` (asynchronous SHA; Li et al.
            2020) or ``none``; pruning decisions read the per-epoch validation metric.
        width: inclusive integer range, sampled log-uniformly.
        lr: optional inclusive range of ``train.optimizer.lr``, sampled log-uniformly.
        trials: budget in trials (per seed); default 12 when ``flops`` is not given.
        flops: budget in training FLOPs per seed: no new round starts once the finished trials'
            FLOPs (pruned ones up to their pruning epoch) reach it; the last round may overshoot.
        parallel: trials asked together (a round); the next round is asked once the round finished,
            so the trial sequence does not depend on how many workers ran it.
        startup_trials: TPE's random start (trials sampled at random before the model is used).
        min_epochs: the pruner's minimum resource (epochs before a first pruning decision).
        reduction_factor: the pruner's eta (about 1/eta of the trials reaching a rung go on).
        max_trials: cap on the trials of a FLOP budget.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["hyperband", "successive_halving", "none"] = "hyperband"
    width: tuple[Int, Int] = (4, 256)
    lr: tuple[Float, Float] | None = None
    trials: Int | None = Field(default=None, ge=1)
    flops: Float | None = Field(default=None, gt=0)
    parallel: Int = Field(default=2, ge=1)
    startup_trials: Int = Field(default=4, ge=0)
    min_epochs: Int = Field(default=1, ge=1)
    reduction_factor: Int = Field(default=3, ge=2)
    max_trials: Int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.width
        if lo < 1 or hi < lo:
            raise ValueError(f"width must be [low, high] with 1 <= low <= high, got {list(self.width)}")
        if self.lr is not None and not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError(f"lr must be [low, high] with 0 < low <= high, got {list(self.lr)}")
        if self.trials is not None and self.flops is not None:
            raise ValueError("give a budget in trials or in flops, not both")
        return self

    @property
    def budget_trials(self) -> int:
        """Most trials this search may run per seed."""
        if self.trials is not None:
            return self.trials
        return self.max_trials if self.flops is not None else DEFAULT_TRIALS

    def identity(self) -> dict:
        """What defines the search's trial sequence (not its budget: a larger budget continues it)."""
        return self.model_dump(exclude={"trials", "flops", "max_trials"})


DEFAULT_SAMPLER = {"random_search": "random"}
IMPLICIT_ARMS = ("search", "random_search")
