"""`lorapipe plan`: published memory figures, ZeRO partitioning arithmetic, the GPU catalogue,
time/cost arithmetic, and the one-line errors. Pure: no model is loaded (one tiny Llama is built
from a config to check the parameter counts)."""
from __future__ import annotations

import argparse
import sys

import pytest

from pipelines.config.load import load_config
from pipelines.config.schema import PipelineConfig
from pipelines.core.errors import UserError
from pipelines.plan.memory import CUDA_CONTEXT_BYTES, Arch, GiB, PlanInputs, arch_from_hf_config, plan_memory
from pipelines.plan.step_time import flops_per_token, gpu_spec, load_catalogue, plan_time
from pipelines.plan.verdict import add_plan_arguments, cmd_plan, plan_for_config, resolve_arch, verdict_line

GB = 1e9
PRESET_8B = "configs/llama3-8b-qlora-zero3.yaml"
TINY = "configs/tiny-cpu.yaml"

# Architectures as their config.json files give them.
LLAMA1 = {"7B": Arch(4096, 11008, 32, 32, 32, 32000), "13B": Arch(5120, 13824, 40, 40, 40, 32000),
          "33B": Arch(6656, 17920, 60, 52, 52, 32000), "65B": Arch(8192, 22016, 80, 64, 64, 32000)}
