"""Quick real run directories for the eval tests: a few real LoRA steps on the tiny base, in this
process, written with the writer training uses (the eval stage reads only the run directory)."""
from __future__ import annotations

from pathlib import Path

import torch


def train_task_run(tmp: Path, name: str, *, task: str, steps: int, uri: str, registry: str = "evaltest",
                   max_examples: int = 200, lr: float = 1e-2, quantization: str = "nf4", seed: int = 0,
                   repeat: int = 0, batch: int = 8):
    """A run directory whose adapter learnt `task` (builtin demo rows) for `steps` steps; its
    metrics.json eval_loss is measured on its own held-out split, as training does. repeat=N:
    the data is the task's first row N times (a model that must learn that one answer)."""
    import json

    from lora import apply_lora, build_lora_config, load_base_model, load_tokenizer
    from pipelines.artifacts.rundir import write_run_dir
    from pipelines.config.load import dump_config, load_config
    from pipelines.data.builtin import demo_rows, materialize_tiny_llama, resolve_builtins
    from pipelines.data.prepare import MicroBatches, eval_batches, prepare_data

    cfg = load_config("configs/tiny-cpu.yaml", [
        f"model.path={materialize_tiny_llama()}", f"model.quantization={quantization}", f"run.name={name}",
        f"run.output_dir={tmp}", f"mlflow.tracking_uri={uri}", "data.path=builtin:demo-tasks", f"data.task={task}",
        f"data.max_examples={max_examples}", f"registry.name={registry}", "scaling.num_workers=1"])
    if repeat:
        data_file = tmp / f"{name}-rows.jsonl"
        data_file.write_text((json.dumps(demo_rows(task, n=1, seed=0)[0]) + "\n") * repeat)
        cfg.data.path, cfg.data.task, cfg.data.max_examples = str(data_file), None, None
    cfg = resolve_builtins(cfg)
    tok = load_tokenizer(cfg.model.path)
    data = prepare_data(cfg.data, tok, cfg.seed)
    torch.manual_seed(seed)
    base = load_base_model(cfg.model.path, dtype="fp32", quantization=quantization)
    model = apply_lora(base, build_lora_config(base, r=8, alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = MicroBatches(data.train, batch, seed, tok.pad_token_id)
    model.train()
    for step in range(steps):
        loss = model(**batches[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        evals = eval_batches(data.eval, 8, 4, len(data.eval), 1, tok.pad_token_id)
        eval_loss = sum(model(**b).loss.item() for b in evals) / len(evals)
    adapter = tmp / f"{name}-adapter-src"
    model.save_pretrained(str(adapter))
    metrics = {"train_loss": loss.item(), "eval_loss": eval_loss, "eval_perplexity": float(torch.exp(torch.tensor(eval_loss))),
               "tokens_per_s": 1.0, "train_steps": steps, "peak_memory_bytes": 1}
    lineage = {"base_model": cfg.model.path, "base_model_sha256": "tiny", "dataset_fingerprint": data.fingerprint,
               "lorapipe_version": "test", "seed": seed, "mlflow_run_id": None}
    return write_run_dir(tmp / name, config_yaml=dump_config(cfg), adapter_src=adapter, metrics=metrics, lineage=lineage)
