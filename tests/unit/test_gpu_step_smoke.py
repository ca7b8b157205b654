"""bench/gpu_step.py on a tiny Llama on the CPU: the JSON it writes, and the formulas behind it."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_bench(tmp_path, *extra, modes="lora"):
    out = tmp_path / "gpu_step.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU smoke test, also on a GPU machine
    cmd = [sys.executable, str(SCRIPT), "--sizes", "tiny", "--modes", modes, "--steps", "2", "--warmup", "1",
           "--seq", "32", "--batch", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_lora_on_cpu_writes_the_report(tmp_path):
    report = run_bench(tmp_path, "--peak-tflops", "1")
    for key in ("machine", "versions", "settings", "mfu_formula", "memory_reference", "configs"):
        assert key in report
    assert report["machine"]["cpu_cores"] > 0 and report["versions"]["torch"]
    assert "4*N" in report["mfu_formula"] and "12*L*H*S" in report["mfu_formula"]
    (c,) = report["configs"]
    assert (c["size"], c["mode"], c["status"]) == ("tiny", "lora", "ok"), c
    for key in ("min", "median", "max"):
        assert c["tokens_per_s"][key] > 0 and c["step_time_s"][key] > 0
    assert c["tokens_per_s"]["min"] <= c["tokens_per_s"]["median"] <= c["tokens_per_s"]["max"]
    assert c["tokens_per_step"] == 32
    assert c["flops_per_token"]["total"] > c["flops_per_token"]["dense_4n"] > 0  # the formula: next test
    assert c["mfu"] > 0 and c["mfu_dense_only"] > 0 and c["peak_bf16_tflops_source"] == "--peak-tflops"
    assert c["adapter"]["trainable_params"] > 0 and c["loss"]["finite"]
    assert c["memory"]["cpu_max_rss_bytes"] > 0 and c["memory"]["peak_allocated_bytes"] is None
    assert c["anchor"] is None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_tiny_qlora_goes_through_the_4bit_load(tmp_path):
    (c,) = run_bench(tmp_path, modes="qlora")["configs"]
    assert c["status"] == "ok", c
    assert "nf4" in c["base_load"]["quantization"] and c["tokens_per_s"]["median"] > 0
    assert c["mfu"] is None  # no peak known for a CPU and none given


def test_param_count_formula_matches_built_models_and_published_counts():
    from transformers import LlamaForCausalLM

    bench = load_bench()
    cfg = bench.llama_config("tiny", 32)
    assert bench.base_param_count(cfg) == LlamaForCausalLM(cfg).num_parameters()
    cfg.tie_word_embeddings = True
    assert bench.base_param_count(cfg) == LlamaForCausalLM(cfg).num_parameters()
    assert bench.base_param_count(bench.llama_config("8b", 2048)) == 8_030_261_248  # Llama-3-8B
    assert bench.base_param_count(bench.llama_config("1b", 2048)) == 1_235_814_400  # Llama-3.2-1B


def test_flops_per_token_formula_matches_torch_flop_counter():
    """The MFU numerator against torch's own FLOP count of a forward + backward through a frozen
    tiny Llama (activation gradients only, as with a frozen base). The formula counts the input
    embedding in 4N by convention (a lookup costs no FLOPs), so that term is taken out; eager
    attention, since torch's counter has no formula for the CPU sdpa kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    bench, seq = load_bench(), 64
    cfg = bench.llama_config("tiny", seq)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (2, seq))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    counted = counter.get_total_flops() / ids.numel()
    formula = bench.flops_per_token(cfg, seq, bench.base_param_count(cfg))
    assert counted == pytest.approx(formula["total"] - 4 * cfg.vocab_size * cfg.hidden_size, rel=0.01)


def test_peak_flops_table_and_override():
    bench = load_bench()
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe", None)[0] == 756
    assert bench.peak_bf16_tflops("NVIDIA H200", None)[0] == 989
    assert bench.peak_bf16_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312
    assert bench.peak_bf16_tflops("NVIDIA L4", None)[0] == 121
    assert bench.peak_bf16_tflops("NVIDIA L40S", None)[0] is None
    assert bench.peak_bf16_tflops("NVIDIA L40S", 362.0) == (362.0, "--peak-tflops")


def test_unknown_size_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "70b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "70b" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# -- bench/gpu_levers.py (#22): every lever as a configuration, the product's step beside the bare loop --
LEVERS_SCRIPT = ROOT / "bench" / "gpu_levers.py"


def test_gpu_levers_tiny_on_cpu_measures_levers_product_and_parity(tmp_path):
    out = tmp_path / "levers.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(LEVERS_SCRIPT), "--sizes", "tiny", "--modes", "lora", "--seq", "32", "--batch", "2",
           "--steps", "2", "--warmup", "1", "--configs", "bare,chunked,sdpa_flash,product,product_chunked,product_auto",
           "--auto-batch", "6", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    got = {c["config"]: c for c in report["configs"]}
    assert got["sdpa_flash"]["status"] == "skipped" and "CUDA" in got["sdpa_flash"]["note"]
    for name in ("bare", "chunked"):
        c = got[name]
        assert c["status"] == "ok", c
        assert c["tokens_per_s"]["median"] > 0 and c["loss"]["finite"] and c["plan_peak_allocated_bytes"] > 0
    assert got["chunked"]["levers"]["loss"] == "chunked" and got["bare"]["levers"]["loss"] == "plain"
    # Same adapter weights and batch: the chunked loss equals the HF loss to bf16 rounding.
    assert abs(got["chunked"]["loss_first_minus_bare"]) <= 1e-4
    if importlib.util.find_spec("deepspeed") is None:
        assert "product mode skipped" in got["product"]["note"]
        return
    # lorapipe's own step (worker build_model + build_engine, DeepSpeed ZeRO-2, training_loss):
    # the chunked loss through the engine equals the plain one on the same weights.
    p, pc = got["product"], got["product_chunked"]
    assert p["status"] == pc["status"] == "ok", (p, pc)
    assert abs(pc["loss"]["first"] - p["loss"]["first"]) <= 1e-5
    assert p["ratio_to_bare"] > 0 and pc["ratio_to_bare"] > 0
    assert abs(p["loss"]["first"] - got["bare"]["loss"]["first"]) <= 1e-2  # fp32 engine vs the bf16 bare base
    # The plan's picks, as a run would make them: on a CPU worker's RAM share all 6 examples fit in one
    # micro batch, without checkpointing; its batches are its own, so no loss comparison with bare.
    auto = got["product_auto"]
    assert auto["status"] == "ok" and auto["micro_batch"] == auto["levers"]["micro"] == 6, auto
    assert (auto["levers"]["grad_accum"], auto["levers"]["ckpt"]) == (1, "none")
    assert auto["loss_first_minus_bare"] is None and auto["tokens_per_s"]["median"] > 0


def test_gpu_levers_unknown_config_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(LEVERS_SCRIPT), "--configs", "warp"], capture_output=True, text=True)
    assert proc.returncode == 2 and "warp" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
