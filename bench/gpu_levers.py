"""Each speed/memory lever of a LoRA/QLoRA step, measured: tokens/s, MFU, peak memory, loss parity.

One child process per (size, mode) builds the base once (bench/gpu_step.py's build_base: random
init on the device; QLoRA saved and reloaded 4-bit through lora.load_base_model), applies the
adapter once, and runs every lever configuration on it in turn, restoring the adapter's initial
weights before each, so every configuration's first loss is on the same weights and batch:

  bare          gpu_step's loop: forward with labels (HF loss), backward, clip, AdamW(fused on CUDA)
  ckpt_all      + activation checkpointing of every layer     ckpt_k2   + every 2nd layer only
  chunked       lora.loss chunked linear + cross-entropy      liger/cce  the fused kernels (if installed)
  adamw_foreach AdamW(fused=False): what the fused optimizer buys
  sdpa_flash    SDPA restricted to the flash backend (CUDA)   liger_kernels  Liger RMSNorm/SwiGLU/RoPE
  best          chunked (or fused) loss + flash + fused AdamW
  compile       torch.compile of the model, last (its compile time is not in the timed steps)
  product, product_chunked   lorapipe's own step: pipelines.train.worker build_model + build_engine
                (DeepSpeed ZeRO-2, world size 1, no Ray) + lora.loss.training_loss; `ratio_to_bare`
  product_auto  the product step with what the plan picks for this GPU (the catalogue entry matching
                its name and memory): micro_batch_size=auto out of --auto-batch examples per step,
                activation_checkpointing=auto, chunked loss; it steps its own batches (micro x seq),
                so its loss is not compared with bare's

    python bench/gpu_levers.py --sizes 8b --modes lora,qlora --seq 2048 --batch 2   # one H100/H200
    python bench/gpu_levers.py --sizes tiny --modes lora --seq 32 --batch 1 --steps 2 --warmup 1   # CPU

The JSON (bench/results/gpu_levers_<device>.json) is rewritten after every configuration, so a run
cut short keeps what it measured; a configuration whose package is missing is recorded as skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import gpu_step as gs  # noqa: E402

LEVERS = {  # name -> changes from the bare loop
    "bare": {}, "ckpt_all": {"ckpt": "all"}, "ckpt_k2": {"ckpt": "every_k"}, "chunked": {"loss": "chunked"},
    "liger": {"loss": "liger"}, "cce": {"loss": "cce"}, "adamw_foreach": {"fused_adamw": False},
    "sdpa_flash": {"sdpa": "flash"}, "best": {"loss": "best", "sdpa": "flash"},
    "compile": {"compile": True, "loss": "chunked"},
    "liger_kernels": {"liger_kernels": True, "loss": "best"},  # patches the model in place: after the others
    "product": {"path": "product"}, "product_chunked": {"path": "product", "loss": "chunked"},
    "product_auto": {"path": "product", "loss": "chunked", "ckpt": "auto", "micro": "auto"},
}
GROUP_RESERVE_S = 120  # what a (size, mode) group still to come keeps of the budget (8B QLoRA: ~2 min)
DEFAULTS = {"path": "bare", "loss": "plain", "ckpt": "none", "every_k": 2, "micro": None, "fused_adamw": True,
            "sdpa": "default", "compile": False, "liger_kernels": False}


def skip_reason(lever: dict, cuda: bool) -> str | None:
    need = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(lever["loss"])
    if need and importlib.util.find_spec(need) is None:
        return f"{need} not installed: skipped (pip install the `gpu` extra)"
    if lever["liger_kernels"] and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed: skipped"
    if lever["sdpa"] == "flash" and not cuda:
        return "the flash SDPA backend needs CUDA: skipped"
    if lever["compile"] and not cuda:
        return "torch.compile is measured on CUDA only (on a CPU its C++ build takes minutes): skipped"
    if lever["path"] == "product":
        missing = [m for m in ("deepspeed", "pydantic", "yaml") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed: product mode skipped"
    return None


def loss_kind(lever: dict, device) -> tuple[str, int]:
    """(lora.loss kind, chunk tokens): 'best' is the fused kernel when one is installed on CUDA."""
    from lora.loss import fused_backend

    kind = lever["loss"]
    if kind == "best":
        kind = "fused" if fused_backend(device) else "chunked"
    return kind, 1024


def set_checkpointing(model, ckpt: str) -> None:
    base = model.get_base_model()
    base.activation_checkpointing_disable()
    if ckpt != "none":
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True},
                                             every_n_layers=2 if ckpt == "every_k" else 1)
        base.enable_input_require_grads()


def bare_step(model, lever: dict, device):
    """The bare loop's step with this configuration's levers; returns (step function, params)."""
    import torch

    from lora.loss import training_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=lever["fused_adamw"] and device.type == "cuda")
    kind, chunk = loss_kind(lever, device)
    forward = torch.compile(model) if lever["compile"] else model

    def step(ids):
        loss = training_loss(forward, model, {"input_ids": ids, "labels": ids}, kind, chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def product_config(mode: str, lever: dict, args, device, model_dir: str):
    """The run config the product path trains with; `auto` levers as a user would write them."""
    from pipelines.config.schema import PipelineConfig

    auto = lever["micro"] == "auto"
    batch = {"micro_batch_size": "auto", "global_batch_size": args.auto_batch} if auto else \
        {"micro_batch_size": lever["micro"] or args.batch}
    return PipelineConfig.model_validate({
        "model": {"path": model_dir, "dtype": "bf16" if device.type == "cuda" else "fp32",
                  "quantization": "nf4" if mode == "qlora" else "none",
                  "activation_checkpointing": lever["ckpt"], "checkpoint_every_k": lever["every_k"]},
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout},
        "data": {"path": "builtin:demo-tasks", "max_seq_len": args.seq},
        "train": {**batch, "max_steps": 1000, "eval_every": 1000, "lr": 1e-4,
                  "loss": "plain" if lever["loss"] == "plain" else "chunked"},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": device.type == "cuda", "gpu_kind": catalogue_gpu(device)},
        "mlflow": {"enabled": False}})


def catalogue_gpu(device) -> str | None:
    """The configs/gpus/catalogue.yaml entry for this GPU: its name in the device's, the nearest memory."""
    if device.type != "cuda":
        return None
    from pipelines.plan.step_time import load_catalogue

    info = gs.device_info(device)
    name, gib = info["name"].lower().replace(" ", ""), info["total_memory_bytes"] / 2**30
    named = [g for g in load_catalogue().gpus.values() if g.memory_gib and g.name.split("-")[0] in name]
    return min(named, key=lambda g: abs(g.memory_gib - gib)).name if named else None


