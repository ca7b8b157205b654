"""The metrics of one eval set on one loaded model: token-weighted loss and perplexity over the
tokens training would put loss on, and generation metrics (exact match, contains, ROUGE-L from
`rouge-score`) on answers generated with the set's settings."""
from __future__ import annotations

import math

import torch

from pipelines.config.eval_suite import GENERATION_METRICS, EvalSetSpec
from pipelines.data.prepare import IGNORE_INDEX
from pipelines.data.prompts import completion_prompt

LOSS_BATCH = 16


def set_metrics(model, tokenizer, spec: EvalSetSpec, rows: list[dict], template: str) -> dict[str, float]:
    """{"<set>/<metric>": value} for every metric the set asks for."""
    out: dict[str, float] = {}
    if {"loss", "perplexity"} & set(spec.metrics):
        loss = token_weighted_loss(model, tokenizer, spec, rows)
        if "loss" in spec.metrics:
            out["loss"] = loss
        if "perplexity" in spec.metrics:
            out["perplexity"] = math.exp(min(loss, 700.0))
    wanted = [m for m in spec.metrics if m in GENERATION_METRICS]
    if wanted:
        from pipelines.eval.generation import generate_answers

        prompts, refs = zip(*(prompt_and_reference(r, spec, tokenizer, template) for r in rows))
        answers = generate_answers(model, tokenizer, list(prompts), spec.generation)
        out.update(answer_scores(answers, list(refs), wanted))
    return {f"{spec.name}/{k}": float(v) for k, v in out.items()}


@torch.no_grad()
def token_weighted_loss(model, tokenizer, spec: EvalSetSpec, rows: list[dict]) -> float:
    """Mean NLL per loss-carrying token over all rows (not a mean of per-batch means)."""
    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import collate, render_row, tokenize_row

    cfg = DataSection(path="-", format=spec.format, text_field=spec.text_field, max_seq_len=spec.max_seq_len)
    encoded = [tokenize_row(*render_row(r, i + 1, cfg, tokenizer), tokenizer, cfg.max_seq_len) for i, r in enumerate(rows)]
    total, count = 0.0, 0
    for i in range(0, len(encoded), LOSS_BATCH):
        chunk = encoded[i:i + LOSS_BATCH]
        batch = collate({"input_ids": [e["input_ids"] for e in chunk], "labels": [e["labels"] for e in chunk]},
                        tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n:
            total += model(**batch).loss.float().item() * n
            count += n
    return total / max(count, 1)


def prompt_and_reference(row: dict, spec: EvalSetSpec, tokenizer, template: str) -> tuple[str, str]:
    """The prompt the model was trained to answer, and the reference answer."""
    if spec.format == "chat":
        msgs = row["messages"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, msgs[-1]["content"]
    return completion_prompt(template, tokenizer, row["instruction"], row.get("input") or ""), row["output"]


def answer_scores(answers: list[str], refs: list[str], wanted: list[str]) -> dict[str, float]:
    n = max(len(refs), 1)
    pairs = [(a.strip(), r.strip()) for a, r in zip(answers, refs)]
    out = {}
    if "exact_match" in wanted:
        out["exact_match"] = sum(a == r for a, r in pairs) / n
    if "contains" in wanted:
        out["contains"] = sum(r in a for a, r in pairs) / n
    if "rouge_l" in wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        out["rouge_l"] = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in pairs) / n
    return out
