"""The per-worker training loop, top to bottom: data -> model -> DeepSpeed -> resume -> loop.

Runs inside each Ray Train worker. Everything it needs arrives in `loop_config` (the resolved
config as a dict, refs to the MLflow run id and to the driver's prepared data); no module
globals. Every worker calls `ray.train.report` at the same steps (it is a barrier); rank 0 alone
writes the replicated files (adapter or full model, state, config) and talks to MLflow, while DeepSpeed writes
one optimizer shard per rank.
"""
from __future__ import annotations

import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lora.loss import training_loss
from pipelines.config.schema import PipelineConfig
from pipelines.data.prepare import IGNORE_INDEX
from pipelines.train.checkpoint import restore, save_checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_device(cfg: PipelineConfig, local_rank: int) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_memory_bytes(device: torch.device):
    """What `activation_checkpointing=auto` must fit in: the GPU's memory; None on CPU (the plan's RAM share)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def build_model(cfg: PipelineConfig, device: torch.device):
    """Frozen base (4-bit when configured) + LoRA; returns (peft model, {layer: (out, in)}).
    method=full: the whole base, every weight trainable; returns (model, {state-dict key: shape})."""
    if cfg.is_full:
        return build_full_model(cfg, device)
    from lora import apply_lora, build_lora_config, load_base_model
    from lora.adapter import config_targets, linear_shapes
    from pipelines.plan.auto import resolve_activation_checkpointing

    m = cfg.model
    base = load_base_model(m.path, dtype=m.dtype, quantization=m.quantization, double_quant=m.double_quant,
                           quant_storage=m.quant_storage, device=str(device), attn_implementation=m.attn_implementation,
                           trust_remote_code=m.trust_remote_code, revision=m.revision)
    lcfg = build_lora_config(base, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                             target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
                             use_dora=cfg.lora.use_dora, bias=cfg.lora.bias)
    shapes = linear_shapes(base, config_targets(lcfg))  # the resolved names, as PEFT wraps them
    ckpt, every = resolve_activation_checkpointing(cfg, device_memory_bytes(device))
    return apply_lora(base, lcfg, gradient_checkpointing=ckpt != "none", checkpoint_every=every), shapes


def optimizer_params(cfg: PipelineConfig, model) -> list:
    """What the optimizer gets: the adapter's parameters, or with LoRA+ its param groups (B at
    lr * lora.plus_lr_ratio). Either optimizer path takes them: the client AdamW, or the one
    DeepSpeed builds from its config when states are offloaded (per-group lr overrides its lr)."""
    from lora.plus import lora_plus_param_groups

    if cfg.lora.plus_lr_ratio is None:
        return [p for p in model.parameters() if p.requires_grad]
    return lora_plus_param_groups(model, cfg.train.lr, cfg.lora.plus_lr_ratio, cfg.train.weight_decay)


def build_full_model(cfg: PipelineConfig, device: torch.device):
    """Full fine-tuning: the unquantized base with every parameter trainable, and the shape of every
    state-dict tensor (taken now: ZeRO-3 partitions the parameters once DeepSpeed wraps the model)."""
    from lora import load_base_model, make_fully_trainable, state_dict_shapes
    from pipelines.plan.auto import resolve_activation_checkpointing

    m = cfg.model
    base = load_base_model(m.path, dtype=m.dtype, quantization="none", device=str(device),
                           attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code,
                           revision=m.revision)
    ckpt, every = resolve_activation_checkpointing(cfg, device_memory_bytes(device))
    model = make_fully_trainable(base, gradient_checkpointing=ckpt != "none", checkpoint_every=every)
    return model, state_dict_shapes(model)


def parameter_counts(model) -> dict:
    """{"trainable_params", "total_params"} of the model as built (before DeepSpeed partitions it);
    PEFT's count, where it applies, counts a packed 4-bit weight as the weights it holds."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        params = list(model.parameters())  # each shared (tied) parameter once
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return {"trainable_params": int(trainable), "total_params": int(total)}