def planned_auto_lever(mode: str, lever: dict, args, device, model_dir: str) -> dict:
    """`lever` with the plan's micro batch (the driver's choice) and checkpointing (the worker's, for
    this device's memory) in place of `auto`, as a run of lorapipe would train."""
    from pipelines.plan.auto import resolve_activation_checkpointing, with_auto_micro_batch
    from pipelines.train.worker import device_memory_bytes

    cfg = with_auto_micro_batch(product_config(mode, lever, args, device, model_dir))
    ckpt, every = resolve_activation_checkpointing(cfg, device_memory_bytes(device))
    return {**lever, "micro": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum, "ckpt": ckpt,
            "every_k": every, "gpu_kind": cfg.scaling.gpu_kind}


def product_step(size: str, mode: str, lever: dict, args, device, model_dir: str):
    """lorapipe's own step: the worker's build_model and build_engine (DeepSpeed), its loss call."""
    import torch

    from lora.loss import training_loss
    from pipelines.train.worker import build_engine, build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    cfg = product_config(mode, lever, args, device, model_dir)
    torch.manual_seed(0)
    model, _ = build_model(cfg, device)
    engine = build_engine(cfg, model)
    engine.train()

    def step(ids):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss = training_loss(engine, engine.module, batch, cfg.train.loss, cfg.train.loss_chunk_tokens)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, engine


