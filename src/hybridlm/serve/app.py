"""The FastAPI application: OpenAI's /v1/completions, /v1/chat/completions and /v1/models,
plus /health and /metrics, over one Engine stepped by an `EngineWorker` thread.

Every failure answers OpenAI's error body {"error": {"message", "type", "param", "code"}}
with a 4xx status for a bad request and 500 for a bug, never a traceback; the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hybridlm.chat import ChatTemplate
from hybridlm.infer.engine import Engine
from hybridlm.infer.sampling_params import SamplingParams
from hybridlm.serve.metrics import Metrics
from hybridlm.serve.protocol import ChatRequest, CompletionRequest, RequestError, SamplingFields
from hybridlm.serve.reply import Reply
from hybridlm.serve.worker import EngineWorker

log = logging.getLogger("hybridlm.serve")
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming handler checks its client


@dataclass
class Served:
    """What the handlers share."""

    engine: Engine
    model_name: str
    template: ChatTemplate
    worker: EngineWorker
    metrics: Metrics
    api_key: str | None


def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              chat_template: ChatTemplate | None = None) -> FastAPI:
    """An app serving `engine` (built with its tokenizer) as `model_name`; with `api_key`,
    /v1 routes want `Authorization: Bearer <api_key>`. The engine thread starts now and
    stops when the app shuts down."""
    if engine.tokenizer is None:
        raise ValueError("the served Engine needs its tokenizer: Engine(model, tokenizer)")
    metrics = Metrics()
    served = Served(engine, model_name, chat_template or ChatTemplate(),
                    EngineWorker(engine, metrics), metrics, api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        served.worker.stop()

    app = FastAPI(title="hybridlm", lifespan=lifespan)
    app.state.served = served
    _add_error_handlers(app)
    _add_auth(app, api_key)
    _add_routes(app, served)
    return app


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(err), err.kind, err.param, err.code), err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {first.get('msg')}",
                                           "invalid_request_error"), 400)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {json.dumps(first['input'], default=str)[:80]})"
        return JSONResponse(error_body(message, "invalid_request_error",
                                       where[0] if where else None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), err.status_code)

    @app.exception_handler(Exception)
    async def bug(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}",
                                       "server_error"), 500)


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    if api_key is None:
        return

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                reason = "missing" if not given else "wrong"
                return JSONResponse(error_body(
                    f"{reason} API key: send 'Authorization: Bearer <key>'",
                    "authentication_error", code="invalid_api_key"), 401)
        return await call_next(request)


def _add_routes(app: FastAPI, served: Served) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = served.metrics.render(*served.worker.counts())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.model_name, "object": "model",
                                            "created": 0, "owned_by": "hybridlm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        tokenizer = served.engine.tokenizer
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        params = body.sampling_params(body.max_tokens, stop_token_ids=(tokenizer.eos_token_id,),
                                      logprobs=body.logprobs)
        return await _answer(served, request, "completions", prompt, params, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        tokenizer = served.engine.tokenizer
        messages = [m.model_dump() for m in body.messages]
        prompt = served.template.render_prompt(messages, tokenizer)
        max_tokens = (body.max_tokens if body.max_completion_tokens is None
                      else body.max_completion_tokens)
        params = body.sampling_params(max_tokens, tuple(served.template.stop_strings()),
                                      (tokenizer.eos_token_id,), body.engine_logprobs())
        return await _answer(served, request, "chat", prompt, params, body)


def _check_model(served: Served, model: str) -> None:
    if model != served.model_name:
        raise RequestError(f"model {model!r} is not served here; this server serves "
                           f"{served.model_name!r}", 404, "model", "invalid_request_error",
                           "model_not_found")


async def _answer(served: Served, request: Request, endpoint: str, prompt: list[int],
                  params: SamplingParams, body: SamplingFields):
    """Run the body's n choices; the whole answer, or a stream once the first delta is in
    (so a request refused for want of a cache row is still a plain 503)."""
    try:
        request_ids, queue = await served.worker.submit(prompt, params, body.n)
    except ValueError as err:
        raise RequestError(str(err), param="prompt") from None
    served.metrics.request(endpoint, len(prompt))
    reply = Reply(endpoint, served.model_name, len(prompt), body.n, served.engine.tokenizer,
                  logprobs=params.logprobs is not None, include_usage=body.include_usage)
    streaming = False
    try:
        while True:
            item = await _next(queue, request)
            if item is None:  # the client went away
                return None
            reply.add(*item)
            _raise_refused(served, reply)
            if reply.failure:
                break
            if body.stream:
                streaming = True  # from here the stream's own `finally` cancels
                return StreamingResponse(_stream(served, request_ids, queue, reply, item),
                                         media_type="text/event-stream")
            if reply.done:
                break
    finally:
        if not streaming:
            _cancel(served, request_ids)
    if reply.failure:
        return JSONResponse(error_body(reply.failure, "server_error"), 500)
    return reply.whole()


async def _next(queue: asyncio.Queue, request: Request):
    """The next (index, delta) pair, or None once the client has hung up."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                return None


def _raise_refused(served: Served, reply: Reply) -> None:
    if reply.timed_out:
        engine = served.engine
        raise RequestError(
            f"no free cache row within the queue timeout of {engine.queue_timeout} s "
            f"(--queue-timeout): all {engine.max_batch} rows (--max-batch) are busy; retry "
            "later", 503, kind="server_error", code="queue_timeout")


def _cancel(served: Served, request_ids: list[int]) -> None:
    for request_id in request_ids:
        served.worker.cancel(request_id)


async def _stream(served: Served, request_ids: list[int], queue: asyncio.Queue, reply: Reply,
                  first: tuple) -> AsyncIterator[str]:
    """SSE: a chunk per delta (each choice's last with its finish_reason), then with
    stream_options.include_usage a chunk of usage alone, then [DONE]. A client that goes
    away cancels this generator; `finally` then frees the requests' rows."""
    try:
        if reply.endpoint == "chat":
            for chunk in reply.role_chunks():
                yield _sse(chunk)
        item = first
        while True:
            if reply.failure or reply.timed_out:
                message = reply.failure or "a choice found no free cache row in time"
                yield _sse(error_body(message, "server_error"))
                break
            chunk = reply.delta_chunk(*item)
            if chunk is not None:
                yield _sse(chunk)
            if reply.done:
                if reply.include_usage:
                    yield _sse(reply.usage_chunk())
                break
            item = await queue.get()
            reply.add(*item)
        yield "data: [DONE]\n\n"
    finally:
        _cancel(served, request_ids)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