def build_engine(cfg: PipelineConfig, model):
    import deepspeed
    from transformers import get_scheduler

    from pipelines.train.deepspeed_config import build_deepspeed_config

    ds_config = build_deepspeed_config(cfg)
    params = optimizer_params(cfg, model)
    optimizer = None
    if "optimizer" not in ds_config:
        # Fused AdamW (one kernel for every adapter tensor) where the parameters are on a GPU.
        first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay,
                                      fused=first.is_cuda)

    def scheduler(opt):  # DeepSpeed steps it at each optimizer step; each group's lr is scaled alike
        return get_scheduler(cfg.train.scheduler, opt, num_warmup_steps=cfg.train.warmup_steps,
                             num_training_steps=cfg.train.max_steps)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine


def learning_rates(engine) -> dict:
    """{"lr": the base (A) group's rate} and, with LoRA+, {"lr_B": the B matrices' rate}."""
    from lora.plus import GROUP_A, GROUP_B

    groups = engine.optimizer.param_groups
    by_name = {g.get("name"): g["lr"] for g in groups}
    rates = {"lr": by_name.get(GROUP_A, groups[0]["lr"])}
    if GROUP_B in by_name:
        rates["lr_B"] = by_name[GROUP_B]
    return rates


def all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, batches: list[dict], device: torch.device) -> dict:
    """Token-weighted eval loss over every worker's eval batches."""
    engine.eval()
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss_sum += engine(**batch).loss.item() * n
        tokens += n
    engine.train()
    loss_sum, tokens = all_reduce([loss_sum, tokens], device)
    eval_loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def worker_data(cfg: PipelineConfig, shipped):
    """The prepared data: the driver's copy from Ray's object store when it shipped one (it
    prepared the data anyway, in preflight; with Ray Data, only the eval rows), else the same
    deterministic preparation here."""
    if shipped is not None:
        import ray

        return ray.get(shipped)
    from lora import load_tokenizer
    from pipelines.data.prepare import prepare_data

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    return prepare_data(cfg.data, tokenizer, cfg.seed)


def train_batches_from(cfg: PipelineConfig, data, state, world: int, rank: int, streamed: bool):
    """A function returning the next training micro batch and advancing `state`'s data position:
    this worker's shard of the prepared data (addressable by position), or its Ray Data shard
    (a stream; a restart skips the micro batches the checkpoint says this epoch consumed)."""
    import ray.train

    from pipelines.data.batches import MicroBatches, shard
    from pipelines.data.streaming import StreamBatches

    mb = cfg.train.micro_batch_size
    if not streamed:
        batches = MicroBatches(shard(data.train, world, rank), mb, cfg.seed, data.pad_id)

        def next_from_shard():
            state.position += 1
            state.epoch = (state.position - 1) // batches.per_epoch
            return batches[state.position - 1]
        return next_from_shard
    stream = StreamBatches(ray.train.get_dataset_shard("train"), mb, data.pad_id, state.epoch, state.epoch_position)

    def next_from_stream():
        batch = stream.next()
        state.position += 1
        state.epoch, state.epoch_position = stream.epoch, stream.in_epoch
        return batch
    return next_from_stream


def record_examples(batch, rank: int, state) -> None:
    """Test instrumentation: LORAPIPE_RECORD_EXAMPLES=<dir> appends, per worker, one line per
    trained row (restarts, step, data position, a hash of its tokens), so a test can count which
    examples a run consumed across a restart."""
    import hashlib

    out = os.environ.get("LORAPIPE_RECORD_EXAMPLES")
    if not out:
        return
    ids = batch["input_ids"]
    real = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else [ids.shape[1]] * len(ids)
    lines = [f"{state.restarts} {state.step} {state.position} {hashlib.sha1(str(row[:n]).encode()).hexdigest()[:16]}\n"
             for row, n in zip(ids.tolist(), real)]
    with open(Path(out) / f"rank{rank}.txt", "a") as f:
        f.writelines(lines)


