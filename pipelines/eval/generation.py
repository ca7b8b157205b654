"""Task metrics that need generation: exact match of greedy answers on alpaca rows."""
from __future__ import annotations

import torch

from pipelines.data.prompts import alpaca_prompt


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy completions of `prompts`, stopped at EOS, prompt removed."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 16) -> float:
    """Share of alpaca rows whose greedy answer equals `output` exactly (whitespace-trimmed)."""
    prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in rows]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows)) / max(len(rows), 1)
