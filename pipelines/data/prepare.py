"""Data in the driver: read each source (sources.py), render and tokenize it with response-only
labels (render.py), mix the sources by weight with a seed, drop rows with no loss tokens, split
train/eval with a seed, and pack the training split (pack.py); micro batches are in batches.py.

The driver runs this once first, so bad data fails before Ray starts. Small prepared data then
travels to the workers through Ray's object store (`shippable`); larger data is prepared again
by each worker with the same deterministic pipeline, keeping only its shard, unless the data
goes through Ray Data (streaming.py), which no single process holds whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from pipelines.core.errors import UserError
from pipelines.data.batches import Batch, MicroBatches, collate, eval_batches, shard, to_device  # noqa: F401
from pipelines.data.pack import example_lengths, pack_dataset, packing_efficiency
from pipelines.data.render import IGNORE_INDEX, check_tokenizer, render_row, tokenize_row  # noqa: F401
from pipelines.data.sources import load_raw_dataset, mix, source_fingerprint

# Prepared data up to this size is shipped from the driver to the workers (one copy in the object
# store) instead of each worker loading and tokenizing the whole dataset again; above it, the
# driver's copy would cost more memory than the workers' repeated work costs time.
SHIP_LIMIT_BYTES = 256 << 20


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels (+ lengths when packed)
    eval: Any   # never packed
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    pad_id: int = 0  # the tokenizer's pad token: all a worker needs of the tokenizer
    fingerprints: dict = field(default_factory=dict)  # source path -> fingerprint


def shippable(data: PreparedData, limit: int = SHIP_LIMIT_BYTES) -> Optional[PreparedData]:
    """`data` with both splits as in-memory tables, so it pickles whole into Ray's object store and
    reaches workers on any node, or None when it is bigger than `limit`. As prepared, the splits
    are memory-mapped cache files on the driver's disk, which would pickle as mere paths."""
    if data.train.data.nbytes + data.eval.data.nbytes > limit:
        return None
    return replace(data, train=data.train.flatten_indices(keep_in_memory=True),
                   eval=data.eval.flatten_indices(keep_in_memory=True))


def dataset_fingerprint(data_cfg, ds=None) -> str:
    """One string for the data: the source's fingerprint, or `path=fingerprint` per source, joined."""
    sources = data_cfg.sources()
    if len(sources) == 1:
        return source_fingerprint(sources[0], ds)
    return ";".join(f"{s.path}={source_fingerprint(s)}" for s in sources)


def source_fingerprints(data_cfg) -> dict:
    """{path: fingerprint} of every source (file hashes; hub names with their split)."""
    return {s.path: source_fingerprint(s) for s in data_cfg.sources()}


def tokenize_dataset(ds, data_cfg, tokenizer, fmt: Optional[str] = None):
    """input_ids, labels (response-only unless train_on_prompt) and a truncated flag per row."""
    fmt = fmt or data_cfg.format
    check_tokenizer([fmt], tokenizer)

    def encode(row, idx):
        text, spans = render_row(row, idx + 1, data_cfg, tokenizer, fmt)
        return tokenize_row(text, spans, tokenizer, data_cfg.max_seq_len)

    return ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenize",
                  load_from_cache_file=False)


def tokenized_sources(data_cfg, tokenizer) -> tuple[list, dict]:
    """Each source tokenized (with a `source` column: its index), and {path: fingerprint}."""
    parts, fingerprints = [], {}
    for i, source in enumerate(data_cfg.sources()):
        raw = load_raw_dataset(source, data_cfg.text_unit)
        if len(data_cfg.sources()) == 1 and data_cfg.max_examples:
            raw = raw.select(range(min(len(raw), data_cfg.max_examples)))
        fingerprints[source.path] = source_fingerprint(source, raw)
        tok = tokenize_dataset(raw, data_cfg, tokenizer, source.format)
        parts.append(tok.add_column("source", [i] * len(tok)))
    return parts, fingerprints


def has_labels(row) -> bool:
    return any(t != IGNORE_INDEX for t in row["labels"])


def prepare_data(data_cfg, tokenizer, seed: int) -> PreparedData:
    """Sources -> tokenized -> mixed -> rows with loss tokens -> seeded split -> packed train."""
    parts, fingerprints = tokenized_sources(data_cfg, tokenizer)
    mixed = mix(parts, data_cfg.sources(), seed, data_cfg.mix_until)
    if len(parts) > 1 and data_cfg.max_examples:
        mixed = mixed.select(range(min(len(mixed), data_cfg.max_examples)))
    kept = mixed.filter(has_labels, load_from_cache_file=False).remove_columns(["truncated"])
    if len(kept) < 2:
        raise UserError(f"data has {len(kept)} usable rows after truncation to max_seq_len={data_cfg.max_seq_len} "
                        "(need at least 2 for a train/eval split)")
    split = kept.train_test_split(test_size=data_cfg.eval_fraction, seed=seed, shuffle=True)
    train, evl = split["train"].remove_columns(["source"]), split["test"].remove_columns(["source"])
    stats = data_stats(data_cfg, parts, mixed, kept)
    if data_cfg.packing:
        lengths = example_lengths(train)
        train = pack_dataset(train, data_cfg.max_seq_len)
        stats.update(packed_blocks=len(train), examples_per_block=len(lengths) / len(train),
                     packing_efficiency=packing_efficiency(lengths, data_cfg.max_seq_len, len(train)))
    stats.update(train_examples=len(train), eval_examples=len(evl))
    fingerprint = ";".join(f"{p}={f}" for p, f in fingerprints.items()) if len(parts) > 1 else \
        next(iter(fingerprints.values()))
    return PreparedData(train=train, eval=evl, stats=stats, fingerprint=fingerprint, pad_id=tokenizer.pad_token_id,
                        fingerprints=fingerprints)


def data_stats(data_cfg, parts: list, mixed, kept) -> dict:
    truncated = int(sum(mixed["truncated"]))
    stats = {"rows": len(mixed), "rows_kept": len(kept), "rows_truncated": truncated,
             "rows_dropped_no_labels": len(mixed) - len(kept)}
    if len(parts) > 1:
        counts = [0] * len(parts)
        for s in kept["source"]:
            counts[s] += 1
        stats["sources"] = [{"path": src.path, "format": src.format, "weight": src.weight, "rows_read": len(p),
                             "rows_used": c} for src, p, c in zip(data_cfg.sources(), parts, counts)]
    return stats
