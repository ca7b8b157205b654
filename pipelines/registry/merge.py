"""`lorapipe merge RUN_DIR OUT_DIR`: one process, never inside DeepSpeed workers.

Default (`onto="trained"`): the base exactly as training saw it (dequantized NF4 for QLoRA)
plus the adapter delta, so the merged model matches the training-time model. `onto="original"`
merges onto the full-precision original weights instead.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.artifacts.rundir import RunDir
from pipelines.core.errors import UserError
from pipelines.core.files import write_dir_atomic

PROBE_TEXTS = ["### Instruction:\nReverse the word.\n\n### Input:\nabc\n\n### Response:\n",
               "The quick brown fox jumps over the lazy dog.", "0123456789 +-*/ ()[]"]


def probe_batch(tokenizer, max_len: int = 64):
    """A fixed batch for logit parity (same token count per row, no padding effects)."""
    import torch

    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS]
    n = max(1, min(min(len(r) for r in rows), max_len))
    return torch.tensor([r[:n] for r in rows], dtype=torch.long)


def merge_run(run_dir: str | Path, out_dir: str | Path, onto: str = "trained") -> dict:
    """Write a stock-transformers model directory (safetensors + config + tokenizer + merge_report.json)."""
    from lora import load_base_model, load_tokenizer, merge_adapter, torch_dtype

    if onto not in ("trained", "original"):
        raise UserError(f"--onto {onto!r} is not allowed; choose trained or original")
    run = RunDir.open(run_dir)
    if run.kind == "full":
        raise UserError(f"{run.path} is a full fine-tuning run: {run.model} is already a whole model (nothing to merge)")
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"output directory {out} already exists")
    cfg = run.config()
    m = cfg.model
    quantized = m.is_quantized and onto == "trained"
    base = load_base_model(m.path, dtype=m.dtype, quantization=m.quantization if quantized else "none",
                           double_quant=m.double_quant, quant_storage=m.quant_storage,
                           trust_remote_code=m.trust_remote_code, revision=m.revision)
    tokenizer = load_tokenizer(m.path, m.trust_remote_code, m.revision)
    merged, report = merge_adapter(base, run.adapter, dtype=torch_dtype(m.dtype), probe_input_ids=probe_batch(tokenizer))
    report.update({"onto": onto, "trained_on_4bit": m.is_quantized, "base_model": m.path, "run_dir": str(run.path)})

    def fill(d: Path) -> None:
        merged.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))
        (d / "merge_report.json").write_text(json.dumps(report, indent=2))

    write_dir_atomic(out, fill)
    return report
