"""`auto` settings of a run config, resolved from its plan.

The micro batch is fixed once, by the driver, before a run starts: it decides the DeepSpeed batch
config and the data position a checkpoint records, so every worker and every restart must agree on
it. Checkpointing changes nothing a checkpoint records, so each worker resolves it for its own device.
"""
from __future__ import annotations

from typing import Optional

from pipelines.core.errors import UserError
from pipelines.plan.levers import config_setting, fastest_fitting
from pipelines.plan.verdict import plan_for_config


def resolve_activation_checkpointing(cfg, budget: float | None = None) -> tuple[str, int]:
    """(mode, k) for a validated PipelineConfig; `auto` becomes the fastest setting whose planned
    memory fits `budget` bytes (default: the plan's budget: the catalogue GPU, or the RAM share).
    A model whose shape cannot be planned gets every layer checkpointed, the safe choice."""
    m = cfg.model
    if m.activation_checkpointing != "auto":
        return m.activation_checkpointing, m.checkpoint_every_k
    try:
        plan = plan_for_config(cfg)
    except UserError:
        return "all", 1
    return config_setting(fastest_fitting(plan.inputs, plan.budget if budget is None else budget))


def with_auto_micro_batch(cfg, gpu: Optional[str] = None):
    """`cfg` with micro_batch_size=auto replaced by the plan's choice on `gpu` (default: the one the
    fit verdict plans for) and grad_accum to keep train.global_batch_size; other configs unchanged.
    A model whose shape cannot be planned steps one example at a time, the safe choice."""
    if cfg.train.micro_batch_size != "auto":
        return cfg
    try:
        micro = plan_for_config(cfg, gpu=gpu).inputs.micro_batch
    except UserError:
        micro = 1
    train = cfg.train.model_copy(update={"micro_batch_size": micro, "grad_accum": cfg.batch_per_worker() // micro})
    return cfg.model_copy(update={"train": train})
