"""LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices learn `ratio` times faster than A.

The split follows PEFT's create_loraplus_optimizer (peft/optimizers/loraplus.py): lora_B and every
1-D trainable parameter (biases, DoRA magnitudes) go to the fast group, and within it biases and
LayerNorm parameters take no weight decay. Plain param-group dicts, not an optimizer, so that the
client AdamW and the optimizer DeepSpeed builds from its own config (offloaded states, CPU Adam)
get the same groups. Empty groups are left out: ZeRO flattens every group and fails on an empty one.
"""
from __future__ import annotations

from torch import nn

GROUP_A, GROUP_B, GROUP_B_NO_DECAY = "lora_A", "lora_B", "lora_B_no_decay"


def _no_decay_names(model: nn.Module) -> set[str]:
    """Trainable parameters PEFT exempts from weight decay: biases and LayerNorm weights."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.requires_grad and ("bias" in full or isinstance(module, nn.LayerNorm)):
                names.add(full)
    return names


def lora_plus_group_of(name: str, param: nn.Parameter, no_decay: set[str]) -> str:
    # PEFT gives LoRA'd embeddings a fixed learning rate of their own; lorapipe targets linear
    # layers only, so an embedding adapter (lora_embedding_A/B) can only come from elsewhere and
    # trains at the base rate.
    if "lora_embedding_" in name:
        return GROUP_A
    if "lora_B" in name or param.ndim == 1:
        return GROUP_B_NO_DECAY if name in no_decay else GROUP_B
    return GROUP_A


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """[{"name", "params", "lr", "weight_decay"}, ...]: A at `lr`, B at `lr * ratio`; no empty group.

    An LR scheduler (LambdaLR) scales each group's own initial lr, so the ratio holds through
    warmup and decay.
    """
    no_decay = _no_decay_names(model)
    members: dict[str, list[nn.Parameter]] = {GROUP_A: [], GROUP_B: [], GROUP_B_NO_DECAY: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            members[lora_plus_group_of(name, p, no_decay)].append(p)
    settings = {GROUP_A: (lr, weight_decay), GROUP_B: (lr * ratio, weight_decay), GROUP_B_NO_DECAY: (lr * ratio, 0.0)}
    return [{"name": group, "params": params, "lr": settings[group][0], "weight_decay": settings[group][1]}
            for group, params in members.items() if params]
