"""lora/: parameter counts equal PEFT's, adapters round-trip through stock PEFT, bad adapters are
refused, merges keep the logits (fp32 and dequantize-then-merge from 4-bit NF4), and training
moves only the adapter. Tiny Llamas (hidden 64, 2 layers), fp32 compute, CPU bitsandbytes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import (
    LoraInputError,
    apply_lora,
    build_lora_config,
    expected_trainable_params,
    linear_module_names,
    load_adapter,
    load_base_model,
    load_tokenizer,
    merge_adapter,
    save_adapter,
    verify_adapter_files,
)
from lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, expected_adapter_shapes, targeted_linears

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
QUANT = [pytest.param(False, id="fp32"), pytest.param(True, id="nf4")]


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def biased_llama_dir(tmp_path_factory, tiny_tokenizer):
    """Same shape as small_llama_dir, with biases on q/k/v/o (Llama has none by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         attention_bias=True, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so that a bias mix-up would show in the logits
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("biased-llama")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def load(path, quantized: bool):
    return load_base_model(str(path), dtype="fp32", quantization="nf4" if quantized else "none")


def probe_ids(vocab: int = 100, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, 24), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def randomize_adapter(peft_model, seed: int = 0, std: float = 0.1) -> None:
    """A trained-looking adapter: every LoRA matrix random and non-zero (PEFT starts B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dense_weights(model) -> dict[str, torch.Tensor]:
    """name -> full-precision weight of every linear layer (dequantizing 4-bit ones)."""
    from peft.utils.integrations import dequantize_bnb_weight

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            if hasattr(w, "quant_state"):
                w = dequantize_bnb_weight(w, state=w.quant_state)
            out[name] = w.detach().float().clone()
    return out


# --------------------------------------------------------------------------- loading
def test_load_base_fp32_is_frozen(small_llama_dir):
    model = load(small_llama_dir, False)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert linear_module_names(model) == LLAMA_LINEARS  # the output head is not a target


def test_load_base_nf4_packs_linears_in_4_bit(small_llama_dir):
    model = load(small_llama_dir, True)
    kinds = {type(m).__name__ for _, m in targeted_linears(model, "all-linear")}
    assert kinds == {"Linear4bit"}
    assert len(targeted_linears(model, "all-linear")) == 2 * 7
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 64 * 64 // 2  # two weights a byte
    assert q.weight.quant_state.quant_type == "nf4"
    assert all(not p.requires_grad for p in model.parameters())
    # The output head and embeddings stay full precision.
    assert model.lm_head.weight.dtype == torch.float32


FREED_BLOCK_PROBE = """
import sys
from pathlib import Path
import torch
from lora.base import load_base_model

def anon():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

load_base_model(sys.argv[1], dtype="fp32", quantization=sys.argv[2])
block = 2 * 2**20  # 8 MiB of fp32: an activation of a model with hidden sizes in the thousands
first = torch.ones(block); del first  # glibc's dynamic threshold would now rise to this size
before = anon()
a = torch.ones(block); b = torch.ones(1024)  # b keeps a off the heap's top, where a free is trimmed
del a
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables")
def test_cpu_qlora_returns_freed_large_blocks_to_the_os(small_llama_dir):
    """After a 4-bit CPU load, a freed 8 MiB block leaves the process (it was mapped, not carved
    from the heap); after a 16-bit load glibc's default keeps it resident, which is what made the
    1B QLoRA step's peak grow step after step (bench/qlora_memory.py)."""
    def retained(quantization: str) -> int:
        out = subprocess.run([sys.executable, "-c", FREED_BLOCK_PROBE, str(small_llama_dir), quantization],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    assert retained("nf4") < 1 << 20
    assert retained("none") > 6 << 20


def test_missing_model_path_raises_lora_input_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for quantization in ("none", "nf4"):
        with pytest.raises(LoraInputError, match="not found"):
            load_base_model(str(missing), dtype="fp32", quantization=quantization)
    with pytest.raises(LoraInputError, match="not found"):
        load_tokenizer(str(missing))


def test_directory_without_a_model_raises_lora_input_error(tmp_path):
    # A user-causable error (model.path points at the wrong folder) must be a one-line
    # LoraInputError, not a ValueError traceback out of transformers.
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraInputError):
        load_base_model(str(tmp_path / "empty"), dtype="fp32")


def test_missing_adapter_path_raises_lora_input_error(small_llama_dir, tmp_path):
    base = load(small_llama_dir, False)
    with pytest.raises(LoraInputError, match="no PEFT adapter"):
        load_adapter(base, tmp_path / "nope")


# --------------------------------------------------------------------------- counting
# (model, target_modules, r, options, expected). Small model: hidden 64, MLP 128, 2 layers:
# attention projections 64->64 (r*128 each), gate/up 64->128 and down 128->64 (r*192 each).
COUNT_CASES = [
    ("plain", "all-linear", 4, {}, 2 * 4 * (4 * 128 + 3 * 192)),
    ("plain", ["q_proj", "v_proj"], 8, {}, 2 * 2 * 8 * 128),
    ("plain", ["gate_proj", "up_proj", "down_proj"], 2, {}, 2 * 3 * 2 * 192),
    ("plain", "all-linear", 4, {"use_rslora": True}, 2 * 4 * (4 * 128 + 3 * 192)),
    ("plain", "all-linear", 4, {"use_dora": True}, 2 * 4 * (4 * 128 + 3 * 192) + 2 * (4 * 64 + 2 * 128 + 64)),
    ("plain", ["q_proj", "v_proj"], 8, {"use_dora": True}, 2 * 2 * 8 * 128 + 2 * 2 * 64),
    ("biased", ["q_proj", "v_proj"], 4, {"bias": "none"}, 2 * 2 * 4 * 128),
    ("biased", ["q_proj", "v_proj"], 4, {"bias": "lora_only"}, 2 * 2 * 4 * 128 + 2 * 2 * 64),
    ("biased", ["q_proj", "v_proj"], 4, {"bias": "all"}, 2 * 2 * 4 * 128 + 2 * 4 * 64),
    ("biased", "all-linear", 4, {"bias": "lora_only"}, 2 * 4 * (4 * 128 + 3 * 192) + 2 * 4 * 64),
    ("biased", ["gate_proj", "up_proj", "down_proj"], 2, {"bias": "lora_only"}, 2 * 3 * 2 * 192),
    ("biased", ["gate_proj", "up_proj", "down_proj"], 2, {"bias": "all"}, 2 * 3 * 2 * 192 + 2 * 4 * 64),
]


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("kind, targets, r, options, expected", COUNT_CASES,
                         ids=[f"{c[0]}-{c[1] if isinstance(c[1], str) else '+'.join(c[1])}-r{c[2]}-"
                              f"{'-'.join(f'{k}={v}' for k, v in c[3].items()) or 'default'}" for c in COUNT_CASES])
def test_expected_trainable_params_equals_peft(kind, targets, r, options, expected, quantized,
                                               small_llama_dir, biased_llama_dir):
    from peft import get_peft_model

    base = load(biased_llama_dir if kind == "biased" else small_llama_dir, quantized)
    cfg = build_lora_config(base, r=r, alpha=2 * r, target_modules=targets, **options)
    formula = expected_trainable_params(base, cfg)
    peft_model = get_peft_model(base, cfg)  # stock PEFT, not apply_lora (which checks itself)
    assert trainable_count(peft_model) == formula == expected
    assert peft_model.get_nb_trainable_parameters()[0] == expected


def test_apply_lora_wraps_only_the_targets(small_llama_dir):
    base = load(small_llama_dir, False)
    cfg = build_lora_config(base, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = apply_lora(base, cfg)
    wrapped = sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n})
    assert wrapped == ["q_proj", "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, 2 modules, 2 layers


@pytest.mark.parametrize("quantized", QUANT)
def test_absent_target_modules_list_the_existing_linears(small_llama_dir, quantized):
    base = load(small_llama_dir, quantized)
    with pytest.raises(LoraInputError) as exc:
        build_lora_config(base, r=4, alpha=8, target_modules=["q_proj", "query_key_value"])
    msg = str(exc.value)
    assert "query_key_value" in msg and "\n" not in msg
    assert "its linear layers are: " + ", ".join(LLAMA_LINEARS) in msg
    assert "lm_head" not in msg


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("quantized", QUANT)
def test_saved_adapter_loads_in_stock_peft_with_identical_logits(small_llama_dir, tmp_path, quantized):
    from peft import PeftModel

    targets = ["q_proj", "v_proj", "down_proj"]
    base = load(small_llama_dir, quantized)
    cfg = build_lora_config(base, r=4, alpha=8, target_modules=targets)
    expected_params = expected_trainable_params(base, cfg)
    model = apply_lora(base, cfg)
    randomize_adapter(model)
    ids = probe_ids()
    reference = logits(model, ids)
    out = save_adapter(model, tmp_path / "adapter")

    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and sorted(saved["target_modules"]) == sorted(targets)
    assert saved["peft_type"] == "LORA"

    stock = PeftModel.from_pretrained(load(small_llama_dir, quantized), str(out))
    assert torch.equal(logits(stock, ids), reference)
    ours = load_adapter(load(small_llama_dir, quantized), out)
    assert torch.equal(logits(ours, ids), reference)
    # Loaded for inference: nothing trainable unless asked.
    assert trainable_count(ours) == 0
    assert trainable_count(load_adapter(load(small_llama_dir, quantized), out, trainable=True)) == expected_params

    fresh = load(small_llama_dir, quantized)
    shapes = expected_adapter_shapes(saved, {n: (m.out_features, m.in_features)
                                             for n, m in targeted_linears(fresh, targets)})
    summary = verify_adapter_files(out, shapes)
    assert summary["tensors"] == 2 * 3 * 2
    assert summary["parameters"] == expected_params
    assert summary["norm"] > 0


# --------------------------------------------------------------------------- verify_adapter_files
@pytest.fixture
def saved_adapter(small_llama_dir, tmp_path):
    """(adapter dir, expected shapes) of a random non-zero [q_proj, v_proj] r=4 adapter."""
    base = load(small_llama_dir, False)
    cfg = build_lora_config(base, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    shapes = expected_adapter_shapes({"r": 4}, {n: (m.out_features, m.in_features)
                                                for n, m in targeted_linears(base, ["q_proj", "v_proj"])})
    model = apply_lora(base, cfg)
    randomize_adapter(model)
    return save_adapter(model, tmp_path / "adapter"), shapes


def rewrite_weights(adapter_dir, change) -> None:
    path = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_verify_accepts_a_good_adapter(saved_adapter):
    adapter_dir, shapes = saved_adapter
    summary = verify_adapter_files(adapter_dir, shapes)
    assert summary["tensors"] == 8 and summary["parameters"] == 2 * 2 * 4 * 128


def test_verify_rejects_an_all_zero_adapter(saved_adapter):
    adapter_dir, shapes = saved_adapter
    rewrite_weights(adapter_dir, lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items()}))
    with pytest.raises(RuntimeError, match="all zeros"):
        verify_adapter_files(adapter_dir, shapes)
    with pytest.raises(RuntimeError, match="all zeros"):
        verify_adapter_files(adapter_dir)


