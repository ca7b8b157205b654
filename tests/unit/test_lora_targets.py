"""lora.target_modules presets: the same roles on a Llama and on GPT-2 (fused c_attn, Conv1D
layers, c_proj under both attention and MLP), PEFT wraps exactly the resolved modules with the
trainable count the shape formula gives, an inexpressible preset fails in one line (also at the
driver's preflight, before Ray), the planner reads presets, and the README table is current."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora import LoraInputError, apply_lora, build_lora_config, expected_trainable_params
from lora.adapter import config_targets, expected_adapter_shapes, linear_shapes
from lora.targets import PRESETS, preset_table, presets_markdown, resolve_target_modules, targeted_linears

ROOT = Path(__file__).resolve().parents[2]
GPT2_Q_ERROR = ("lora.target_modules=q: gpt2 fuses q, k and v into one projection (c_attn); "
                "presets this model supports: qkv, qkvo, mlp, all-linear")
LLAMA_NAMES = {
    "q": ["q_proj"], "qk": ["q_proj", "k_proj"], "qkv": ["q_proj", "k_proj", "v_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
GPT2_NAMES = {"qkv": ["c_attn"], "qkvo": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"],
              "all-linear": ["c_attn", "c_proj", "c_fc"]}
# The full names each preset must wrap in one decoder layer (index 0; layer 1 alike).
LLAMA_LAYER = {"q": ["self_attn.q_proj"], "qk": ["self_attn.q_proj", "self_attn.k_proj"],
               "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "qkvo": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
               "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
LLAMA_LAYER["all-linear"] = LLAMA_LAYER["qkvo"] + LLAMA_LAYER["mlp"]
GPT2_LAYER = {"qkv": ["attn.c_attn"], "qkvo": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"],
              "all-linear": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)


def tiny_gpt2():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config())


def wrapped_modules(peft_model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}


def layer_names(prefix: str, per_layer: list[str], layers: int = 2) -> set[str]:
    return {f"{prefix}.{i}.{n}" for i in range(layers) for n in per_layer}


def test_presets_resolve_to_each_architectures_names():
    with torch.device("meta"):
        llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert {p: list(r.names) for p, r in preset_table(llama).items()} == LLAMA_NAMES
    gpt2_table = preset_table(gpt2)
    assert {p: list(r.names) for p, r in gpt2_table.items() if not r.reason} == GPT2_NAMES
    assert gpt2_table["q"].reason == gpt2_table["qk"].reason == "gpt2 fuses q, k and v into one projection (c_attn)"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", PRESETS)
def test_peft_wraps_exactly_the_resolved_modules_with_the_formulas_count(arch, preset):
    model, prefix, layer = (tiny_llama(), "model.layers", LLAMA_LAYER) if arch == "llama" else \
        (tiny_gpt2(), "transformer.h", GPT2_LAYER)
    if preset not in layer:
        with pytest.raises(LoraInputError):
            build_lora_config(model, r=4, alpha=8, target_modules=preset)
        return
    expected = layer_names(prefix, layer[preset])
    cfg = build_lora_config(model, r=4, alpha=8, target_modules=preset)
    assert {n for n, _ in targeted_linears(model, config_targets(cfg))} == expected
    formula = expected_trainable_params(model, cfg)
    peft_model = apply_lora(model, cfg)  # raises unless PEFT's trainable count equals `formula`
    assert wrapped_modules(peft_model) == expected
    assert peft_model.get_nb_trainable_parameters()[0] == formula


def test_gpt2_conv1d_counts_and_shapes_come_from_the_weight():
    """Conv1D weights are (in, out): c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32."""
    model = tiny_gpt2()
    shapes = linear_shapes(model, "all-linear")
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32) and shapes["transformer.h.1.mlp.c_proj"] == (32, 128)
    r = 4
    per_layer = {"qkv": r * (32 + 96), "qkvo": r * (32 + 96 + 32 + 32),
                 "all-linear": r * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)}
    for preset, n in per_layer.items():
        cfg = build_lora_config(model, r=r, alpha=8, target_modules=preset)
        assert cfg.fan_in_fan_out  # Conv1D's layout, set by us rather than by PEFT's warning
        assert expected_trainable_params(model, cfg) == 2 * n, preset
    peft_model = apply_lora(model, build_lora_config(model, r=r, alpha=8, target_modules="qkvo"))
    saved = {n.removeprefix("base_model.model.").replace(".default", ""): tuple(p.shape)
             for n, p in peft_model.named_parameters() if "lora_" in n}
    want = expected_adapter_shapes({"r": r}, linear_shapes(tiny_gpt2(), "qkvo"))
    assert saved == want


def test_inexpressible_preset_is_one_line_naming_what_the_model_supports():
    with torch.device("meta"):
        gpt2 = tiny_gpt2()
    with pytest.raises(LoraInputError) as err:
        resolve_target_modules(gpt2, "q")
    assert str(err.value) == GPT2_Q_ERROR
    with pytest.raises(LoraInputError, match=r"^lora.target_modules='qv' is not a preset; presets: q, qk, qkv"):
        resolve_target_modules(gpt2, "qv")
    with pytest.raises(LoraInputError, match=r"\['q_proj'\] not in the model; its linear layers are: c_attn, c_fc"):
        resolve_target_modules(gpt2, ["q_proj", "c_attn"])


def test_a_model_without_the_roles_says_so():
    """A Mixtral in transformers 5 keeps its experts as stacked parameters: no MLP linear to wrap."""
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    with pytest.raises(LoraInputError, match=r"^lora.target_modules=mlp: mixtral has no MLP linear layer .*; "
                                             r"presets this model supports: q, qk, qkv, qkvo, all-linear$"):
        resolve_target_modules(model, "mlp")


def test_driver_preflight_refuses_an_inexpressible_preset_before_ray(tmp_path):
    from pipelines.config.load import load_config
    from pipelines.train.driver import check_target_modules

    gpt2_config().save_pretrained(str(tmp_path))
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [f"model.path={tmp_path}", "lora.target_modules=q"])
    with pytest.raises(LoraInputError) as err:
        check_target_modules(cfg)
    assert str(err.value) == GPT2_Q_ERROR
    check_target_modules(load_config(ROOT / "configs/tiny-cpu.yaml", [f"model.path={tmp_path}",
                                                                      "lora.target_modules=qkvo"]))


def test_config_takes_presets_and_a_typo_is_one_line_listing_them():
    from pipelines.config.load import load_config
    from pipelines.config.schema import TARGET_PRESETS
    from pipelines.core.errors import UserError

    assert TARGET_PRESETS == PRESETS
    assert load_config(ROOT / "configs/tiny-cpu.yaml", ["lora.target_modules=qkv"]).lora.target_modules == "qkv"
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs/tiny-cpu.yaml", ["lora.target_modules=qkvv"])
    assert "\n" not in str(err.value)
    assert str(err.value).endswith("lora.target_modules: 'qkvv' is not a preset; presets: q, qk, qkv, qkvo, mlp, "
                                   "all-linear (or a list of module names such as [q_proj, v_proj])")


def test_planner_reads_presets_as_llama_roles():
    from pipelines.plan.memory import Arch, PlanInputs

    arch = Arch(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100)
    plan = PlanInputs(arch, lora_r=8)
    assert {p: plan.with_(lora_targets=p).targeted() for p in PRESETS} == {
        p: tuple(names) for p, names in LLAMA_NAMES.items()}
    assert plan.with_(lora_targets="qkv").adapter_params() == \
        plan.with_(lora_targets=("q_proj", "k_proj", "v_proj")).adapter_params() == 2 * 8 * (64 + 64 + 2 * (64 + 32))


def test_readme_table_is_what_the_function_returns():
    with torch.device("meta"):
        table = presets_markdown({"Llama / Mistral / Qwen2": tiny_llama(), "GPT-2": tiny_gpt2()})
    assert table in (ROOT / "README.md").read_text(), f"README's preset table is stale; it should read:\n{table}"
