"""`auto` settings of a run config, resolved from its plan (the worker asks this before building)."""
from __future__ import annotations

from pipelines.core.errors import UserError
from pipelines.plan.levers import config_setting, fastest_fitting_checkpointing
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
    return config_setting(fastest_fitting_checkpointing(plan.inputs, plan.budget if budget is None else budget))
