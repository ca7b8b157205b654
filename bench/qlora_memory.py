"""QLoRA memory on the CPU: peak anonymous and total RSS over training steps on a ~1B Llama, vs a floor.

Run several steps (`--steps 4` in `make bench`): the first step's peak misses the AdamW states
(created by its optimizer step) and the allocator's fragmentation, which on CPU keeps growing the
peak for the first few steps before it settles.

Modes (each in its own child process, so peaks never mix):
  qlora_nf4       lorapipe: lora.load_base_model(dtype='bf16', quantization='nf4', double quant) + lora.apply_lora
  qlora_nf4_peft  bare transformers + PEFT with peft.prepare_model_for_kbit_training (upcasts the
                  non-quantized params - embeddings, norms - to fp32)
  lora_bf16       lorapipe: bf16 base + lora.apply_lora
  full_bf16       every parameter trained in bf16, torch AdamW (states in bf16)
All: seq --seq, batch 1, gradient checkpointing, LoRA r=16 alpha=32 all-linear, AdamW(foreach=False).
A thread samples /proc/self/status RssAnon and VmRSS every 10 ms; the kernel's VmHWM is kept too.
Anonymous memory is what the process itself allocated; total RSS adds file pages (the mmapped
safetensors while loading, shared libraries).

    python bench/qlora_memory.py --size 1b --modes qlora_nf4,qlora_nf4_peft,lora_bf16,full_bf16
    python bench/qlora_memory.py --size tiny --seq 32 --modes qlora_nf4,lora_bf16
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RssSampler, gib, header, meminfo, save_figure, single_thread_env, write_json  # noqa: E402

# Llama-3.2-1B's shape (1.24B parameters, tied embeddings); "tiny" is for the smoke test.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
MODES = ("qlora_nf4", "qlora_nf4_peft", "lora_bf16", "full_bf16")
NF4_DQ_BITS = 4.127  # 4-bit codes + 8-bit absmax per 64 (double-quantized: 8-bit per 64, fp32 per 256 blocks)
LORA_R, LORA_ALPHA = 16, 32


# -- the model on disk ----------------------------------------------------------------------
def save_bf16_llama(out: Path, shape: dict) -> Path:
    """A random Llama saved in bf16 safetensors. Built on the meta device and filled in place, so
    the 1B model never exists in fp32 (5 GB) and skips the slow per-module init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.tie_weights()  # to_empty gave lm_head its own storage; tied, only the embedding is saved
    model.save_pretrained(str(out), safe_serialization=True)
    return out


# -- the floor ------------------------------------------------------------------------------
def shape_counts(shape: dict) -> dict:
    """Parameter counts from the shape: quantizable linears, everything else, LoRA adapter."""
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    quantized = L * sum(a * b for a, b in linears)
    embed = v * h * (1 if shape["tie_word_embeddings"] else 2)
    norms = (2 * L + 1) * h
    adapter = L * sum(LORA_R * (a + b) for a, b in linears)
    return {"quantized_linear": quantized, "non_quantized": embed + norms, "total": quantized + embed + norms,
            "adapter": adapter, "kv_dim": kv}


def activation_floor(shape: dict, seq: int, batch: int = 1, b: int = 2) -> dict:
    """Bytes of activations one step needs with per-layer checkpointing, computing in a `b`-byte
    dtype: the saved layer inputs, one layer's recomputed tensors during its backward, and the
    logits (b-byte logits + fp32 log-probs that cross-entropy keeps for backward)."""
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    t = seq * batch
    checkpoints = L * t * h * b
    # norm in (fp32), q, k, v, attention out, o in, residual, norm2 in (fp32); gate, up, act, product, down in
    one_layer = t * (2 * h * 2 + (h + 2 * kv + 3 * h) * b + 5 * i * b) if b == 2 else t * (2 * h + 6 * h + 2 * kv + 5 * i) * 4
    logits = t * v * (b + 4)
    return {"checkpoints": checkpoints, "one_layer_recompute": one_layer, "logits": logits,
            "total": checkpoints + one_layer + logits}


