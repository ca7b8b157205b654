"""Data: load rows with `datasets`, validate them, tokenize with response-only labels, truncate,
optionally pack, split train/eval with a seed, shard per worker, and form padded micro batches.

The driver runs the pipeline once first, so bad data fails before Ray starts. Small prepared
data then travels to the workers through Ray's object store (`shippable`); larger data is
prepared again by each worker with the same deterministic pipeline, keeping only its shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipelines.core.errors import UserError
from pipelines.core.files import sha256_file
from pipelines.data.prompts import alpaca_prompt

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CHAT_ROLES = ("system", "user", "assistant")


# Prepared data up to this size is shipped from the driver to the workers (one copy in the object
# store) instead of each worker loading and tokenizing the whole dataset again; above it, the
# driver's copy would cost more memory than the workers' repeated work costs time.
SHIP_LIMIT_BYTES = 256 << 20


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    pad_id: int = 0  # the tokenizer's pad token: all a worker needs of the tokenizer


def shippable(data: PreparedData, limit: int = SHIP_LIMIT_BYTES) -> Optional[PreparedData]:
    """`data` with both splits as in-memory tables, so it pickles whole into Ray's object store and
    reaches workers on any node, or None when it is bigger than `limit`. As prepared, the splits
    are memory-mapped cache files on the driver's disk, which would pickle as mere paths."""
    if data.train.data.nbytes + data.eval.data.nbytes > limit:
        return None
    return replace(data, train=data.train.flatten_indices(keep_in_memory=True),
                   eval=data.eval.flatten_indices(keep_in_memory=True))


def _check_jsonl(path: Path) -> None:
    """datasets reports malformed JSON Lines without a line number; find it for the user."""
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None


def _is_empty_file(path: Path) -> bool:
    if path.suffix == ".parquet":
        return path.stat().st_size == 0
    text = path.read_text(errors="replace") if path.stat().st_size < (1 << 20) else "x"
    return not text.strip() or text.strip() in ("[]", "{}")


def load_raw_dataset(data_cfg):
    """Rows of a local JSON/JSONL/Parquet file or a `datasets` hub dataset."""
    from datasets import load_dataset

    path = Path(data_cfg.path).expanduser()
    try:
        if path.suffix in _BUILDERS or path.exists():
            if not path.is_file():
                raise UserError(f"dataset file not found: {data_cfg.path}")
            if path.suffix not in _BUILDERS:
                raise UserError(f"dataset file {path} has suffix {path.suffix!r}; allowed: .json, .jsonl, .parquet")
            if path.suffix == ".jsonl":
                _check_jsonl(path)
            if _is_empty_file(path):
                raise UserError(f"dataset {data_cfg.path} is empty")
            ds = load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
        else:
            ds = load_dataset(data_cfg.path, split=data_cfg.split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the first line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load dataset {data_cfg.path!r}: {first}") from None
    if data_cfg.max_examples:
        ds = ds.select(range(min(len(ds), data_cfg.max_examples)))
    if len(ds) == 0:
        raise UserError(f"dataset {data_cfg.path} is empty")
    return ds


def dataset_fingerprint(data_cfg, ds) -> str:
    path = Path(data_cfg.path).expanduser()
    if path.is_file():
        return f"sha256:{sha256_file(path)}"
    return f"datasets:{data_cfg.path}@{getattr(ds, '_fingerprint', None) or data_cfg.split}"


# -- rendering rows into (text, spans of characters that carry loss) ------------------------
def _require_str(row: dict, key: str, row_no: int, fmt: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None or not isinstance(value, str) or (not allow_empty and not value):
        raise UserError(f"row {row_no}: {fmt} rows need a non-empty string field {key!r} (got {value!r})")
    return value


def render_alpaca(row: dict, row_no: int, eos: str) -> tuple[str, list[tuple[int, int]]]:
    instruction = _require_str(row, "instruction", row_no, "alpaca")
    output = _require_str(row, "output", row_no, "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"row {row_no}: alpaca field 'input' must be a string (got {type(extra).__name__})")
    prompt = alpaca_prompt(instruction, extra)
    text = prompt + output + eos
    return text, [(len(prompt), len(text))]


def render_chat(row: dict, row_no: int, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"row {row_no}: chat rows need a non-empty list field 'messages'")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"row {row_no}: message {i} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)} "
                            "with string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"row {row_no}: chat row has no assistant message to train on")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    return text, spans


def render_row(row: dict, row_no: int, data_cfg, tokenizer) -> tuple[str, Optional[list[tuple[int, int]]]]:
    """(text, loss spans); spans None means every token carries loss."""
    if data_cfg.format == "alpaca":
        text, spans = render_alpaca(row, row_no, tokenizer.eos_token or "")
    elif data_cfg.format == "chat":
        text, spans = render_chat(row, row_no, tokenizer)
    else:
        text, spans = _require_str(row, data_cfg.text_field, row_no, "text"), None
        text += tokenizer.eos_token or ""
    return text, (None if data_cfg.train_on_prompt else spans)


def tokenize_row(text: str, spans, tokenizer, max_len: int) -> dict:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = enc["input_ids"]
    if spans is None:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": truncated}


def tokenize_dataset(ds, data_cfg, tokenizer):
    if data_cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format=chat needs a tokenizer with a chat template; this tokenizer has none "
                        "(use format alpaca or text, or a chat model's tokenizer)")

    def encode(row, idx):
        text, spans = render_row(row, idx + 1, data_cfg, tokenizer)
        return tokenize_row(text, spans, tokenizer, data_cfg.max_seq_len)

    return ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenize",
                  load_from_cache_file=False)


def pack_dataset(ds, block: int):
    """Concatenate examples and cut into full blocks (labels keep their prompt masks)."""

    def pack(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in seq]
        n = len(ids) // block * block
        return {"input_ids": [ids[i:i + block] for i in range(0, n, block)],
                "labels": [labels[i:i + block] for i in range(0, n, block)]}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="pack",
                  load_from_cache_file=False)


