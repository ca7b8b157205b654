"""The Ray Serve application: one deployment holds the base once and every adapter, answers the
OpenAI-compatible API through a FastAPI ingress, batches requests for different adapters into one
generate() call (Serve's @serve.batch + PEFT's per-row adapter selection), and follows registry
aliases: a moved alias loads the new version beside the old one, switches the name, then drops the old.

No `from __future__ import annotations` here: FastAPI reads the route signatures through Serve's
ingress wrapper and would not find `Request` from a string annotation.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram

from pipelines.artifacts.resolve import resolve
from pipelines.data.prompts import chat_prompt, completion_prompt
from pipelines.serve import protocol
from pipelines.serve.catalog import Catalog, ServedModel, adapter_rank, check_on_base
from pipelines.serve.engine import BASE_ROW, MultiAdapterModel, RowText
from pipelines.serve.protocol import ApiError, ChatRequest, CompletionRequest

APP_NAME = "lorapipe"
logger = logging.getLogger("ray.serve")
api = FastAPI(title="lorapipe", description="OpenAI-compatible API over registered LoRA adapters")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    follow_interval_s: float = 30.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64      # in the replica (incl. rows waiting for a batch)
    max_queued_requests: int = 512      # waiting for the replica; beyond this: 503
    request_timeout_s: float = 120.0    # end to end, at Serve's HTTP proxy
    max_tokens_limit: int = 512
    num_cpus: float = 1.0


@dataclass(frozen=True)
class Slot:
    """A public model id and what answers it now: an internal adapter name, or BASE_ROW."""

    name: str
    template: str
    internal: str
    served: Optional[ServedModel] = None  # None for the base itself


@dataclass(frozen=True)
class Row:
    model: str
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: Optional[str]
    completion_tokens: int


def step_pieces(texts: list[RowText], ids: list[int], closed: list[bool]) -> list:
    """Each row's new text for one decoding step; a row already finished gets Serve's stop sentinel."""
    out = []
    for i, (t, token) in enumerate(zip(texts, ids)):
        if closed[i]:
            out.append(StopIteration)
            continue
        delta = t.add(token)
        closed[i] = t.finish_reason is not None
        out.append(Piece(delta, t.finish_reason, len(t.ids)))
    return out


@serve.deployment(name=APP_NAME)
@serve.ingress(api)
class LoraServer:
    def __init__(self, catalog: Catalog, settings: ServeSettings):
        import torch

        torch.set_num_threads(max(1, int(settings.num_cpus)))  # a busy CPU: spinning threads cost more than they give
        self.catalog, self.settings, self.started = catalog, settings, int(time.time())
        self.engine = MultiAdapterModel.load(catalog.models[0].resolved)
        self.lock = asyncio.Lock()  # a batch's generate() and an adapter swap never overlap
        self.adapters_loaded = 0
        self.batches = {"batches": 0, "rows": 0, "mixed_batches": 0, "largest_batch": 0}
        self.slots: dict[str, Slot] = {}
        if catalog.base_name:
            self.slots[catalog.base_name] = Slot(catalog.base_name, catalog.base_template, BASE_ROW)
        for m in catalog.models:
            internal = self._load(m) if m.resolved.kind == "adapter" else BASE_ROW
            self.slots[m.name] = Slot(m.name, m.template, internal, m)
        self.generate_rows.set_max_batch_size(settings.max_batch_size)
        self.generate_rows.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.requests = Counter("lorapipe_serve_requests", description="requests answered, by model and HTTP status",
                                tag_keys=("model", "status"))
        self.latency = Histogram("lorapipe_serve_request_latency_s", description="request latency, by model",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60], tag_keys=("model",))
        if any(m.follows_alias for m in catalog.models):
            self.follower = asyncio.get_running_loop().create_task(self._follow())

    def _load(self, model: ServedModel) -> str:
        """Load an adapter under a fresh internal name (a swap keeps the old one until switched)."""
        internal = f"a{self.adapters_loaded}"
        self.adapters_loaded += 1
        self.engine.add_adapter(internal, model.resolved.adapter_path)
        return internal

    # -- HTTP API ----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": list(self.slots), **self.batches}

    @api.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for s in self.slots.values():
            info = s.served.describe() if s.served else {"kind": "base", "ref": self.catalog.base_path,
                                                         "digest": self.catalog.base_sha256}
            data.append({"id": s.name, "object": "model", "created": self.started, "owned_by": "lorapipe",
                         "lorapipe": info})
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool):
        started, name = time.monotonic(), None
        try:
            req = protocol.parse_request(await request.body(), ChatRequest if chat else CompletionRequest)
            name = req.model
            row = self._row(req, chat)
        except ApiError as e:
            self._record(name, e.status, started)
            return JSONResponse(e.body(), status_code=e.status)
        if req.stream:
            return StreamingResponse(self._events(row, chat, started), media_type="text/event-stream")
        text, last = "", None
        async for piece in self.generate_rows(row):
            text, last = text + piece.text, piece
        answer = protocol.Answer(text, last.finish_reason, self.engine.count_tokens(row.prompt), last.completion_tokens)
        self._record(name, 200, started)
        return protocol.completion_body(name, answer, chat)

    def _row(self, req, chat: bool) -> Row:
        """The request as one batch row: the model's own prompt template, a checked token budget."""
        slot = self.slots.get(req.model)
        if slot is None:
            raise ApiError(404, f"model {req.model!r} is not served here; served models: {', '.join(self.slots)}",
                           param="model", code="model_not_found")
        tok = self.engine.tokenizer
        if chat:
            try:
                prompt = chat_prompt(slot.template, tok, [m.model_dump() for m in req.messages])
            except ValueError as e:
                raise ApiError(400, f"field 'messages' is invalid: {e}", param="messages", code="invalid_field") from None
        else:
            prompt = completion_prompt(slot.template, tok, req.prompt, req.input)
        n = protocol.checked_max_tokens(req, self.engine.count_tokens(prompt), self.settings.max_tokens_limit,
                                        self.engine.context_length)
        return Row(req.model, prompt, n)

    async def _events(self, row: Row, chat: bool, started: float):
        rid, first = protocol.new_id(chat), True
        async for piece in self.generate_rows(row):
            yield protocol.stream_chunk(rid, row.model, piece.text, piece.finish_reason, chat, first)
            first = False
        yield protocol.STREAM_END
        self._record(row.model, 200, started)

    def _record(self, name: Optional[str], status: int, started: float) -> None:
        model = name if name in self.slots else "(unknown)"  # bounded tag values
        self.requests.inc(tags={"model": model, "status": str(status)})
        self.latency.observe(time.monotonic() - started, tags={"model": model})

    # -- batching: rows of any models in one generate() --------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_rows(self, rows: list[Row]):
        async with self.lock:
            adapters = [self.slots[r.model].internal for r in rows]  # looked up now: after any swap
            self._count_batch(adapters)
            texts = [RowText(self.engine.tokenizer, r.max_tokens) for r in rows]
            closed = [False] * len(rows)
            loop, steps = asyncio.get_running_loop(), asyncio.Queue()
            encoded = self.engine.encode([r.prompt for r in rows])  # tokenizer: this thread only

            def run() -> None:
                try:
                    self.engine.generate(encoded, adapters, max(r.max_tokens for r in rows),
                                         lambda ids: loop.call_soon_threadsafe(steps.put_nowait, ids))
                finally:
                    loop.call_soon_threadsafe(steps.put_nowait, None)

            job = loop.run_in_executor(None, run)
            while (ids := await steps.get()) is not None:
                yield step_pieces(texts, ids, closed)
            await job  # a generation error reaches every row of the batch
            yield [StopIteration if c else Piece("", "length", len(t.ids)) for t, c in zip(texts, closed)]
            yield [StopIteration] * len(rows)

    def _count_batch(self, adapters: list[str]) -> None:
        b = self.batches
        b["batches"], b["rows"] = b["batches"] + 1, b["rows"] + len(adapters)
        b["mixed_batches"] += len(set(adapters)) > 1
        b["largest_batch"] = max(b["largest_batch"], len(adapters))

    # -- following the registry ----------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.follow_interval_s)
            for slot in [s for s in self.slots.values() if s.served and s.served.follows_alias]:
                try:
                    await self._refresh(slot)
                except Exception as e:  # the registry away, a bad version: keep serving what we have
                    logger.warning(f"lorapipe serve: {slot.served.ref}: not switched: {e}")

    async def _refresh(self, slot: Slot) -> None:
        """If the alias moved: load the new version under a fresh name, switch, drop the old one."""
        new = await asyncio.to_thread(resolve, slot.served.ref, self.catalog.tracking_uri)
        if new.version == slot.served.resolved.version:
            return
        check_on_base(new, self.catalog.base_path, self.catalog.base_sha256)
        served = replace(slot.served, resolved=new, rank=adapter_rank(new.adapter_path))
        async with self.lock:
            internal = await asyncio.to_thread(self._load, served)
            self.slots[slot.name] = replace(slot, internal=internal, served=served, template=served.template)
            await asyncio.to_thread(self.engine.delete_adapter, slot.internal)
        logger.info(f"lorapipe serve: {slot.name} now serves {new.label} ({slot.served.ref})")


def build_app(catalog: Catalog, settings: ServeSettings):
    """The bound application: one replica (the base is loaded once), bounded queues."""
    return LoraServer.options(
        num_replicas=1, max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests, graceful_shutdown_timeout_s=10,
        ray_actor_options={"num_cpus": settings.num_cpus}).bind(catalog, settings)


def app_builder(args: dict):
    """Serve's application-builder entry (`import_path: pipelines.serve.app:app_builder` in a Serve
    config or a KubeRay RayService): args {"refs": [...], "tracking_uri": ..., and any
    ServeSettings field}; the REFs are resolved and checked where Serve builds the app."""
    from pipelines.core.defaults import default_tracking_uri
    from pipelines.serve.catalog import build_catalog

    args = dict(args)
    refs, uri = args.pop("refs"), default_tracking_uri(args.pop("tracking_uri", None))
    return build_app(build_catalog(list(refs), uri), ServeSettings(**args))