def floors(shape: dict, seq: int, b: int = 2) -> dict:
    """Bytes each mode cannot do without (formulas in the JSON), with `b`-byte (2: bf16, 4: fp32)
    non-quantized parameters and activations."""
    c, act = shape_counts(shape), activation_floor(shape, seq, b=b)["total"]
    adapter = c["adapter"] * (4 + 4 + 8)  # fp32 weights, grads, AdamW m and v
    return {
        "qlora_nf4": c["quantized_linear"] * NF4_DQ_BITS / 8 + c["non_quantized"] * b + adapter + act,
        "qlora_nf4_peft": c["quantized_linear"] * NF4_DQ_BITS / 8 + c["non_quantized"] * b + adapter + act,
        "lora_bf16": c["total"] * b + adapter + act,
        "full_bf16": c["total"] * (b + b + 2 * b) + act,  # weights, grads, AdamW m and v, all in the dtype
    }


FLOOR_FORMULA = (f"qlora: quantized_linear*{NF4_DQ_BITS}/8 + non_quantized*2 + adapter*16 + activations; "
                 "lora_bf16: total*2 + adapter*16 + activations; full_bf16: total*8 + activations. "
                 "adapter*16 = fp32 weight + grad + AdamW m, v. activations = L*S*H*2 (checkpointed layer inputs) "
                 "+ one layer's recompute S*(4H + 2(4H+2kv) + 10I) + logits S*V*(2 bf16 + 4 fp32 log-probs). "
                 "qlora_nf4_peft uses the same floor as qlora_nf4 (its fp32 upcast is overhead, not need). "
                 "With --dtype fp32 the 2-byte terms (non-quantized params, activations, logits) are 4 bytes.")


# -- the child: one mode, one process -------------------------------------------------------
def tensor_bytes(model) -> dict:
    """Bytes held in parameters (4-bit packed weights as stored, plus their quant-state tensors)."""
    by_dtype: dict = {}
    for p in model.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, getattr(qs, "code", None), getattr(getattr(qs, "state2", None), "absmax", None),
                      getattr(getattr(qs, "state2", None), "code", None)):
                if t is not None:
                    by_dtype["quant_state"] = by_dtype.get("quant_state", 0) + t.numel() * t.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"by_dtype": by_dtype, "total": sum(by_dtype.values()), "trainable_params": trainable}