def prepare_data(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Load -> validate/tokenize -> drop rows with no loss tokens -> split -> (pack)."""
    raw = load_raw_dataset(data_cfg)
    fingerprint = dataset_fingerprint(data_cfg, raw)
    tok = tokenize_dataset(raw, data_cfg, tokenizer)
    truncated = int(sum(tok["truncated"]))
    kept = tok.filter(lambda r: any(t != IGNORE_INDEX for t in r["labels"]), load_from_cache_file=False)
    kept = kept.remove_columns(["truncated"])
    if len(kept) < 2:
        raise UserError(f"dataset {data_cfg.path} has {len(kept)} usable rows after truncation to "
                        f"max_seq_len={data_cfg.max_seq_len} (need at least 2 for a train/eval split)")
    split = kept.train_test_split(test_size=data_cfg.eval_fraction, seed=seed, shuffle=True)
    train, evl = split["train"], split["test"]
    if data_cfg.packing:
        train, evl = pack_dataset(train, data_cfg.max_seq_len), pack_dataset(evl, data_cfg.max_seq_len)
        if len(train) == 0 or len(evl) == 0:
            raise UserError(f"packing into blocks of {data_cfg.max_seq_len} tokens left no full block; "
                            "lower data.max_seq_len or add data")
    stats = {"rows": len(raw), "rows_kept": len(kept), "rows_truncated": truncated,
             "rows_dropped_no_labels": len(raw) - len(kept), "train_examples": len(train), "eval_examples": len(evl)}
    return PreparedData(train=train, eval=evl, stats=stats, fingerprint=fingerprint, pad_id=tokenizer.pad_token_id)


def shard(ds, world_size: int, rank: int):
    return ds.shard(num_shards=world_size, index=rank, contiguous=True)


# -- micro batches, addressable by position so a resumed run continues where it stopped ---------
class MicroBatches:
    """Micro batch number `position` of an endless, per-epoch reshuffled stream over `ds`."""

    def __init__(self, ds, batch_size: int, seed: int, pad_id: int):
        if len(ds) < batch_size:
            raise UserError(f"a worker's shard has {len(ds)} examples, fewer than train.micro_batch_size={batch_size}")
        self.ds, self.batch_size, self.seed, self.pad_id = ds, batch_size, seed, pad_id
        self.per_epoch = len(ds) // batch_size  # drop the ragged tail so every batch is full

    def indices(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.ds))
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return collate(self.ds.select(self.indices(position)), self.pad_id)


def collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows["input_ids"])
    n = len(rows["input_ids"])
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def eval_batches(shard_ds, batch_size: int, limit: int, total_eval: int, world_size: int, pad_id: int) -> list[dict]:
    """The first eval batches of this worker's shard. The count is computed from the smallest
    shard, so it is the same on every rank (ZeRO-3 runs collectives inside forward: unequal
    counts would deadlock)."""
    smallest = total_eval // world_size
    if smallest == 0:
        raise UserError(f"{total_eval} eval examples cannot be shared by {world_size} workers; raise data.eval_fraction")
    count = min(limit, -(-smallest // batch_size))
    return [collate(shard_ds.select(range(i * batch_size, min((i + 1) * batch_size, smallest))), pad_id)
            for i in range(count)]