def test_verify_rejects_an_empty_tensor(saved_adapter):
    adapter_dir, shapes = saved_adapter

    def empty_one(t):  # what a ZeRO-3 save without gathering writes: a 0-element shard
        key = sorted(k for k in t if "lora_A" in k)[0]
        t[key] = torch.empty(0)

    rewrite_weights(adapter_dir, empty_one)
    with pytest.raises(RuntimeError, match="is empty"):
        verify_adapter_files(adapter_dir)


def test_verify_rejects_a_wrong_shape(saved_adapter):
    adapter_dir, shapes = saved_adapter

    def reshape_one(t):
        key = sorted(k for k in t if "lora_B" in k)[0]
        t[key] = torch.ones(t[key].shape[0] // 2, t[key].shape[1])

    rewrite_weights(adapter_dir, reshape_one)
    verify_adapter_files(adapter_dir)  # without expected shapes the file is plausible
    with pytest.raises(RuntimeError, match=r"has shape \(32, 4\), expected \(64, 4\)"):
        verify_adapter_files(adapter_dir, shapes)


def test_verify_rejects_missing_tensors_and_files(saved_adapter):
    adapter_dir, shapes = saved_adapter
    rewrite_weights(adapter_dir, lambda t: t.pop(sorted(k for k in t if "lora_A" in k)[0]))
    with pytest.raises(RuntimeError, match="misses tensor"):
        verify_adapter_files(adapter_dir, shapes)
    (adapter_dir / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        verify_adapter_files(adapter_dir)


# --------------------------------------------------------------------------- merge
def make_adapter(model_dir, out_dir, quantized: bool, *, r=4, alpha=8, targets="all-linear",
                 randomize=True, use_rslora=False):
    base = load(model_dir, quantized)
    model = apply_lora(base, build_lora_config(base, r=r, alpha=alpha, target_modules=targets,
                                               use_rslora=use_rslora))
    if randomize:
        randomize_adapter(model)
    lora_ab = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return save_adapter(model, out_dir), lora_ab


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_fp32_merge_keeps_logits_and_adds_scaled_delta(small_llama_dir, tmp_path, use_rslora):
    r, alpha = 4, 8
    adapter_dir, lora_ab = make_adapter(small_llama_dir, tmp_path / "a", False, r=r, alpha=alpha,
                                        use_rslora=use_rslora)
    ids = probe_ids()
    from peft import PeftModel

    unmerged = logits(PeftModel.from_pretrained(load(small_llama_dir, False), str(adapter_dir)), ids)
    base_weights = dense_weights(load(small_llama_dir, False))
    merged, report = merge_adapter(load(small_llama_dir, False), adapter_dir, dtype=torch.float32,
                                   probe_input_ids=ids)

    assert report["method"] == "merge" and report["dtype"] == "float32"
    assert report["max_abs_logit_diff"] < 1e-5
    assert (logits(merged, ids) - unmerged).abs().max().item() < 1e-5
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "LlamaForCausalLM"

    # W = W0 + scale * B @ A, scale alpha/r (or alpha/sqrt(r) with rsLoRA), on every layer.
    scale = alpha / (r ** 0.5 if use_rslora else r)
    merged_weights = dense_weights(merged)
    a = lora_ab["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"]
    b = lora_ab["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(merged_weights[name], base_weights[name] + scale * (b @ a), atol=1e-6, rtol=0)
    changed = [n for n in base_weights if n != "lm_head" and not torch.equal(merged_weights[n], base_weights[n])]
    assert len(changed) == 2 * 7
    assert torch.equal(merged_weights["lm_head"], base_weights["lm_head"])


def test_nf4_dequantize_then_merge_parity(small_llama_dir, tmp_path):
    adapter_dir, lora_ab = make_adapter(small_llama_dir, tmp_path / "a", True)
    ids = probe_ids()
    dequantized = dense_weights(load(small_llama_dir, True))
    merged, report = merge_adapter(load(small_llama_dir, True), adapter_dir, dtype=torch.float32,
                                   probe_input_ids=ids)

    assert report["method"] == "dequantize-then-merge"
    assert report["dequantized_layers"] == 2 * 7
    assert report["max_abs_logit_diff"] < 1e-4
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # The merge adds the delta to exactly the weights the 4-bit layer computed with.
    name = "model.layers.0.self_attn.q_proj"
    a = lora_ab[f"base_model.model.{name}.lora_A.default.weight"]
    b = lora_ab[f"base_model.model.{name}.lora_B.default.weight"]
    torch.testing.assert_close(dense_weights(merged)[name], dequantized[name] + 2.0 * (b @ a), atol=1e-6, rtol=0)


@pytest.mark.parametrize("quantized", QUANT)
def test_merging_a_zero_b_adapter_changes_no_weight(small_llama_dir, tmp_path, quantized):
    adapter_dir, lora_ab = make_adapter(small_llama_dir, tmp_path / "a", quantized, randomize=False)
    assert all(not v.any() for k, v in lora_ab.items() if "lora_B" in k)  # PEFT's init: B = 0
    before = dense_weights(load(small_llama_dir, quantized))
    merged, _ = merge_adapter(load(small_llama_dir, quantized), adapter_dir, dtype=torch.float32)
    after = dense_weights(merged)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    if not quantized:
        plain = load(small_llama_dir, False).state_dict()
        state = merged.state_dict()
        assert plain.keys() == state.keys()
        assert all(torch.equal(plain[k], state[k]) for k in plain)


@pytest.mark.parametrize("quantized", QUANT)
def test_merged_model_saves_and_loads_with_stock_transformers(small_llama_dir, tmp_path, quantized):
    from transformers import AutoModelForCausalLM

    adapter_dir, _ = make_adapter(small_llama_dir, tmp_path / "a", quantized)
    ids = probe_ids()
    merged, _ = merge_adapter(load(small_llama_dir, quantized), adapter_dir, dtype=torch.float32)
    expected = logits(merged, ids)
    out = tmp_path / "merged"
    merged.save_pretrained(str(out), safe_serialization=True)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a 4-bit one
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not any(type(m).__name__ == "Linear4bit" for m in reloaded.modules())
    assert torch.equal(logits(reloaded, ids), expected)


# --------------------------------------------------------------------------- training moves only the adapter
def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor (weights, biases, packed 4-bit data and its quantization state),
    keyed by the base model's own names."""
    return {k.replace(".base_layer", ""): v.detach().clone()
            for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("quantized", QUANT)
def test_training_changes_the_adapter_and_never_the_base(small_llama_dir, quantized):
    base = load(small_llama_dir, quantized)
    before = frozen_state(base)
    if quantized:
        assert any(k.endswith("weight.absmax") for k in before)  # the 4-bit state is compared too

    torch.manual_seed(0)  # LoRA A's init
    model = apply_lora(base, build_lora_config(base, r=4, alpha=8, target_modules="all-linear"))
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batch = probe_ids(seed=3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.05, losses
    after = frozen_state(model.get_base_model())
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"frozen tensor {key} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert len(changed) == len(adapter_before) == 2 * 7 * 2
