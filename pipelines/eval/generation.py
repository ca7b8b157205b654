"""Generation: batched answers for the suite's generation metrics (greedy unless the set asks to
sample), and token streaming for `lorapipe generate`."""
from __future__ import annotations

import threading
from typing import Iterator

import torch

from pipelines.data.prompts import alpaca_prompt


def sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict:
    """generate() arguments: greedy, or sampling with temperature/top_p (unset when greedy, so
    transformers does not warn about ignored settings)."""
    if not do_sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64,
                   **sampling) -> list[str]:
    """Completions of `prompts` (greedy unless sampling kwargs say otherwise), stopped at EOS,
    prompt removed."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, **(sampling or {"do_sample": False}),
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def generate_answers(model, tokenizer, prompts: list[str], gen) -> list[str]:
    """Answers under an eval set's GenerationSpec (seeded when sampling, so reruns agree)."""
    if gen.do_sample:
        torch.manual_seed(gen.seed)
    return greedy_answers(model, tokenizer, prompts, gen.max_new_tokens, gen.batch_size,
                          **sampling_kwargs(gen.do_sample, gen.temperature, gen.top_p))


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 16) -> float:
    """Share of alpaca rows whose greedy answer equals `output` exactly (whitespace-trimmed)."""
    prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in rows]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows)) / max(len(rows), 1)


def stream_answer(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0) -> Iterator[str]:
    """Text pieces of the answer as the model produces them (generate runs in a thread and feeds
    a TextIteratorStreamer; the prompt is not echoed)."""
    from transformers import TextIteratorStreamer

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, **sampling_kwargs(do_sample, temperature, top_p))
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs), daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        worker.join()
