"""Data beyond the driver: Ray Data reads the source (read_json / read_parquet / read_text) and
tokenizes it with `map_batches` in parallel tasks across the cluster; Ray Train splits the
stream between the workers (`ray.train.get_dataset_shard("train")`). No process holds the corpus.

Train/eval: a row is held out when a seeded hash of its text falls under eval_fraction, so the
split is the same on every read. Eval rows are few (train.eval_batches micro batches per worker):
the driver reads them from the head of the file and ships them like small prepared data.

Order and resume: the train stream runs with preserve_order, so every epoch hands each worker the
same rows in the same order (Ray Data's splitter gives each next block to the worker with the
fewest rows, deterministic once block order is). A worker counts the micro batches it consumed in
the current epoch; the checkpoint saves that count and a restarted worker skips as many.
Packing happens inside each tokenized batch (best-fit decreasing over its examples).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipelines.core.errors import UserError
from pipelines.data.batches import Batch, collate
from pipelines.data.pack import pack_rows
from pipelines.data.render import IGNORE_INDEX, render_row, tokenize_row
from pipelines.data.sources import iter_file_rows, mapped_row

TOKENIZE_BATCH_ROWS = 2048  # rows per map_batches call: large enough to pack well, small in memory


def use_ray_data(data_cfg) -> bool:
    """engine=ray, or engine=auto with one local Ray-readable file of at least ray_min_bytes."""
    if data_cfg.engine != "auto":
        return data_cfg.engine == "ray"
    sources = data_cfg.sources()
    if len(sources) != 1 or data_cfg.text_unit != "line":
        return False
    path = Path(sources[0].path).expanduser()
    return path.suffix in (".jsonl", ".parquet", ".txt") and path.is_file() \
        and path.stat().st_size >= data_cfg.ray_min_bytes


def is_eval_text(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str, trust_remote_code: bool, revision):
    from lora import load_tokenizer

    return load_tokenizer(model_path, trust_remote_code, revision)


def tokenize_batch(table, *, data: dict, model: dict, seed: int, keep: str) -> dict:
    """A Ray Data batch (pyarrow) -> tokenized rows of split `keep` that have labels; packed blocks
    when keep='train' and data.packing."""
    from pipelines.config.schema import DataSection

    data_cfg = DataSection.model_validate(data)
    source = data_cfg.sources()[0]
    tok = _tokenizer(model["path"], model["trust_remote_code"], model["revision"])
    ids, labels = [], []
    for n, row in enumerate(table.rename_columns(_renamed(table.column_names, source.columns)).to_pylist(), 1):
        try:
            text, spans = render_row(row, n, data_cfg, tok, source.format)
        except UserError as e:  # the row number is within this batch: say so, and name the file
            raise UserError(f"{source.path} (streamed by Ray Data; row numbers count within a batch): {e}") from None
        if is_eval_text(text, seed, data_cfg.eval_fraction) != (keep == "eval"):
            continue
        enc = tokenize_row(text, spans, tok, data_cfg.max_seq_len)
        if any(t != IGNORE_INDEX for t in enc["labels"]):
            ids.append(enc["input_ids"])
            labels.append(enc["labels"])
    if keep == "train" and data_cfg.packing:
        return _arrow(pack_rows(ids, labels, data_cfg.max_seq_len))
    return _arrow({"input_ids": ids, "labels": labels})


def _renamed(columns: list[str], mapping: dict) -> list[str]:
    back = {col: field for field, col in mapping.items()}
    return [back.get(c, c) for c in columns]


def _arrow(columns: dict):
    import pyarrow as pa

    return pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in columns.items()})


def read_source(source):
    import ray.data

    path = str(Path(source.path).expanduser().resolve())
    if path.endswith(".parquet"):
        return ray.data.read_parquet(path)
    if path.endswith(".txt"):
        return ray.data.read_text(path)  # one row per non-empty line, column "text"
    return ray.data.read_json(path, lines=True)


def tokenized_stream(cfg, keep: str):
    """The lazily read, tokenized (and for train, packed) Ray Dataset of split `keep`."""
    kwargs = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "keep": keep,
              "model": {"path": cfg.model.path, "trust_remote_code": cfg.model.trust_remote_code,
                        "revision": cfg.model.revision}}
    return read_source(cfg.data.sources()[0]).map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=TOKENIZE_BATCH_ROWS, fn_kwargs=kwargs)


def eval_rows(cfg, tokenizer, count: int):
    """The first `count` held-out rows of the file (input_ids, labels), found by the driver reading
    it from the start: eval needs few rows, so no Ray Data execution (and no corpus) in the driver."""
    from datasets import Dataset

    source = cfg.data.sources()[0]
    ids, labels = [], []
    rows = iter_file_rows(Path(source.path).expanduser(), cfg.data.text_unit)
    for n, row in enumerate(rows, 1):
        text, spans = render_row(mapped_row(row, source, n), n, cfg.data, tokenizer, source.format)
        if not is_eval_text(text, cfg.seed, cfg.data.eval_fraction):
            continue
        enc = tokenize_row(text, spans, tokenizer, cfg.data.max_seq_len)
        if any(t != IGNORE_INDEX for t in enc["labels"]):
            ids.append(enc["input_ids"])
            labels.append(enc["labels"])
        if len(ids) == count:
            break
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def train_data_config():
    """Ray Train's dataset config for the stream: preserved order (a deterministic split, so a
    restart can skip what was consumed) instead of locality-driven, arrival-order splitting."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


class StreamBatches:
    """This worker's micro batches from its Ray Train dataset shard, epoch after epoch, starting
    `skip` micro batches into epoch `epoch` (a restart skips what the checkpoint says it consumed)."""

    def __init__(self, shard, batch_size: int, pad_id: int, epoch: int = 0, skip: int = 0):
        self.shard, self.batch_size, self.pad_id = shard, batch_size, pad_id
        self.epoch, self.in_epoch = epoch, 0
        self._it = self._epoch_batches()
        for _ in range(skip):
            next(self._it)
            self.in_epoch += 1

    def _epoch_batches(self):
        return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", drop_last=True))

    def next(self) -> Batch:
        """The next micro batch; at the end of an epoch the stream starts over (epoch + 1)."""
        try:
            table = next(self._it)
        except StopIteration:
            self.epoch, self.in_epoch = self.epoch + 1, 0
            self._it = self._epoch_batches()
            table = next(self._it)
        self.in_epoch += 1
        return collate(table.to_pydict(), self.pad_id)
