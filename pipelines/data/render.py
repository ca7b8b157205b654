"""Rows -> (text, character spans that carry loss) -> token ids with response-only labels.

Every conversational format (alpaca, chat, sharegpt) labels only what the model should say:
each assistant turn of a multi-turn conversation, never a system or user token. Spans come from
rendering the conversation's prefixes with the tokenizer's own chat template, so the labels
match exactly what the template writes.
"""
from __future__ import annotations

from typing import Optional

from pipelines.core.errors import UserError
from pipelines.data.prompts import alpaca_prompt

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
Spans = Optional[list[tuple[int, int]]]


def _require_str(row: dict, key: str, row_no: int, fmt: str) -> str:
    value = row.get(key)
    if value is None or not isinstance(value, str) or not value:
        raise UserError(f"row {row_no}: {fmt} rows need a non-empty string field {key!r} (got {value!r})")
    return value


def render_alpaca(row: dict, row_no: int, eos: str) -> tuple[str, Spans]:
    instruction = _require_str(row, "instruction", row_no, "alpaca")
    output = _require_str(row, "output", row_no, "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"row {row_no}: alpaca field 'input' must be a string (got {type(extra).__name__})")
    prompt = alpaca_prompt(instruction, extra)
    text = prompt + output + eos
    return text, [(len(prompt), len(text))]


def chat_messages(row: dict, row_no: int) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"row {row_no}: chat rows need a non-empty list field 'messages'")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"row {row_no}: message {i} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)} "
                            "with string content")
    return messages


def sharegpt_messages(row: dict, row_no: int, spec) -> list[dict]:
    """sharegpt `conversations` ([{from, value}, ...]) as chat messages, through spec.roles."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"row {row_no}: sharegpt rows need a non-empty list field 'conversations' (got {turns!r})")
    messages = []
    for i, turn in enumerate(turns, 1):
        speaker = turn.get(spec.role_key) if isinstance(turn, dict) else None
        if speaker not in spec.roles:
            raise UserError(f"row {row_no}, turn {i}: unknown role {speaker!r} in {spec.role_key!r}; "
                            f"known: {', '.join(spec.roles)} (map others with data.sharegpt.roles)")
        content = turn.get(spec.content_key)
        if not isinstance(content, str):
            raise UserError(f"row {row_no}, turn {i}: {spec.content_key!r} must be a string (got {content!r})")
        messages.append({"role": spec.roles[speaker], "content": content})
    return messages


def _template(tokenizer, messages: list[dict], row_no: int, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. "roles must alternate") and friends
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        roles = "/".join(m["role"] for m in messages)
        raise UserError(f"row {row_no}: the chat template cannot render turns {roles}: {first}") from None


def render_conversation(messages: list[dict], row_no: int, tokenizer) -> tuple[str, Spans]:
    """The rendered conversation and the span of every assistant turn (its text and end marker)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"row {row_no}: conversation has no assistant turn to train on")
    text = _template(tokenizer, messages, row_no)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], row_no, generation_prompt=True)) if i else 0
        end = _template(tokenizer, messages[: i + 1], row_no)
        if not text.startswith(end):
            raise UserError(f"row {row_no}: the chat template renders turn {i + 1} differently inside the "
                            "conversation, so its labels cannot be located")
        spans.append((start, len(end)))
    return text, spans


def render_row(row: dict, row_no: int, data_cfg, tokenizer, fmt: Optional[str] = None) -> tuple[str, Spans]:
    """(text, loss spans) of one row in format `fmt` (default data_cfg.format); spans None means
    every token carries loss."""
    fmt = fmt or data_cfg.format
    if fmt == "alpaca":
        text, spans = render_alpaca(row, row_no, tokenizer.eos_token or "")
    elif fmt == "chat":
        text, spans = render_conversation(chat_messages(row, row_no), row_no, tokenizer)
    elif fmt == "sharegpt":
        text, spans = render_conversation(sharegpt_messages(row, row_no, data_cfg.sharegpt), row_no, tokenizer)
    else:
        text, spans = _require_str(row, "text", row_no, "text") + (tokenizer.eos_token or ""), None
    return text, (None if data_cfg.train_on_prompt else spans)


def tokenize_row(text: str, spans: Spans, tokenizer, max_len: int) -> dict:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = enc["input_ids"]
    if spans is None:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": truncated}


def check_tokenizer(formats, tokenizer) -> None:
    conversational = sorted(set(formats) & {"chat", "sharegpt"})
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data.format={conversational[0]} needs a tokenizer with a chat template; this tokenizer has "
                        "none (use format alpaca or text, or a chat model's tokenizer)")
