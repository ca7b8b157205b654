"""The chunked loss's memory cut on a CPU, at a 128k vocabulary: one LoRA step, plain vs chunked.

A Llama with Llama-3's vocabulary (128,256) and a small width (so the logits dominate the step,
as they do at 8B: 2 x 2048 x 128,256 fp32 logits are 2 GiB), fp32, LoRA r=8 all-linear, frozen
head. Both modes run in one child process, each: build, one warm-up step, then the kernel's peak-RSS
mark is reset (/proc/self/clear_refs) and one measured step runs (lora.loss.training_loss,
backward, AdamW). The step's peak = VmHWM - VmRSS before it. glibc is told to map big blocks
straight from the OS (MALLOC_MMAP_THRESHOLD_), so freed logits leave RSS at once.

    python bench/chunked_loss.py --tokens 1024 --chunk 256 --out bench/results/chunked_loss.json

The JSON holds each mode's step peak, loss and gradient norm, the cut, the logits' share as the
plan computes it (pipelines.plan.memory), and the plan's predicted cut.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import proc_status_bytes  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128256, tie_word_embeddings=False)
MMAP_THRESHOLD = str(1 << 20)  # blocks of 1 MiB and more come from (and go back to) the OS


def build(tokens: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora.adapter import apply_lora, build_lora_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": vocab}, use_cache=False)).float()
    model = apply_lora(base, build_lora_config(base, r=8, alpha=16, dropout=0.0))
    for p in model.parameters():  # B = 0 at init would make every adapter gradient but B's zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    labels = ids.clone()
    labels[0, : tokens // 8] = -100  # a prompt: not counted
    return model, {"input_ids": ids, "labels": labels}


def measure(mode: str, tokens: int, chunk: int, vocab: int) -> dict:
    """One child's figures: the measured step's peak above the RSS it started from, loss, grad norm."""
    import torch

    from lora.loss import training_loss

    torch.set_num_threads(1)
    model, batch = build(tokens, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> tuple[float, float]:
        loss = training_loss(model, model, batch, mode, chunk)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1e9))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), norm

    first = step()  # optimizer states and autograd's one-time buffers exist from here on
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = proc_status_bytes("VmRSS")["VmRSS"]
    second = step()
    peak = proc_status_bytes("VmHWM")["VmHWM"]
    return {"mode": mode, "rss_before_step": before, "step_peak_bytes": peak - before,
            "loss_first_step": first[0], "grad_norm_first_step": first[1], "loss_second_step": second[0]}


def run_child(args) -> dict:
    """Both modes in one fresh process, one after the other (freed blocks go back to the OS, so each
    step's peak is read above the RSS it starts from; imports are paid once)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, __file__, "--child", "plain,chunked", "--result", str(out), "--tokens",
               str(args.tokens), "--chunk", str(args.chunk), "--vocab", str(args.vocab)]
        subprocess.run(cmd, env=env, check=True, timeout=600)
        return json.loads(out.read_text())


def planned_cut(tokens: int, chunk: int, vocab: int) -> dict:
    """The plan's loss peak per mode (pipelines.plan.memory) for this model and micro batch."""
    from pipelines.plan.levers import loss_chunks
    from pipelines.plan.memory import Arch, PlanInputs, logits_bytes_per_token, plan_memory

    arch = Arch(SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"],
                SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], vocab)
    plain = PlanInputs(arch, dtype="fp32", quantization="none", lora_r=8, precision="mixed", seq_len=tokens, cpu=True,
                        keeps_logits=False)
    chunked = plain.with_(loss_chunks=loss_chunks("chunked", chunk, tokens))
    peak = {name: plan_memory(p).allocated_peak for name, p in (("plain", plain), ("chunked", chunked))}
    return {"plain_loss_bytes": logits_bytes_per_token(plain) * tokens,
            "chunked_loss_bytes": logits_bytes_per_token(chunked) * tokens,
            "loss_chunks": chunked.loss_chunks, "cut_bytes": peak["plain"] - peak["chunked"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens in the micro batch (one sequence)")
    ap.add_argument("--chunk", type=int, default=256, help="train.loss_chunk_tokens")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chunked_loss.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        runs = {m: measure(m, a.tokens, a.chunk, a.vocab) for m in a.child.split(",")}
        Path(a.result).write_text(json.dumps(runs))
        return {}
    runs = run_child(a)
    plan = planned_cut(a.tokens, a.chunk, a.vocab)
    cut = runs["plain"]["step_peak_bytes"] - runs["chunked"]["step_peak_bytes"]
    logits_fp32 = a.tokens * a.vocab * 4
    report = {
        "schema": "lorapipe.bench.chunked_loss/1", "command": ["bench/chunked_loss.py", *(argv or sys.argv[1:])],
        "settings": {"tokens": a.tokens, "chunk_tokens": a.chunk, "vocab": a.vocab, "shape": SHAPE, "dtype": "fp32",
                     "lora": "r=8 all-linear, head frozen", "torch_threads": 1, "malloc_mmap_threshold": MMAP_THRESHOLD},
        "runs": runs, "measured_cut_bytes": cut, "fp32_logits_bytes": logits_fp32,
        "cut_over_fp32_logits": cut / logits_fp32, "plan": plan, "measured_over_planned_cut": cut / plan["cut_bytes"],
        "loss_abs_diff": abs(runs["plain"]["loss_first_step"] - runs["chunked"]["loss_first_step"]),
        "grad_norm_rel_diff": abs(runs["plain"]["grad_norm_first_step"] / runs["chunked"]["grad_norm_first_step"] - 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    mib = 2 ** 20
    print(f"step peak: plain {runs['plain']['step_peak_bytes'] / mib:.0f} MiB, chunked "
          f"{runs['chunked']['step_peak_bytes'] / mib:.0f} MiB; cut {cut / mib:.0f} MiB = "
          f"{report['cut_over_fp32_logits']:.2f} x the fp32 logits ({logits_fp32 / mib:.0f} MiB); plan's cut "
          f"{plan['cut_bytes'] / mib:.0f} MiB; loss diff {report['loss_abs_diff']:.2e} -> {a.out}")
    return report


if __name__ == "__main__":
    main()
