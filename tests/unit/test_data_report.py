"""`lorapipe data`: per-source rows, token-length percentiles, truncation, unlabelled rows and the
packing efficiency, from the first N rows of each source."""
from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from pipelines.data.report import length_stats, padded_efficiency


def enc(n: int, labelled_from: int = 0, max_len: int = 8) -> tuple[int, bool]:
    """A row's summary: n tokens, labelled from `labelled_from` on (is any label left after max_len?)."""
    return n, labelled_from < min(n, max_len)


def test_length_stats_on_known_lengths():
    # Lengths 1..100: p50 50.5 -> 50 (int), p95 95.05 -> 95; 20 rows longer than 80 are cut.
    rows = [enc(n, max_len=80) for n in range(1, 101)]
    s = length_stats(rows, max_len=80, micro_batch=4)
    assert (s["tokens_p50"], s["tokens_p95"], s["tokens_max"]) == (50, 95, 100)
    assert s["truncated_share"] == pytest.approx(0.2)
    assert s["no_trainable_tokens"] == 0


def test_rows_whose_labels_all_fall_past_max_seq_len_have_no_trainable_tokens(tiny_tokenizer):
    from pipelines.config.schema import DataSection
    from pipelines.data.report import row_summaries

    data = DataSection(path="x.jsonl", max_seq_len=24)
    rows = [{"instruction": "Repeat the word.", "input": "a", "output": "a"},
            {"instruction": "Repeat the word.", "input": " ".join("b" * 30), "output": "b"}]  # prompt > 24 tokens
    (short, short_ok), (long, long_ok) = row_summaries(rows, data.sources()[0], data, tiny_tokenizer)
    assert short < 24 < 30 < long and short_ok and not long_ok
    assert length_stats([(short, short_ok), (long, long_ok)], 24, 2)["no_trainable_tokens"] == 1


def test_packing_efficiency_of_a_perfect_fit_is_one_and_padding_is_worse():
    rows = [enc(n, max_len=10) for n in (6, 4, 7, 3, 5, 5)]
    s = length_stats(rows, max_len=10, micro_batch=2)
    assert s["packing_efficiency"] == 1.0
    assert s["padded_efficiency"] < 1.0
    # Padded batches of equal lengths waste nothing.
    assert padded_efficiency([5, 5, 5, 5], micro_batch=2, seed=0) == 1.0


def test_data_command_reports_each_source(builtin_tiny_llama_dir, tmp_path, capsys):
    rows = [{"instruction": "Repeat the word.", "input": "a", "output": " ".join("a" * (1 + i % 30))} for i in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.txt").write_text("".join(f"{' '.join('b' * (1 + i % 5))}\n" for i in range(50)))
    mixture = f"data.datasets=[{{path: {tmp_path / 'a.jsonl'}, weight: 3}}, {{path: {tmp_path / 'c.txt'}, format: text}}]"
    argv = ["data", "configs/tiny-cpu.yaml", f"model.path={builtin_tiny_llama_dir}", "data.path=null", "data.task=null",
            mixture, "data.max_seq_len=32", "--sample", "100", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    a, c = report["sources"]
    assert (a["rows"], a["sampled"], a["weight"], c["rows"], c["sampled"]) == (300, 100, 3.0, 50, 50)
    assert a["tokens_max"] > 32 and 0 < a["truncated_share"] < 1  # the long outputs are cut at 32
    assert c["tokens_max"] == 6 and c["truncated_share"] == 0  # 5 letters + eos
    assert 0 < a["packing_efficiency"] <= 1 and c["no_trainable_tokens"] == 0
    assert main(argv[:-1]) == 0  # the table form
    table = capsys.readouterr().out
    assert "a.jsonl" in table and "c.txt" in table and "truncated" in table
