"""Micro batches: padded (attention_mask) or packed (position_ids restarting per example, no
attention_mask, so transformers keeps attention inside each example), addressable by position
so a resumed run continues where it stopped; rank-equal eval batches; worker shards.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.core.errors import UserError
from pipelines.data.pack import position_ids_of
from pipelines.data.render import IGNORE_INDEX


class Batch(dict):
    """Model inputs (call `model(**batch)`), plus how many of its token slots hold real tokens
    and how many there are: the share is the batch's packing efficiency."""

    real_tokens: int = 0
    slots: int = 0


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _padded(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    length = max(len(r) for r in rows["input_ids"])
    n = len(rows["input_ids"])
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        labels[i, : len(lab)] = torch.as_tensor(lab)
    return input_ids, labels, length


def collate(rows, pad_id: int) -> Batch:
    """A batch from rows (a dict of columns). Rows with `lengths` are packed blocks: they get
    per-example position_ids and use_cache=False (a cache would turn transformers' packed-sequence
    masking off) instead of an attention mask."""
    input_ids, labels, width = _padded(rows, pad_id)
    real = [len(r) for r in rows["input_ids"]]
    if "lengths" in rows:
        pos = torch.tensor([position_ids_of(list(n), width) for n in rows["lengths"]], dtype=torch.long)
        batch = Batch(input_ids=input_ids, position_ids=pos, labels=labels, use_cache=False)
    else:
        mask = (torch.arange(width)[None, :] < torch.tensor(real)[:, None]).long()
        batch = Batch(input_ids=input_ids, attention_mask=mask, labels=labels)
    batch.real_tokens, batch.slots = sum(real), input_ids.numel()
    return batch


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

    def __getitem__(self, position: int) -> Batch:
        return collate(self.ds.select(self.indices(position)).to_dict(), self.pad_id)


def shard(ds, world_size: int, rank: int):
    return ds.shard(num_shards=world_size, index=rank, contiguous=True)


def eval_batches(shard_ds, batch_size: int, limit: int, total_eval: int, world_size: int, pad_id: int) -> list[dict]:
    """The first eval batches of this worker's shard. The count is computed from the smallest
    shard, so it is the same on every rank (ZeRO-3 runs collectives inside forward: unequal
    counts would deadlock)."""
    smallest = total_eval // world_size
    if smallest == 0:
        raise UserError(f"{total_eval} eval examples cannot be shared by {world_size} workers; raise data.eval_fraction")
    count = min(limit, -(-smallest // batch_size))
    return [collate(shard_ds.select(range(i * batch_size, min((i + 1) * batch_size, smallest))).to_dict(), pad_id)
            for i in range(count)]
