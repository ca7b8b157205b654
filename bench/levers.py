"""Throughput levers on the CPU (bare PEFT loop, ~20M Llama, one torch thread):

  pad_nockpt    padded micro batches (data.packing=false), no gradient checkpointing
  pack_nockpt   packed full blocks of --seq tokens (data.packing=true), no checkpointing
  pack_ckpt     packed, gradient checkpointing on (lorapipe's reentrant variant)

tokens/s counts real (non-pad) tokens only. Each run is its own child process, so its peak
anonymous RSS is its own; `step_peak_anon` is that peak minus the RssAnon just before the first
step (activations, grads, optimizer states: what checkpointing and padding change). Runs are
interleaved over repeats.

    python bench/levers.py --repeats 2 --steps 6 --warmup 1 --seq 128 --batch 4
    python bench/levers.py --shape tiny --repeats 1 --steps 2 --warmup 1 --seq 32 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    SHAPE_20M,
    RssSampler,
    gib,
    header,
    param_count,
    save_figure,
    save_llama,
    single_thread_env,
    spread,
    write_json,
)

SHAPES = {"20m": SHAPE_20M, "tiny": dict(hidden=64, layers=2, heads=4, intermediate=256)}
CONFIGS = {"pad_nockpt": (False, False), "pack_nockpt": (True, False), "pack_ckpt": (True, True)}


def child(name: str, model_dir: str, a, out: Path) -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch
    torch.set_num_threads(1)

    from lora import apply_lora, build_lora_config, load_base_model, load_tokenizer
    from pipelines.config.schema import DataSection
    from pipelines.data.builtin import materialize_demo_tasks
    from pipelines.data.prepare import MicroBatches, prepare_data, shard

    packing, ckpt = CONFIGS[name]
    tok = load_tokenizer(model_dir)
    dcfg = DataSection(path=str(materialize_demo_tasks("reverse", 2000, 0)), max_seq_len=a.seq, packing=packing)
    data = prepare_data(dcfg, tok, 0)
    mb = MicroBatches(shard(data.train, 1, 0), a.batch, 0, tok.pad_token_id)
    batches = [mb[i] for i in range(a.steps)]
    torch.manual_seed(0)
    base = load_base_model(model_dir, dtype="fp32")
    model = apply_lora(base, build_lora_config(base, r=8, alpha=16, target_modules="all-linear"),
                       gradient_checkpointing=ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times, real, padded = [], [], []
    with RssSampler(0.01) as sampler:
        before = sampler.mark()["rss_anon"]
        sampler.peak_anon = before
        for batch in batches:
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t0)
            real.append(float(batch.real_tokens))  # packed batches carry position_ids, no mask
            padded.append(float(batch.slots))
    w = slice(a.warmup, None)
    out.write_text(json.dumps({
        "config": name, "packing": packing, "gradient_checkpointing": ckpt,
        "real_tokens_per_s": sum(real[w]) / sum(times[w]), "all_tokens_per_s": sum(padded[w]) / sum(times[w]),
        "pad_fraction": 1 - sum(real) / sum(padded), "step_s_median": sorted(times[w])[len(times[w]) // 2],
        "anon_before_steps": before, "peak_anon": sampler.peak_anon, "step_peak_anon": sampler.peak_anon - before,
        "seq_len_per_batch": [int(b["input_ids"].shape[1]) for b in batches]}))


def run_child(name: str, model_dir: Path, a, work: Path) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", name, "--model", str(model_dir), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--seq", str(a.seq), "--batch", str(a.batch), "--child-out", str(out)]
    proc = subprocess.run(cmd, env=single_thread_env(), cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"levers child {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    a1.bar(names, [report["configs"][n]["real_tokens_per_s"]["median"] for n in names], color="#3a7")
    a1.set_ylabel("real tokens/s (median)")
    a2.bar(names, [report["configs"][n]["step_peak_anon_mib"]["median"] for n in names], color="#37a")
    a2.set_ylabel("step peak anon (MiB, median)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128, help="max_seq_len (packed block size)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=str(RESULTS / "levers.json"))
    ap.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.model, a, Path(a.child_out))
        return {}
    if a.steps <= a.warmup:
        ap.error(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-levers-"))
    os.environ["LORAPIPE_HOME"] = str(work / "home")  # children inherit it: fresh demo data
    runs: dict = {n: [] for n in CONFIGS}
    try:
        model_dir = save_llama(work / "model", **SHAPES[a.shape])
        n_params = param_count(model_dir)
        for i in range(a.repeats):
            for name in CONFIGS:
                runs[name].append(run_child(name, model_dir, a, work))
                print(f"[{i}] {name}: {runs[name][-1]['real_tokens_per_s']:.1f} real tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = header("levers", vars(a), 1)
    report["model"] = {"shape": SHAPES[a.shape], "parameters": n_params, "dtype": "fp32", "lora": "r=8 all-linear"}
    report["configs"] = {n: {"real_tokens_per_s": spread(r["real_tokens_per_s"] for r in rs),
                             "all_tokens_per_s": spread(r["all_tokens_per_s"] for r in rs),
                             "pad_fraction": rs[0]["pad_fraction"],
                             "step_peak_anon_mib": spread(r["step_peak_anon"] / 2**20 for r in rs),
                             "peak_anon_gib": spread(gib(r["peak_anon"]) for r in rs), "runs": rs}
                         for n, rs in runs.items()}
    med = {n: c["real_tokens_per_s"]["median"] for n, c in report["configs"].items()}
    mem = {n: c["step_peak_anon_mib"]["median"] for n, c in report["configs"].items()}
    report["packing_speedup_real_tokens"] = med["pack_nockpt"] / med["pad_nockpt"]
    report["checkpointing_throughput_ratio"] = med["pack_ckpt"] / med["pack_nockpt"]
    report["checkpointing_step_memory_ratio"] = mem["pack_ckpt"] / max(mem["pack_nockpt"], 1e-9)
    out = write_json(a.out, report)
    plot(report, out.with_suffix(".png"))
    print(f"packing x{report['packing_speedup_real_tokens']:.2f} real tok/s; checkpointing "
          f"x{report['checkpointing_throughput_ratio']:.2f} tok/s, x{report['checkpointing_step_memory_ratio']:.2f} "
          f"step memory -> {out}")
    return report


if __name__ == "__main__":
    main()
