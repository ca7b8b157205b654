"""Mixtures: data.datasets of weighted sources in different formats, a seeded reproducible mix in
the weights' proportions, one fingerprint per source, and the validation of weights and sources."""
from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from pipelines.config.schema import DataSection
from pipelines.core.errors import UserError
from pipelines.data.prepare import prepare_data


def alpaca(n: int) -> list[dict]:
    return [{"instruction": "Repeat the word.", "input": "a", "output": "a " * (1 + i % 3)} for i in range(n)]


def texts(n: int) -> list[dict]:
    return [{"body": "b " * (1 + i % 4)} for i in range(n)]


def sharegpt(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": "h i"}, {"from": "gpt", "value": "c " * (1 + i % 2)}]}
            for i in range(n)]


@pytest.fixture
def three_sources(write_jsonl):
    return [write_jsonl(alpaca(2200), "a.jsonl"), write_jsonl(texts(2200), "t.jsonl"),
            write_jsonl(sharegpt(2200), "s.jsonl")]


def mixture(paths, weights, **kw) -> DataSection:
    fmts = [("alpaca", {}), ("text", {"text": "body"}), ("sharegpt", {})]
    return DataSection(datasets=[{"path": str(p), "format": f, "columns": c, "weight": w}
                                 for p, (f, c), w in zip(paths, fmts, weights)], max_seq_len=64, **kw)


def first_tokens(tok, prepared) -> list[str]:
    """Which source each row came from, read off its first token (alpaca: '###', text: 'b', chat: '<' of '<|user|>')."""
    rows = list(prepared.train["input_ids"]) + list(prepared.eval["input_ids"])
    return [tok.convert_ids_to_tokens(r[0]) for r in rows]


def test_mixture_follows_the_weights_and_is_reproducible(tiny_tokenizer, three_sources):
    data = mixture(three_sources, [5, 3, 2], max_examples=4000)
    a, b = prepare_data(data, tiny_tokenizer, seed=11), prepare_data(data, tiny_tokenizer, seed=11)
    assert a.train["input_ids"] == b.train["input_ids"]
    firsts = first_tokens(tiny_tokenizer, a)
    assert len(firsts) == 4000
    shares = {t: firsts.count(t) / len(firsts) for t in set(firsts)}
    # 4000 draws: a share's standard error is under 0.008; 0.03 is ~4 sigma.
    assert shares["#"] == pytest.approx(0.5, abs=0.03)
    assert shares["b"] == pytest.approx(0.3, abs=0.03)
    assert shares["<"] == pytest.approx(0.2, abs=0.03)
    used = [s["rows_used"] for s in a.stats["sources"]]
    assert sum(used) == 4000 and used == [firsts.count(t) for t in ("#", "b", "<")]
    other = prepare_data(data, tiny_tokenizer, seed=12)
    assert other.train["input_ids"] != a.train["input_ids"]


def test_one_fingerprint_per_source(tiny_tokenizer, three_sources):
    prepared = prepare_data(mixture(three_sources, [1, 1, 1], max_examples=50), tiny_tokenizer, seed=0)
    assert prepared.fingerprints == {str(p): "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
                                     for p in three_sources}
    assert all(f"{p}=sha256:" in prepared.fingerprint for p in three_sources)


def test_an_empty_source_is_an_error(tiny_tokenizer, write_jsonl, three_sources):
    empty = write_jsonl([], "empty.jsonl")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        prepare_data(mixture([three_sources[0], empty], [1, 1]), tiny_tokenizer, seed=0)


@pytest.mark.parametrize("weight", [0, -1.5])
def test_weights_must_be_positive(weight):
    with pytest.raises(ValidationError, match="greater than 0"):
        DataSection(datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": weight}])


@pytest.mark.parametrize("kw, needle", [
    ({}, "either data.path"),
    ({"path": "a.jsonl", "datasets": [{"path": "b.jsonl"}]}, "either data.path"),
    ({"datasets": []}, "data.datasets is empty"),
    ({"datasets": [{"path": "a.jsonl"}, {"path": "b.jsonl"}], "engine": "ray"}, "mixture is prepared with"),
    ({"path": "a.json", "engine": "ray"}, ".jsonl, .parquet, .txt"),
])
def test_data_section_rules(kw, needle):
    with pytest.raises(ValidationError, match=needle):
        DataSection(**kw)


def test_single_path_is_the_one_source_case():
    data = DataSection(path="x.jsonl", format="text", text_field="body")
    [source] = data.sources()
    assert (source.path, source.format, source.weight, source.columns) == ("x.jsonl", "text", 1.0, {"text": "body"})
