"""Which builtin task shows a LoRA rank knee on the tiny Llama (issue 19)? In-process, one thread,
no Ray: the worker's pieces (load_base_model, build_lora_config + apply_lora, AdamW with warmup +
cosine, clip 1.0, prepare_data + MicroBatches) and the eval suite's exact match (greedy answers,
pipelines/eval/generation.py) on rows drawn with another seed.

    python bench/ablate_task.py --task adapter --base pretrained --ranks 1,4,8,16,64 --full --out ablate_task

Tasks: a builtin task or mix (pipelines/data/builtin.py), `all`, `mix:a,b,c`, or the candidate
`lookup<K>[v<len>]` (a fixed random table of K three-letter keys -> values; eval on the same table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine_info, versions  # noqa: E402


def lookup_rows(size: int, n: int, seed: int, value_len: int = 3) -> list[dict]:
    """Prototype: a fixed table of `size` keys (independent of `seed`), rows drawn from it."""
    import itertools
    import random

    from pipelines.data.builtin import ALPHABET, spaced

    table_rng = random.Random("lookup-table")
    keys = table_rng.sample(["".join(t) for t in itertools.product(ALPHABET, repeat=3)], size)
    table = {k: "".join(table_rng.choice(ALPHABET) for _ in range(value_len)) for k in keys}
    rng = random.Random(f"{seed}-lookup")
    return [{"instruction": "Give the word.", "input": spaced(k), "output": spaced(table[k]), "task": "lookup"}
            for k in (rng.choice(keys) for _ in range(n))]


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    from pipelines.data.builtin import demo_rows

    if task.startswith("lookup"):  # lookup<size>[v<value_len>]
        size, _, vlen = task[len("lookup"):].partition("v")
        return lookup_rows(int(size), n, seed, int(vlen or 3))
    if task.startswith("mix:"):  # mix:reverse,sort,last -- round robin of builtin tasks
        names = task[4:].split(",")
        parts = [demo_rows(t, n=-(-n // len(names)), seed=seed) for t in names]
        return [parts[i % len(names)][i // len(names)] for i in range(n)]
    return demo_rows(None if task == "all" else task, n=n, seed=seed)


def prepared(rows: list[dict], tokenizer, seed: int, max_seq_len: int):
    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import prepare_data

    tmp = Path(tempfile.mkdtemp(prefix="abl-task-")) / "data.jsonl"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare_data(DataSection(path=str(tmp), format="alpaca", max_seq_len=max_seq_len), tokenizer, seed)


def model_for(base: str, r: int, targets, full: bool):
    from lora import apply_lora, build_lora_config, load_base_model

    model = load_base_model(base, dtype="fp32")
    if full:
        return model.requires_grad_(True)
    alpha = 2 * r
    return apply_lora(model, build_lora_config(model, r=r, alpha=alpha, target_modules=targets))


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    from pipelines.data.prompts import alpaca_prompt
    from pipelines.eval.generation import greedy_answers

    prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in rows]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, 64)
    hits = [a.strip() == r["output"].strip() for a, r in zip(answers, rows)]
    by_task: dict = {}
    for h, r in zip(hits, rows):
        by_task.setdefault(r.get("task", "?"), []).append(h)
    return {"exact_match": sum(hits) / len(hits),
            "by_task": {t: round(sum(v) / len(v), 3) for t, v in sorted(by_task.items())}}


def trial(args, base: str, tokenizer, data, eval_rows, r: int, full: bool, targets) -> dict:
    import torch
    from transformers import get_scheduler

    from pipelines.data.batches import MicroBatches

    torch.manual_seed(args.seed)
    model = model_for(base, r, targets, full)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.full_lr if full else args.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=args.warmup, num_training_steps=args.steps)
    batches = MicroBatches(data.train, args.mb, args.seed, tokenizer.pad_token_id)
    started = time.perf_counter()
    losses = []
    for step in range(args.steps):
        loss = model(**batches[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    em = exact_match(model, tokenizer, eval_rows, args.max_new_tokens)
    eval_s = time.perf_counter() - started
    tail = losses[-20:]
    return {"r": None if full else r, "full": full, "targets": "all" if full else targets, "lr": lr,
            "trainable": sum(p.numel() for p in params), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "final_train_loss": round(sum(tail) / len(tail), 4), **em}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="adapter")
    p.add_argument("--base", default="pretrained", help="random | pretrained (the builtins) | a model directory")
    p.add_argument("--ranks", default="1,4,8,16,64")
    p.add_argument("--targets", default="all-linear", help="comma list of target sets separated by ';'")
    p.add_argument("--full", action="store_true")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--mb", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from lora import load_tokenizer
    from pipelines.data.builtin import materialize_tiny_llama, materialize_tiny_llama_pretrained

    bases = {"random": materialize_tiny_llama, "pretrained": materialize_tiny_llama_pretrained}
    base = str(bases[args.base](seed=0)) if args.base in bases else args.base
    tokenizer = load_tokenizer(base)
    data = prepared(task_rows(args.task, args.n, args.seed), tokenizer, args.seed, args.max_seq_len)
    eval_rows = task_rows(args.task, args.eval_n, 12345)
    results = []
    target_sets = [t if t == "all-linear" else t.split(",") for t in args.targets.split(";")]
    for targets in target_sets:
        for r in [int(x) for x in args.ranks.split(",") if x]:
            row = trial(args, base, tokenizer, data, eval_rows, r, False, targets)
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.full:
        row = trial(args, base, tokenizer, data, eval_rows, 0, True, None)
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        out = {"command": "python " + " ".join(sys.argv), "args": vars(args), "machine": machine_info(),
               "versions": versions(), "trials": results}
        (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
