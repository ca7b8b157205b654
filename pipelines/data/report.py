"""Know your data before paying for GPUs (`lorapipe data`): per source, its row count, and on its
first N rows the token-length percentiles, the share cut at max_seq_len, the rows with nothing to
train on, and how full packed blocks would be (vs padded micro batches of the same rows).
"""
from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

import numpy as np

from pipelines.core.errors import UserError
from pipelines.data.pack import best_fit_decreasing, packing_efficiency
from pipelines.data.render import IGNORE_INDEX, render_row, tokenize_row
from pipelines.data.sources import iter_file_rows, load_raw_dataset, mapped_row, read_utf8, split_documents

SAMPLE_ROWS = 2000


def count_rows(source, text_unit: str) -> int | None:
    """Rows of a local file without parsing it (None for hub datasets and JSON arrays)."""
    path = Path(source.path).expanduser()
    if not path.is_file() or path.suffix == ".json":
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".txt" and text_unit == "paragraph":
        return len(split_documents(read_utf8(path), text_unit))
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def first_rows(source, text_unit: str, n: int) -> list[dict]:
    """The first `n` rows of a source (format fields after its column mapping), reading no more
    of a local JSONL/Parquet/.txt file than that."""
    path = Path(source.path).expanduser()
    if not (path.is_file() and path.suffix in (".jsonl", ".parquet", ".txt")):
        # JSON arrays, hub datasets: loaded whole (the column mapping is applied there)
        return list(islice(iter(load_raw_dataset(source, text_unit)), n))
    rows = [mapped_row(r, source, i) for i, r in enumerate(islice(iter_file_rows(path, text_unit), n), 1)]
    if not rows:
        raise UserError(f"dataset {source.path} is empty")
    return rows


def row_summaries(rows: list[dict], source, data_cfg, tokenizer) -> list[tuple[int, bool]]:
    """(tokens before truncation, whether any label survives truncation) of each row; the token
    lists themselves are dropped row by row, so a sample of long rows stays small."""
    out = []
    for i, row in enumerate(rows, 1):
        enc = tokenize_row(*render_row(row, i, data_cfg, tokenizer, source.format), tokenizer, 1 << 62)
        out.append((len(enc["input_ids"]), any(t != IGNORE_INDEX for t in enc["labels"][:data_cfg.max_seq_len])))
    return out


def length_stats(summaries: list[tuple[int, bool]], max_len: int, micro_batch: int, seed: int = 0) -> dict:
    lengths = np.array([n for n, _ in summaries])
    kept = [min(n, max_len) for n, labelled in summaries if labelled]
    blocks = len(best_fit_decreasing(kept, max_len)) if kept else 0
    return {"tokens_p50": int(np.percentile(lengths, 50)), "tokens_p95": int(np.percentile(lengths, 95)),
            "tokens_max": int(lengths.max()), "truncated_share": float((lengths > max_len).mean()),
            "no_trainable_tokens": len(summaries) - len(kept),
            "packing_efficiency": packing_efficiency(kept, max_len, blocks) if kept else 0.0,
            "padded_efficiency": padded_efficiency(kept, micro_batch, seed)}


def padded_efficiency(lengths: list[int], micro_batch: int, seed: int) -> float:
    """Share of real tokens in shuffled micro batches padded to their longest row (no packing)."""
    if not lengths:
        return 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))
    slots = sum(micro_batch * max(lengths[i] for i in order[k:k + micro_batch])
                for k in range(0, len(order), micro_batch))
    return sum(lengths) / slots


def source_report(source, data_cfg, tokenizer, sample: int, micro_batch: int = 8) -> dict:
    t0 = time.perf_counter()
    rows = first_rows(source, data_cfg.text_unit, sample)
    report = {"path": source.path, "format": source.format, "weight": source.weight,
              "rows": count_rows(source, data_cfg.text_unit), "sampled": len(rows)}
    report.update(length_stats(row_summaries(rows, source, data_cfg, tokenizer), data_cfg.max_seq_len, micro_batch))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def data_report(cfg, tokenizer, sample: int = SAMPLE_ROWS) -> dict:
    """Per-source figures (see module doc) for a resolved config."""
    from pipelines.data.streaming import use_ray_data

    sources = [source_report(s, cfg.data, tokenizer, sample, cfg.train.micro_batch_size) for s in cfg.data.sources()]
    return {"max_seq_len": cfg.data.max_seq_len, "packing": cfg.data.packing,
            "engine": "ray" if use_ray_data(cfg.data) else "driver", "sample_rows": sample, "sources": sources}


def format_report(report: dict) -> str:
    head = (f"max_seq_len={report['max_seq_len']}  packing={report['packing']}  engine={report['engine']}  "
            f"(token figures on the first {report['sample_rows']} rows of each source)")
    cols = ["source", "format", "weight", "rows", "p50", "p95", "max", "truncated", "no-label", "packed", "padded"]
    lines = [head, "  ".join(f"{c:>9}" if i else f"{c:<40}" for i, c in enumerate(cols))]
    for s in report["sources"]:
        cells = [s["format"], f"{s['weight']:g}", "?" if s["rows"] is None else str(s["rows"]), s["tokens_p50"],
                 s["tokens_p95"], s["tokens_max"], f"{s['truncated_share']:.1%}", s["no_trainable_tokens"],
                 f"{s['packing_efficiency']:.1%}", f"{s['padded_efficiency']:.1%}"]
        lines.append("  ".join([f"{_short(s['path']):<40}"] + [f"{c!s:>9}" for c in cells]))
    return "\n".join(lines)


def _short(path: str, width: int = 40) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]