def measure(step, batches, args, device, flops: dict, tflops) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    times, losses = gs.time_steps(step, batches, args.warmup, device)
    tps = [batches[0].numel() / t for t in times]
    mfu = (lambda f: statistics.median(tps) * f / (tflops * 1e12)) if tflops else (lambda f: None)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), "micro_batch": batches[0].shape[0],
            "tokens_per_s": gs.stats(tps),
            "step_time_s": gs.stats(times), "mfu": mfu(flops["total"]), "mfu_dense_only": mfu(flops["dense_4n"]),
            "peak_allocated_bytes": peak, "peak_allocated_gib": peak / 2**30 if peak else None,
            "loss": {"first": losses[0], "last": losses[-1], "finite": all(math.isfinite(x) for x in losses)}}


def planned_peak(size: str, mode: str, lever: dict, args) -> float:
    """The plan's allocated peak for this configuration (pipelines.plan), to compare with the measured one."""
    from pipelines.plan.levers import checkpointing_fields, loss_chunks
    from pipelines.plan.memory import PlanInputs, arch_from_hf_config, plan_memory

    kind = "plain" if lever["loss"] == "plain" else "chunked"
    micro = lever["micro"] or args.batch
    p = PlanInputs(arch_from_hf_config(gs.SHAPES[size]), quantization="nf4" if mode == "qlora" else "none",
                   lora_r=args.rank, lora_dropout=args.dropout, seq_len=args.seq, micro_batch=micro,
                   precision="mixed" if lever["path"] == "product" else "fp32-adapter", keeps_logits=False,
                   loss_chunks=loss_chunks(kind, 1024, args.seq * micro),
                   **checkpointing_fields(lever["ckpt"], lever["every_k"]))
    return plan_memory(p).allocated_peak


