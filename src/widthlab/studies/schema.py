"""The study file schema (pydantic). Errors name the YAML key; nothing below ``studies/`` sees a dict.

A study file::

    # widthlab run dense-digits --out runs/dense-digits
    name: dense-digits
    data: {name: digits}
    model: {name: mlp, width: 64}
    method: {name: dense}
    train: {epochs: 30, batch_size: 64, optimizer: {name: adam, lr: 0.001}}
    seeds: [0, 1, 2]
    sweep: {model.width: [16, 32, 64, 128]}

``data``, ``model`` and ``method`` take a ``name`` plus the options of that component; the options are
checked against the component's own signature when the study is resolved (see ``studies/resolve.py``).
``train`` mirrors :class:`widthlab.train.config.TrainConfig` exactly and rejects unknown keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from widthlab.train.config import OptimConfig, ScheduleConfig, TrainConfig


def _no_bool(kind: str):
    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"expected {kind}, got a boolean")
        return v
    return BeforeValidator(check)


def _whole(v: Any) -> Any:
    """YAML ``5.0`` may stand for 5; ``5.5`` may not be truncated to 5."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# Numbers of a study file: a boolean is not a number (``epochs: true`` is refused, not read as 1), and
# floats must be finite (``lr: .inf`` is refused like ``.nan``).
Int = Annotated[int, Field(strict=True), BeforeValidator(_whole), _no_bool("an integer")]
Float = Annotated[float, Field(allow_inf_nan=False), _no_bool("a number")]
SEED_MAX = 2**32 - 1  # numpy's seed range; torch's generators take any of these
Seed = Annotated[int, Field(strict=True, ge=0, le=SEED_MAX), BeforeValidator(_whole), _no_bool("an integer")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Component(BaseModel):
    """A named component with free options (checked later against the component's signature)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSpec(_Component):
    pass


class ModelSpec(_Component):
    width: Int | None = Field(default=None, ge=1)
    widths: list[Int] | None = None

    @field_validator("widths")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(w < 1 for w in v)):
            raise ValueError("widths must be a non-empty list of integers >= 1")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if self.width is not None and self.widths is not None:
            raise ValueError("give either width or widths, not both")
        return self


class MethodSpec(_Component):
    name: str = "dense"


class OptimSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Float = Field(default=0.1, gt=0)
    momentum: Float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: Float = Field(default=0.0, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = Field(default=1e-8, gt=0)
    amsgrad: bool = False

    @model_validator(mode="after")
    def _nesterov(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class ScheduleSpec(_Strict):
    name: Literal["constant", "multistep", "cosine", "onecycle", "plateau"] = "constant"
    milestones: list[Int] = []
    gamma: Float = Field(default=0.1, gt=0)
    min_lr: Float = Field(default=0.0, ge=0)
    pct_start: Float = Field(default=0.3, gt=0, lt=1)
    factor: Float = Field(default=0.1, gt=0, lt=1)
    patience: Int = Field(default=10, ge=0)


class TrainSpec(_Strict):
    epochs: Int = Field(default=10, ge=1)
    batch_size: Int = Field(default=128, ge=1)
    eval_batch_size: Int = Field(default=1024, ge=1)
    optimizer: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    loss: Literal["auto", "cross_entropy", "mse", "half_sse"] = "auto"
    grad_clip: Float | None = Field(default=None, gt=0)
    early_stopping: Int | None = Field(default=None, ge=1)
    monitor: str = "auto"
    select_best: bool = True
    eval_test_every_epoch: bool = True
    device: str = "cpu"
    amp: Literal["none", "fp16", "bf16"] = "none"
    deterministic: bool = False
    num_threads: Int | None = Field(default=None, ge=1)
    checkpoint_every: Int = Field(default=1, ge=0)
    tensorboard: bool | None = None
    max_steps: Int | None = Field(default=None, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("cpu", "cuda", "auto") and not v.startswith("cuda:"):
            raise ValueError("device must be cpu, cuda, cuda:N or auto")
        return v

    def to_config(self, seed: int) -> TrainConfig:
        d = self.model_dump()
        d["optimizer"] = OptimConfig(**{**d["optimizer"], "betas": tuple(d["optimizer"]["betas"])})
        d["schedule"] = ScheduleConfig(**{**d["schedule"], "milestones": tuple(d["schedule"]["milestones"])})
        return TrainConfig(**d, seed=seed, progress="none")


class StudySpec(_Strict):
    """One study file, validated.

    Attributes:
        seeds: every run is repeated for each seed (model init, masks, batch order).
        sweep: a grid over dotted keys (``model.width: [8, 16]``); runs = product of axes x seeds. A list
            of grids sweeps their union, for axes whose valid values depend on each other (e.g. wide &
            sparse MLPs where only some fract_cl values can reach the largest width).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    kind: Literal["train"] = "train"
    data: DataSpec
    model: ModelSpec
    method: MethodSpec = MethodSpec()
    train: TrainSpec = TrainSpec()
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    sweep: dict[str, list[Any]] | list[dict[str, list[Any]]] = {}

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]] | list[dict[str, list[Any]]]):
        if isinstance(v, list) and not v:
            raise ValueError("a list of sweep grids needs at least one grid")
        for grid in v if isinstance(v, list) else [v]:
            for key, values in grid.items():
                if key.split(".")[0] not in ("data", "model", "method", "train"):
                    raise ValueError(f"sweep axis {key!r} must start with data., model., method. or train.")
                if not values:
                    raise ValueError(f"sweep axis {key!r} has no values")
        return v

    def sweep_grids(self) -> list[dict[str, list[Any]]]:
        """The sweep as a list of grids (one grid for a plain mapping)."""
        return list(self.sweep) if isinstance(self.sweep, list) else [self.sweep]

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        return distinct_seeds(v)


def distinct_seeds(v: list[int]) -> list[int]:
    """Validator of a study's ``seeds``: a repeated seed would repeat a run under the same id."""
    if len(set(v)) != len(v):
        raise ValueError("seeds must be distinct")
    return v
