"""The `tune:` section's schema: search space, algorithm and scheduler.

Part of the run config, so `lorapipe validate` and `submit` reject a misspelled tune key or a bad
range before anything starts. Every searched key is a dotted path into PipelineConfig plus the
derived key `lora.alpha_ratio`, which ties alpha to the sampled rank (alpha = ratio * r); that each
key exists and each choice/bound validates is checked when the config loads
(`pipelines.config.load.check_tune_space`).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

ALPHA_RATIO = "lora.alpha_ratio"
# Metrics the training loop reports (pipelines.train.worker); a tune metric must be one of them.
REPORTED_METRICS = ("eval_loss", "eval_perplexity", "train_loss", "tokens_per_s")


class Dist(BaseModel):
    """Exactly one of: choice, uniform, loguniform, randint (inclusive low, exclusive high)."""

    model_config = ConfigDict(extra="forbid")
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {kinds or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice list is empty")
        for k in ("uniform", "loguniform", "randint"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k} range [{lo_hi[0]}, {lo_hi[1]}] is empty or inverted (need low < high)")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs a positive lower bound (got {self.loguniform[0]})")
        return self

    @model_serializer(mode="plain")
    def _as_written(self) -> dict:
        # Dumped as the user writes it ({loguniform: [lo, hi]}), not with three nulls beside it.
        value = getattr(self, self.kind)
        return {self.kind: list(value)}

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values to validate against the schema: every choice, or both bounds."""
        if self.choice is not None:
            return list(self.choice)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1 if self.kind == "randint" else hi]

    def grid_values(self, points: int = 3) -> list[Any]:
        if self.choice is not None:
            return list(self.choice)
        lo, hi = getattr(self, self.kind)
        if self.kind == "randint":
            return list(range(lo, hi))
        if self.kind == "loguniform":
            return [math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (points - 1)) for i in range(points)]
        return [lo + i * (hi - lo) / (points - 1) for i in range(points)]


class AshaSection(BaseModel):
    """ASHA early stopping over training steps (max_t = train.max_steps)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="stop weak trials early (ASHA)")
    grace_period: int = Field(10, gt=0, description="steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep 1/reduction_factor at each rung")


class TuneSection(BaseModel):
    """`tune:`: what to search, how, and what to optimise."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, Dist] = Field(description="dotted config key -> distribution")
    num_samples: int = Field(8, ge=1, description="trials (for grid: repeats of the full grid)")
    search: Literal["optuna", "random", "grid"] = Field("optuna", description="optuna = TPE")
    metric: str = Field("eval_loss", description="reported metric to optimise")
    mode: Literal["min", "max"] = Field("min", description="min or max the metric")
    asha: AshaSection = AshaSection()
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="default: from cluster CPUs/GPUs")
    name: Optional[str] = Field(None, description="experiment name; default <config name>-tune")
    grid_points: int = Field(3, ge=2, description="points per continuous axis for search=grid")
    seed: Optional[int] = Field(None, ge=0, description="seeds the search algorithm; default: the config's seed")
    rank_by: Optional[str] = Field(None, pattern=r"^suite:[^/]+/.+$",
                                   description="suite:<set>/<metric>: rank finished trials by the eval suite "
                                               "(min for loss/perplexity, else max); default: by `metric`")

    @field_validator("space")
    @classmethod
    def _searchable(cls, space: dict) -> dict:
        if not space:
            raise ValueError("empty: name at least one config key to search")
        for key in space:
            if key == "tune" or key.startswith("tune."):
                raise ValueError(f"key {key!r}: the tune section itself cannot be searched")
        return space

    @field_validator("metric")
    @classmethod
    def _reported(cls, metric: str) -> str:
        if metric not in REPORTED_METRICS:
            raise ValueError(f"{metric!r} is not produced by training; choose one of {', '.join(REPORTED_METRICS)}")
        return metric
