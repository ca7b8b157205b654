"""`lorapipe demo`: the whole pipeline on embedded defaults, on a laptop CPU, in minutes.

1. a tiny Llama (built from config, tokenizer trained locally) is pretrained briefly on the
   generic demo tasks, so the adapter starts from a model that already follows the format;
2. a QLoRA adapter learns a held-out task with 2 Ray workers under DeepSpeed ZeRO-2;
3. base and base+adapter are compared on held-out rows (eval loss, exact match);
4. the run is registered in MLflow (sqlite) and promoted through the evaluation gate.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
TASK = "reverse"


def pretrain_base(out: Path, steps: int, seed: int = 0) -> Path:
    """Full-parameter pretraining of the builtin tiny Llama on the generic tasks (one process)."""
    import torch
    from transformers import get_scheduler

    from lora import load_base_model, load_tokenizer
    from pipelines.config.schema import DataSection
    from pipelines.core.files import write_dir_atomic
    from pipelines.data.builtin import materialize_demo_tasks, materialize_tiny_llama
    from pipelines.data.prepare import MicroBatches, prepare_data

    if (out / "config.json").is_file():
        return out
    init = materialize_tiny_llama(seed=seed)
    tokenizer = load_tokenizer(str(init))
    data_path = materialize_demo_tasks("generic", 8000, seed + 1)
    data = prepare_data(DataSection(path=str(data_path), format="alpaca", max_seq_len=64), tokenizer, seed)
    model = load_base_model(str(init), dtype="fp32")
    model.requires_grad_(True).train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(20, steps // 10), num_training_steps=steps)
    batches = MicroBatches(data.train, 32, seed, tokenizer.pad_token_id)
    with console.status("pretraining") as status:
        for step in range(steps):
            loss = model(**batches[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 20 == 0:
                status.update(f"pretraining base: step {step}/{steps}, loss {loss.item():.3f}")

    def fill(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))

    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dir_atomic(out, fill)


def compare_base_and_adapter(run, rows: list[dict]) -> dict:
    """Eval loss and exact match of the base as trained (4-bit) vs base + adapter."""
    from lora import load_adapter, load_base_model, load_tokenizer
    from pipelines.eval.generation import exact_match

    cfg = run.config()
    m = cfg.model
    tokenizer = load_tokenizer(m.path)
    base = load_base_model(m.path, dtype=m.dtype, quantization=m.quantization, double_quant=m.double_quant,
                           quant_storage=m.quant_storage)
    before = {"exact_match": exact_match(base, tokenizer, rows), "eval_loss": _eval_loss(base, tokenizer, rows)}
    model = load_adapter(base, run.adapter)
    after = {"exact_match": exact_match(model, tokenizer, rows), "eval_loss": _eval_loss(model, tokenizer, rows)}
    return {"base": before, "adapter": after}


def _eval_loss(model, tokenizer, rows: list[dict]) -> float:
    """Token-mean loss on the responses of `rows` (prompt tokens masked, as in training)."""
    import torch

    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import collate, render_row, tokenize_row

    cfg = DataSection(path="-", format="alpaca", max_seq_len=128)
    encoded = [tokenize_row(*render_row(r, i + 1, cfg, tokenizer), tokenizer, cfg.max_seq_len) for i, r in enumerate(rows)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), 32):
            chunk = encoded[i:i + 32]
            batch = collate({"input_ids": [e["input_ids"] for e in chunk], "labels": [e["labels"] for e in chunk]},
                            tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / max(count, 1)


def print_before_after(result: dict, task: str) -> None:
    t = Table(title=f"held-out '{task}' rows: base (4-bit) vs base + QLoRA adapter")
    for col in ("model", "eval loss", "exact match"):
        t.add_column(col)
    for label, key in (("base", "base"), ("base + adapter", "adapter")):
        r = result[key]
        t.add_row(label, f"{r['eval_loss']:.3f}", f"{r['exact_match']:.1%}")
    console.print(t)


def run_demo(workdir: str = ".demo", quick: bool = False) -> int:
    import torch

    from pipelines.config.load import load_config
    from pipelines.data.builtin import demo_rows
    from pipelines.pipeline import register_and_promote
    from pipelines.train.driver import train

    started = time.time()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LORAPIPE_HOME"] = str(root / "assets")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # One thread: tiny matrices gain little from more, and spinning OpenMP threads on a busy
    # 2-core machine slow a step by orders of magnitude.
    torch.set_num_threads(1)

    console.rule("[bold]1/4  base model: tiny Llama from config, tokenizer trained locally, brief pretraining")
    base = pretrain_base(root / "base", steps=120 if quick else 500)
    console.print(f"base model: {base}")

    console.rule("[bold]2/4  QLoRA adapter: 2 Ray workers, DeepSpeed ZeRO-2, 4-bit NF4 base")
    steps = 40 if quick else 300
    cfg = load_config(PRESET, [f"model.path={base}", f"run.output_dir={root / 'runs'}", f"mlflow.tracking_uri={uri}",
                               f"data.task={TASK}", "lora.r=16", "lora.alpha=32", "train.lr=5e-3",
                               f"train.max_steps={steps}", f"train.eval_every={steps // 3}",
                               f"train.checkpoint_every={steps // 2}", "train.report_every=10"])
    run = train(cfg)

    console.rule("[bold]3/4  before/after on held-out rows")
    rows = demo_rows(TASK, n=64 if quick else 200, seed=12345)
    result = compare_base_and_adapter(run, rows)
    print_before_after(result, TASK)
    (run.path / "demo_before_after.json").write_text(json.dumps(result, indent=2))

    console.rule("[bold]4/4  register in MLflow and promote through the eval gate")
    outcome = register_and_promote(run, tracking_uri=uri)
    for line in outcome.lines:
        console.print(line)
    console.print(f"\nsee it:  mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    console.print(f"run directory: {run.path}\ndemo took {time.time() - started:.0f} s")
    return 0