def build(mode: str, path: str, dtype: str = "bf16"):
    import torch

    from lora import apply_lora, build_lora_config, load_base_model

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if mode == "qlora_nf4_peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch_dtype,
                                                     device_map={"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    quant = "nf4" if mode == "qlora_nf4" else "none"
    model = load_base_model(path, dtype=dtype, quantization=quant, double_quant=True)
    if mode == "full_bf16":
        model.requires_grad_(True)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        return model
    lcfg = build_lora_config(model, r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear")
    return apply_lora(model, lcfg, gradient_checkpointing=True)


def child(mode: str, path: str, seq: int, steps: int, out: Path, dtype: str = "bf16") -> None:
    """One mode's steps under the sampler; the JSON is rewritten after every phase, so a kill
    (timeout, OOM) still leaves the peaks measured so far."""
    sampler = RssSampler(0.01)
    sampler._thread.start()
    import torch
    torch.set_num_threads(1)
    import peft  # noqa: F401  (imports count towards the runtime baseline, not the model)
    import transformers  # noqa: F401
    if mode.startswith("qlora"):
        import bitsandbytes  # noqa: F401
    result = {"mode": mode, "status": "running", "phases": {"imports": sampler.mark()}}

    started = time.perf_counter()

    def mark(phase: str) -> None:
        result["phases"][phase] = {**sampler.mark(), "t_s": round(time.perf_counter() - started, 2)}
        result.update(peak_anon=sampler.peak_anon, peak_rss=sampler.peak_rss, samples=sampler.samples)
        out.write_text(json.dumps(result))

    t0 = time.perf_counter()
    model = build(mode, path, dtype)
    model.config.use_cache = False
    result["load_s"] = time.perf_counter() - t0
    result["tensors"] = tensor_bytes(model)
    mark("model_ready")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, seq), generator=g)
    model.train()
    step_s = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        mark(f"step{step}_forward")
        loss.backward()
        mark(f"step{step}_backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        mark(f"step{step}_optimizer")
    sampler._stop.set()
    result.update(status="ok", step_s=step_s, loss=float(loss.detach()),
                  vm_hwm=sampler.mark()["vm_hwm"])
    out.write_text(json.dumps(result))


# -- the parent -----------------------------------------------------------------------------
def run_mode(mode: str, path: Path, a, work: Path) -> dict:
    out = work / f"{mode}.json"
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(path), "--seq", str(a.seq),
           "--steps", str(a.steps), "--child-out", str(out), "--dtype", a.dtype]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=single_thread_env(), capture_output=True, text=True, timeout=a.timeout)
        rc, tail = proc.returncode, proc.stderr[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"killed after {a.timeout} s"
    res = json.loads(out.read_text()) if out.is_file() else {"mode": mode, "phases": {}}
    if rc != 0:
        res["status"] = f"failed ({rc})"
        res["error_tail"] = tail
    res["wall_s"] = time.perf_counter() - t0
    return res


def summarize(res: dict, floor: float) -> dict:
    if "peak_anon" not in res:
        return res
    base = res["phases"]["imports"]["rss_anon"]
    res.update({"floor_bytes": floor, "runtime_anon_bytes": base,
                "peak_anon_over_floor": res["peak_anon"] / floor,
                "peak_anon_minus_runtime_over_floor": (res["peak_anon"] - base) / floor,
                "peak_rss_over_floor": res["peak_rss"] / floor,
                "peak_anon_gib": gib(res["peak_anon"]), "peak_rss_gib": gib(res["peak_rss"]),
                "floor_gib": gib(floor)})
    return res


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["modes"] if "peak_anon" in r]
    if not rows:
        return
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar([i - 0.27 for i in x], [gib(r["floor_bytes"]) for r in rows], 0.27, label="floor", color="#bbb")
    ax.bar(x, [gib(r["peak_anon"]) for r in rows], 0.27, label="peak RssAnon", color="#37a")
    ax.bar([i + 0.27 for i in x], [gib(r["peak_rss"]) for r in rows], 0.27, label="peak RSS", color="#a73")
    ax.set_xticks(list(x), [r["mode"] for r in rows], fontsize=8)
    ax.set_ylabel("GiB")
    st = report["settings"]
    ax.set_title(f"{st['size']} Llama, peak over {st['steps']} step(s), seq {st['seq']}, grad ckpt", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--modes", default="qlora_nf4,qlora_nf4_peft,lora_bf16,full_bf16")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="load/compute dtype of the non-quantized parameters and activations; fp32 on a CPU "
                         "without fast bf16 GEMMs, where a bf16 1B backward does not finish in 40 min")
    ap.add_argument("--out", default=str(RESULTS / "qlora_memory.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.model, a.seq, a.steps, Path(a.child_out), a.dtype)
        return {}
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes {bad} unknown; allowed: {', '.join(MODES)}")

    b = 2 if a.dtype == "bf16" else 4
    shape, fl = SHAPES[a.size], floors(SHAPES[a.size], a.seq, b)
    report = header("qlora_memory", vars(a), 1)
    report.update({"shape": shape, "counts": shape_counts(shape), "activation_floor": activation_floor(shape, a.seq, b=b),
                   "floor_formula": FLOOR_FORMULA, "floors_bytes": fl, "target": "qlora_nf4 peak_anon <= 1.3 x floor",
                   "modes": []})
    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-mem-"))
    try:
        t0 = time.perf_counter()
        path = save_bf16_llama(work / "model", shape)
        report["model_build_s"] = time.perf_counter() - t0
        for mode in modes:
            avail = meminfo().get("MemAvailable", 0)
            if fl[mode] * 1.5 + 2 * 2**30 > avail:
                report["modes"].append({"mode": mode, "status": "skipped",
                                        "note": f"needs ~{gib(fl[mode] * 1.5)} GiB + 2 GiB headroom, "
                                                f"{gib(avail)} GiB available: OOM risk on a shared machine"})
                continue
            res = summarize(run_mode(mode, path, a, work), fl[mode])
            report["modes"].append(res)
            print(f"{mode}: {res.get('status')} peak anon {gib(res.get('peak_anon', 0))} GiB, "
                  f"floor {gib(fl[mode])} GiB", flush=True)
            write_json(a.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["mode"]: r for r in report["modes"]}
    if "peak_anon" in by.get("qlora_nf4", {}):
        report["qlora_ratio"] = by["qlora_nf4"]["peak_anon_over_floor"]
    out = write_json(a.out, report)
    plot(report, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
