"""pipelines/data: response-only labels (alpaca, chat), text, truncation, packing, a seeded
split, worker shards, position-addressable micro batches, rank-equal eval batches, and one-line
errors for bad files and rows. The word tokenizer makes token counts easy to reason about: texts here
are space-separated single letters, digits and punctuation marks (one token each) plus the template
and instruction words in its vocabulary, so a text's expected tokens are its whitespace-split words."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.config.schema import DataSection
from pipelines.core.errors import UserError
from pipelines.data.prepare import (
    IGNORE_INDEX,
    MicroBatches,
    eval_batches,
    load_raw_dataset,
    prepare_data,
    shard,
    shippable,
    tokenize_dataset,
)
from pipelines.data.prompts import alpaca_prompt


def cfg(path, **kw) -> DataSection:
    return DataSection(path=str(path), **kw)


def labelled(labels) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


def label_runs(labels) -> list[list[int]]:
    """Maximal runs of consecutive labelled tokens."""
    runs, current = [], []
    for t in labels:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def tokens(tok, ids) -> list[str]:
    """The token strings of `ids`; none may be <unk> (every test text is in the vocabulary)."""
    out = tok.convert_ids_to_tokens(list(ids))
    assert tok.unk_token not in out, out
    return out


def words(text: str) -> list[str]:
    """The expected tokens of a text written as space-separated single-token words."""
    return text.split()


def alpaca_rows(n: int, *, start: int = 0) -> list[dict]:
    """Distinct rows (so that shards and splits can be compared by content)."""
    rows = []
    for i in range(start, start + n):
        letters = ["abcdefghij"[int(c)] for c in str(i)]
        rows.append({"instruction": "Repeat the word.", "input": " ".join(letters),
                     "output": " ".join(letters * (1 + i % 3))})
    return rows


def ids_of(ds) -> list[tuple[int, ...]]:
    return [tuple(r) for r in ds["input_ids"]]


# --------------------------------------------------------------------------- alpaca
def test_alpaca_labels_only_the_response(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    rows = [
        {"instruction": "Reverse the word.", "input": "a b c", "output": "c b a"},
        {"instruction": "Give the first letter.", "output": "h i , t h e r e !"},  # no input: the shorter template
        {"instruction": "Sort the letters.", "input": "", "output": "0"},
    ]
    path = write_jsonl(rows)
    ds = tokenize_dataset(load_raw_dataset(cfg(path)), cfg(path), tok)
    assert len(ds) == 3
    for row, enc in zip(rows, ds):
        prompt = alpaca_prompt(row["instruction"], row.get("input", ""))
        n_prompt = n_tokens(tok, prompt)
        ids, labels = enc["input_ids"], enc["labels"]
        assert len(ids) == len(labels) == n_prompt + len(words(row["output"])) + 1
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokens(tok, labelled(labels)) == words(row["output"]) + [tok.eos_token]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert tokens(tok, ids) == tokens(tok, prompt_ids) + words(row["output"]) + [tok.eos_token]
        assert ids[-1] == tok.eos_token_id


def test_alpaca_train_on_prompt_labels_everything(tiny_tokenizer, write_jsonl):
    path = write_jsonl(alpaca_rows(3))
    data = cfg(path, train_on_prompt=True)
    ds = tokenize_dataset(load_raw_dataset(data), data, tiny_tokenizer)
    for enc in ds:
        assert enc["labels"] == enc["input_ids"]
        assert IGNORE_INDEX not in enc["labels"]


# --------------------------------------------------------------------------- chat
CHAT_ROW = {"messages": [
    {"role": "system", "content": "B e b r i e f ."},
    {"role": "user", "content": "h i"},
    {"role": "assistant", "content": "y o"},
    {"role": "user", "content": "a g a i n , p l e a s e"},
    {"role": "assistant", "content": "o k t h e n"},
]}


def test_chat_labels_only_assistant_turns(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    single = {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "c b a"}]}
    path = write_jsonl([CHAT_ROW, single])
    data = cfg(path, format="chat")
    ds = tokenize_dataset(load_raw_dataset(data), data, tok)
    for row, enc in zip([CHAT_ROW, single], ds):
        assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        runs = label_runs(enc["labels"])
        assert [tokens(tok, r) for r in runs] == [words(c) + [tok.eos_token] for c in assistant]
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tokens(tok, enc["input_ids"]) == tokens(tok, tok(rendered, add_special_tokens=False)["input_ids"])
        # Everything else (system, user, role markers) is masked.
        n_labelled = sum(len(words(c)) + 1 for c in assistant)
        assert len(labelled(enc["labels"])) == n_labelled
        assert enc["labels"].count(IGNORE_INDEX) == len(enc["input_ids"]) - n_labelled


def test_chat_train_on_prompt_labels_everything(tiny_tokenizer, write_jsonl):
    path = write_jsonl([CHAT_ROW])
    data = cfg(path, format="chat", train_on_prompt=True)
    enc = tokenize_dataset(load_raw_dataset(data), data, tiny_tokenizer)[0]
    assert enc["labels"] == enc["input_ids"]


def test_chat_bad_role_names_the_row_and_the_allowed_roles(tiny_tokenizer, write_jsonl):
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl([CHAT_ROW, CHAT_ROW, bad, CHAT_ROW])
    data = cfg(path, format="chat")
    with pytest.raises(UserError) as exc:
        tokenize_dataset(load_raw_dataset(data), data, tiny_tokenizer)
    msg = str(exc.value)
    assert "row 3" in msg and "'human'" in msg and "system, user, assistant" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("row, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
    ({"messages": []}, "'messages'"),
    ({"messages": "hi"}, "'messages'"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "string content"),
])
def test_chat_malformed_rows_name_the_row(tiny_tokenizer, write_jsonl, row, words):
    path = write_jsonl([CHAT_ROW, row])
    data = cfg(path, format="chat")
    with pytest.raises(UserError) as exc:
        tokenize_dataset(load_raw_dataset(data), data, tiny_tokenizer)
    assert "row 2" in str(exc.value) and words in str(exc.value)


def test_chat_needs_a_chat_template(write_jsonl):
    from lora.tiny import train_word_tokenizer
    from pipelines.data.builtin import tokenizer_corpus

    tok = train_word_tokenizer(tokenizer_corpus())
    tok.chat_template = None
    path = write_jsonl([CHAT_ROW, CHAT_ROW])
    with pytest.raises(UserError, match="chat template"):
        prepare_data(cfg(path, format="chat"), tok, seed=0)


# --------------------------------------------------------------------------- text
def test_text_format_labels_every_token(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    rows = [{"body": "T h e q u i c k b r o w n f o x ."}, {"body": "j u m p s o v e r"}]
    path = write_jsonl(rows)
    data = cfg(path, format="text", text_field="body")
    ds = tokenize_dataset(load_raw_dataset(data), data, tok)
    for row, enc in zip(rows, ds):
        assert enc["labels"] == enc["input_ids"]
        assert tokens(tok, enc["input_ids"]) == words(row["body"]) + [tok.eos_token]


def test_text_format_missing_field_names_the_row(tiny_tokenizer, write_jsonl):
    path = write_jsonl([{"text": "a b"}, {"text": "c"}, {"body": "x"}])
    data = cfg(path, format="text")
    with pytest.raises(UserError) as exc:
        tokenize_dataset(load_raw_dataset(data), data, tiny_tokenizer)
    assert "row 3" in str(exc.value) and "'text'" in str(exc.value)


# --------------------------------------------------------------------------- truncation
def test_truncation_counts_rows_and_drops_rows_without_labels(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    prompt = alpaca_prompt("Repeat the word.", "a b c")
    max_len = n_tokens(tok, prompt) + 3
    fits = {"instruction": "Repeat the word.", "input": "a b c", "output": "a b"}                # exactly max_len
    cut = {"instruction": "Repeat the word.", "input": "a b c", "output": "a b c d e f g h"}     # keeps 'a b c'
    no_label = {"instruction": "Repeat the word, the first letter, the last letter.", "input": "a b c",
                "output": "a b c"}                                                              # prompt > max
    assert n_tokens(tok, alpaca_prompt(no_label["instruction"], no_label["input"])) > max_len
    rows = [fits] * 4 + [cut] * 4 + [no_label] * 2
    path = write_jsonl(rows)
    prepared = prepare_data(cfg(path, max_seq_len=max_len, eval_fraction=0.25), tok, seed=0)
    assert prepared.stats == {"rows": 10, "rows_kept": 8, "rows_truncated": 6, "rows_dropped_no_labels": 2,
                              "train_examples": 6, "eval_examples": 2}
    kept = list(prepared.train) + list(prepared.eval)
    assert all(len(r["input_ids"]) == max_len for r in kept)
    kept_labels = sorted(tokens(tok, labelled(r["labels"])) for r in kept)
    assert kept_labels == sorted([["a", "b", tok.eos_token]] * 4 + [["a", "b", "c"]] * 4)


def test_everything_truncated_away_is_a_user_error(tiny_tokenizer, write_jsonl):
    path = write_jsonl(alpaca_rows(5))
    with pytest.raises(UserError, match="0 usable rows.*max_seq_len=8"):
        prepare_data(cfg(path, max_seq_len=8), tiny_tokenizer, seed=0)


# --------------------------------------------------------------------------- packing
def test_packing_places_whole_examples_and_leaves_eval_unpacked(tiny_tokenizer, write_jsonl):
    path = write_jsonl(alpaca_rows(60))
    plain = prepare_data(cfg(path, max_seq_len=96, eval_fraction=0.2), tiny_tokenizer, seed=3)
    packed = prepare_data(cfg(path, max_seq_len=96, eval_fraction=0.2, packing=True), tiny_tokenizer, seed=3)
    assert ids_of(packed.eval) == ids_of(plain.eval)  # eval is never packed
    flat = sorted(t for r in plain.train["input_ids"] for t in r)
    assert sorted(t for r in packed.train["input_ids"] for t in r) == flat  # every token, once
    assert all(sum(n) == len(ids) <= 96 for ids, n in zip(packed.train["input_ids"], packed.train["lengths"]))
    assert len(packed.train) < len(plain.train)
    # Prompt masks survive; each example's first token is unlabelled (pack.py); nothing else changes.
    assert sum(labelled_count(r) for r in packed.train["labels"]) == sum(labelled_count(r) for r in plain.train["labels"])
    assert packed.stats["train_examples"] == len(packed.train)


def labelled_count(labels) -> int:
    return sum(t != IGNORE_INDEX for t in labels)


# --------------------------------------------------------------------------- split + shards
def test_split_is_seeded_and_partitions_the_rows(tiny_tokenizer, write_jsonl):
    path = write_jsonl(alpaca_rows(40))
    data = cfg(path, max_seq_len=128, eval_fraction=0.25)
    a, b, c = (prepare_data(data, tiny_tokenizer, seed=s) for s in (7, 7, 8))
    assert ids_of(a.train) == ids_of(b.train) and ids_of(a.eval) == ids_of(b.eval)
    assert set(ids_of(a.eval)) != set(ids_of(c.eval))
    for p in (a, c):
        train, evl = ids_of(p.train), ids_of(p.eval)
        assert len(evl) == 10 and len(train) == 30
        assert not set(train) & set(evl)
        assert len(set(train) | set(evl)) == 40


@pytest.mark.parametrize("n_rows", [30, 31])
def test_worker_shards_are_disjoint_and_cover_the_train_set(tiny_tokenizer, write_jsonl, n_rows):
    path = write_jsonl(alpaca_rows(n_rows))
    prepared = prepare_data(cfg(path, max_seq_len=128, eval_fraction=0.1), tiny_tokenizer, seed=0)
    train = ids_of(prepared.train)
    shards = [ids_of(shard(prepared.train, 2, rank)) for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(train)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    # The same call on another "worker" gives the same shard.
    assert ids_of(shard(prepared.train, 2, 1)) == shards[1]


def test_fingerprint_is_the_file_hash(tiny_tokenizer, write_jsonl):
    import hashlib

    path = write_jsonl(alpaca_rows(6))
    prepared = prepare_data(cfg(path, max_seq_len=128, eval_fraction=0.3), tiny_tokenizer, seed=0)
    assert prepared.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_max_examples_caps_the_rows(tiny_tokenizer, write_jsonl):
    path = write_jsonl(alpaca_rows(20))
    prepared = prepare_data(cfg(path, max_seq_len=128, max_examples=8, eval_fraction=0.25), tiny_tokenizer, seed=0)
    assert prepared.stats["rows"] == 8 and prepared.stats["train_examples"] + prepared.stats["eval_examples"] == 8


# --------------------------------------------------------------------------- shipping to workers
@pytest.mark.parametrize("packing", [False, True])
def test_shipped_data_pickles_whole_and_equals_what_a_worker_would_prepare(tiny_tokenizer, write_jsonl, packing):
    """What travels through Ray's object store must carry the rows themselves (as prepared, the
    splits are memory-mapped cache files: they pickle as paths that another node lacks)."""
    import pickle

    path = write_jsonl(alpaca_rows(60))
    data = cfg(path, max_seq_len=48, eval_fraction=0.2, packing=packing)
    prepared = prepare_data(data, tiny_tokenizer, seed=5)
    shipped = shippable(prepared)
    assert shipped is not None and shipped.pad_id == tiny_tokenizer.pad_token_id
    blob = pickle.dumps(shipped)
    tokens = sum(len(r) for split in (prepared.train, prepared.eval) for r in split["input_ids"])
    assert len(blob) > 2 * 4 * tokens  # input_ids and labels, 4+ bytes a token: the data, not a path
    received = pickle.loads(blob)
    again = prepare_data(data, tiny_tokenizer, seed=5)  # what each worker computed before
    for split in ("train", "eval"):
        assert getattr(received, split)["input_ids"] == getattr(again, split)["input_ids"]
        assert getattr(received, split)["labels"] == getattr(again, split)["labels"]
    assert ids_of(shard(received.train, 2, 1)) == ids_of(shard(again.train, 2, 1))
    assert (received.stats, received.fingerprint) == (prepared.stats, prepared.fingerprint)


def test_data_over_the_ship_limit_stays_with_the_workers(tiny_tokenizer, write_jsonl):
    prepared = prepare_data(cfg(write_jsonl(alpaca_rows(20)), max_seq_len=48, eval_fraction=0.2), tiny_tokenizer, 0)
    assert shippable(prepared, limit=100) is None


# --------------------------------------------------------------------------- micro batches
@pytest.fixture
def ragged_ds():
    from datasets import Dataset

    ids = [[10 + i] * (1 + i % 4) for i in range(11)]  # lengths 1..4, first token = row id + 10
    return Dataset.from_dict({"input_ids": ids, "labels": [[t + 100 for t in r] for r in ids]})


def batch_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_are_padded_and_masked(ragged_ds):
    mb = MicroBatches(ragged_ds, batch_size=3, seed=0, pad_id=0)
    batch = mb[0]
    rows = [ragged_ds[i] for i in mb.indices(0)]
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["labels"][i, :n].tolist() == r["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [0] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)


def test_micro_batches_are_deterministic_per_position(ragged_ds):
    first = MicroBatches(ragged_ds, batch_size=3, seed=5, pad_id=0)
    positions = list(range(10))
    batches = [first[p] for p in positions]
    # A resumed run builds a fresh stream and asks for position 7 first: same batch.
    resumed = MicroBatches(ragged_ds, batch_size=3, seed=5, pad_id=0)
    assert batch_equal(resumed[7], batches[7])
    for p in reversed(positions):
        assert batch_equal(resumed[p], batches[p])
        assert resumed.indices(p) == first.indices(p)
    other_seed = MicroBatches(ragged_ds, batch_size=3, seed=6, pad_id=0)
    assert [other_seed.indices(p) for p in range(3)] != [first.indices(p) for p in range(3)]


def test_micro_batches_cover_an_epoch_and_reshuffle_per_epoch(ragged_ds):
    mb = MicroBatches(ragged_ds, batch_size=3, seed=0, pad_id=0)
    assert mb.per_epoch == 3  # 11 // 3: the ragged tail is dropped, every batch is full
    epochs = [[i for p in range(e * 3, e * 3 + 3) for i in mb.indices(p)] for e in range(4)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 9  # no example twice within an epoch
        assert all(0 <= i < 11 for i in epoch)
    assert len({tuple(e) for e in epochs}) == 4  # every epoch in a new order


def test_micro_batches_refuse_a_shard_smaller_than_a_batch(ragged_ds):
    with pytest.raises(UserError, match="micro_batch_size=12"):
        MicroBatches(ragged_ds, batch_size=12, seed=0, pad_id=0)


# --------------------------------------------------------------------------- eval batches
@pytest.mark.parametrize("total, world, batch, limit, expected_count, rows_used", [
    (7, 2, 2, 8, 2, 3),   # shards of 4 and 3: both ranks use the first 3 rows
    (7, 2, 2, 1, 1, 2),   # limit wins
    (10, 3, 4, 8, 1, 3),  # shards 4, 3, 3
    (9, 2, 1, 8, 4, 4),   # shards 5, 4
])
def test_eval_batches_have_the_same_count_on_every_rank(ragged_ds, total, world, batch, limit, expected_count,
                                                        rows_used):
    evl = ragged_ds.select(range(total))
    shards = [shard(evl, world, rank) for rank in range(world)]
    assert len({len(s) for s in shards}) > 1  # the shards really are unequal
    per_rank = [eval_batches(s, batch, limit, total, world, pad_id=0) for s in shards]
    assert [len(b) for b in per_rank] == [expected_count] * world
    for s, batches in zip(shards, per_rank):
        used = [row for b in batches for row in b["input_ids"][:, 0].tolist()]
        assert used == [r[0] for r in s["input_ids"][:rows_used]]


def test_eval_batches_need_an_example_per_rank(ragged_ds):
    with pytest.raises(UserError, match="cannot be shared by 4 workers"):
        eval_batches(ragged_ds.select(range(3)), 1, 8, 3, 4, pad_id=0)


# --------------------------------------------------------------------------- bad files and rows
def test_malformed_jsonl_reports_the_line_number(tiny_tokenizer, write_jsonl):
    rows = alpaca_rows(2)
    path = write_jsonl([json.dumps(rows[0]), "", json.dumps(rows[1]), '{"instruction": "x", "output": ', "{}"])
    with pytest.raises(UserError) as exc:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    msg = str(exc.value)
    assert "line 4" in msg and str(path) in msg and "\n" not in msg


def test_missing_required_field_reports_the_row(tiny_tokenizer, write_jsonl):
    rows = alpaca_rows(5)
    del rows[2]["output"]
    path = write_jsonl(rows)
    with pytest.raises(UserError) as exc:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert "row 3" in str(exc.value) and "'output'" in str(exc.value)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_dataset_is_a_user_error(tiny_tokenizer, tmp_path, name, content):
    path = tmp_path / name.replace("empty", "rows")
    path.write_text(content)
    with pytest.raises(UserError) as exc:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    # Say what is wrong ("empty"), not what a library tripped over (e.g. "StopIteration").
    msg = str(exc.value).replace(str(path), "<path>")
    assert "empty" in msg, msg


def test_missing_file_is_a_user_error(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="not found"):
        prepare_data(cfg(tmp_path / "nope.jsonl"), tiny_tokenizer, seed=0)


def test_unsupported_suffix_is_a_user_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(UserError) as exc:
        prepare_data(cfg(path), tiny_tokenizer, seed=0)
    assert "'.csv'" in str(exc.value) and ".jsonl" in str(exc.value) and ".parquet" in str(exc.value)


def test_json_and_parquet_files_load_like_jsonl(tiny_tokenizer, tmp_path, write_jsonl):
    import pandas as pd

    rows = alpaca_rows(12)
    jsonl = write_jsonl(rows)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows))
    as_parquet = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(as_parquet)
    results = [prepare_data(cfg(p, max_seq_len=128, eval_fraction=0.25), tiny_tokenizer, seed=1)
               for p in (jsonl, as_json, as_parquet)]
    assert ids_of(results[0].train) == ids_of(results[1].train) == ids_of(results[2].train)


def test_demo_tasks_materialise_under_lorapipe_home(lorapipe_home, tiny_tokenizer):
    from pipelines.data.builtin import ADAPTER_TASKS, materialize_demo_tasks

    path = materialize_demo_tasks("reverse", n=40, seed=0)
    assert path.is_file() and lorapipe_home in path.parents
    prepared = prepare_data(cfg(path, max_seq_len=96, eval_fraction=0.25), tiny_tokenizer, seed=0)
    assert prepared.stats["rows"] == 40 and prepared.stats["rows_kept"] == 40
    row = json.loads(path.read_text().splitlines()[0])
    assert row["task"] in ADAPTER_TASKS and row["output"] == row["input"][::-1]
