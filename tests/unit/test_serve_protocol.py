"""The serving stage's pure parts: OpenAI request checks, stream format, public names, per-row text."""
from __future__ import annotations

import json

import pytest

from pipelines.serve import protocol
from pipelines.serve.catalog import public_names
from pipelines.serve.protocol import ApiError, ChatRequest, CompletionRequest


def _error(body: bytes, schema=CompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as e:
        protocol.parse_request(body, schema)
    return e.value


def test_bad_bodies_are_400_naming_the_field():
    assert _error(b'{"model": "a", ').status == 400 and "not valid JSON" in _error(b'{"model": ').message
    assert _error(b'["model"]').message == "request body must be a JSON object"
    missing = _error(b'{"model": "a"}')
    assert (missing.status, missing.param, missing.message) == (400, "prompt", "field 'prompt' is required")
    assert _error(b'{"prompt": "x"}').param == "model"
    assert _error(b'{"model": "a", "prompt": "x", "max_tokens": "5"}').param == "max_tokens"
    assert _error(b'{"model": "a", "prompt": "x", "max_tokens": 2.5}').param == "max_tokens"
    assert _error(b'{"model": "a", "messages": []}', ChatRequest).param == "messages"
    assert _error(b'{"model": "a", "messages": [{"role": "user"}]}', ChatRequest).param == "messages.0.content"


def test_openai_clients_extra_fields_are_accepted():
    req = protocol.parse_request(json.dumps({"model": "a", "prompt": "x", "temperature": 0.7, "user": "u", "n": 1,
                                             "input": "a b"}).encode(), CompletionRequest)
    assert (req.model, req.prompt, req.input, req.max_tokens, req.stream) == ("a", "x", "a b", None, False)


@pytest.mark.parametrize("max_tokens,prompt_tokens,ok", [(None, 10, True), (1, 10, True), (64, 10, True),
                                                         (0, 10, False), (65, 10, False), (60, 200, False)])
def test_max_tokens_range_and_context(max_tokens, prompt_tokens, ok):
    req = CompletionRequest(model="a", prompt="x", max_tokens=max_tokens)
    if ok:
        assert protocol.checked_max_tokens(req, prompt_tokens, limit=64, context=256) == (max_tokens or 16)
    else:
        with pytest.raises(ApiError) as e:
            protocol.checked_max_tokens(req, prompt_tokens, limit=64, context=256)
        assert e.value.status == 400 and e.value.param == "max_tokens"


def test_stream_chunks_are_openai_server_sent_events():
    first = protocol.stream_chunk("id1", "m", "a", None, chat=True, first=True)
    assert first.startswith("data: ") and first.endswith("\n\n")
    body = json.loads(first[len("data: "):])
    assert body["object"] == "chat.completion.chunk" and body["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    last = json.loads(protocol.stream_chunk("id1", "m", "", "stop", chat=True, first=False)[6:])
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    text = json.loads(protocol.stream_chunk("id2", "m", "b", "length", chat=False, first=True)[6:])
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "b"
    assert protocol.STREAM_END == "data: [DONE]\n\n"


def test_404_and_400_bodies_have_openai_error_shape():
    body = ApiError(404, "model 'x' is not served", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "model 'x' is not served", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}
    assert ApiError(400, "bad").body()["error"]["type"] == "invalid_request_error"


def test_public_names_are_registered_names_unless_they_clash(tmp_path):
    run = tmp_path / "my-run"
    assert public_names(["models:/a-adapter@champion", "models:/b-adapter/3", str(run)]) == ["a-adapter", "b-adapter", "my-run"]
    assert public_names(["models:/a-adapter@champion", "models:/a-adapter@candidate", "models:/a-adapter/2"]) == \
        ["a-adapter@champion", "a-adapter@candidate", "a-adapter/2"]


def test_row_text_stops_at_eos_or_its_own_budget():
    from lora.tiny import train_word_tokenizer
    from pipelines.data.builtin import tokenizer_corpus
    from pipelines.serve.engine import RowText

    tok = train_word_tokenizer(tokenizer_corpus())
    ids = tok("a b c", add_special_tokens=False)["input_ids"]
    row = RowText(tok, max_tokens=10)
    deltas = [row.add(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) and row.finish_reason is None
    assert row.add(tok.eos_token_id) == "" and row.finish_reason == "stop"
    assert row.add(ids[0]) == "" and len(row.ids) == len(ids)  # finished rows ignore the batch's later steps
    short = RowText(tok, max_tokens=2)
    [short.add(i) for i in ids]
    assert short.finish_reason == "length" and len(short.ids) == 2
