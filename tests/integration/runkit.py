"""Real run directories without Ray, for tests of the stages after training (registry, eval,
serve, auth): a few real LoRA steps on the tiny base in this process, measured on the run's own
held-out split, written with the writer training uses. Those stages read only the run directory."""
from __future__ import annotations

from pathlib import Path

import torch


def write_trained_run(tmp: Path, name: str, overrides: list[str], *, steps: int, lr: float = 1e-2, batch: int = 8,
                      seed: int = 0, random_lora: bool = False):
    """configs/tiny-cpu.yaml + `overrides` -> a RunDir at tmp/name whose adapter trained `steps`
    steps. random_lora: B starts random, not zero, so the adapter changes answers from step 0."""
    from lora import load_base_model, load_tokenizer, model_content_hash
    from pipelines.artifacts.rundir import write_run_dir
    from pipelines.config.load import dump_config, load_config
    from pipelines.data.builtin import resolve_builtins
    from pipelines.data.prepare import prepare_data

    root = Path(__file__).resolve().parents[2]
    cfg = resolve_builtins(load_config(root / "configs/tiny-cpu.yaml",
                                       [f"run.name={name}", f"run.output_dir={tmp}", *overrides]))
    tok = load_tokenizer(cfg.model.path)
    data = prepare_data(cfg.data, tok, cfg.seed)
    torch.manual_seed(seed)
    base = load_base_model(cfg.model.path, dtype="fp32", quantization=cfg.model.quantization)
    model, last_loss = _train(base, cfg, data, tok, steps=steps, lr=lr, batch=batch, seed=seed, random_lora=random_lora)
    eval_loss = held_out_loss(model, data, tok)
    model.save_pretrained(str(tmp / f"{name}-adapter-src"))
    metrics = {"train_loss": last_loss, "eval_loss": eval_loss, "eval_perplexity": float(torch.exp(torch.tensor(eval_loss))),
               "tokens_per_s": 1.0, "train_steps": steps, "peak_memory_bytes": 1}
    lineage = {"base_model": cfg.model.path, "base_model_sha256": model_content_hash(cfg.model.path),
               "dataset_fingerprint": data.fingerprint, "lorapipe_version": "test", "seed": seed, "mlflow_run_id": None}
    return write_run_dir(tmp / name, config_yaml=dump_config(cfg), weights_src=tmp / f"{name}-adapter-src",
                         kind="adapter", metrics=metrics, lineage=lineage)


def write_full_run(tmp: Path, name: str, overrides: list[str], *, steps: int, lr: float = 1e-3, batch: int = 8,
                   seed: int = 0):
    """configs/tiny-cpu.yaml with method=full + `overrides` -> a RunDir at tmp/name whose model/
    is the whole tiny base after `steps` full fine-tuning steps (every weight trained)."""
    from lora import load_base_model, load_tokenizer, make_fully_trainable, model_content_hash
    from pipelines.artifacts.rundir import write_run_dir
    from pipelines.config.load import dump_config, load_config
    from pipelines.data.builtin import resolve_builtins
    from pipelines.data.prepare import prepare_data

    root = Path(__file__).resolve().parents[2]
    cfg = resolve_builtins(load_config(root / "configs/tiny-cpu.yaml", [
        "method=full", "model.quantization=none", f"run.name={name}", f"run.output_dir={tmp}", *overrides]))
    tok = load_tokenizer(cfg.model.path)
    data = prepare_data(cfg.data, tok, cfg.seed)
    torch.manual_seed(seed)
    model = make_fully_trainable(load_base_model(cfg.model.path, dtype="fp32"))
    loss = _steps(model, data, tok, steps=steps, lr=lr, batch=batch, seed=seed)
    src = tmp / f"{name}-model-src"
    model.save_pretrained(str(src), safe_serialization=True)
    tok.save_pretrained(str(src))
    n = sum(p.numel() for p in model.parameters())
    metrics = {"train_loss": loss, "eval_loss": held_out_loss(model, data, tok), "eval_perplexity": 1.0,
               "tokens_per_s": 1.0, "train_steps": steps, "peak_memory_bytes": 1, "train_seconds": 1.0,
               "trainable_params": n, "total_params": n}
    lineage = {"base_model": cfg.model.path, "base_model_sha256": model_content_hash(cfg.model.path),
               "dataset_fingerprint": data.fingerprint, "lorapipe_version": "test", "seed": seed, "mlflow_run_id": None}
    return write_run_dir(tmp / name, config_yaml=dump_config(cfg), weights_src=src, kind="full", metrics=metrics,
                         lineage=lineage)


def _train(base, cfg, data, tok, *, steps: int, lr: float, batch: int, seed: int, random_lora: bool):
    from lora import apply_lora, build_lora_config

    lora_config = build_lora_config(base, r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules="all-linear")
    lora_config.init_lora_weights = not random_lora
    model = apply_lora(base, lora_config)
    return model, _steps(model, data, tok, steps=steps, lr=lr, batch=batch, seed=seed)


def _steps(model, data, tok, *, steps: int, lr: float, batch: int, seed: int) -> float:
    """`steps` AdamW steps on the trainable parameters over the training micro batches; the last loss."""
    from pipelines.data.prepare import MicroBatches

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = MicroBatches(data.train, batch, seed, tok.pad_token_id)
    model.train()
    for step in range(steps):
        loss = model(**batches[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


@torch.no_grad()
def held_out_loss(model, data, tok) -> float:
    from pipelines.data.prepare import eval_batches

    evals = eval_batches(data.eval, 8, 4, len(data.eval), 1, tok.pad_token_id)
    return sum(model(**b).loss.item() for b in evals) / len(evals)
