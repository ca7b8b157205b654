"""Dequantize-then-merge: never merge into 4-bit weights (that re-quantizes and loses quality).

For an adapter trained on a 4-bit base the default reproduces what training computed with: each
NF4 weight is dequantized to the compute dtype (exactly the values the 4-bit layer multiplied by)
and the adapter delta is added in that precision. Layers are dequantized one at a time, in place,
so peak memory is one full-precision copy of the model plus one layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ in {"Linear4bit", "LinearNF4", "LinearFP4"}


def dequantize_linear4bit_(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes Linear4bit in `model` by an nn.Linear holding its dequantized
    weight (in place). Returns how many layers were replaced."""
    from peft.utils.integrations import dequantize_bnb_weight

    replaced = 0
    for name, module in list(model.named_modules()):
        if not _is_linear4bit(module):
            continue
        weight = dequantize_bnb_weight(module.weight, state=module.weight.quant_state).to(dtype)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
        del weight
        replaced += 1
    if replaced and hasattr(model, "config"):
        # The model is plain 16/32-bit now: drop the quantization record so it saves and loads as such.
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        for attr in ("is_loaded_in_4bit", "is_quantized", "hf_quantizer"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, False if attr != "hf_quantizer" else None)
                except AttributeError:
                    pass
    return replaced


@torch.no_grad()
def probe_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids).logits.float()


def logit_difference(reference: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (reference - other).abs()
    scale = reference.abs().max().clamp_min(1e-12)
    return {"max_abs_logit_diff": float(diff.max()), "max_rel_logit_diff": float(diff.max() / scale)}


def merge_adapter(base_model: nn.Module, adapter_dir, *, dtype: torch.dtype,
                  probe_input_ids: Optional[torch.Tensor] = None) -> tuple[nn.Module, dict]:
    """Merge a PEFT adapter into `base_model` (4-bit or not) and return (plain model, parity report).

    The parity report compares the training-time model (base as given + adapter, unmerged) with
    the merged model on `probe_input_ids`.
    """
    from lora.adapter import load_adapter

    quantized = any(_is_linear4bit(m) for m in base_model.modules())
    report: dict = {"method": "dequantize-then-merge" if quantized else "merge", "dtype": str(dtype).removeprefix("torch.")}
    reference = None
    peft_model = load_adapter(base_model, adapter_dir)
    if probe_input_ids is not None:
        reference = probe_logits(peft_model, probe_input_ids)
    if quantized:
        # Drop the LoRA wrappers (no merge), dequantize the base in place, then re-attach.
        base_model = peft_model.unload()
        report["dequantized_layers"] = dequantize_linear4bit_(base_model, dtype)
        peft_model = load_adapter(base_model, adapter_dir)
    merged = peft_model.merge_and_unload(safe_merge=True)
    if reference is not None:
        report.update(logit_difference(reference, probe_logits(merged, probe_input_ids)))
    return merged, report
