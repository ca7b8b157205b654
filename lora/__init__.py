"""Model-side library: load a base (16/32-bit or 4-bit NF4), build and apply LoRA (or unfreeze it all for
full fine-tuning), count, merge, save.

Imports no ray, mlflow or deepspeed; bitsandbytes is imported lazily, only when 4-bit is asked for.
Submodules load on first use, so `import lora` (and the CLI's config checks) stay fast.
"""
from importlib import import_module

from lora.errors import LoraInputError

_EXPORTS = {
    "load_base_model": "lora.base", "load_tokenizer": "lora.base", "torch_dtype": "lora.base",
    "model_content_hash": "lora.base",
    "apply_lora": "lora.adapter", "build_lora_config": "lora.adapter", "expected_trainable_params": "lora.adapter",
    "linear_module_names": "lora.adapter", "load_adapter": "lora.adapter", "save_adapter": "lora.adapter",
    "verify_adapter_files": "lora.adapter",
    "preset_table": "lora.targets", "resolve_target_modules": "lora.targets",
    "dequantize_linear4bit_": "lora.merge", "merge_adapter": "lora.merge",
    "make_fully_trainable": "lora.full", "state_dict_shapes": "lora.full", "verify_model_files": "lora.full",
}
__all__ = ["LoraInputError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
