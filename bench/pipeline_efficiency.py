"""Pipeline efficiency on the CPU: steady-state tokens/s of `lorapipe train` vs a bare PEFT loop.

Same model (a ~20M-parameter Llama built from config, fp32 safetensors), same packed
builtin:demo-tasks batches (every batch has seq*batch tokens), same LoRA config, AdamW, clipping
and schedule. lorapipe runs through the driver `pipelines.train.driver.train(cfg)` (Ray Train, one
worker with one CPU, DeepSpeed ZeRO-2) and reports every `--warmup` steps; its steady state is
the tokens over the timed windows (forward+backward+step, and collating each batch, which the
worker does inside its window) after the first report, i.e. the same steps the bare loop counts.
The bare loop runs in this process with one torch thread on pre-collated batches and times the
steps after `--warmup`. Runs are interleaved (bare, lorapipe, bare, ...) so drifting CPU
contention hits both alike, after one untimed lorapipe run that starts the local Ray both then
share the machine with. Also reported: lorapipe with every step counted (metrics.json).

    python bench/pipeline_efficiency.py --repeats 5 --steps 48 --warmup 4 --seq 128 --batch 2
    python bench/pipeline_efficiency.py --shape tiny --repeats 1 --steps 3 --warmup 1 --seq 32 --batch 2

Builtin assets go to a fresh $LORAPIPE_HOME in a temp directory, so a stale cache cannot change the data.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, SHAPE_20M, header, param_count, save_figure, save_llama, spread, write_json  # noqa: E402

SHAPES = {"20m": SHAPE_20M, "tiny": dict(hidden=64, layers=2, heads=4, intermediate=256)}


def run_config(model_dir: Path, out_dir: Path, name: str, a, steps: int | None = None):
    """tiny-cpu.yaml with the overrides that make lorapipe and the bare loop comparable."""
    from pipelines.config.load import load_config

    s = steps or a.steps
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [
        f"model.path={model_dir}", "model.quantization=none", "model.dtype=fp32",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "deepspeed.stage=2",
        "data.packing=true", f"data.max_seq_len={a.seq}", f"train.micro_batch_size={a.batch}",
        f"train.max_steps={s}", f"train.report_every={a.warmup}", f"train.eval_every={s}", f"train.checkpoint_every={s}",
        "train.eval_batches=1", f"train.warmup_steps={min(3, s - 1)}", "mlflow.enabled=false",
        f"run.output_dir={out_dir}", f"run.name={name}"])


def steady_tokens_per_s(history: list[dict]) -> float:
    """Tokens over timed seconds of every report window after the first (the warm-up window).
    Each report carries its window's tokens/s and the cumulative token count."""
    tokens = seconds = 0.0
    for prev, cur in zip(history, history[1:]):
        window_tokens = cur["tokens"] - prev["tokens"]
        tokens += window_tokens
        seconds += window_tokens / cur["tokens_per_s"]
    return tokens / seconds


def lorapipe_run(cfg) -> dict:
    from pipelines.train.driver import train

    run = train(cfg, progress=False)
    m, history = run.metrics(), run.history()
    return {"tokens_per_s": steady_tokens_per_s(history), "tokens_per_s_all_steps": m["tokens_per_s"],
            "window_tokens_per_s": [h["tokens_per_s"] for h in history], "tokens": m["tokens"],
            "train_steps": m["train_steps"], "startup": m.get("startup", {})}


def bare_batches(cfg, steps: int):
    """The micro batches a single lorapipe worker trains on, collated up front (and the time it took)."""
    from lora import load_tokenizer
    from pipelines.data.builtin import resolve_builtins
    from pipelines.data.prepare import MicroBatches, prepare_data, shard

    cfg = resolve_builtins(cfg)
    tok = load_tokenizer(cfg.model.path)
    data = prepare_data(cfg.data, tok, cfg.seed)
    mb = MicroBatches(shard(data.train, 1, 0), cfg.train.micro_batch_size, cfg.seed, tok.pad_token_id)
    t0 = time.perf_counter()
    batches = [mb[i] for i in range(steps)]
    return batches, (time.perf_counter() - t0) / steps


