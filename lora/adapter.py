"""Building, applying, counting, saving and loading LoRA adapters (PEFT format, safetensors)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Union

from torch import nn

from lora.errors import LoraInputError
from lora.targets import (
    TargetModules,
    linear_in_out,
    linear_leaf_names,
    model_linears,
    resolve_target_modules,
    targeted_linears,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; the
# FutureWarning is about PEFT's code, not anything a lorapipe user can change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers, except the output head."""
    return linear_leaf_names(model_linears(model))


def check_target_modules(model: nn.Module, target_modules: TargetModules) -> Union[str, list[str]]:
    """The names PEFT gets for a preset or list, or a one-line error (an inexpressible preset, or a
    name that is not among the model's linear layers, listing those)."""
    return resolve_target_modules(model, target_modules)


def build_lora_config(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: TargetModules = "all-linear",
    use_rslora: bool = False,
    use_dora: bool = False,
    bias: str = "none",
):
    """A PEFT LoraConfig for a causal LM; presets resolve to this model's module names, and names
    absent from the model are an error listing what exists."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    target_modules = resolve_target_modules(model, target_modules)
    # GPT-2's Conv1D stores weights as (in, out); PEFT would flip this itself, with a warning.
    conv1d = any(isinstance(m, Conv1D) for _, m in targeted_linears(model, target_modules))
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        fan_in_fan_out=conv1d,
        use_rslora=use_rslora,
        use_dora=use_dora,
        bias=bias,
        task_type="CAUSAL_LM",
    )


def linear_shapes(model: nn.Module, target_modules: TargetModules) -> dict[str, tuple[int, int]]:
    """{wrapped layer name: (out, in)} for every layer the targets select (Linear or Conv1D)."""
    shapes = {}
    for name, m in targeted_linears(model, target_modules):
        in_f, out_f = linear_in_out(m)
        shapes[name] = (out_f, in_f)
    return shapes


def config_targets(lora_config) -> TargetModules:
    """A LoraConfig's target_modules as targeted_linears takes them (PEFT keeps a list as a set)."""
    tm = lora_config.target_modules
    return tm if isinstance(tm, str) else sorted(tm)


def expected_trainable_params(model: nn.Module, lora_config) -> int:
    """r*(in+out) per wrapped linear, + out per layer for DoRA's magnitude, + trainable biases.

    Computed from the base model's shapes alone (call it before applying the adapter).
    """
    targets = targeted_linears(model, config_targets(lora_config))
    r = lora_config.r
    in_out = [linear_in_out(m) for _, m in targets]
    total = sum(r * (i + o) for i, o in in_out)
    if lora_config.use_dora:
        total += sum(o for _, o in in_out)
    if lora_config.bias == "all":
        total += sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias")
    elif lora_config.bias == "lora_only":
        total += sum(m.bias.numel() for _, m in targets if m.bias is not None)
    return total


def apply_lora(model: nn.Module, lora_config, *, gradient_checkpointing: bool = False, checkpoint_every: int = 1):
    """Wrap the frozen base with the adapter; the trainable count must equal the formula.

    `checkpoint_every`=k recomputes only the decoder layers whose index is a multiple of k (1: all).
    """
    from peft import get_peft_model

    expected = expected_trainable_params(model, lora_config)
    if gradient_checkpointing:
        # Reentrant checkpointing: the non-reentrant variant raises CheckpointError on recompute
        # with frozen params under ZeRO-3 in some versions. Inputs must carry grad for it to work.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True},
                                              every_n_layers=checkpoint_every)
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    if trainable != expected:
        raise RuntimeError(f"PEFT made {trainable} trainable parameters, the shape formula says {expected}")
    return peft_model


def save_adapter(peft_model, out_dir: Union[str, Path], state_dict: dict | None = None) -> Path:
    """Save in stock PEFT format (adapter_config.json + adapter_model.safetensors)."""
    out = Path(out_dir)
    peft_model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    return out


def load_adapter(base_model: nn.Module, adapter_dir: Union[str, Path], *, trainable: bool = False):
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise LoraInputError(f"no PEFT adapter at {adapter_dir} (missing {ADAPTER_CONFIG})")
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)


def expected_adapter_shapes(adapter_config: dict, linear_shapes: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """lora_A: (r, in), lora_B: (out, r) for every wrapped layer name -> (out, in)."""
    r = adapter_config["r"]
    shapes = {}
    for name, (out_f, in_f) in linear_shapes.items():
        shapes[f"{name}.lora_A.weight"] = (r, in_f)
        shapes[f"{name}.lora_B.weight"] = (out_f, r)
    return shapes


def verify_adapter_files(adapter_dir: Union[str, Path], expected_shapes: dict[str, tuple] | None = None) -> dict:
    """Refuse an adapter that is empty, zero-sized or of the wrong shapes (the ZeRO-3 empty-save failure).

    Returns {"tensors": n, "parameters": n, "norm": total L2 norm}.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise RuntimeError(f"adapter at {adapter_dir} is incomplete (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    n_params, sq = 0, 0.0
    names = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            names.append(key)
            if t.numel() == 0:
                raise RuntimeError(f"adapter tensor {key} is empty (shape {tuple(t.shape)}): parameters were not gathered")
            n_params += t.numel()
            sq += float(t.float().pow(2).sum())
    if not names:
        raise RuntimeError(f"adapter at {adapter_dir} holds no tensors")
    if expected_shapes:
        saved = {}
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        for suffix, shape in expected_shapes.items():
            match = [k for k in saved if k.endswith(suffix)]
            if not match:
                raise RuntimeError(f"adapter misses tensor {suffix}")
            if saved[match[0]] != tuple(shape):
                raise RuntimeError(f"adapter tensor {match[0]} has shape {saved[match[0]]}, expected {tuple(shape)}")
    if sq == 0.0:
        raise RuntimeError(f"adapter at {adapter_dir} is all zeros")
    return {"tensors": len(names), "parameters": n_params, "norm": sq ** 0.5}
