"""The per-worker training step alone: LoRA / QLoRA on a Llama built from its config (random init).

No Ray, no DeepSpeed, no hub download: one process, one device, the model side of a worker
(`lora.apply_lora`, and for QLoRA `lora.load_base_model(..., quantization='nf4')`) and the step
a worker runs (forward with labels, backward, clip, fused AdamW on the adapter only).

    python bench/gpu_step.py --sizes 1b,8b --modes lora,qlora --seq 2048 --batch 2 \
        --steps 10 --warmup 3 --out bench/results/gpu_step_h100.json
    python bench/gpu_step.py --sizes tiny --modes lora --seq 32 --batch 1 --steps 2 --warmup 1 --out x.json

Each (size, mode) runs in a child process, so one crash or OOM cannot skew or lose the others,
and the JSON is rewritten after every config, so a run cut short keeps what it measured.
bitsandbytes is optional: without it QLoRA is skipped with a note. lorapipe's own step (the
worker's build_model/build_engine with DeepSpeed) beside this loop, and each speed/memory lever:
bench/gpu_levers.py.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Llama-3-8B and Llama-3.2-1B shapes; "tiny" runs on a CPU in seconds.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
MODES = ("lora", "qlora")
# Dense bf16 peak (no sparsity) by device-name pattern; the first match wins, so PCIe/NVL come first.
PEAK_BF16_TFLOPS = [(r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100", 989.0), (r"H200", 989.0),
                    (r"A100", 312.0), (r"\bL4\b", 121.0)]
MFU_FORMULA = ("mfu = tokens_per_s * (4*N + 12*L*H*S) / peak_bf16_flops; N = base parameter count "
               "(tied embedding counted once), L = layers, H = hidden size, S = sequence length. "
               "4N: forward 2N + backward 2N for activation gradients only (frozen base, no weight "
               "gradients); 12*L*H*S: attention scores and values, forward + backward, without the "
               "causal halving (PaLM convention). Not counted: adapter FLOPs (<1%) and the forward "
               "recomputed by gradient checkpointing, so this is MFU, not hardware utilisation. "
               "mfu_dense_only drops the attention term (the anchor's convention).")
MEMORY_REFERENCE = ("ratio = peak / (16*N): a full bf16 fine-tune with fp32 AdamW needs about 16 bytes "
                    "per parameter (weights, gradients, fp32 master copy, two moments) before activations")
ANCHOR_8B_LORA = {
    "tokens_per_s": 12500, "mfu": 0.41, "device": "one H100 (SXM, 989 TFLOP/s dense bf16)",
    "note": ("published single-H100 Llama-3-8B LoRA figure quoted in the issue; an anchor to compare "
             "with, not a target: 4*8.03e9*12500/989e12 = 0.41, i.e. the dense-only convention"),
}


def llama_config(size: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[size], max_position_embeddings=max(seq, 8192), rms_norm_eps=1e-5,
                       use_cache=False)


def base_param_count(cfg) -> int:
    """Parameters of a LlamaForCausalLM from its shape alone (checked against the built model)."""
    h, i, v, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_key_value_heads
    head_dim = h // cfg.num_attention_heads
    attn = 2 * h * h + 2 * h * kv * head_dim
    per_layer = attn + 3 * h * i + 2 * h
    embeddings = v * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_hidden_layers * per_layer + embeddings + h


def flops_per_token(cfg, seq: int, n_params: int) -> dict:
    dense = 4 * n_params
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return {"dense_4n": dense, "attention": attention, "total": dense + attention}


def peak_bf16_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, f"table: {pattern}"
    return None, f"unknown device {device_name!r}: pass --peak-tflops"


def grad_ckpt_for(size: str, choice: str) -> bool:
    return size == "8b" if choice == "auto" else choice == "on"


def qlora_skip_reason() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed: QLoRA skipped (pip install bitsandbytes)"
    return None


def save_dir_root(n_params: int) -> str:
    """tmpfs when it holds the bf16 checkpoint with room to spare (saving there is seconds), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 2.5 * n_params * 2:
            return str(shm)
    return tempfile.gettempdir()


