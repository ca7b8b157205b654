"""What each ablation varies: its values (as the user writes them) and the config keys each value
sets. Every value is applied to the base config and validated here, before Ray starts, so a bad
value or an impossible combination (full fine-tuning on a 4-bit base) fails in one line.
"""
from __future__ import annotations

from typing import Any, Optional

from pipelines.config.schema import PipelineConfig
from pipelines.core.errors import UserError

KINDS = ("rank", "targets", "method", "variant")
DEFAULT_VALUES = {
    "rank": ["1", "4", "8", "16", "64", "full"],
    "targets": ["q", "qk", "qkv", "qkvo", "mlp", "all-linear"],
    "method": ["lora", "qlora", "full"],
    "variant": ["lora", "rslora", "dora", "loraplus"],
}
TARGET_PRESETS = ("q", "qk", "qkv", "qkvo", "mlp", "all-linear")
METHODS = ("lora", "qlora", "full")
VARIANTS = ("lora", "rslora", "dora", "loraplus")
LORA_PLUS_RATIO = 16.0  # the LoRA+ paper's recommended ratio (lr_B / lr_A = 2^4)
MAX_RANK = 1024


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown ablation {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def method_overrides(method: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The keys that switch the training method: QLoRA keeps the config's 4-bit format (nf4 when
    the config trains a 16/32-bit base); LoRA and full fine-tuning load the base unquantized."""
    quant = cfg.model.quantization if cfg.model.is_quantized else "nf4"
    keys = {"method": method, "model.quantization": quant if method == "qlora" else "none"}
    if method == "full":
        keys["lora.plus_lr_ratio"] = None  # the lora: section does not apply to full fine-tuning
    return keys


def rank_overrides(value: str, cfg: PipelineConfig) -> dict[str, Any]:
    """lora.r = value with alpha/r kept as in the config (the scale alpha/r stays fixed), or `full`."""
    if value == "full":
        return method_overrides("full", cfg)
    if not value.isdigit() or not 1 <= int(value) <= MAX_RANK:
        raise UserError(f"rank ablation: {value!r} is not a rank; give integers 1..{MAX_RANK} or 'full'")
    return {"lora.r": int(value), "lora.alpha_ratio": cfg.lora.alpha / cfg.lora.r}


def target_overrides(value: str, cfg: PipelineConfig) -> dict[str, Any]:
    """A preset, or module-name suffixes joined by commas (q_proj,v_proj)."""
    if value in TARGET_PRESETS:
        return {"lora.target_modules": value}
    names = [n for n in value.split(",") if n]
    if not names or not all(n.replace("_", "").replace(".", "").isalnum() for n in names):
        raise UserError(f"targets ablation: {value!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
                        "nor a comma-separated list of module names such as q_proj,v_proj")
    return {"lora.target_modules": names}


def variant_overrides(value: str, cfg: PipelineConfig) -> dict[str, Any]:
    """LoRA, rsLoRA, DoRA and LoRA+ at the config's rank: each differs from plain LoRA in one key."""
    if value not in VARIANTS:
        raise UserError(f"variant ablation: {value!r} is not a variant; choose from {', '.join(VARIANTS)}")
    plain = {"lora.use_rslora": False, "lora.use_dora": False, "lora.plus_lr_ratio": None}
    change = {"lora": {}, "rslora": {"lora.use_rslora": True}, "dora": {"lora.use_dora": True},
              "loraplus": {"lora.plus_lr_ratio": cfg.lora.plus_lr_ratio or LORA_PLUS_RATIO}}[value]
    return {**plain, **change}


def method_value_overrides(value: str, cfg: PipelineConfig) -> dict[str, Any]:
    if value not in METHODS:
        raise UserError(f"method ablation: {value!r} is not a method; choose from {', '.join(METHODS)}")
    return method_overrides(value, cfg)


OVERRIDES = {"rank": rank_overrides, "targets": target_overrides, "method": method_value_overrides,
             "variant": variant_overrides}


def trial_configs(cfg: PipelineConfig, kind: str, values: Optional[list[str]] = None) -> dict[str, PipelineConfig]:
    """value -> the validated config of its trial (the base config with that value applied)."""
    from pipelines.config.load import apply_trial_values

    values = [str(v) for v in (values or DEFAULT_VALUES[check_kind(kind)])]
    if cfg.is_full and kind != "method":
        raise UserError(f"the {kind} ablation varies the adapter, but {cfg.name} uses method=full (no adapter): "
                        "set method=lora or method=qlora (with model.quantization) in the base config")
    if len(set(values)) != len(values):
        raise UserError(f"{kind} ablation: values repeat ({', '.join(values)}); give each once")
    configs = {}
    for value in values:
        overrides = OVERRIDES[kind](value, cfg)
        try:
            configs[value] = apply_trial_values(cfg, overrides, source=f"{kind} ablation, value {value}")
        except UserError as e:
            raise UserError(f"{kind} ablation: value {value!r} cannot run: {e}") from None
    return configs