def bare_run(cfg, batches: list, warmup: int) -> dict:
    """PEFT + torch AdamW in this process: same init seed, LoRA config, optimizer, clipping, schedule."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    tr, lc = cfg.train, cfg.lora
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, attn_implementation="sdpa")
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    sched = get_scheduler(tr.scheduler, opt, num_warmup_steps=tr.warmup_steps, num_training_steps=tr.max_steps)
    model.train()
    times, tokens = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
        tokens.append(float(batch.real_tokens))
    steady = slice(warmup, None)
    out = {"tokens_per_s": sum(tokens[steady]) / sum(times[steady]),
           "tokens_per_s_all_steps": sum(tokens) / sum(times),
           "step_s": spread(times[steady]), "first_step_s": times[0], "final_loss": float(loss.detach())}
    del model, opt, params
    gc.collect()
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, lp = report["bare"]["tokens_per_s"], report["lorapipe"]["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["bare PEFT loop", "lorapipe train"], [b["median"], lp["median"]],
           yerr=[[b["median"] - b["min"], lp["median"] - lp["min"]], [b["max"] - b["median"], lp["max"] - lp["median"]]],
           color=["#888", "#3a7"], capsize=6)
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title(f"steady state, ratio {report['ratio_lorapipe_over_bare']:.3f}")
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (both loops)")
    ap.add_argument("--warmup", type=int, default=2, help="bare-loop steps left out of its steady state")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "pipeline_efficiency.json"))
    ap.add_argument("--png", default=None, help="default: --out with .png")
    a = ap.parse_args(argv)
    if a.warmup < 1 or a.steps <= a.warmup or a.steps % a.warmup:
        ap.error(f"--steps {a.steps} must be a multiple of --warmup {a.warmup} above it (lorapipe reports "
                 "every --warmup steps and its first window is the warm-up)")

    # One torch thread here; Ray gives its 1-CPU worker OMP_NUM_THREADS=1 as well.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-eff-"))
    os.environ["LORAPIPE_HOME"] = str(work / "home")
    try:
        model_dir = save_llama(work / "model", **SHAPES[a.shape])
        n_params = param_count(model_dir)
        batches, collate_s = bare_batches(run_config(model_dir, work / "runs", "probe", a), a.steps)
        # Untimed: starts the local Ray both loops then share the machine with (its processes settle
        # in the first minute) and pays one-off costs (DeepSpeed's op build), so that no timed run
        # meets a different machine state than the others.
        lorapipe_run(run_config(model_dir, work / "runs", "eff-warmup", a, steps=2 * a.warmup))
        bare, lp = [], []
        for i in range(a.repeats):
            cfg = run_config(model_dir, work / "runs", f"eff-{i}", a)
            bare.append(bare_run(cfg, batches, a.warmup))
            print(f"[{i}] bare      {bare[-1]['tokens_per_s']:.1f} tok/s", flush=True)
            lp.append(lorapipe_run(cfg))
            print(f"[{i}] lorapipe  {lp[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            import ray
            ray.shutdown()
        except Exception:
            pass

    pairs = [ln["tokens_per_s"] / b["tokens_per_s"] for b, ln in zip(bare, lp)]
    bare_med = statistics.median(b["tokens_per_s"] for b in bare)
    lp_med = statistics.median(ln["tokens_per_s"] for ln in lp)
    step_s = statistics.median(b["step_s"]["median"] for b in bare)
    report = header("pipeline_efficiency", vars(a), 1)
    report.update({
        "model": {"shape": SHAPES[a.shape], "parameters": n_params, "dtype": "fp32"},
        "tokens_per_step": a.seq * a.batch,
        "bare": {"tokens_per_s": spread(b["tokens_per_s"] for b in bare),
                 "tokens_per_s_all_steps": spread(b["tokens_per_s_all_steps"] for b in bare),
                 "step_s_median": step_s, "runs": bare},
        "lorapipe": {"tokens_per_s": spread(ln["tokens_per_s"] for ln in lp),
                     "tokens_per_s_all_steps": spread(ln["tokens_per_s_all_steps"] for ln in lp), "runs": lp},
        "ratio_lorapipe_over_bare": lp_med / bare_med,
        "ratio_per_pair": spread(pairs),
        "ratio_all_steps": (statistics.median(ln["tokens_per_s_all_steps"] for ln in lp)
                            / statistics.median(b["tokens_per_s_all_steps"] for b in bare)),
        "target_ratio": 0.95,
        "collate_s_per_batch": collate_s,
        "collate_share_of_bare_step": collate_s / step_s,
        "notes": ("tokens_per_s (both): the steps after --warmup; lorapipe's from its report windows after "
                  "the first (timed forward/backward/step incl. collating each batch, reports excluded), "
                  "bare on pre-collated batches. ratio_all_steps: both with every step counted (lorapipe's "
                  "metrics.json tokens_per_s). collate_share_of_bare_step: lorapipe's per-step collation "
                  "time as a share of a bare step."),
    })
    out = write_json(a.out, report)
    plot(report, Path(a.png) if a.png else out.with_suffix(".png"))
    print(f"ratio lorapipe/bare = {report['ratio_lorapipe_over_bare']:.3f} -> {out}")
    return report


if __name__ == "__main__":
    main()