def build_base(cfg, mode: str, device, n_params: int) -> tuple[object, dict]:
    """The frozen bf16 base on `device`; for QLoRA, saved and reloaded 4-bit the way a worker loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    import lora

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    built = sum(p.numel() for p in model.parameters())
    if built != n_params:
        raise RuntimeError(f"built model has {built} parameters, the shape formula says {n_params}")
    if mode == "lora":
        model.requires_grad_(False)
        return model, {}
    root = save_dir_root(n_params)
    with tempfile.TemporaryDirectory(dir=root, prefix="gpu_step_") as d:
        t0 = time.perf_counter()
        model.save_pretrained(d)
        saved_s = time.perf_counter() - t0
        del model  # free the bf16 copy before the 4-bit load, or the load's peak includes it
        gc.collect()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        target = f"cuda:{torch.cuda.current_device()}" if device.type == "cuda" else "cpu"
        model = lora.load_base_model(d, dtype="bf16", quantization="nf4", double_quant=True,
                                     device=target, attn_implementation="sdpa")
        loaded_s = time.perf_counter() - t0
    return model, {"quantization": "nf4, double quant, compute bf16 (lora.load_base_model)",
                   "saved_to": root, "save_s": round(saved_s, 2), "load_4bit_s": round(loaded_s, 2)}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_model()}
    p = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": p.name, "total_memory_bytes": p.total_memory,
            "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}


def stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def train_step(model, params, opt):
    """The worker's step: forward with labels, backward, clip, optimizer step."""
    import torch

    def step(ids):
        # No attention mask: every position is real, and sdpa then takes its causal fast path.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, batches: list, warmup: int, device) -> tuple[list[float], list[float]]:
    """Seconds of each step after `warmup` untimed ones (synchronised on both sides), and every loss."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, times = [step(ids) for ids in batches[:warmup]], []
    for ids in batches[warmup:]:
        sync()
        t0 = time.perf_counter()
        losses.append(step(ids))
        sync()
        times.append(time.perf_counter() - t0)
    return times, [float(x) for x in losses]


def run_config(size: str, mode: str, args) -> dict:
    """One (size, mode): build, warm up, time `args.steps` steps one by one, read peak memory."""
    import torch

    import lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = llama_config(size, args.seq)
    n = base_param_count(cfg)
    gc_on = grad_ckpt_for(size, args.grad_ckpt)
    out = {"size": size, "mode": mode, "shape": SHAPES[size], "n_params": n, "grad_ckpt": gc_on,
           "device": device_info(device), "anchor": ANCHOR_8B_LORA if (size, mode) == ("8b", "lora") else None}
    if mode == "qlora" and (reason := qlora_skip_reason()):
        return {**out, "status": "skipped", "note": reason}

    t_setup = time.perf_counter()
    model, out["base_load"] = build_base(cfg, mode, device, n)
    lora_cfg = lora.build_lora_config(model, r=args.rank, alpha=args.alpha, dropout=args.dropout,
                                      target_modules="all-linear")
    model = lora.apply_lora(model, lora_cfg, gradient_checkpointing=gc_on)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused)
    out["adapter"] = {"trainable_params": sum(p.numel() for p in params), "dtype": str(params[0].dtype),
                      "r": args.rank, "alpha": args.alpha, "dropout": args.dropout, "target_modules": "all-linear"}
    out["optimizer"] = f"torch.optim.AdamW(fused={fused}) on adapter params; clip_grad_norm 1.0"

    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=g)
               for _ in range(args.warmup + args.steps)]

    if device.type == "cuda":
        out["setup_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak below is the training step's, warm-up included
    out["setup_s"] = round(time.perf_counter() - t_setup, 2)
    times, losses = time_steps(train_step(model, params, opt), batches, args.warmup, device)

    tokens = args.batch * args.seq
    tps = [tokens / t for t in times]
    flops = flops_per_token(cfg, args.seq, n)
    tflops, source = peak_bf16_tflops(out["device"]["name"], args.peak_tflops)
    mfu = (lambda f: statistics.median(tps) * f / (tflops * 1e12)) if tflops else (lambda f: None)
    out.update({
        "status": "ok", "tokens_per_step": tokens, "step_time_s": stats(times), "tokens_per_s": stats(tps),
        "flops_per_token": flops, "peak_bf16_tflops": tflops, "peak_bf16_tflops_source": source,
        "mfu": mfu(flops["total"]), "mfu_dense_only": mfu(flops["dense_4n"]),
        "loss": {"first": losses[0], "last": losses[-1], "finite": all(math.isfinite(x) for x in losses)},
        "memory": memory_report(device, n),
    })
    return out


def memory_report(device, n_params: int) -> dict:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if device.type != "cuda":
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "cpu_max_rss_bytes": rss}
    alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    full = 16 * n_params
    return {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved,
            "peak_allocated_gib": alloc / 2**30, "peak_reserved_gib": reserved / 2**30,
            "full_finetune_reference_bytes": full, "ratio_allocated_to_16n": alloc / full,
            "ratio_reserved_to_16n": reserved / full, "cpu_max_rss_bytes": rss}


def machine_info() -> dict:
    mem = None
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    gpus = None
    try:  # nvidia-smi rather than torch.cuda: the parent must not hold a CUDA context
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        gpus = [dict(zip(("name", "memory", "driver"), (s.strip() for s in row.split(","))))
                for row in q.stdout.strip().splitlines()] if q.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "memory_bytes": mem, "gpus": gpus,
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    import torch

    return {**{k: version(k) for k in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")},
            "cuda": torch.version.cuda}


def run_child(size: str, mode: str, args) -> dict:
    """Run one config in a fresh interpreter; a hard crash becomes a 'failed' record with its exit code."""
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{size}:{mode}", "--result", str(result),
               *args.passthrough]
        try:
            rc = subprocess.run(cmd, timeout=args.config_timeout).returncode
        except subprocess.TimeoutExpired:
            return {"size": size, "mode": mode, "status": "failed", "error": f"timed out after {args.config_timeout}s"}
        if result.is_file():
            return json.loads(result.read_text())
        return {"size": size, "mode": mode, "status": "failed", "error": f"child exited with code {rc}, no result"}


def child_main(args) -> int:
    import traceback

    size, mode = args.child.split(":")
    try:
        res = run_config(size, mode, args)
    except Exception as e:  # recorded, not hidden: an OOM or a bitsandbytes error is a result too
        traceback.print_exc()
        res = {"size": size, "mode": mode, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    Path(args.result).write_text(json.dumps(res))
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1b,8b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--modes", default="lora,qlora", help="comma list of lora, qlora")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="micro batch (sequences per step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (the shipped 8B config's)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="auto", help="auto: on for 8b only")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak when the GPU is not in the table")
    p.add_argument("--config-timeout", type=int, default=900, help="seconds allowed per (size, mode)")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu_step_<device>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    bad = [s for s in sizes if s not in SHAPES] + [m for m in modes if m not in MODES]
    if bad:
        p.exit(2, f"gpu_step: unknown size or mode {bad}; sizes: {', '.join(SHAPES)}; modes: {', '.join(MODES)}\n")
    if min(args.seq, args.batch, args.steps) < 1 or args.warmup < 0:
        p.exit(2, "gpu_step: --seq, --batch and --steps must be >= 1 and --warmup >= 0\n")
    args.sizes, args.modes = sizes, modes
    # What a child needs to measure the same way (everything but the selection and the output).
    args.passthrough = ["--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--rank", str(args.rank), "--alpha", str(args.alpha),
                        "--dropout", str(args.dropout), "--grad-ckpt", args.grad_ckpt]
    if args.peak_tflops is not None:
        args.passthrough += ["--peak-tflops", str(args.peak_tflops)]
    return args


def default_out(machine: dict) -> Path:
    name = (machine["gpus"] or [{"name": "cpu"}])[0]["name"]
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_") or "cpu"
    return ROOT / "bench" / "results" / f"gpu_step_{slug}.json"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(ROOT))  # `import lora` from a checkout that is not pip-installed
    if args.child:
        return child_main(args)
    machine = machine_info()
    out = Path(args.out) if args.out else default_out(machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"schema": "lorapipe.bench.gpu_step/1", "command": ["bench/gpu_step.py", *sys.argv[1:]],
              "machine": machine, "versions": versions(),
              "settings": {"seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                           "grad_ckpt": args.grad_ckpt, "dtype": "bf16", "attention": "sdpa", "init": "random"},
              "mfu_formula": MFU_FORMULA, "memory_reference": MEMORY_REFERENCE, "configs": []}
    for size in args.sizes:
        for mode in args.modes:
            print(f"gpu_step: {size} {mode} ...", file=sys.stderr, flush=True)
            report["configs"].append(run_child(size, mode, args))
            out.write_text(json.dumps(report, indent=2) + "\n")  # after each: a cut-short run keeps its results
    print(json.dumps(report, indent=2))
    print(summary_table(report["configs"]), file=sys.stderr)
    return 1 if any(c["status"] == "failed" for c in report["configs"]) else 0


def summary_table(configs: list[dict]) -> str:
    rows = ["size  mode   status   tok/s(med)   MFU    MFU4N  peak GiB  /16N"]
    for c in configs:
        if c["status"] != "ok":
            rows.append(f"{c['size']:<5} {c['mode']:<6} {c['status']:<8} {c.get('note') or c.get('error', '')}"[:160])
            continue
        m = c["memory"]
        fmt = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
        rows.append(f"{c['size']:<5} {c['mode']:<6} ok       {c['tokens_per_s']['median']:>10.0f}  "
                    f"{fmt(c['mfu'], '.3f'):>5}  {fmt(c['mfu_dense_only'], '.3f'):>5}  "
                    f"{fmt(m.get('peak_allocated_gib'), '8.2f'):>8}  {fmt(m.get('ratio_allocated_to_16n'), '.3f')}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
