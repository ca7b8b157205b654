"""The CPU benchmarks at their smallest sizes: the JSON they write and the formulas behind them.

In-process where the script allows it (bare loops, formulas, start-up parsing); the memory
benchmark runs one tiny child process. The Ray-backed halves (lorapipe's side of the efficiency
comparison, the `lorapipe train` start-up) take minutes on a shared 2-core machine, so they run
only with LORAPIPE_BENCH_SMOKE_RAY=1.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_header_reports_machine_versions_and_spread():
    common = load("common")
    h = common.header("x", {"a": 1}, 1)
    assert h["machine"]["cpu_cores"] > 0 and h["machine"]["cpu_model"]
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray"):
        assert pkg in h["versions"]
    assert h["versions"]["torch"] and h["torch_threads"] == 1
    s = common.spread([3, 1, 2])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 3.0, 3)


def test_memory_floor_counts_match_llama_1b_and_peft():
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora import build_lora_config

    mem = load("qlora_memory")
    c = mem.shape_counts(mem.SHAPES["1b"])
    assert c["total"] == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    assert c["adapter"] == 11_272_192  # PEFT's count for r=16 all-linear on it (bench/results/gpu_step_h100.json)
    shape = mem.SHAPES["tiny"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    assert sum(p.numel() for p in model.parameters()) == mem.shape_counts(shape)["total"]
    lcfg = build_lora_config(model, r=mem.LORA_R, alpha=mem.LORA_ALPHA)
    # What stock PEFT really makes trainable, not lora/'s formula for it.
    assert mem.shape_counts(shape)["adapter"] == get_peft_model(model, lcfg).get_nb_trainable_parameters()[0]
    f = mem.floors(mem.SHAPES["1b"], 256)
    assert f["qlora_nf4"] < f["lora_bf16"] < f["full_bf16"]
    assert 1.2e9 < f["qlora_nf4"] < 2.0e9  # ~0.5 GB NF4 + 0.5 GB bf16 embedding + adapter + activations


def test_qlora_memory_tiny_child_writes_peaks(tmp_path):
    out = tmp_path / "mem.json"
    cmd = [sys.executable, str(BENCH / "qlora_memory.py"), "--size", "tiny", "--seq", "32", "--modes", "qlora_nf4",
           "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("machine", "versions", "floors_bytes", "floor_formula", "activation_floor", "counts"):
        assert key in r
    (m,) = r["modes"]
    assert m["status"] == "ok", m
    assert 0 < m["peak_anon"] <= m["peak_rss"]
    assert m["peak_anon"] >= m["phases"]["imports"]["rss_anon"]
    assert m["tensors"]["trainable_params"] == r["counts"]["adapter"]
    # Resident memory holds at least the tensors the child counted; the floor leaves the runtime out,
    # so a measured peak is above it.
    assert m["peak_anon"] >= m["tensors"]["total"] > 0
    assert r["qlora_ratio"] > 1
    assert out.with_suffix(".png").is_file()


def test_bare_loop_trains_on_packed_batches(small_llama_dir, tmp_path):
    eff = load("pipeline_efficiency")
    a = argparse.Namespace(steps=3, warmup=1, seq=32, batch=2)
    cfg = eff.run_config(small_llama_dir, tmp_path / "runs", "smoke", a)
    assert cfg.scaling.num_workers == 1 and cfg.deepspeed.stage == 2 and cfg.data.packing
    assert cfg.train.eval_every == cfg.train.checkpoint_every == a.steps and cfg.train.report_every == a.warmup
    batches, collate_s = eff.bare_batches(cfg, a.steps)
    # packed: whole examples in blocks with per-example position_ids (no attention mask)
    assert all("position_ids" in b and "attention_mask" not in b and 0 < b.real_tokens <= b.slots for b in batches)
    r = eff.bare_run(cfg, batches, a.warmup)
    assert r["tokens_per_s"] > 0 and r["step_s"]["n"] == a.steps - a.warmup and collate_s > 0


def test_lorapipe_steady_state_leaves_out_the_first_report_window():
    eff = load("pipeline_efficiency")
    # window 1 (warm-up): 100 tokens in 1 s; windows 2 and 3: 100 tokens in 0.5 s and 100 in 0.25 s
    history = [{"tokens": 100, "tokens_per_s": 100.0}, {"tokens": 200, "tokens_per_s": 200.0},
               {"tokens": 300, "tokens_per_s": 400.0}]
    assert eff.steady_tokens_per_s(history) == pytest.approx(200 / 0.75)


def test_levers_child_counts_real_tokens(small_llama_dir, tmp_path):
    lev = load("levers")
    a = argparse.Namespace(steps=2, warmup=1, seq=32, batch=2)
    for name in ("pad_nockpt", "pack_ckpt"):
        lev.child(name, str(small_llama_dir), a, tmp_path / f"{name}.json")
    pad = json.loads((tmp_path / "pad_nockpt.json").read_text())
    pack = json.loads((tmp_path / "pack_ckpt.json").read_text())
    assert pack["gradient_checkpointing"] and pack["pad_fraction"] == 0.0
    assert 0.0 <= pad["pad_fraction"] < 1.0
    assert pad["real_tokens_per_s"] <= pad["all_tokens_per_s"]
    assert pack["step_peak_anon"] >= 0 and pack["peak_anon"] > 0


def test_startup_breakdown_adds_the_cli_share(tmp_path):
    st = load("startup")
    run = tmp_path / "run"
    run.mkdir()
    phases = {"preflight_s": 1.0, "ray_init_s": 2.0, "workers_start_s": 3.0, "data_s": 0.5, "model_load_s": 0.5,
              "deepspeed_init_s": 1.0, "first_step_s": 0.2}
    phases["total_to_first_step_s"] = sum(phases.values())
    (run / "metrics.json").write_text(json.dumps({"startup": phases}))
    (run / "history.jsonl").write_text(json.dumps({"step": 1, "startup_first_step_done": 110.0}) + "\n")
    s = st.breakdown(100.0, run)
    assert s["wall_to_first_step_s"] == pytest.approx(10.0)
    assert s["cli_s"] == pytest.approx(10.0 - 8.2)
    assert sum(s[p] for p in st.PHASES) == pytest.approx(s["wall_to_first_step_s"])


@pytest.mark.skipif(os.environ.get("LORAPIPE_BENCH_SMOKE_RAY") != "1",
                    reason="Ray-backed benchmarks take minutes here; set LORAPIPE_BENCH_SMOKE_RAY=1")
def test_run_cpu_quick_ray_backed(tmp_path):
    cmd = [sys.executable, str(BENCH / "run_cpu.py"), "--quick", "--only", "pipeline_efficiency,startup",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eff = json.loads((tmp_path / "pipeline_efficiency.json").read_text())
    assert eff["ratio_lorapipe_over_bare"] > 0 and eff["lorapipe"]["tokens_per_s"]["n"] == 1
    st = json.loads((tmp_path / "startup.json").read_text())
    assert st["wall_to_first_step_s"]["median"] > 0
    assert set(st["phases_s"]) >= {"cli_s", "ray_init_s", "deepspeed_init_s", "first_step_s"}


def test_packing_bench_training_half_at_quick_size(tmp_path):
    """bench/packing.py's training half (no Ray): packed blocks carry far less padding than padded
    micro batches of the same long-tailed examples, and the report says so."""
    pk = load("packing")
    a = pk.parse(["--quick"])
    out = pk.bench_training(a, tmp_path)
    assert out["packed"]["non_pad_share"]["median"] > 0.8 > out["padded"]["non_pad_share"]["median"]
    assert out["speedup_real_tokens_per_s"] > 0 and out["data"]["tokens_max"] > 2 * out["data"]["tokens_p50"]
    assert out["data"]["examples_per_block"] > 1
