"""Model-side library: load a base (16/32-bit or 4-bit NF4), build and apply LoRA, count, merge, save.

Imports no ray, mlflow or deepspeed; bitsandbytes is imported lazily, only when 4-bit is asked for.
"""
from lora.errors import LoraInputError
from lora.base import load_base_model, load_tokenizer, torch_dtype, model_content_hash
from lora.adapter import (
    apply_lora,
    build_lora_config,
    expected_trainable_params,
    linear_module_names,
    load_adapter,
    save_adapter,
    verify_adapter_files,
)
from lora.merge import dequantize_linear4bit_, merge_adapter

__all__ = [
    "LoraInputError",
    "apply_lora",
    "build_lora_config",
    "dequantize_linear4bit_",
    "expected_trainable_params",
    "linear_module_names",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "merge_adapter",
    "model_content_hash",
    "save_adapter",
    "torch_dtype",
    "verify_adapter_files",
]
