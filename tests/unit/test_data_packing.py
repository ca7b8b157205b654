"""Packing: whole examples placed by best-fit decreasing, and the isolation invariant: inside a
packed block every example's logits and loss equal its unpacked logits and loss (fp32, a tiny
Llama built from config), with SDPA and eager attention. Eval is never packed."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pipelines.config.schema import DataSection
from pipelines.data.batches import MicroBatches, collate
from pipelines.data.pack import best_fit_decreasing, pack_rows
from pipelines.data.prepare import prepare_data
from pipelines.data.render import IGNORE_INDEX


def test_best_fit_decreasing_places_every_example_whole_once():
    rng = random.Random(0)
    lengths = [min(64, int(rng.lognormvariate(2.5, 0.8)) + 1) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 64)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # Near the lower bound: at most one bin more than ceil(total / block) + a few for the long tail.
    lower = -(-sum(lengths) // 64)
    assert len(bins) <= lower * 1.05 + 1


def test_best_fit_decreasing_finds_the_perfect_packing():
    # 6 + 4, 7 + 3, 5 + 5: three full blocks of 10 (first-fit in input order would need four).
    assert sorted(sorted(b) for b in best_fit_decreasing([6, 7, 5, 5, 3, 4], 10)) == [[0, 5], [1, 4], [2, 3]]


def test_an_example_longer_than_a_block_fills_one_alone():
    assert best_fit_decreasing([30, 3, 3], 10) == [[0], [1, 2]]


@pytest.fixture(scope="module")
def fp32_llama(small_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(small_llama_dir), dtype=torch.float32)
    return model.eval()


def examples(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of random lengths; labels mask a random prompt prefix, like response-only data."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = rng.randint(3, 40)
        seq = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 2)
        ids.append(seq)
        labels.append([IGNORE_INDEX] * prompt + seq[prompt:])
    return ids, labels


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of predicting labels[t + 1] from logits[t] (0 where ignored)."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_never_see_each_other(fp32_llama, tiny_tokenizer, attn):
    model = fp32_llama
    model.config._attn_implementation = attn
    ids, labels = examples(24, len(tiny_tokenizer), seed=1)
    blocks = pack_rows(ids, labels, block=64)
    assert max(len(b) for b in blocks["lengths"]) >= 2  # blocks really hold several examples
    batch = collate(blocks, pad_id=tiny_tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch).logits
        packed_loss = model(**batch).loss
    by_content = {tuple(x): (x, lab) for x, lab in zip(ids, labels)}
    loss_sum, count = 0.0, 0
    for row, lengths in enumerate(blocks["lengths"]):
        start = 0
        for n in lengths:
            seq, lab = by_content[tuple(blocks["input_ids"][row][start:start + n])]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([seq]), labels=torch.tensor([lab]))
            torch.testing.assert_close(packed[row, start:start + n], alone.logits[0], rtol=1e-5, atol=1e-5)
            inside = token_losses(packed[row, start:start + n + 1], batch["labels"][row, start:start + n + 1])
            n_labelled = sum(t != IGNORE_INDEX for t in lab[1:])
            torch.testing.assert_close(inside.sum() / n_labelled, alone.loss, rtol=1e-5, atol=1e-6)
            loss_sum, count = loss_sum + alone.loss.item() * n_labelled, count + n_labelled
            start += n
    # The block's loss is the token-weighted mean of the examples' own losses: nothing else is trained.
    assert packed_loss.item() == pytest.approx(loss_sum / count, rel=1e-5)


def test_no_label_crosses_an_example_boundary(tiny_tokenizer):
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    blocks = pack_rows(ids, [list(x) for x in ids], block=16)  # text format: every token labelled
    assert blocks["lengths"] == [[4, 3, 2]]
    labels = blocks["labels"][0]
    # The first token of each example is never a target (it would be predicted from the previous one).
    assert labels == [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    batch = collate(blocks, pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]


def test_padding_tail_is_its_own_sequence_and_not_counted():
    blocks = pack_rows([[5, 6, 7], [8, 9], [4] * 6], [[5, 6, 7], [8, 9], [4] * 6], block=6)
    batch = collate(blocks, pad_id=0)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["labels"][1, -1].item() == IGNORE_INDEX
    assert (batch.real_tokens, batch.slots) == (11, 12)


def lognormal_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice("abcdefgh") for _ in range(min(200, int(rng.lognormvariate(2.0, 0.9)) + 1))),
             "id": i} for i in range(n)]


def test_prepared_packing_keeps_every_training_example_and_never_packs_eval(tiny_tokenizer, write_jsonl):
    path = write_jsonl(lognormal_rows(300, seed=2))
    plain = prepare_data(DataSection(path=str(path), format="text", max_seq_len=48), tiny_tokenizer, seed=4)
    packed = prepare_data(DataSection(path=str(path), format="text", max_seq_len=48, packing=True), tiny_tokenizer, 4)
    assert packed.eval["input_ids"] == plain.eval["input_ids"] and "lengths" not in packed.eval.column_names
    examples_in_blocks = []
    for ids, lengths in zip(packed.train["input_ids"], packed.train["lengths"]):
        assert len(ids) == sum(lengths) <= 48
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        examples_in_blocks += [tuple(ids[s:s + n]) for s, n in zip(starts, lengths)]
    assert sorted(examples_in_blocks) == sorted(tuple(x) for x in plain.train["input_ids"])
    stats = packed.stats
    assert stats["packed_blocks"] == len(packed.train) < len(plain.train) / 2
    assert 0.9 < stats["packing_efficiency"] <= 1.0
    # Micro batches of blocks carry nearly no padding; padded ones of the same examples carry a lot.
    packed_mb, plain_mb = MicroBatches(packed.train, 4, 0, 0)[0], MicroBatches(plain.train, 4, 0, 0)[0]
    assert packed_mb.real_tokens / packed_mb.slots > 0.85 > plain_mb.real_tokens / plain_mb.slots


def test_shipped_packed_data_round_trips(tiny_tokenizer, write_jsonl):
    import pickle

    from pipelines.data.prepare import shippable

    path = write_jsonl([json.dumps(r) for r in lognormal_rows(60, seed=3)])
    prepared = prepare_data(DataSection(path=str(path), format="text", max_seq_len=48, packing=True), tiny_tokenizer, 0)
    received = pickle.loads(pickle.dumps(shippable(prepared)))
    assert received.train["lengths"] == prepared.train["lengths"]
    assert received.train["labels"] == prepared.train["labels"]
