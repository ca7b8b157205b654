"""Packing: whole examples placed into blocks of `max_seq_len` tokens by best-fit decreasing, each
block remembering its examples' lengths so that a batch carries per-example `position_ids`
(restarting at 0). transformers builds its attention mask from those position ids when no
attention_mask is given (masking_utils.find_packed_sequence_indices: block-diagonal causal masks
for SDPA/eager, cu_seqlens for flash-attention varlen kernels), so no token attends across an
example boundary. The first token of every example carries no label, so no example's first
token is predicted from the previous example's last one (unpacked, it is never predicted either).
"""
from __future__ import annotations

import bisect

from pipelines.data.render import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], block: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of capacity `block`: longest first, each into the
    fullest bin it still fits (a new bin when none). Deterministic; ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = min(lengths[i], block)
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = block - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def packed_block(ids: list[list[int]], labels: list[list[int]]) -> dict:
    """One block from whole examples: concatenated ids, labels without each example's first
    token, and the examples' lengths (from which position ids restart)."""
    block_labels = []
    for lab in labels:
        block_labels += [IGNORE_INDEX] + list(lab[1:])
    return {"input_ids": [t for seq in ids for t in seq], "labels": block_labels,
            "lengths": [len(seq) for seq in ids]}


def example_lengths(ds) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(ds.flatten_indices().data.column("input_ids")).to_pylist()


def pack_dataset(ds, block: int):
    """`ds` (input_ids, labels; each at most `block` long) as packed blocks."""
    from datasets import Dataset

    ds = ds.flatten_indices()
    bins = best_fit_decreasing(example_lengths(ds), block)

    def build(batch):
        out = {"input_ids": [], "labels": [], "lengths": []}
        for members in batch["members"]:
            rows = ds[members]
            for key, value in packed_block(rows["input_ids"], rows["labels"]).items():
                out[key].append(value)
        return out

    return Dataset.from_dict({"members": bins}).map(build, batched=True, batch_size=256, remove_columns=["members"],
                                                    desc="pack", load_from_cache_file=False)


def pack_rows(ids: list[list[int]], labels: list[list[int]], block: int) -> dict:
    """Packed blocks of in-memory examples (the streaming path packs each Ray Data batch so)."""
    out = {"input_ids": [], "labels": [], "lengths": []}
    for members in best_fit_decreasing([len(x) for x in ids], block):
        for key, value in packed_block([ids[i] for i in members], [labels[i] for i in members]).items():
            out[key].append(value)
    return out


def position_ids_of(lengths: list[int], width: int) -> list[int]:
    """Positions restarting at 0 for every example, the padding tail counting as one more
    sequence (so it attends only to itself)."""
    pos = [p for n in lengths for p in range(n)]
    return pos + list(range(width - len(pos)))


def packing_efficiency(lengths: list[int], block: int, n_blocks: int) -> float:
    """Share of the block slots that hold real tokens."""
    return sum(lengths) / max(n_blocks * block, 1)
