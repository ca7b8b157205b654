"""The speed/memory levers a run config chooses, as the plan sees them.

- the loss: `train.loss` plain holds the full fp32 logits of a micro batch; chunked/fused hold one
  chunk of `train.loss_chunk_tokens` tokens at a time (`PlanInputs.loss_chunks`);
- activation checkpointing: none, every k-th decoder layer, or all. Each checkpointed layer keeps
  only its input and replays its forward in backward (+2N FLOPs per token x its share of layers).
  `auto` takes the fastest setting (fewest checkpointed layers) whose planned memory fits.
"""
from __future__ import annotations

import math
from typing import Optional

from pipelines.plan.memory import PlanInputs, plan_memory

# `auto` leaves this share of the budget unplanned: the plan is within ~5% of measured peaks, and an
# out-of-memory error an hour into a run costs more than recomputing a few more layers.
AUTO_HEADROOM = 0.90


def loss_chunks(loss: str, chunk_tokens: int, tokens_per_micro_batch: int) -> int:
    """How many pieces the loss's logits come in: 1 for the plain loss."""
    if loss == "plain":
        return 1
    return max(1, math.ceil(tokens_per_micro_batch / chunk_tokens))


def checkpointing_fields(mode: str, every_k: int) -> dict:
    """PlanInputs fields of a concrete setting (not `auto`)."""
    if mode == "none":
        return {"gradient_checkpointing": False, "checkpoint_every": 1}
    return {"gradient_checkpointing": True, "checkpoint_every": every_k if mode == "every_k" else 1}


def checkpointing_options(p: PlanInputs) -> list[dict]:
    """Every distinct setting, fastest first: none, then every k-th layer from the fewest
    checkpointed layers to all of them (k=1)."""
    options, seen = [checkpointing_fields("none", 1)], set()
    for k in range(p.arch.layers, 0, -1):
        count = -(-p.arch.layers // k)
        if count not in seen:
            seen.add(count)
            options.append({"gradient_checkpointing": True, "checkpoint_every": k})
    return options


def micro_batch_options(batch_per_worker: int) -> list[int]:
    """Micro batches that divide a worker's batch evenly, largest first."""
    return [m for m in range(batch_per_worker, 0, -1) if batch_per_worker % m == 0]


def with_micro_batch(p: PlanInputs, micro: int, batch_per_worker: int, chunk_tokens: Optional[int]) -> PlanInputs:
    """`p` stepping `micro` examples at a time; `chunk_tokens` None means the plain loss."""
    chunks = 1 if chunk_tokens is None else loss_chunks("chunked", chunk_tokens, micro * p.seq_len)
    return p.with_(micro_batch=micro, grad_accum=batch_per_worker // micro, loss_chunks=chunks)


def fastest_fitting(p: PlanInputs, budget: float, *, checkpointing: bool = True, batch_per_worker: Optional[int] = None,
                    chunk_tokens: Optional[int] = None) -> PlanInputs:
    """`p` with the fastest `auto` settings whose planned total stays within AUTO_HEADROOM of `budget`:
    with `checkpointing`, the fewest recomputed layers; with `batch_per_worker`, then the largest micro batch
    dividing it. Recomputation comes first: it costs up to a third more FLOPs per token, while a larger micro
    batch gains a few percent once a micro batch holds a few thousand tokens. When nothing fits: every layer
    recomputed, micro batch 1 (the verdict then says it does not fit)."""
    def settings(ckpts: list[dict], micros: list[int]):
        for fields in ckpts:
            base = p.with_(**fields)
            for micro in micros:
                yield with_micro_batch(base, micro, batch_per_worker, chunk_tokens) if batch_per_worker else base

    micros = micro_batch_options(batch_per_worker) if batch_per_worker else [p.micro_batch]
    for candidate in settings(checkpointing_options(p) if checkpointing else [{}], micros):
        if plan_memory(candidate).total <= AUTO_HEADROOM * budget:
            return candidate
    return next(settings([checkpointing_fields("all", 1)] if checkpointing else [{}], micros[-1:]))


def describe_checkpointing(p: PlanInputs) -> str:
    n, layers = p.checkpointed_layers(), p.arch.layers
    if n == 0:
        return "none"
    return "all layers" if n == layers else f"every {p.checkpoint_every} layers ({n} of {layers})"


def describe_loss(p: PlanInputs) -> str:
    return f"in {p.loss_chunks} chunks" if p.loss_chunks > 1 else "plain"


def config_setting(p: PlanInputs) -> tuple[str, int]:
    """(model.activation_checkpointing, model.checkpoint_every_k) that gives `p`'s setting."""
    n = p.checkpointed_layers()
    if n == 0:
        return "none", 1
    return ("all", 1) if n == p.arch.layers else ("every_k", p.checkpoint_every)