def new_window() -> dict:
    """What a worker sums between two reports."""
    return {"loss": 0.0, "micro": 0, "tokens": 0.0, "slots": 0.0, "seconds": 0.0}


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from pipelines.data.batches import eval_batches, shard, to_device
    from pipelines.tracking.runs import MetricsLogger, run_id_of

    marks = {"worker_start": time.time()}  # start-up breakdown, reported once
    cfg = PipelineConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(cfg, ctx.get_local_rank())
    seed_everything(cfg.seed)

    # Data: the same deterministic split on every worker, then this worker's shard.
    data = worker_data(cfg, loop_config.get("data"))
    eval_set = eval_batches(shard(data.eval, world, rank), cfg.train.micro_batch_size, cfg.train.eval_batches,
                            len(data.eval), world, data.pad_id)
    marks["data_ready"] = time.time()

    # Model and engine: identical LoRA init on every rank (same seed), then DeepSpeed.
    seed_everything(cfg.seed)
    model, shapes = build_model(cfg, device)
    counts = parameter_counts(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # 4-bit loading leaves its 16-bit load buffers in the cache
    marks["model_loaded"] = time.time()
    engine = build_engine(cfg, model)
    marks["engine_ready"] = time.time()
    state = restore(engine, rank)
    next_batch = train_batches_from(cfg, data, state, world, rank, bool(loop_config.get("streamed")))
    if rank == 0:
        # One quick attempt per report: MetricsLogger retries later itself, so MLflow's own HTTP
        # retries (seconds of backoff each) would only stall training while the server is away.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    logger = MetricsLogger(run_id_of(loop_config.get("mlflow_run")), cfg.tracking_uri()) if rank == 0 else None

    tr = cfg.train
    window = new_window()
    engine.train()
    while state.step < tr.max_steps:
        t0 = time.perf_counter()
        for _ in range(tr.grad_accum):
            host_batch = next_batch()
            record_examples(host_batch, rank, state)
            loss = training_loss(engine, engine.module, to_device(host_batch, device), tr.loss, tr.loss_chunk_tokens)
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["micro"] += 1
            window["tokens"] += host_batch.real_tokens
            window["slots"] += host_batch.slots
        window["seconds"] += time.perf_counter() - t0
        state.step += 1
        if marks is not None:
            marks.setdefault("first_step_done", time.time())

        last = state.step == tr.max_steps
        do_eval = state.step % tr.eval_every == 0 or last
        do_ckpt = state.step % tr.checkpoint_every == 0 or last
        if not (do_eval or do_ckpt or state.step % tr.report_every == 0):
            continue
        loss_sum, micro, tokens, slots, seconds = all_reduce(
            [window["loss"], window["micro"], window["tokens"], window["slots"], window["seconds"]], device)
        state.tokens += int(tokens)
        state.slots += int(slots)
        state.train_seconds += seconds / world
        metrics = {"step": state.step, "train_loss": loss_sum / max(micro, 1), **learning_rates(engine),
                   "tokens_per_s": tokens / max(seconds / world, 1e-9), "tokens": state.tokens,
                   "peak_memory_bytes": int(all_reduce([peak_memory_bytes(device)], device, dist.ReduceOp.MAX)[0]),
                   "non_pad_share": tokens / max(slots, 1.0), "epoch": state.epoch, "restarts": state.restarts,
                   **counts}
        if do_eval:
            metrics.update(evaluate(engine, eval_set, device))
        if marks is not None:  # first report of this process: how start-up time was spent
            metrics.update({f"startup_{k}": v for k, v in marks.items()})
            marks = None
        window = new_window()
        state.history.append(metrics)
        if logger:
            logger.log(metrics, state.step)

        if not do_ckpt:
            ray.train.report(metrics)
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"lorapipe-ckpt-r{rank}-"))
        try:
            save_checkpoint(engine, cfg, state, shapes, rank, tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"checkpoint_step_{state.step:07d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if logger:
        logger.close()