LLAMA2_70B = Arch(8192, 28672, 80, 64, 8, 32000)
LLAMA31_8B = Arch(4096, 14336, 32, 32, 8, 128256)
LLAMA32_1B = Arch(2048, 8192, 16, 32, 8, 128256, tie_embeddings=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel(planned: float, published: float) -> float:
    return planned / published - 1


# -- published figures -------------------------------------------------------------------------
@pytest.mark.parametrize("size,published_gb", [("65B", 41), ("33B", 21), ("13B", 10), ("7B", 5)])
def test_qlora_paper_guanaco_footprint(size, published_gb):
    """QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), the Guanaco sizes: 65B 41 GB, 33B 21 GB,
    13B 10 GB, 7B 5 GB, the 4-bit model's memory footprint on one GPU.

    Settings of the paper's qlora.py: LLaMA-1 shapes, NF4 with double quantization, bf16 compute,
    LoRA r=64 on every linear layer held in bf16, embeddings and head in bf16. Compared: the plan's
    loaded footprint (base + adapter weights + CUDA context), decimal GB, within 15%.
    """
    plan = plan_memory(PlanInputs(LLAMA1[size], lora_r=64, lora_targets="all-linear", quantization="nf4",
                                  double_quant=True, dtype="bf16", precision="mixed"))
    assert abs(rel(plan.loaded / GB, published_gb)) <= 0.15, plan.loaded / GB


def test_peft_deepspeed_docs_70b_qlora_zero3_two_gpus():
    """PEFT docs, "Use PEFT QLoRA and DeepSpeed with ZeRO3 for finetuning large models on multiple
    GPUs" (huggingface/peft docs/source/accelerate/deepspeed.md): Llama-2-70B on 2 GPUs, 36.6 GB per
    GPU. Settings from its run_peft_qlora_deepspeed_stage3.sh: max_seq_len 2048 (packed), per-device
    batch 2, grad accum 2, gradient checkpointing, flash attention, LoRA r=8 all-linear dropout 0.1,
    NF4 nested quant, bf16 quant storage, bf16 mixed precision. The figure is the GPU's used memory
    (read as GiB, as nvidia-smi's MiB give it): compared with the plan's total, within 15%."""
    p = PlanInputs(LLAMA2_70B, num_gpus=2, lora_r=8, lora_dropout=0.1, quantization="nf4", seq_len=2048,
                   micro_batch=2, grad_accum=2, gradient_checkpointing=True, attn_implementation="flash", zero_stage=3)
    assert abs(rel(plan_memory(p).total / GiB, 36.6)) <= 0.15


def test_peft_deepspeed_docs_70b_lora_zero3_eight_gpus():
    """Same PEFT docs page, "Use PEFT and DeepSpeed with ZeRO3 ...": Llama-2-70B, LoRA (no
    quantization) on 8x H100 80GB, "64 GB (80%)" per GPU. run_peft_deepspeed.sh: max_seq_len 2048,
    per-device batch 8, grad accum 4, gradient checkpointing, flash attention, r=8 all-linear
    dropout 0.1, bf16. Compared with the plan's total, within 15%."""
    p = PlanInputs(LLAMA2_70B, num_gpus=8, lora_r=8, lora_dropout=0.1, quantization="none", seq_len=2048,
                   micro_batch=8, grad_accum=4, gradient_checkpointing=True, attn_implementation="flash", zero_stage=3)
    assert abs(rel(plan_memory(p).total / GiB, 64)) <= 0.15


@pytest.mark.parametrize("method,published_gib", [("lora", 16.2), ("qlora", 7.4)])
def test_torchtune_llama31_8b_single_gpu(method, published_gib):
    """torchtune README, "Memory and training speed" (pytorch/torchtune): Llama 3.1 8B on one GPU,
    LoRA 16.2 GiB, QLoRA 7.4 GiB peak. Settings: batch 2, packed to 2048 tokens, activation
    checkpointing (recipe default), bf16 throughout (torchtune keeps LoRA weights and AdamW states in
    bf16: precision="pure"), r=8; LoRA on q,v,output_proj + MLP (8B_lora_single_device), QLoRA on
    q,k,v,output_proj + MLP (8B_qlora_single_device, torchao NF4 with double quantized scalers);
    chunked cross-entropy in 8 chunks. torchtune's peak memory is torch.cuda.max_memory_allocated,
    so it is compared with the plan's allocated peak (tensors, no CUDA context), within 15%."""
    targets = ALL if method == "qlora" else ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    p = PlanInputs(LLAMA31_8B, quantization="nf4" if method == "qlora" else "none", lora_r=8, lora_targets=targets,
                   seq_len=2048, micro_batch=2, gradient_checkpointing=True, precision="pure", loss_chunks=8)
    assert abs(rel(plan_memory(p).allocated_peak / GiB, published_gib)) <= 0.15


# Measured in this project on one H100 80GB HBM3 (torch 2.11, transformers 5.17, peft 0.21,
# bitsandbytes 0.50) by tests/integration/test_plan_measured.py's CUDA cases: bare PEFT (fp32
# adapter), AdamW, r=16 all-linear, sdpa; torch.cuda.max_memory_allocated after the first step.
# (arch, quantization, micro batch, seq, checkpointing, measured GiB)
H100_MEASURED = [
    (LLAMA31_8B, "none", 2, 2048, True, 23.40),
    (LLAMA31_8B, "nf4", 2, 2048, True, 13.76),
    (LLAMA31_8B, "none", 1, 2048, False, 36.95),
    (LLAMA32_1B, "none", 4, 1024, False, 19.49),
]


@pytest.mark.parametrize("arch,quant,batch,seq,ckpt,measured_gib", H100_MEASURED)
def test_h100_measured_allocated_peaks(arch, quant, batch, seq, ckpt, measured_gib):
    p = PlanInputs(arch, quantization=quant, lora_r=16, precision="fp32-adapter", seq_len=seq, micro_batch=batch,
                   gradient_checkpointing=ckpt)
    assert abs(rel(plan_memory(p).allocated_peak / GiB, measured_gib)) <= 0.05


# -- partitioning arithmetic -------------------------------------------------------------------
def parts(p: PlanInputs) -> dict:
    return {x.name: x for x in plan_memory(p).parts}


BF16_LORA = PlanInputs(LLAMA31_8B, quantization="none", seq_len=512, micro_batch=1)


def test_zero3_divides_base_adapter_grads_and_optimizer_by_n():
    got = parts(BF16_LORA.with_(zero_stage=3, num_gpus=8))
    for name in ("base weights", "adapter weights", "gradients", "optimizer states"):
        assert got[name].per_gpu == pytest.approx(got[name].full / 8)


def test_zero2_divides_grads_and_optimizer_only():
    got = parts(BF16_LORA.with_(zero_stage=2, num_gpus=4))
    assert got["base weights"].per_gpu == got["base weights"].full
    assert got["adapter weights"].per_gpu == got["adapter weights"].full
    assert got["gradients"].per_gpu == pytest.approx(got["gradients"].full / 4)
    assert got["optimizer states"].per_gpu == pytest.approx(got["optimizer states"].full / 4)


def test_zero1_divides_optimizer_only_and_zero0_nothing():
    one, zero = parts(BF16_LORA.with_(zero_stage=1, num_gpus=4)), parts(BF16_LORA.with_(zero_stage=0, num_gpus=4))
    assert one["gradients"].per_gpu == one["gradients"].full
    assert one["optimizer states"].per_gpu == pytest.approx(one["optimizer states"].full / 4)
    assert all(zero[k].per_gpu == zero[k].full for k in ("base weights", "gradients", "optimizer states"))


def test_offload_moves_optimizer_then_params_to_host():
    opt = parts(BF16_LORA.with_(zero_stage=2, num_gpus=4, offload_optimizer=True))["optimizer states"]
    assert opt.per_gpu == 0 and opt.host == pytest.approx(opt.full / 4)
    off = parts(BF16_LORA.with_(zero_stage=3, num_gpus=4, offload_optimizer=True, offload_params=True))
    assert off["base weights"].per_gpu == 0 and off["base weights"].host == pytest.approx(off["base weights"].full / 4)


def test_activations_do_not_shrink_with_gpus_but_checkpointing_and_micro_batch_do():
    def act(p):
        return parts(p)["activations"].per_gpu

    assert act(BF16_LORA.with_(zero_stage=3, num_gpus=8)) == act(BF16_LORA)
    assert act(BF16_LORA.with_(gradient_checkpointing=True)) < act(BF16_LORA) / 3
    assert act(BF16_LORA.with_(micro_batch=2)) == pytest.approx(2 * act(BF16_LORA))


def bnb_bits_per_param(double_quant: bool) -> tuple[float, float]:
    """(packed weight bits, quantization-constant bits) per parameter, as bitsandbytes' NF4 really
    stores them: the slope between two matrix sizes, so per-tensor fixed parts (code books) drop out."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    def sizes(rows: int) -> tuple[int, int]:
        packed, state = quantize_4bit(torch.randn(rows, 1024), quant_type="nf4", compress_statistics=double_quant)
        consts = sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if torch.is_tensor(t))
        return packed.numel() * packed.element_size(), consts

    (p1, c1), (p2, c2) = sizes(512), sizes(1024)
    return (p2 - p1) * 8 / (512 * 1024), (c2 - c1) * 8 / (512 * 1024)


@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_base_and_its_zero3_split_match_bitsandbytes(double_quant):
    """The planned 4-bit base costs what bitsandbytes stores (packed NF4 + absmax constants), and
    under ZeRO-3 only the packed weights are partitioned: the constants stay whole on every GPU."""
    arch, n = LLAMA1["65B"], 8
    packed_bits, const_bits = bnb_bits_per_param(double_quant)
    dense_bytes = parts(PlanInputs(arch, quantization="none"))["base weights"].full - arch.linear_params() * 2
    q = PlanInputs(arch, quantization="nf4", double_quant=double_quant)
    base = parts(q)["base weights"]
    assert (base.full - dense_bytes) * 8 / arch.linear_params() == pytest.approx(packed_bits + const_bits, rel=1e-3)
    z3 = parts(q.with_(zero_stage=3, num_gpus=n))["base weights"]
    whole = (n * z3.per_gpu - base.full) / (n - 1)  # per_gpu = (full - whole) / n + whole
    assert whole * 8 / arch.linear_params() == pytest.approx(const_bits, rel=1e-2)


def test_counts_match_a_real_llama_and_peft():
    """Parameter and adapter counts equal what transformers builds and what PEFT makes trainable."""
    import copy

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora.adapter import build_lora_config

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    arch = arch_from_hf_config(cfg.to_dict())
    assert arch.total_params() == sum(p.numel() for p in model.parameters())
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        lcfg = build_lora_config(model, r=8, alpha=16, target_modules=targets)
        p = PlanInputs(arch, lora_r=8, lora_targets=targets if targets == "all-linear" else tuple(targets))
        peft_trainable, _ = get_peft_model(copy.deepcopy(model), lcfg).get_nb_trainable_parameters()
        assert p.adapter_params() == peft_trainable


# -- time and cost ------------------------------------------------------------------------------
def test_flops_per_token_about_4n_lora_6n_full_plus_recompute():
    n = LLAMA31_8B.matmul_params()
    short = PlanInputs(LLAMA31_8B, seq_len=8, lora_r=1)  # attention and adapter negligible
    assert flops_per_token(short) == pytest.approx(4 * n, rel=0.01)
    assert flops_per_token(short.with_(method="full", quantization="none")) == pytest.approx(6 * n, rel=0.01)
    assert flops_per_token(short.with_(gradient_checkpointing=True)) == pytest.approx(6 * n, rel=0.01)
    assert flops_per_token(short.with_(seq_len=8192)) > 1.1 * flops_per_token(short)


def test_time_and_cost_scale_as_the_inputs_say():
    """Invariants, not the plan's own arithmetic again: compute time scales with tokens per step and
    inversely with achieved FLOP/s; cost with price; ZeRO-2 does not overlap its communication;
    ZeRO-3 moves far more bytes than ZeRO-2; one GPU communicates nothing."""
    p = PlanInputs(LLAMA31_8B, seq_len=2048, micro_batch=2, grad_accum=4, max_steps=1000, num_gpus=8, zero_stage=2)
    hw = dict(peak_tflops=1000, bandwidth_gbps=800)

    def at(q=p, utilization=0.5, price=2.0):
        return plan_time(q, utilization=utilization, price_per_gpu_hour=price, **hw)

    t = at()
    assert t.compute_s > 0 and t.comm_s > 0
    assert at(utilization=0.25).compute_s == pytest.approx(2 * t.compute_s)
    assert at(p.with_(grad_accum=8)).compute_s == pytest.approx(2 * t.compute_s)
    assert at(p.with_(max_steps=2000)).gpu_hours == pytest.approx(2 * t.gpu_hours)
    assert at(price=4.0).cost == pytest.approx(2 * t.cost) and at(price=0.0).cost == 0
    assert t.step_s >= t.compute_s + t.comm_s - 1e-12  # no overlap_comm under ZeRO-2
    assert at(p.with_(zero_stage=3)).comm_bytes_per_gpu > 10 * t.comm_bytes_per_gpu > 0
    assert at(p.with_(num_gpus=1)).comm_bytes_per_gpu == 0


# -- catalogue ---------------------------------------------------------------------------------
def test_catalogue_lists_the_issue_gpus_with_sane_figures():
    cat = load_catalogue()
    for name in ("h100", "a100-80g", "a100-40g", "l4", "rtx4090", "cpu"):
        assert name in cat.gpus
    assert cat.default_gpu in cat.gpus
    for spec in cat.gpus.values():
        assert spec.bf16_tflops > 0 and spec.intra_node_gbps > 0 and spec.gpus_per_node >= 1
        assert all(0 < u <= 1 for u in spec.utilization.values())
        assert spec.memory_gib is None if spec.name == "cpu" else spec.memory_gib > 10
    assert cat.gpus["h100"].memory_gib == pytest.approx(79.6) and cat.gpus["a100-40g"].memory_gib == 40


# -- configs, verdicts, knobs ------------------------------------------------------------------
def test_8b_preset_fits_on_8_h100():
    plan = plan_for_config(load_config(PRESET_8B), gpus=8, gpu="h100")
    assert plan.fits and not plan.knobs
    line = verdict_line(plan)
    assert line.startswith("plan: ") and "GiB/GPU of 79.6 GiB on 8x h100 - FITS; ~" in line and "$" in line


def test_70b_bf16_lora_on_one_l4_does_not_fit_and_suggests_knobs(tmp_path):
    cfg = load_config(PRESET_8B, ["model.quantization=none", "deepspeed.stage=2", "scaling.num_workers=1",
                                  "model.activation_checkpointing=none", "model.shape.hidden_size=8192",
                                  "model.shape.intermediate_size=28672", "model.shape.num_hidden_layers=80",
                                  "model.shape.num_attention_heads=64", "model.shape.vocab_size=32000",
                                  "model.path=meta-llama/Llama-2-70b-hf"])
    plan = plan_for_config(cfg, gpu="l4")
    assert not plan.fits and "DOES NOT FIT" in verdict_line(plan)
    suggested = [" ".join(k.overrides) for k in plan.knobs]
    assert any("model.activation_checkpointing=all" in s for s in suggested)
    assert any(k.fits and "model.quantization=nf4" in " ".join(k.overrides) for k in plan.knobs)
    assert any(k.fits and k.overrides[0].startswith("--gpus ") for k in plan.knobs)


def test_tiny_cpu_preset_plans_in_cpu_mode():
    plan = plan_for_config(load_config(TINY))
    assert plan.inputs.cpu and plan.fits and plan.gpu.name == "cpu"
    assert plan.inputs.arch.hidden == 128 and plan.inputs.arch.layers == 4
    assert "cpu worker" in verdict_line(plan)


def test_shape_from_a_local_config_json(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}))
    cfg = load_config(TINY, [f"model.path={tmp_path}"])
    assert resolve_arch(cfg) == Arch(256, 688, 3, 4, 2, 1000, tie_embeddings=True)


# -- bad input: one line, UserError (the CLI prints it and exits 2) ----------------------------
def run_plan(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return cmd_plan(parser.parse_args(list(argv)))


@pytest.mark.parametrize("argv,message", [
    ((PRESET_8B, "--gpu", "h900"), "unknown GPU 'h900'; known: h100, h200, a100-80g"),
    ((PRESET_8B, "--gpus", "0"), "--gpus must be at least 1, got 0"),
    ((PRESET_8B, "--utilization", "1.5"), "--utilization must be in (0, 1], got 1.5"),
    ((PRESET_8B, "model.shape=null", "model.path=some-org/some-model"),
     "model shape unknown for some-org/some-model: give model.shape or a local path with config.json"),
])
def test_bad_input_is_one_line(argv, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(UserError) as err:
        run_plan(*argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cmd_plan_prints_table_and_verdict(capsys):
    assert run_plan(PRESET_8B, "--gpus", "8", "--gpu", "h100", "--price-per-gpu-hour", "2") == 0
    out = capsys.readouterr().out
    for text in ("Memory per GPU", "optimizer states", "activations", "Time and cost", "FITS", "tok/s/GPU"):
        assert text in out


def test_cli_exits_2_with_one_line(tmp_path):
    """Through the real `lorapipe` entry point, once `plan` is wired into pipelines/cli.py."""
    import subprocess

    from pipelines import cli

    if "plan" not in cli.build_parser().format_help():
        pytest.skip("pipelines/cli.py has no plan subcommand yet")
    proc = subprocess.run([sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
                           "plan", PRESET_8B, "--gpu", "h900"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "unknown GPU 'h900'" in lines[0]


def test_gpu_spec_is_case_insensitive():
    assert gpu_spec("H100").name == "h100"
    assert CUDA_CONTEXT_BYTES > 0


def test_preflight_refuses_what_does_not_fit_unless_forced(monkeypatch, tmp_path):
    from pipelines.plan.verdict import fit_verdict as preflight

    fits = load_config(PRESET_8B)
    assert preflight(fits).endswith(verdict_line(plan_for_config(fits))[-20:])
    big = load_config(PRESET_8B, ["scaling.num_workers=1", "model.quantization=none", "deepspeed.stage=2",
                                  "train.micro_batch_size=64", "data.max_seq_len=8192"])
    with pytest.raises(UserError, match="DOES NOT FIT.*--force"):
        preflight(big)
    assert "DOES NOT FIT" in preflight(big, force=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    unknown = load_config(PRESET_8B, ["model.shape=null", "model.path=some-org/some-model"])
    assert preflight(unknown).startswith("plan: skipped (model shape unknown for some-org/some-model")


# -- the levers (#22): activation checkpointing of every k-th layer, the chunked loss -----------
def test_every_k_checkpointing_sits_between_none_and_all_in_memory_and_flops():
    p = PlanInputs(LLAMA31_8B, quantization="none", seq_len=2048, micro_batch=2)
    none, k2, every = p, p.with_(gradient_checkpointing=True, checkpoint_every=2), p.with_(gradient_checkpointing=True)
    assert (k2.checkpointed_layers(), every.checkpointed_layers()) == (16, 32)
    act = [parts(x)["activations"].per_gpu for x in (none, k2, every)]
    assert act[0] > act[1] > act[2]
    # Half the layers keep their activations, half keep only their input: between the two, near halfway.
    assert (act[1] - act[2]) / (act[0] - act[2]) == pytest.approx(0.5, abs=0.05)
    f = [flops_per_token(x) for x in (none, k2, every)]
    assert f[1] - f[0] == pytest.approx((f[2] - f[0]) / 2)  # half the layers replay their forward


def test_auto_checkpointing_picks_the_fastest_setting_that_fits_each_budget():
    from pipelines.plan.levers import AUTO_HEADROOM, config_setting, fastest_fitting

    p = PlanInputs(LLAMA31_8B, quantization="none", seq_len=2048, micro_batch=4)
    totals = {k: plan_memory(p.with_(gradient_checkpointing=k > 0, checkpoint_every=max(k, 1))).total / AUTO_HEADROOM
              for k in (0, 1, 2, 4)}  # the budgets at which each setting just fits
    assert totals[0] > totals[4] > totals[2] > totals[1]
    assert config_setting(fastest_fitting(p, totals[0] * 1.01)) == ("none", 1)
    assert config_setting(fastest_fitting(p, totals[1] * 1.01)) == ("all", 1)
    assert config_setting(fastest_fitting(p, totals[1] * 0.5)) == ("all", 1)  # nothing fits
    middle = fastest_fitting(p, (totals[0] + totals[1]) / 2)
    mode, k = config_setting(middle)
    assert mode == "every_k" and 1 < k < 32
    assert plan_memory(middle).total / AUTO_HEADROOM <= (totals[0] + totals[1]) / 2
    # The next setting with one fewer checkpointed layer would not fit: it is the fastest that does.
    fewer = [x for x in range(k + 1, 33) if -(-32 // x) < middle.checkpointed_layers()]
    over = plan_memory(p.with_(gradient_checkpointing=True, checkpoint_every=fewer[0])).total / AUTO_HEADROOM
    assert over > (totals[0] + totals[1]) / 2


def test_config_auto_checkpointing_follows_the_gpu():
    from pipelines.plan.auto import resolve_activation_checkpointing

    cfg = load_config(PRESET_8B, ["model.activation_checkpointing=auto", "scaling.num_workers=1", "deepspeed.stage=2",
                                  "model.quant_storage=null", "train.micro_batch_size=2"])
    assert resolve_activation_checkpointing(cfg, budget=200 * GiB) == ("none", 1)
    assert resolve_activation_checkpointing(cfg, budget=12 * GiB) == ("all", 1)
    # 8B QLoRA, 2 x 2048 tokens: 48 GiB without checkpointing, 15 GiB with every layer checkpointed.
    assert plan_for_config(cfg, gpu="h100").inputs.checkpointed_layers() == 0
    on_a100_40g = plan_for_config(cfg, gpu="a100-40g")
    assert on_a100_40g.fits and 0 < on_a100_40g.inputs.checkpointed_layers() < 32
    assert plan_for_config(cfg, gpu="l4").inputs.checkpointed_layers() == 32
    fixed = load_config(PRESET_8B, ["model.activation_checkpointing=every_k", "model.checkpoint_every_k=4"])
    assert resolve_activation_checkpointing(fixed) == ("every_k", 4)
    assert plan_for_config(fixed).inputs.checkpointed_layers() == 8


def test_auto_micro_batch_is_the_largest_divisor_that_fits_after_checkpointing():
    from pipelines.plan.levers import AUTO_HEADROOM, config_setting, fastest_fitting

    p = PlanInputs(LLAMA31_8B, quantization="nf4", seq_len=2048, keeps_logits=False)

    def need(micro: int, ckpt: str) -> float:  # the budget at which (micro, ckpt) just fits
        fields = {"none": {}, "all": {"gradient_checkpointing": True}}[ckpt]
        return plan_memory(p.with_(micro_batch=micro, grad_accum=8 // micro, **fields)).total / AUTO_HEADROOM

    assert need(1, "none") < need(2, "none") < need(4, "none") < need(8, "none")
    for micro in (8, 4, 2, 1):  # without checkpointing: exactly the largest micro batch that fits
        chosen = fastest_fitting(p, need(micro, "none") * 1.001, batch_per_worker=8)
        assert (chosen.micro_batch, chosen.grad_accum, config_setting(chosen)) == (micro, 8 // micro, ("none", 1))
    # Between "micro 1 without checkpointing" and "micro 8 with every layer": checkpointing is dropped
    # first (a third of the FLOPs), then the micro batch is the largest that still fits.
    budget = need(1, "none") * 0.98
    chosen = fastest_fitting(p, budget, batch_per_worker=8)
    assert chosen.checkpointed_layers() > 0 and chosen.micro_batch * chosen.grad_accum == 8
    assert plan_memory(chosen).total <= AUTO_HEADROOM * budget
    if chosen.micro_batch < 8:
        bigger = 2 * chosen.micro_batch
        assert plan_memory(chosen.with_(micro_batch=bigger, grad_accum=8 // bigger)).total > AUTO_HEADROOM * budget
    # Nothing fits: every layer recomputed, one example at a time (the verdict then refuses).
    frugal = fastest_fitting(p, 1 * GiB, batch_per_worker=8)
    assert (frugal.micro_batch, frugal.grad_accum, frugal.checkpointed_layers()) == (1, 8, 32)
    # The chunked loss is planned per candidate: 4 x 2048 tokens in 1,024-token chunks.
    chunked = fastest_fitting(p, 1e15, checkpointing=False, batch_per_worker=4, chunk_tokens=1024)
    assert (chunked.micro_batch, chunked.loss_chunks) == (4, 8)


@pytest.mark.parametrize("gpu, micro, checkpointed", [("h100", 2, False), ("h200", 4, False), ("a100-40g", 1, False),
                                                           ("l4", 1, True)])
def test_config_auto_micro_batch_follows_the_gpu_kind_and_keeps_the_global_batch(gpu, micro, checkpointed):
    from pipelines.plan.auto import with_auto_micro_batch

    cfg = load_config(PRESET_8B, [f"scaling.gpu_kind={gpu}"])
    assert cfg.train.micro_batch_size == "auto" and cfg.global_batch_size() == 64 and cfg.train.grad_accum is None
    fixed = with_auto_micro_batch(cfg)
    assert (fixed.train.micro_batch_size, fixed.train.grad_accum) == (micro, 8 // micro)
    assert fixed.global_batch_size() == 64
    plan = plan_for_config(fixed)
    assert plan.fits and plan.inputs.micro_batch == micro
    assert (plan.inputs.checkpointed_layers() > 0) == checkpointed
    # What the driver hands the workers validates as it is (dumped and loaded again).
    assert PipelineConfig.model_validate(fixed.model_dump(mode="json")).train == fixed.train
    # A config without auto is left as written.
    assert with_auto_micro_batch(fixed) is fixed


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=auto"], "train.micro_batch_size=auto needs train.global_batch_size"),
    (["train.micro_batch_size=auto", "train.global_batch_size=16"],
     "train.grad_accum=1 is chosen with the micro batch when train.micro_batch_size=auto: remove it"),
    (["train.global_batch_size=15"], "train.global_batch_size=15 must be a multiple of scaling.num_workers=2"),
    (["train.global_batch_size=20"], "train.global_batch_size=20 is 10 per worker over 2 workers, not a multiple of "
                                     "train.micro_batch_size=8"),
    (["train.global_batch_size=32", "train.grad_accum=3"], "train.grad_accum=3 disagrees with train.global_batch_size=32"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["scaling.gpu_kind=h900"], "'h900' is not in configs/gpus/catalogue.yaml; known: h100, h200"),
])
def test_batch_settings_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_global_batch_size_sets_grad_accum():
    cfg = load_config(TINY, ["train.global_batch_size=64", "train.grad_accum=null"])
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.global_batch_size()) == (8, 4, 64)
    assert load_config(TINY, ["train.global_batch_size=64", "train.grad_accum=4"]).train.grad_accum == 4
    assert load_config(TINY, ["train.grad_accum=null"]).train.grad_accum == 1  # neither given: one micro batch


def test_chunked_loss_knob_and_its_memory():
    p = PlanInputs(LLAMA31_8B, quantization="nf4", seq_len=2048, micro_batch=2, keeps_logits=False)
    plain, chunked = plan_memory(p), plan_memory(p.with_(loss_chunks=4))
    # The fp32 logits of 4096 tokens are 1.96 GiB; the plain loss holds 3 such buffers, a chunk 2 x 1/4 of one.
    logits = 4096 * 128256 * 4
    assert plain.total - chunked.total == pytest.approx(logits * (3 - 2 * 1.25 / 4) * 1.05, rel=0.02)
    cfg = load_config(PRESET_8B, ["scaling.num_workers=1", "deepspeed.stage=2", "model.quant_storage=null",
                                  "train.loss=chunked", "train.loss_chunk_tokens=512"])
    assert plan_for_config(cfg).inputs.loss_chunks == 8


def test_plan_predicts_the_chunked_loss_cut_measured_on_this_cpu(tmp_path):
    """bench/chunked_loss.py's child at a 128k vocabulary, 256 tokens in 4 chunks: the step's peak RSS
    falls by what the plan predicts, within 10%, and the loss is the same to 1e-5."""
    import json
    import subprocess

    out = tmp_path / "cut.json"
    proc = subprocess.run([sys.executable, "bench/chunked_loss.py", "--tokens", "256", "--chunk", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["plan"]["loss_chunks"] == 4
    assert abs(r["measured_over_planned_cut"] - 1) <= 0.10, r
    assert r["cut_over_fp32_logits"] > 2.0  # more than the logits themselves: their fp32 gradients go too
    assert r["loss_abs_diff"] <= 1e-5 and r["grad_norm_rel_diff"] <= 1e-4


def test_config_keys_of_the_levers_and_the_deprecated_alias():
    old = load_config(TINY, ["model.gradient_checkpointing=true"])
    assert old.model.activation_checkpointing == "all" and old.model.gradient_checkpointing
    assert load_config(TINY, ["model.gradient_checkpointing=false"]).model.activation_checkpointing == "none"
    both = load_config(TINY, ["model.gradient_checkpointing=true", "model.activation_checkpointing=every_k"])
    assert both.model.activation_checkpointing == "every_k"  # the new key wins over a preset's old one
    assert "gradient_checkpointing" not in both.model.model_dump()
    d = load_config(TINY)
    assert (d.model.activation_checkpointing, d.model.checkpoint_every_k, d.train.loss, d.train.loss_chunk_tokens) == (
        "none", 2, "plain", 1024)
    with pytest.raises(UserError, match=r"train.loss=chunked needs deepspeed.stage <= 2") as err:
        load_config(PRESET_8B, ["train.loss=chunked"])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="activation_checkpointing"):
        load_config(TINY, ["model.activation_checkpointing=some"])


# -- full fine-tuning ----------------------------------------------------------------------------
FULL_8B = PlanInputs(LLAMA31_8B, method="full", quantization="none", seq_len=512, micro_batch=1)


@pytest.mark.parametrize("dtype, weights, grads, states", [("bf16", 2, 2, 12), ("fp32", 4, 4, 8)])
def test_full_finetuning_holds_weights_grads_and_adam_states_for_every_parameter(dtype, weights, grads, states):
    """Mixed bf16: 16-bit weights and grads + fp32 master, m, v (12 B); fp32: m and v only (8 B).
    Either way 16 bytes per parameter before activations, every parameter of the 8B."""
    got = parts(FULL_8B.with_(dtype=dtype))
    n = LLAMA31_8B.total_params()
    assert 8.0e9 < n < 8.1e9 and FULL_8B.adapter_params() == n
    assert "adapter weights" not in got
    assert got["base weights"].full == pytest.approx(weights * n)
    assert got["gradients"].full == pytest.approx(grads * n)
    assert got["optimizer states"].full == pytest.approx(states * n)
    per_param = sum(got[k].full for k in ("base weights", "gradients", "optimizer states")) / n
    assert per_param == pytest.approx(16)


def test_full_finetuning_zero2_shards_grads_and_states_zero3_the_weights_too():
    z2, z3 = parts(FULL_8B.with_(zero_stage=2, num_gpus=8)), parts(FULL_8B.with_(zero_stage=3, num_gpus=8))
    assert z2["base weights"].per_gpu == z2["base weights"].full
    for name in ("gradients", "optimizer states"):
        assert z2[name].per_gpu == pytest.approx(z2[name].full / 8)
    for name in ("base weights", "gradients", "optimizer states"):
        assert z3[name].per_gpu == pytest.approx(z3[name].full / 8)
    # 8B full FT does not fit one 80 GB GPU (>120 GiB of states alone), and does on 8 under ZeRO-3.
    assert plan_memory(FULL_8B).total > 120 * GiB
    assert plan_memory(FULL_8B.with_(zero_stage=3, num_gpus=8, gradient_checkpointing=True)).total < 40 * GiB


def test_full_finetuning_step_counts_the_weight_gradients():
    lora = FULL_8B.with_(method="lora")
    assert flops_per_token(FULL_8B) > 1.4 * flops_per_token(lora)


def test_plan_for_a_full_config_plans_full_finetuning():
    cfg = load_config(PRESET_8B, ["method=full", "model.quantization=none"])
    plan = plan_for_config(cfg)
    assert plan.inputs.method == "full" and not plan.inputs.quantized
    assert plan.inputs.adapter_params() == plan.inputs.arch.total_params()
    assert plan.memory.part("optimizer states") * plan.inputs.num_gpus == pytest.approx(
        12 * plan.inputs.arch.total_params())
    lora = plan_for_config(load_config(PRESET_8B))
    assert plan.memory.total > lora.memory.total and plan.time.step_s > lora.time.step_s