def saved_base(cfg, device, n: int) -> tempfile.TemporaryDirectory:
    """The random bf16 base on disk, for the product path to load the way a worker loads a model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    d = tempfile.TemporaryDirectory(dir=gs.save_dir_root(n), prefix="gpu_levers_")
    model.save_pretrained(d.name)
    del model
    return d


def run_one(name: str, lever: dict, make_step, size, mode, args, device, batches, flops, tflops) -> dict:
    import torch

    rec = {"config": name, "size": size, "mode": mode, "levers": lever}
    try:
        step = make_step()
        ctx = None
        if lever["sdpa"] == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        with ctx if ctx is not None else torch.enable_grad():
            rec.update(measure(step, batches, args, device, flops, tflops))
        rec["plan_peak_allocated_bytes"] = planned_peak(size, mode, lever, args)
        if rec["peak_allocated_bytes"]:
            rec["measured_over_plan"] = rec["peak_allocated_bytes"] / rec["plan_peak_allocated_bytes"]
    except Exception as e:  # an OOM or a kernel that refuses these shapes is a result too
        rec.update({"status": "failed", "error": f"{type(e).__name__}: {e}"[:1500]})
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def run_group(size: str, mode: str, names: list[str], args, emit) -> None:
    """Every configuration of one (size, mode), in this process; `emit` records each result."""
    import torch

    import lora

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # as a worker names it
    cfg = gs.llama_config(size, args.seq)
    n = gs.base_param_count(cfg)
    flops = gs.flops_per_token(cfg, args.seq, n)
    tflops, _ = gs.peak_bf16_tflops(gs.device_info(device)["name"], args.peak_tflops)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=g)
               for _ in range(args.warmup + args.steps)]
    levers = {name: {**DEFAULTS, **LEVERS[name]} for name in names}
    for name, lever in levers.items():
        if (reason := skip_reason(lever, device.type == "cuda")) or (mode == "qlora" and (reason := gs.qlora_skip_reason())):
            emit({"config": name, "size": size, "mode": mode, "levers": lever, "status": "skipped", "note": reason})
    runnable = [x for x in names if not skip_reason(levers[x], device.type == "cuda")
                and not (mode == "qlora" and gs.qlora_skip_reason())]
    bare = [x for x in runnable if levers[x]["path"] == "bare"]
    if bare:
        model, _ = gs.build_base(cfg, mode, device, n)
        model = lora.apply_lora(model, lora.build_lora_config(model, r=args.rank, alpha=args.alpha,
                                                              dropout=args.dropout, target_modules="all-linear"))
        model.train()
        init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        for name in bare:
            lever = levers[name]
            torch.manual_seed(0)
            with torch.no_grad():  # every configuration starts from the same adapter weights
                for k, v in model.named_parameters():
                    if k in init:
                        v.copy_(init[k])
            set_checkpointing(model, lever["ckpt"])
            if lever["liger_kernels"]:
                from liger_kernel.transformers import apply_liger_kernel_to_llama

                apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                            fused_linear_cross_entropy=False, model=model.get_base_model())
            emit(run_one(name, lever, lambda: bare_step(model, lever, device), size, mode, args, device, batches,
                         flops, tflops))
        del model, init
        if device.type == "cuda":
            torch.cuda.empty_cache()
    product = [x for x in runnable if levers[x]["path"] == "product"]
    if product:
        with saved_base(cfg, device, n) as model_dir:
            for name in product:
                held, lever, steps = {}, levers[name], batches
                if lever["micro"] == "auto":
                    lever = planned_auto_lever(mode, lever, args, device, model_dir)
                    g = torch.Generator(device=device).manual_seed(1)
                    steps = [torch.randint(0, cfg.vocab_size, (lever["micro"], args.seq), device=device, generator=g)
                             for _ in range(args.warmup + args.steps)]
                torch.manual_seed(0)

                def make(lever=lever):
                    step, held["engine"] = product_step(size, mode, lever, args, device, model_dir)
                    return step

                emit(run_one(name, lever, make, size, mode, args, device, steps, flops, tflops))
                held.clear()


def child_main(args) -> int:
    size, mode = args.child.split(":")
    results: list[dict] = []

    def emit(rec: dict) -> None:
        results.append(rec)
        print(f"gpu_levers: {size} {mode} {rec['config']}: {rec['status']}", file=sys.stderr, flush=True)
        Path(args.result).write_text(json.dumps(results))  # a child killed later keeps these

    try:
        run_group(size, mode, args.configs, args, emit)
    except Exception as e:  # building the base failed: every configuration shares the reason
        import traceback

        traceback.print_exc()
        emit({"config": "*", "size": size, "mode": mode, "status": "failed", "error": f"{type(e).__name__}: {e}"[:1500]})
    return 0


def run_child(size: str, mode: str, configs: list[str], args, timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{size}:{mode}", "--result", str(result),
               *args.passthrough, "--configs", ",".join(configs)]
        try:
            rc = subprocess.run(cmd, timeout=timeout).returncode
            note = None if rc == 0 else f"child exited with code {rc}"
        except subprocess.TimeoutExpired:
            note = f"time budget reached after {timeout:.0f}s: later configurations not run"
        done = json.loads(result.read_text()) if result.is_file() else []
        if note:
            done.append({"config": "*", "size": size, "mode": mode, "status": "cut", "note": note})
        return done


def add_ratios(configs: list[dict]) -> None:
    """tokens/s of each configuration over its (size, mode)'s bare loop; product over bare, chunked."""
    ok = {(c["size"], c["mode"], c["config"]): c for c in configs if c.get("status") == "ok"}
    for (size, mode, name), c in ok.items():
        ref = ok.get((size, mode, "chunked" if name == "product_chunked" else "bare"))
        if ref:
            c["ratio_to_bare"] = c["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"]
            bare = ok.get((size, mode, "bare"))
            same_batch = bare is not None and bare["micro_batch"] == c["micro_batch"]  # product_auto's may differ
            c["loss_first_minus_bare"] = c["loss"]["first"] - bare["loss"]["first"] if same_batch else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8b", help=f"comma list of {', '.join(gs.SHAPES)}")
    p.add_argument("--modes", default="lora,qlora")
    p.add_argument("--configs", default=",".join(LEVERS), help="comma list of " + ", ".join(LEVERS))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--auto-batch", type=int, default=8, help="product_auto: examples per optimizer step, the "
                   "micro batch the plan picks among its divisors")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=290.0, help="seconds for everything; groups share what is left")
    p.add_argument("--out", default=None, help="default: bench/results/gpu_levers_<device>.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes, a.modes, a.configs = a.sizes.split(","), a.modes.split(","), a.configs.split(",")
    bad = [x for x in a.sizes if x not in gs.SHAPES] + [x for x in a.modes if x not in gs.MODES] + \
          [x for x in a.configs if x not in LEVERS]
    if bad:
        p.exit(2, f"gpu_levers: unknown size, mode or config {bad}\n")
    a.passthrough = ["--seq", str(a.seq), "--batch", str(a.batch), "--auto-batch", str(a.auto_batch),
                     "--steps", str(a.steps), "--warmup", str(a.warmup), "--rank", str(a.rank),
                     "--alpha", str(a.alpha), "--dropout", str(a.dropout)]
    if a.peak_tflops is not None:
        a.passthrough += ["--peak-tflops", str(a.peak_tflops)]
    return a


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child_main(args)
    t0 = time.monotonic()
    machine = gs.machine_info()
    out = Path(args.out) if args.out else gs.default_out(machine).with_name(
        gs.default_out(machine).name.replace("gpu_step_", "gpu_levers_"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"schema": "lorapipe.bench.gpu_levers/1", "command": ["bench/gpu_levers.py", *sys.argv[1:]],
              "machine": machine, "versions": {**gs.versions(), **{m: gs_version(m) for m in (
                  "deepspeed", "liger-kernel", "cut-cross-entropy")}},
              "settings": {k: v for k, v in vars(args).items() if k not in ("passthrough", "child", "result")},
              "mfu_formula": gs.MFU_FORMULA, "configs": []}
    # Every lever first, one child per (size, mode) sharing the budget; torch.compile (minutes of
    # compiling at 8B) after them, each in a fresh child, with what is left.
    main_configs = [c for c in args.configs if c != "compile"]
    phases = [main_configs] + ([["compile"]] if "compile" in args.configs else [])
    for configs in phases:
        groups = [(size, mode) for size in args.sizes for mode in args.modes]
        for i, (size, mode) in enumerate(groups):
            left = args.budget_s - (time.monotonic() - t0)
            if left < 20:
                report["configs"].append({"config": ",".join(configs), "size": size, "mode": mode, "status": "cut",
                                          "note": "time budget spent before this group"})
                continue
            after = len(groups) - i - 1  # groups still to run: each keeps GROUP_RESERVE_S, or a fair share
            report["configs"] += run_child(size, mode, configs, args, max(left / (after + 1), left - GROUP_RESERVE_S * after))
            add_ratios(report["configs"])
            report["wall_s"] = round(time.monotonic() - t0, 1)
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(report["configs"]), file=sys.stderr)
    print(f"-> {out} ({report.get('wall_s', 0)} s)", file=sys.stderr)
    return 1 if any(c["status"] == "failed" for c in report["configs"]) else 0


def gs_version(name: str):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def summary_table(configs: list[dict]) -> str:
    rows = ["size  mode   config           status   tok/s    MFU    peak GiB  vs bare  loss-bare   note"]
    for c in configs:
        if c["status"] != "ok":
            rows.append(f"{c['size']:<5} {c['mode']:<6} {c['config']:<16} {c['status']:<8} "
                        f"{c.get('note') or c.get('error', '')}"[:170])
            continue
        fmt = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
        rows.append(f"{c['size']:<5} {c['mode']:<6} {c['config']:<16} ok       {c['tokens_per_s']['median']:>7.0f}  "
                    f"{fmt(c['mfu'], '.3f'):>5}  {fmt(c['peak_allocated_gib'], '8.2f'):>8}  "
                    f"{fmt(c.get('ratio_to_bare'), '.3f'):>7}  {fmt(c.get('loss_first_minus_bare'), '+.1e'):>9}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
