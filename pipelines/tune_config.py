"""The `tune:` section: search space, algorithm and scheduler, validated before any trial starts.

Every searched key is a dotted path into RunConfig (checked against the schema, and every
choice/bound is checked by validating the base config with it applied), plus the derived key
`lora.alpha_ratio`, which ties alpha to the sampled rank (alpha = ratio * r).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.errors import UserError

ALPHA_RATIO = "lora.alpha_ratio"


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
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="stop weak trials early (ASHA)")
    grace_period: int = Field(10, gt=0, description="steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep 1/reduction_factor at each rung")


class TuneSection(BaseModel):
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

    @model_validator(mode="after")
    def _non_empty(self):
        if not self.space:
            raise ValueError("tune.space is empty: name at least one key to search")
        return self


# Metrics the training loop reports (pipelines.worker); a tune metric must be one of them.
REPORTED_METRICS = ("eval_loss", "eval_perplexity", "train_loss", "tokens_per_s")


def parse_tune_section(cfg) -> TuneSection:
    """Validate cfg.tune and every searched value against the run schema (UserError on failure)."""
    from pydantic import ValidationError

    from pipelines.config_loader import describe_validation_error

    try:
        section = TuneSection.model_validate(cfg.tune or {})
    except ValidationError as e:
        raise UserError(f"tune.{describe_validation_error(e, TuneSection)}") from None
    if section.metric not in REPORTED_METRICS:
        raise UserError(f"tune.metric={section.metric!r} is not produced by training; choose one of "
                        f"{', '.join(REPORTED_METRICS)}")
    if section.asha.grace_period >= cfg.train.max_steps and section.asha.enabled:
        raise UserError(f"tune.asha.grace_period={section.asha.grace_period} must be < train.max_steps={cfg.train.max_steps}")
    for key, dist in section.space.items():
        check_searched_key(cfg, key, dist)
    return section


def check_searched_key(cfg, key: str, dist: Dist) -> None:
    from pipelines.config_loader import fields_at

    if key.startswith("tune"):
        raise UserError(f"tune.space key {key!r}: the tune section itself cannot be searched")
    if key == ALPHA_RATIO:
        for v in dist.probe_values():
            if not isinstance(v, (int, float)) or v <= 0:
                raise UserError(f"tune.space.{key}: value {v!r} must be a positive number")
        return
    parts = key.split(".")
    if parts[-1] not in fields_at(type(cfg), parts[:-1]):
        raise UserError(f"tune.space key {key!r} is not a config key")
    for v in dist.probe_values():
        apply_trial_values(cfg, {key: v}, source=f"tune.space.{key}")


def apply_trial_values(cfg, values: dict[str, Any], source: str = "trial"):
    """A validated copy of cfg with `values` (dotted keys, plus lora.alpha_ratio) applied."""
    from pipelines.config_loader import validate_config

    data = cfg.model_dump(mode="json")
    data["tune"] = None
    ratio = values.get(ALPHA_RATIO)
    for key, value in values.items():
        if key == ALPHA_RATIO:
            continue
        node = data
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    if ratio is not None:
        data["lora"]["alpha"] = float(ratio) * data["lora"]["r"]
    return validate_config(data, source=source)


def to_ray_space(section: TuneSection) -> dict:
    """Ray Tune sampling objects; grid uses grid_search over the grid values."""
    from ray import tune

    space = {}
    for key, d in section.space.items():
        if section.search == "grid":
            space[key] = tune.grid_search(d.grid_values(section.grid_points))
        elif d.kind == "choice":
            space[key] = tune.choice(d.choice)
        elif d.kind == "uniform":
            space[key] = tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            space[key] = tune.loguniform(*d.loguniform)
        else:
            space[key] = tune.randint(*d.randint)
    return space
