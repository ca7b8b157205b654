"""The eval suite schema: the same yardstick held against every model (run dir, registered
version, or a base alone). It lives in the config stage so a run config can carry one in its
`eval:` section; loading the data and fingerprinting it is pipelines/eval/suite.py.

Metric names in results are qualified by their eval set (`reverse/exact_match`) or, for
lm-evaluation-harness tasks, `harness/<task>/<metric>`.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MetricName = Literal["loss", "perplexity", "exact_match", "contains", "rouge_l"]
GENERATION_METRICS = ("exact_match", "contains", "rouge_l")
LOWER_IS_BETTER = ("loss", "perplexity")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationSpec(_Strict):
    """How answers are generated for exact_match / contains / rouge_l (greedy by default)."""

    max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per answer")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="sampling temperature (do_sample only)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (do_sample only)")
    seed: int = Field(0, ge=0, description="torch seed before sampling")
    batch_size: int = Field(32, ge=1, le=1024, description="prompts per generate call")


class EvalSetSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="prefix of its metric names")
    path: str = Field(description="local .json/.jsonl/.parquet file, a datasets name, or builtin:demo-tasks")
    format: Literal["alpaca", "chat", "text"] = Field("alpaca", description="row layout (the training formats)")
    task: Optional[str] = Field(None, description="builtin:demo-tasks only: which task")
    seed: int = Field(12345, ge=0, description="builtin:demo-tasks only: rows are generated from this seed")
    split: str = Field("train", description="split of a datasets hub dataset")
    text_field: str = Field("text", description="column holding the text for format=text")
    limit: int = Field(64, gt=0, le=100000, description="evaluate at most this many rows")
    max_seq_len: int = Field(256, ge=8, le=131072, description="tokens per row for loss (truncated)")
    metrics: list[MetricName] = Field(["loss", "perplexity"], min_length=1, description="what to compute")
    generation: GenerationSpec = GenerationSpec()

    @model_validator(mode="after")
    def _generation_needs_prompts(self):
        gen = [m for m in self.metrics if m in GENERATION_METRICS]
        if gen and self.format == "text":
            raise ValueError(f"eval set {self.name!r}: {gen[0]} needs prompts and answers (format alpaca or chat), "
                             "not format=text")
        if self.task is not None and self.path != "builtin:demo-tasks":
            raise ValueError(f"eval set {self.name!r}: task only applies to path=builtin:demo-tasks")
        return self


class HarnessSpec(_Strict):
    """lm-evaluation-harness tasks from local task YAMLs (and local data files they name)."""

    include_path: str = Field(description="folder with lm-eval task YAML files")
    tasks: list[str] = Field(min_length=1, description="task names defined in those YAML files")
    limit: Optional[int] = Field(None, gt=0, description="documents per task")
    num_fewshot: Optional[int] = Field(None, ge=0, description="few-shot examples")
    batch_size: int = Field(8, ge=1, le=1024, description="requests per forward")


class GoalSpec(_Strict):
    metric: str = Field(description="qualified metric name, e.g. reverse/exact_match")
    mode: Literal["min", "max"] = Field(description="min: lower is better")
    margin: float = Field(0.0, ge=0.0, description="the candidate must beat the holder by more than this")


class GuardSpec(_Strict):
    metric: str = Field(description="qualified metric name")
    mode: Literal["min", "max"] = Field(description="min: lower is better")
    tolerance: float = Field(0.0, ge=0.0, description="may not get worse than the holder by more than this")


class EvalSuite(_Strict):
    sets: list[EvalSetSpec] = Field(min_length=1, description="eval sets, each with its metrics")
    harness: Optional[HarnessSpec] = Field(None, description="lm-evaluation-harness tasks (local)")
    primary: GoalSpec = Field(description="the metric promotion is decided on")
    guards: list[GuardSpec] = Field([], description="metrics that may not regress past a tolerance")
    parity_tolerance: float = Field(0.03, ge=0.0, description="max |adapter - merged| per metric at registration "
                                    "(relative above 1, absolute below)")

    def metric_names(self) -> list[str]:
        return [f"{s.name}/{m}" for s in self.sets for m in s.metrics]

    @model_validator(mode="after")
    def _names_resolve(self):
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique, got {names}")
        known = self.metric_names()
        for spec in [self.primary, *self.guards]:
            if spec.metric.startswith("harness/"):
                task = spec.metric.split("/")[1] if spec.metric.count("/") >= 2 else ""
                if not self.harness or task not in self.harness.tasks:
                    raise ValueError(f"metric {spec.metric!r} names no harness task of this suite")
            elif spec.metric not in known:
                raise ValueError(f"metric {spec.metric!r} is not computed by this suite; known: {', '.join(known)}")
        return self


class EvalSection(_Strict):
    """`eval:` in a run config: an inline suite, or the path of a suite YAML (exactly one)."""

    suite: Optional[EvalSuite] = Field(None, description="the suite, inline")
    suite_file: Optional[str] = Field(None, description="path of a standalone suite YAML (configs/eval/...)")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.suite is None) == (self.suite_file is None):
            raise ValueError("give exactly one of eval.suite (inline) or eval.suite_file (a suite YAML path)")
        return self


def metric_mode(qualified: str) -> str:
    """min for loss-like metrics, max for the rest (tune's rank_by uses this)."""
    return "min" if qualified.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"
