"""Full fine-tuning, model side: every weight of the base trains, and the result is a whole model
(stock transformers safetensors + config + tokenizer) rather than an adapter."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from torch import nn

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


def make_fully_trainable(model: nn.Module, *, gradient_checkpointing: bool = False, checkpoint_every: int = 1):
    """The (unquantized) base with every parameter requires_grad=True.

    The embedding weight trains, so the first layer's input already carries grad: checkpointing
    needs no enable_input_require_grads here (LoRA needs it, its embeddings are frozen)."""
    if any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        raise ValueError("full fine-tuning needs an unquantized base (model.quantization=none)")
    for p in model.parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        # Reentrant, as for LoRA (apply_lora): one recompute path for every method under ZeRO-3.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True},
                                              every_n_layers=checkpoint_every)
    return model


def state_dict_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model's state dict holds (call before ZeRO-3 partitions it)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def verify_model_files(model_dir: Union[str, Path], expected_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Refuse a saved model that is empty, holds zero-sized tensors (ZeRO-3 without a gather), or
    tensors whose names or shapes the model does not have. Sharded saves (an index file) too.

    Returns {"tensors": n, "parameters": n}."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_CONFIG).is_file():
        raise RuntimeError(f"model at {model_dir} has no {MODEL_CONFIG}")
    json.loads((model_dir / MODEL_CONFIG).read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"model at {model_dir} has no .safetensors weights")
    n_tensors, n_params = 0, 0
    for weights in files:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                numel = 1
                for d in shape:
                    numel *= d
                if numel == 0:
                    raise RuntimeError(f"model tensor {key} is empty (shape {shape}): parameters were not gathered")
                if expected_shapes is not None:
                    if key not in expected_shapes:
                        raise RuntimeError(f"model tensor {key} is not a tensor of the trained model")
                    if shape != tuple(expected_shapes[key]):
                        raise RuntimeError(f"model tensor {key} has shape {shape}, expected {tuple(expected_shapes[key])}")
                n_tensors += 1
                n_params += numel
    if not n_tensors:
        raise RuntimeError(f"model at {model_dir} holds no tensors")
    return {"tensors": n_tensors, "parameters": n_params}
