"""Formats: sharegpt (role and column mapping), multi-turn response-only labels for chat and
sharegpt, .txt files by line or paragraph, column mappings, and their one-line errors."""
from __future__ import annotations

import pytest

from pipelines.config.schema import DataSection
from pipelines.core.errors import UserError
from pipelines.data.prepare import prepare_data, tokenize_dataset
from pipelines.data.render import IGNORE_INDEX
from pipelines.data.sources import load_raw_dataset

TURNS = [("system", "B e b r i e f ."), ("human", "h i"), ("gpt", "y o"), ("human", "a g a i n"),
         ("gpt", "o k t h e n"), ("human", "l a s t"), ("gpt", "b y e !")]


def sharegpt_row(turns=TURNS, role_key="from", content_key="value") -> dict:
    return {"conversations": [{role_key: r, content_key: c} for r, c in turns]}


def label_runs(labels) -> list[list[int]]:
    runs, current = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    return runs


def encode(tok, data: DataSection):
    return tokenize_dataset(load_raw_dataset(data, data.text_unit), data, tok)


def assistant_runs(tok, enc) -> list[list[str]]:
    return [tok.convert_ids_to_tokens(r) for r in label_runs(enc["labels"])]


def test_sharegpt_labels_every_assistant_turn_and_nothing_else(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    data = DataSection(path=str(write_jsonl([sharegpt_row()])), format="sharegpt")
    enc = encode(tok, data)[0]
    answers = [c for r, c in TURNS if r == "gpt"]
    assert assistant_runs(tok, enc) == [c.split() + [tok.eos_token] for c in answers]
    # The tokens are exactly the chat template's rendering of the mapped roles.
    messages = [{"role": {"system": "system", "human": "user", "gpt": "assistant"}[r], "content": c} for r, c in TURNS]
    assert enc["input_ids"] == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    n_labelled = sum(len(c.split()) + 1 for c in answers)
    assert sum(t != IGNORE_INDEX for t in enc["labels"]) == n_labelled


def test_chat_multi_turn_labels_only_assistant_turns(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    row = {"messages": [{"role": roles[r], "content": c} for r, c in TURNS]}
    enc = encode(tok, DataSection(path=str(write_jsonl([row])), format="chat"))[0]
    assert assistant_runs(tok, enc) == [c.split() + [tok.eos_token] for r, c in TURNS if r == "gpt"]


def test_sharegpt_role_and_column_mapping(tiny_tokenizer, write_jsonl):
    turns = [("asker", "h i"), ("bot", "y o"), ("asker", "a g a i n"), ("bot", "o k")]
    row = {"dialog": sharegpt_row(turns, role_key="speaker", content_key="text")["conversations"]}
    data = DataSection(path=str(write_jsonl([row])), format="sharegpt", columns={"conversations": "dialog"},
                       sharegpt={"role_key": "speaker", "content_key": "text",
                                 "roles": {"asker": "user", "bot": "assistant"}})
    enc = encode(tiny_tokenizer, data)[0]
    assert assistant_runs(tiny_tokenizer, enc) == [["y", "o", "</s>"], ["o", "k", "</s>"]]


@pytest.mark.parametrize("row, needle", [
    (sharegpt_row([("human", "h i"), ("wizard", "y o")]), "row 2, turn 2: unknown role 'wizard'"),
    ({"conversations": []}, "row 2: sharegpt rows need a non-empty list field 'conversations'"),
    (sharegpt_row([("human", "h i")]), "row 2: conversation has no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "row 2, turn 1: 'value' must be a string"),
])
def test_sharegpt_bad_rows_are_one_line(tiny_tokenizer, write_jsonl, row, needle):
    data = DataSection(path=str(write_jsonl([sharegpt_row(), row])), format="sharegpt")
    with pytest.raises(UserError) as exc:
        encode(tiny_tokenizer, data)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_a_template_that_refuses_broken_alternation_names_the_row(write_jsonl):
    from lora.tiny import train_word_tokenizer
    from pipelines.data.builtin import tokenizer_corpus

    tok = train_word_tokenizer(tokenizer_corpus())
    # Like Llama-2/Mistral templates: user and assistant must alternate.
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'assistant') != (loop.index0 % 2 == 1) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
                         "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    twice = sharegpt_row([("human", "h i"), ("gpt", "y o"), ("gpt", "o k")])
    data = DataSection(path=str(write_jsonl([sharegpt_row(TURNS[1:5]), twice])), format="sharegpt")
    with pytest.raises(UserError) as exc:
        encode(tok, data)
    msg = str(exc.value)
    assert "row 2" in msg and "user/assistant/assistant" in msg and "must alternate" in msg and "\n" not in msg


# --------------------------------------------------------------------------- .txt
def test_txt_one_document_per_line_or_paragraph(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a b c\nd e\n\n\nf g h\n  \ni j\n")
    by_line = encode(tiny_tokenizer, DataSection(path=str(path), format="text"))
    assert [tiny_tokenizer.decode(r["input_ids"][:-1]) for r in by_line] == ["a b c", "d e", "f g h", "i j"]
    by_para = encode(tiny_tokenizer, DataSection(path=str(path), format="text", text_unit="paragraph"))
    assert [tiny_tokenizer.convert_ids_to_tokens(r["input_ids"]) for r in by_para] == [
        ["a", "b", "c", "d", "e", "</s>"], ["f", "g", "h", "</s>"], ["i", "j", "</s>"]]
    assert all(r["labels"] == r["input_ids"] for r in by_para)


def test_txt_not_utf8_names_the_byte_offset(tiny_tokenizer, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok\n".encode("utf-8") + b"na\xefve\n")
    with pytest.raises(UserError, match=r"not UTF-8: byte 11 \(0xef\)"):
        prepare_data(DataSection(path=str(path), format="text"), tiny_tokenizer, 0)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_txt_is_an_error(tiny_tokenizer, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="empty"):
        prepare_data(DataSection(path=str(path), format="text"), tiny_tokenizer, 0)


def test_txt_holds_only_text(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b\n")
    with pytest.raises(UserError, match="format text, not alpaca"):
        prepare_data(DataSection(path=str(path)), tiny_tokenizer, 0)


# --------------------------------------------------------------------------- column mapping
def test_alpaca_column_mapping(tiny_tokenizer, write_jsonl):
    rows = [{"prompt": "Reverse the word.", "input": "a b", "completion": "b a"}] * 2
    data = DataSection(path=str(write_jsonl(rows)), columns={"instruction": "prompt", "output": "completion"})
    enc = encode(tiny_tokenizer, data)[0]
    assert assistant_runs(tiny_tokenizer, enc) == [["b", "a", "</s>"]]


def test_column_mapping_to_a_missing_column_is_an_error(tiny_tokenizer, write_jsonl):
    data = DataSection(path=str(write_jsonl([{"q": "x", "a": "y"}])), columns={"instruction": "prompt"})
    with pytest.raises(UserError) as exc:
        prepare_data(data, tiny_tokenizer, 0)
    assert "no column 'prompt'" in str(exc.value) and "columns: q, a" in str(exc.value)


def test_column_mapping_names_only_fields_of_the_format():
    with pytest.raises(ValueError, match="'prompt' is not a field of format alpaca"):
        DataSection(path="x.jsonl", columns={"prompt": "p"})
