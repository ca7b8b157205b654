"""The OpenAI-compatible request and response shapes: /v1/completions, /v1/chat/completions.

Bad requests become an `ApiError` (HTTP status + OpenAI's error body) naming the field; the
server answers it and keeps serving. Decoding is greedy: sampling fields (temperature, top_p,
...) are accepted as OpenAI clients send them, and do not change the answer.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # OpenAI clients send more fields than we use (user, n=1, seed, ...): accepted, not required.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(default=None, strict=True)
    stream: bool = False


class CompletionRequest(_Request):
    prompt: str = Field(strict=True)
    input: str = ""  # lorapipe's addition: the alpaca template's input (OpenAI clients: extra_body)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


def parse_request(raw: bytes, schema: type[_Request]) -> _Request:
    """The request body as `schema`, or a 400 naming what is wrong (malformed JSON, a missing field)."""
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="malformed_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="malformed_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        what = "is required" if err["type"] == "missing" else f"is invalid: {err['msg']}"
        raise ApiError(400, f"field '{field}' {what}", param=field, code="invalid_field") from None


def checked_max_tokens(req: _Request, prompt_tokens: int, limit: int, context: int) -> int:
    """max_tokens (default DEFAULT_MAX_TOKENS) within 1..limit and the model's context length."""
    n = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if not 1 <= n <= limit:
        raise ApiError(400, f"max_tokens={n} is out of range: use 1..{limit}", param="max_tokens", code="out_of_range")
    if prompt_tokens + n > context:
        raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({n}) exceeds the model's context of "
                            f"{context} tokens", param="max_tokens", code="out_of_range")
    return n


@dataclass
class Answer:
    """A finished (non-streamed) answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(a: Answer) -> dict:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def completion_body(model: str, a: Answer, chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish_reason}
    else:
        choice = {"index": 0, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
    return {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(a)}


def stream_chunk(rid: str, model: str, delta: str, finish_reason: Optional[str], chat: bool, first: bool) -> str:
    """One server-sent event in OpenAI's chunk format."""
    if chat:
        d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": d, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


STREAM_END = "data: [DONE]\n\n"
