"""Which linear layers LoRA wraps: presets that mean the same on any decoder, resolved to module names.

`lora.target_modules` is a preset (q, qk, qkv, qkvo, mlp, all-linear) or a list of module-name
suffixes. A preset names roles (query, key, value, attention output, MLP); each linear layer gets
its role from its own name and from whether an attention or an MLP module holds it, so
`qkv` is q_proj/k_proj/v_proj on Llama and the fused c_attn on GPT-2. Presets resolve to names
PEFT matches by suffix (the leaf name where no other module shares it, else parent.leaf), so the
saved adapter_config.json names real modules and loads with stock PEFT.

Importing this module does not import torch (the config schema reads PRESETS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from lora.errors import LoraInputError

PRESETS = ("q", "qk", "qkv", "qkvo", "mlp", "all-linear")
# The roles each preset targets; "qkv" (the fused projection) stands in for q, k and v together.
PRESET_ROLES = {"q": ("q",), "qk": ("q", "k"), "qkv": ("q", "k", "v"), "qkvo": ("q", "k", "v", "o"),
                "mlp": ("mlp",)}
# Leaf names of the projections inside an attention module, by role.
ATTENTION_LEAVES = {
    "q": ("q_proj", "query", "q", "wq"),
    "k": ("k_proj", "key", "k", "wk"),
    "v": ("v_proj", "value", "v", "wv"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "wo"),
    "qkv": ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv"),
}
# Leaf names of MLP linears, for decoders whose layer holds them without an MLP module (OPT's fc1/fc2).
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "fc1", "fc2", "fc_in", "fc_out",
              "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3")
ROLE_WORDS = {"q": "query", "k": "key", "v": "value", "o": "attention output", "mlp": "MLP"}

TargetModules = Union[str, Sequence[str]]


def is_linear(module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit is a subclass) or transformers' Conv1D (GPT-2's linear)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_in_out(module) -> tuple[int, int]:
    """(in_features, out_features); Conv1D stores its weight as (in, out), Linear as (out, in)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def model_linears(model) -> list[tuple[str, object]]:
    """Every (name, linear layer) of the model except the output head, in module order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules() if is_linear(m) and m is not head]


def _context(name: str) -> str:
    """'attention', 'mlp' or '' by the nearest enclosing module whose name says which it is."""
    for part in reversed(name.split(".")[:-1]):
        low = part.lower()
        if "attn" in low or "attention" in low:
            return "attention"
        if any(word in low for word in ("mlp", "ffn", "feed_forward", "moe")):
            return "mlp"
    return ""


def linear_role(name: str) -> str:
    """q, k, v, o, qkv (fused), mlp, or '' (a linear no preset but all-linear targets)."""
    context, leaf = _context(name), name.rsplit(".", 1)[-1]
    if context == "attention":
        return next((role for role, leaves in ATTENTION_LEAVES.items() if leaf in leaves), "")
    if context == "mlp" or leaf in MLP_LEAVES:
        return "mlp"
    return ""


def suffix_matches(name: str, suffix: str) -> bool:
    """PEFT's rule for a list of target names: the full name or a dotted suffix of it."""
    return name == suffix or name.endswith("." + suffix)


def suffix_names(model, chosen: Sequence[str]) -> list[str]:
    """Shortest suffixes (leaf, else parent.leaf, ...) that match the chosen modules and no other.
    Any module counts as another, not only linears: PEFT refuses a target that is not a layer it wraps."""
    all_names = [n for n, _ in model.named_modules() if n]
    chosen_set, names = set(chosen), {}
    for full in chosen:
        parts = full.split(".")
        for depth in range(1, len(parts) + 1):
            suffix = ".".join(parts[-depth:])
            if all(n in chosen_set for n in all_names if suffix_matches(n, suffix)):
                names[suffix] = None
                break
    return list(names)  # in the order of `chosen`: q, k, v, o as a preset names them


def model_label(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


@dataclass(frozen=True)
class PresetResolution:
    """What a preset means on one model: the module-name suffixes, or why it cannot apply."""

    names: tuple[str, ...] = ()
    reason: str = ""


def resolve_preset(model, preset: str, linears=None) -> PresetResolution:
    linears = model_linears(model) if linears is None else linears
    if preset == "all-linear":
        return PresetResolution(tuple(suffix_names(model, [n for n, _ in linears])))
    by_role: dict[str, list[str]] = {}
    for name, _ in linears:
        by_role.setdefault(linear_role(name), []).append(name)
    label, chosen = model_label(model), []
    for role in PRESET_ROLES[preset]:
        if role in ("q", "k", "v") and role not in by_role and "qkv" in by_role:
            if preset in ("q", "qk"):
                fused = ", ".join(suffix_names(model, by_role["qkv"]))
                return PresetResolution(reason=f"{label} fuses q, k and v into one projection ({fused})")
            role = "qkv"
        if role not in by_role:
            return PresetResolution(reason=f"{label} has no {ROLE_WORDS[role]} linear layer that lorapipe can find "
                                           f"(its linear layers: {', '.join(linear_leaf_names(linears))})")
        chosen += [n for n in by_role[role] if n not in chosen]
    return PresetResolution(tuple(suffix_names(model, chosen)))


def linear_leaf_names(linears) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in linears})


def preset_table(model) -> dict[str, PresetResolution]:
    """Every preset's meaning on this model (docs, errors, `lorapipe validate`)."""
    linears = model_linears(model)
    return {preset: resolve_preset(model, preset, linears) for preset in PRESETS}


def resolve_target_modules(model, target_modules: TargetModules) -> Union[str, list[str]]:
    """What PEFT gets: 'all-linear' as is, a preset as module-name suffixes, a list checked against
    the model. An inexpressible preset or an absent name is a LoraInputError of one line."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return "all-linear"
        if target_modules not in PRESET_ROLES:
            raise LoraInputError(f"lora.target_modules={target_modules!r} is not a preset; presets: "
                                 f"{', '.join(PRESETS)} (or a list of module names)")
        table = preset_table(model)
        found = table[target_modules]
        if found.reason:
            usable = ", ".join(p for p, r in table.items() if not r.reason)
            raise LoraInputError(f"lora.target_modules={target_modules}: {found.reason}; "
                                 f"presets this model supports: {usable}")
        return list(found.names)
    linears = model_linears(model)
    missing = [t for t in target_modules if not any(suffix_matches(n, t) for n, _ in linears)]
    if missing:
        raise LoraInputError(f"lora.target_modules {missing} not in the model; its linear layers are: "
                             f"{', '.join(linear_leaf_names(linears))}")
    return list(target_modules)


def targeted_linears(model, target_modules: TargetModules) -> list[tuple[str, object]]:
    """The (name, module) pairs LoRA will wrap, matched the way PEFT matches names."""
    resolved = resolve_target_modules(model, target_modules)
    linears = model_linears(model)
    if resolved == "all-linear":
        return linears
    return [(name, m) for name, m in linears if any(suffix_matches(name, t) for t in resolved)]


def presets_markdown(models: dict[str, object]) -> str:
    """The README's table: one row per preset, one column per labelled model (names it resolves to,
    or why it cannot apply)."""
    tables = {label: preset_table(model) for label, model in models.items()}
    lines = ["| preset | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for preset in PRESETS:
        cells = [", ".join(f"`{n}`" for n in t[preset].names) if not t[preset].reason else f"not expressible: "
                 f"{t[preset].reason}" for t in tables.values()]
        lines.append(f"| `{preset}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
