"""The Ray Train driver: config -> preflight -> TorchTrainer.fit() -> run directory (+ MLflow run)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from pipelines.config.schema import PipelineConfig
from pipelines.core.errors import UserError
from pipelines.core.meta import git_commit, lorapipe_version
from pipelines.train import checkpoint
from pipelines.train.ray_cluster import driver_node_label, ensure_ray, warn_if_not_shared


def with_run_name(cfg: PipelineConfig) -> PipelineConfig:
    """Fix the run name once, on the driver, so restarts and later stages agree on it."""
    if cfg.run.name:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def resolved_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Absolute output/storage paths and tracking URI: workers run in other directories."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    cfg.run.storage_path = cfg.storage_path()
    cfg.mlflow.tracking_uri = cfg.tracking_uri()
    return cfg


def check_target_modules(cfg: PipelineConfig) -> None:
    """Build the model skeleton on the meta device (no weights) and check lora.target_modules: a
    name absent from the model, or a preset the architecture cannot express (q on GPT-2's fused
    c_attn), fails here, before Ray starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora.adapter import check_target_modules as check_in_model

    if cfg.lora.target_modules == "all-linear":
        return
    try:
        mcfg = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                          revision=cfg.model.revision)
    except OSError as e:
        raise UserError(f"cannot read the config of model {cfg.model.path!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
    check_in_model(skeleton, cfg.lora.target_modules)


def fixed_micro_batch(cfg: PipelineConfig) -> PipelineConfig:
    """train.micro_batch_size=auto chosen by the plan, once, here: the run directory, MLflow's params,
    every worker and every restart then see the same number."""
    from pipelines.plan.auto import with_auto_micro_batch

    if cfg.train.micro_batch_size != "auto":
        return cfg
    cfg = with_auto_micro_batch(cfg)
    print(f"micro batch: auto -> {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} "
          f"(global batch {cfg.global_batch_size()}), the largest the plan fits", flush=True)
    return cfg


def preflight(cfg: PipelineConfig):
    """Everything that can fail on bad input, before Ray starts: paths, data rows, modules, 4-bit."""
    from lora import load_tokenizer
    from lora.base import build_bnb_config
    from pipelines.data.prepare import prepare_data
    from pipelines.data.streaming import use_ray_data
    from pipelines.plan.auto import with_auto_micro_batch

    if cfg.model.is_quantized:
        build_bnb_config(cfg.model.dtype, cfg.model.quantization, cfg.model.double_quant, cfg.model.quant_storage)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    check_target_modules(cfg)
    if use_ray_data(cfg.data):
        return sampled_data(cfg.data, tokenizer, cfg.seed)
    data = prepare_data(cfg.data, tokenizer, cfg.seed)
    shard_size = len(data.train) // cfg.scaling.num_workers
    micro = with_auto_micro_batch(cfg).train.micro_batch_size  # a search's base config may still say auto
    if shard_size < micro:
        raise UserError(f"{len(data.train)} training examples give each of {cfg.scaling.num_workers} workers "
                        f"{shard_size}, fewer than train.micro_batch_size={micro}")
    return data


def sampled_data(data_cfg, tokenizer, seed: int):
    """Ray Data path preflight: the first rows checked and measured as the driver path would
    (the rest is checked while streaming); the fingerprint is the whole file's."""
    from pipelines.data.prepare import PreparedData, dataset_fingerprint
    from pipelines.data.report import SAMPLE_ROWS, source_report

    source = data_cfg.sources()[0]
    stats = {"engine": "ray", "sample": source_report(source, data_cfg, tokenizer, SAMPLE_ROWS)}
    fingerprint = dataset_fingerprint(data_cfg)
    return PreparedData(train=None, eval=None, stats=stats, fingerprint=fingerprint, pad_id=tokenizer.pad_token_id,
                        fingerprints={source.path: fingerprint})


def streamed_data(cfg: PipelineConfig):
    """(Ray Dataset of the training split, ref to the eval rows + pad id) for the Ray Data path."""
    import ray

    from lora import load_tokenizer
    from pipelines.data.prepare import PreparedData
    from pipelines.data.streaming import eval_rows, tokenized_stream

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    count = cfg.train.eval_batches * cfg.train.micro_batch_size * cfg.scaling.num_workers
    evl = eval_rows(cfg, tokenizer, count)
    if len(evl) < cfg.scaling.num_workers:
        raise UserError(f"{cfg.data.sources()[0].path} holds {len(evl)} eval rows, fewer than one per worker; "
                        "raise data.eval_fraction")
    return tokenized_stream(cfg, "train"), ray.put(PreparedData(train=None, eval=evl, pad_id=tokenizer.pad_token_id))


def ray_train_env_defaults() -> None:
    """Ray Train reads these in the process that builds the trainer and passes them on. Worker
    start-up (a new process importing torch, transformers, DeepSpeed) can exceed Ray's 60 s
    default on a busy machine, which would fail the run instead of waiting."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")


def data_tags(fingerprints: dict) -> dict:
    """MLflow tags naming each data source and its fingerprint."""
    tags = {}
    for i, (path, fingerprint) in enumerate(fingerprints.items()):
        tags[f"lorapipe.data.{i}.path"], tags[f"lorapipe.data.{i}.fingerprint"] = path, fingerprint
    return tags


def start_tracking(cfg: PipelineConfig, tune_trial_id: Optional[str], parent_run_id: Optional[str],
                   extra_tags: Optional[dict] = None):
    """Create the run's MLflow run in a Ray task (None when MLflow is off): its imports and a new
    store's migrations cost seconds of CPU, which then run beside Ray Train's controller start-up
    instead of in front of it. The task runs on the driver's node, where a sqlite/file store lives;
    rank 0 and the driver resolve the ref with `tracking.run_id_of`."""
    import ray

    from pipelines.tracking import runs as tracking

    if not cfg.mlflow.enabled:
        return None
    tags = {"lorapipe.config": cfg.name, "lorapipe.version": lorapipe_version()}
    if tune_trial_id:
        tags["lorapipe.tune_trial_id"] = tune_trial_id
    tags.update(extra_tags or {})
    task = ray.remote(num_cpus=0, max_retries=0)(tracking.start_run)
    return task.options(label_selector=driver_node_label()).remote(
        cfg.tracking_uri(), cfg.mlflow.experiment, cfg.run.name, cfg.model_dump(mode="json"), tags,
        parent_run_id=parent_run_id)


def ship_data(data):
    """A ref to the prepared data in Ray's object store, for the workers, or None (no preflight
    here, or too big to ship: workers then prepare it themselves). Saves each worker loading the
    tokenizer and tokenizing the whole dataset again: seconds of start-up, on every restart too."""
    import ray

    from pipelines.data.prepare import shippable

    small = shippable(data) if data is not None else None
    return ray.put(small) if small is not None else None


def build_trainer(cfg: PipelineConfig, loop_config: dict, callbacks: list, train_stream=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.worker import train_loop_per_worker

    ray_train_env_defaults()
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = 1
    streamed = {}
    if train_stream is not None:  # Ray Data: each worker reads its split through get_dataset_shard("train")
        from pipelines.data.streaming import train_data_config

        streamed = {"datasets": {"train": train_stream}, "dataset_config": train_data_config()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources, placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.storage_path(),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
        ),
        **streamed,
    )


def final_metrics(state: dict) -> dict:
    """metrics.json from the final trainer state: last train/eval figures, steady-state speed."""
    history = state["history"]
    last = history[-1]
    last_eval = next(m for m in reversed(history) if "eval_loss" in m)
    return {
        "train_loss": last["train_loss"],
        "eval_loss": last_eval["eval_loss"],
        "eval_perplexity": last_eval["eval_perplexity"],
        "tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_steps": state["step"],
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in history),
        "tokens": state["tokens"],
        "non_pad_share": state["tokens"] / max(state.get("slots", 0), 1) if state.get("slots") else None,
        "restarts": state.get("restarts", 0),
        "resumed_from_step": state.get("resumed_from_step", []),
        "train_seconds": state["train_seconds"],
        # What trained and how much there was (LoRA: the adapter of the whole; full: all of it).
        "trainable_params": last.get("trainable_params"),
        "total_params": last.get("total_params"),
    }


def startup_breakdown(driver: dict, first_report: dict) -> dict:
    """Seconds spent before the first optimizer step, by phase (driver and rank 0 clocks)."""
    w = {k.removeprefix("startup_"): v for k, v in first_report.items() if k.startswith("startup_")}
    if not w:  # a resumed run reports no start-up of its own
        return {}
    return {
        "preflight_s": driver["preflight_done"] - driver["invoked"],
        "ray_init_s": driver["ray_ready"] - driver["preflight_done"],
        "workers_start_s": w["worker_start"] - driver["ray_ready"],
        "data_s": w["data_ready"] - w["worker_start"],
        "model_load_s": w["model_loaded"] - w["data_ready"],
        "deepspeed_init_s": w["engine_ready"] - w["model_loaded"],
        "first_step_s": w["first_step_done"] - w["engine_ready"],
        "total_to_first_step_s": w["first_step_done"] - driver["invoked"],
    }


def per_source(cfg: PipelineConfig, fingerprints: dict) -> list[dict]:
    return [{"path": s.path, "format": s.format, "weight": s.weight, "fingerprint": fingerprints.get(s.path)}
            for s in cfg.data.sources()]


def lineage(cfg: PipelineConfig, source_model: str, fingerprint: str, data_stats: dict, extra: dict) -> dict:
    from lora import model_content_hash
    from pipelines.data.prepare import source_fingerprints

    return {
        "base_model": cfg.model.path,
        "base_model_source": source_model,
        "base_model_sha256": model_content_hash(cfg.model.path),
        "dataset": cfg.data.path or [s.path for s in cfg.data.sources()],
        "dataset_fingerprint": fingerprint,
        "datasets": per_source(cfg, extra.get("fingerprints") or source_fingerprints(cfg.data)),
        "data_stats": data_stats,
        "lorapipe_version": lorapipe_version(),
        "git_commit": git_commit(),
        "seed": cfg.seed,
        **{k: v for k, v in extra.items() if k != "fingerprints"},
    }


def config_to_resume(path: str) -> PipelineConfig:
    """The resolved config of an interrupted run, from its Ray storage directory (or its newest
    complete checkpoint): resuming reuses its run name and storage, so Ray Train restores the
    latest checkpoint (adapter or model, optimizer, scheduler, RNG, data position) instead of step 0."""
    from pipelines.config.load import config_from_yaml_text

    p = Path(path).expanduser()
    ckpt = checkpoint.find_checkpoint(p)
    if ckpt is None:
        raise UserError(f"nothing to resume at {p}: no complete checkpoint_* directory there "
                        "(give the run's storage directory, e.g. runs/_ray/<run name>)")
    cfg = config_from_yaml_text(checkpoint.read_config_yaml(ckpt))
    if ckpt.parent.name != cfg.run.name:
        raise UserError(f"{ckpt} belongs to run {ckpt.parent.name!r} but its config names {cfg.run.name!r}")
    return cfg


def run_dir_from_checkpoint(ckpt: Path, run_dir: Path, *, source_model: str, fingerprint: str, data_stats: dict,
                            extra: dict, marks: Optional[dict] = None):
    """The run directory from a complete checkpoint (the final one, or an early-stopped trial's last)."""
    from pipelines.artifacts.rundir import write_run_dir
    from pipelines.config.load import config_from_yaml_text

    state = checkpoint.read_state(ckpt)  # refuses a checkpoint without its marker
    config_yaml = checkpoint.read_config_yaml(ckpt)
    cfg = config_from_yaml_text(config_yaml)
    metrics = final_metrics(state)
    if marks and not state.get("resumed_from_step"):  # a resumed run's first report is from another process
        metrics["startup"] = startup_breakdown(marks, state["history"][0])
    history = "".join(json.dumps(m) + "\n" for m in state["history"])
    weights, kind = checkpoint.weights_dir(ckpt)
    return write_run_dir(run_dir, config_yaml=config_yaml, weights_src=weights, kind=kind, metrics=metrics,
                         lineage=lineage(cfg, source_model, fingerprint, data_stats, extra),
                         extra_files={"history.jsonl": history})


def report_unlogged(run_dir, missing: list[int]) -> None:
    """Say which steps the MLflow run lacks (the server was away), and how to fill them in."""
    if missing:
        print(f"warning: MLflow lacks the metrics of {len(missing)} reports (steps {missing[0]}..{missing[-1]}): "
              f"the server was unreachable. They are in {run_dir.path / 'history.jsonl'}; "
              f"`lorapipe sync {run_dir.path}` logs them once it is back.")


def train(cfg: PipelineConfig, *, progress: bool = True, tune_trial_id: Optional[str] = None,
          parent_run_id: Optional[str] = None, callbacks: Optional[list] = None, preflight_checks: bool = True):
    """One Ray Train run. Returns the RunDir it wrote."""
    import ray

    from pipelines.data.builtin import resolve_builtins
    from pipelines.data.prepare import dataset_fingerprint, source_fingerprints
    from pipelines.data.streaming import use_ray_data
    from pipelines.tracking import runs as tracking
    from pipelines.train.progress import ForwardMetrics, ProgressSink, live_progress

    marks = {"invoked": time.time()}
    source_model = cfg.model.path
    cfg = resolved_paths(with_run_name(resolve_builtins(cfg)))
    cfg = fixed_micro_batch(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if run_dir.exists():
        raise UserError(f"run directory {run_dir} already exists; set run.name=... to a new name")
    data = None
    if preflight_checks:
        data = preflight(cfg)
        fingerprint, data_stats, fingerprints = data.fingerprint, data.stats, data.fingerprints
    else:  # a Tune trial: the driver already checked the base config and the searched values
        fingerprint, data_stats, fingerprints = dataset_fingerprint(cfg.data, None), {}, source_fingerprints(cfg.data)
    marks["preflight_done"] = time.time()

    ensure_ray(cfg)
    warn_if_not_shared(cfg)
    marks["ray_ready"] = time.time()
    pending_run = start_tracking(cfg, tune_trial_id, parent_run_id, data_tags(fingerprints))
    sink = ProgressSink.options(label_selector=driver_node_label()).remote()
    train_stream, shipped = streamed_data(cfg) if use_ray_data(cfg.data) else (None, ship_data(data))
    loop_config = {"config": cfg.model_dump(mode="json"), "mlflow_run": pending_run, "data": shipped,
                   "streamed": train_stream is not None}
    trainer = build_trainer(cfg, loop_config, [ForwardMetrics(sink), *(callbacks or [])], train_stream)
    try:
        with live_progress(sink, cfg.train.max_steps, cfg.run.name, enabled=progress):
            result = trainer.fit()
    except Exception:
        run_id = tracking.run_id_of(pending_run, timeout=30)
        if run_id:
            try:
                tracking.finish_run(cfg.tracking_uri(), run_id, "FAILED")
            except Exception:  # the training error matters more than MLflow being away too
                pass
        raise
    finally:
        ray.kill(sink)
    run_id = tracking.run_id_of(pending_run)
    extra = {"tune_trial_id": tune_trial_id, "mlflow_run_id": run_id, "ray_run_path": result.path,
             "checkpoint": result.checkpoint.path, "fingerprints": fingerprints}
    with result.checkpoint.as_directory() as ckpt:
        out = run_dir_from_checkpoint(Path(ckpt), run_dir, source_model=source_model, fingerprint=fingerprint,
                                      data_stats=data_stats, extra=extra, marks=marks)
    if run_id:
        report_unlogged(out, tracking.finalize_run(cfg.tracking_uri(), run_id, out.history(), out.metrics()))
    elif pending_run is not None:
        print(f"warning: no MLflow run was created for {cfg.run.name}: training went on untracked. Its metrics are "
              f"in {out.path / 'history.jsonl'}; `lorapipe register {out.path}` records it in MLflow.")
    return out
