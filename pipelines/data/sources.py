"""Reading sources: local JSON/JSONL/Parquet/.txt files or hub datasets -> rows with the fields
their format reads (after the source's column mapping), one fingerprint per source, and a seeded
weighted mixture of several tokenized sources.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.errors import UserError
from pipelines.core.files import sha256_file

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SUFFIXES = (*_BUILDERS, ".txt")


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


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8: byte {e.start} (0x{data[e.start]:02x}) cannot be decoded") from None


def split_documents(text: str, unit: str) -> list[str]:
    """A .txt file's documents: one per non-blank line, or per blank-line-separated paragraph
    (its lines joined with newlines)."""
    if unit == "line":
        return [line for line in text.splitlines() if line.strip()]
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def load_text_file(path: Path, unit: str):
    from datasets import Dataset

    docs = split_documents(read_utf8(path), unit)
    if not docs:
        raise UserError(f"dataset {path} is empty (no non-blank {unit})")
    return Dataset.from_dict({"text": docs})


def _load_rows(source, text_unit: str):
    from datasets import load_dataset

    path = Path(source.path).expanduser()
    if path.suffix not in SUFFIXES and not path.exists():
        return load_dataset(source.path, split=source.split)
    if not path.is_file():
        raise UserError(f"dataset file not found: {source.path}")
    if path.suffix not in SUFFIXES:
        raise UserError(f"dataset file {path} has suffix {path.suffix!r}; allowed: {', '.join(SUFFIXES)}")
    if path.suffix == ".txt":
        if source.format != "text":
            raise UserError(f"{path}: .txt files hold format text, not {source.format}")
        return load_text_file(path, text_unit)
    if path.suffix == ".jsonl":
        _check_jsonl(path)
    if _is_empty_file(path):
        raise UserError(f"dataset {source.path} is empty")
    return load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")


def iter_file_rows(path: Path, text_unit: str = "line"):
    """Rows of a local JSONL/Parquet/.txt file one by one from its start, never the whole file
    in memory (a .txt by paragraph is read whole)."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            yield from (json.loads(line) for line in f if line.strip())
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif path.suffix == ".txt" and text_unit == "line":
        with path.open(encoding="utf-8") as f:
            yield from ({"text": line.rstrip("\n")} for line in f if line.strip())
    else:
        yield from ({"text": doc} for doc in split_documents(read_utf8(path), text_unit))


def mapped_row(row: dict, source, row_no: int) -> dict:
    """`row` with the source's column mapping applied; a mapped column it lacks is an error."""
    for field, column in source.columns.items():
        if column not in row:
            raise UserError(f"data columns: {field} -> {column!r}, but row {row_no} of {source.path} has no column "
                            f"{column!r} (columns: {', '.join(row)})")
    return {**row, **{field: row[column] for field, column in source.columns.items()}}


def load_raw_dataset(source, text_unit: str = "line"):
    """Rows of one source, with its column mapping applied (a DataSection works as the source too)."""
    source = source.sources()[0] if hasattr(source, "sources") else source
    try:
        ds = _load_rows(source, text_unit)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the first line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load dataset {source.path!r}: {first}") from None
    ds = apply_columns(ds, source)
    if source.max_examples:
        ds = ds.select(range(min(len(ds), source.max_examples)))
    if len(ds) == 0:
        raise UserError(f"dataset {source.path} is empty")
    return ds


def apply_columns(ds, source):
    """Rename the mapped columns to the format's field names; a mapping to an absent column is an error."""
    if not source.columns:
        return ds
    for field, column in source.columns.items():
        if column not in ds.column_names:
            raise UserError(f"data columns: {field} -> {column!r}, but {source.path} has no column {column!r} "
                            f"(columns: {', '.join(ds.column_names)})")
    renames = {col: field for field, col in source.columns.items() if col != field}
    clashing = [f for f in renames.values() if f in ds.column_names]
    return ds.remove_columns(clashing).rename_columns(renames)


def source_fingerprint(source, ds=None) -> str:
    path = Path(source.path).expanduser()
    if path.is_file():
        return f"sha256:{sha256_file(path)}"
    return f"datasets:{source.path}@{getattr(ds, '_fingerprint', None) or source.split}"


def mixture_probabilities(sources) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def mix(parts: list, sources, seed: int, until: str):
    """One dataset drawing each next row from source i with probability weight_i / sum(weights),
    seeded; it ends when the first source runs out (or, all_exhausted, when all have, re-drawing
    from the ones already used up)."""
    from datasets import interleave_datasets

    if len(parts) == 1:
        return parts[0]
    return interleave_datasets(parts, probabilities=mixture_probabilities(sources), seed=seed,
                               stopping_strategy=until)
