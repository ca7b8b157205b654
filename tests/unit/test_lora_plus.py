"""LoRA+ param groups (lora/plus.py), split as PEFT's create_loraplus_optimizer splits them: lora_B
and 1-D params fast, biases without weight decay, no empty group; and the config key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora import apply_lora, build_lora_config
from lora.plus import lora_plus_param_groups

ROOT = Path(__file__).resolve().parents[2]


def tiny_peft_llama(*, bias: str = "none", use_dora: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, attention_bias=True,
                                        tie_word_embeddings=False))
    return apply_lora(base, build_lora_config(base, r=4, alpha=8, target_modules="qkvo", bias=bias, use_dora=use_dora))


def names_by_group(model, groups) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


def test_plain_adapter_gives_an_A_group_at_lr_and_a_B_group_at_ratio_times_lr():
    model = tiny_peft_llama()
    groups = lora_plus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("lora_A", 1e-3, 0.1), ("lora_B", 16e-3, 0.1)]
    by_group = names_by_group(model, groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 4 * 2  # A and B on q, k, v, o of 2 layers
    assert by_group["lora_A"] == {n for n in trainable if ".lora_A." in n}
    assert by_group["lora_B"] == {n for n in trainable if ".lora_B." in n}


def test_biases_train_fast_without_decay_and_dora_magnitudes_train_fast_with_it():
    model = tiny_peft_llama(bias="lora_only", use_dora=True)
    groups = lora_plus_param_groups(model, lr=2e-4, ratio=8, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("lora_A", 2e-4, 0.01), ("lora_B", 2e-4 * 8, 0.01), ("lora_B_no_decay", 2e-4 * 8, 0.0)]
    by_group = names_by_group(model, groups)
    assert len(by_group["lora_B_no_decay"]) == 8 and all(n.endswith(".bias") for n in by_group["lora_B_no_decay"])
    magnitudes = {n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 8 and magnitudes <= by_group["lora_B"]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_config_key_is_off_by_default_and_positive():
    from pipelines.config.load import load_config
    from pipelines.core.errors import UserError

    tiny = ROOT / "configs/tiny-cpu.yaml"
    assert load_config(tiny).lora.plus_lr_ratio is None
    assert load_config(tiny, ["lora.plus_lr_ratio=16"]).lora.plus_lr_ratio == 16.0
    with pytest.raises(UserError, match=r"lora.plus_lr_ratio=0: Input should be greater than 0"):
        load_config(tiny, ["lora.plus_lr_ratio=0"])
