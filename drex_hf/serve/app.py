"""The FastAPI app: OpenAI-compatible routes over the engine thread.

A generation route reads and checks its body (`protocol`), tokenises the prompt, refuses what can
never fit, queues a `Job` with the engine thread (`worker`) and relays the tokens it sends back, as
one JSON response or as server-sent events. The routes never call torch; they only wait on the
job's asyncio queue, so a slow step never blocks another client's HTTP traffic.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from drex_hf.serve.metrics import CONTENT_TYPE, ServerMetrics
from drex_hf.serve.protocol import GenerationRequest, RequestError, check_length, error_body, parse_json, parse_request
from drex_hf.serve.text import TextStream
from drex_hf.serve.worker import EngineWorker, Job

DONE = "data: [DONE]\n\n"


@dataclass
class ServeSettings:
    """What the routes need to know about the server (the CLI's options)."""

    model_name: str
    max_len: int
    vocab_size: int
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20


class ServerState:
    """Shared by the routes: settings, tokenizer, the engine thread, metrics, and whether we drain."""

    def __init__(self, settings: ServeSettings, tokenizer: Any, worker: EngineWorker, metrics: ServerMetrics) -> None:
        self.settings, self.tokenizer, self.worker, self.metrics = settings, tokenizer, worker, metrics
        self.draining = False
        self.created = int(time.time())


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="drex serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.drex = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            return _error(RequestError(message, status=405), headers=exc.headers)
        if exc.status_code == 404:
            return _error(RequestError(f"no route {request.url.path}", status=404, type="not_found_error"))
        return _error(RequestError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(RequestError(first.get("msg", "invalid request"), param=param))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "drex"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.worker.failed:
            return JSONResponse({"status": "engine failed"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "queued_or_running": state.worker.busy})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _error(err: RequestError, headers: Any = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers={**(headers or {}), **err.headers})


async def _generate(state: ServerState, request: Request, *, chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    try:
        response = await _admit_and_run(state, request, chat)
    except RequestError as err:
        response = _error(err)
    state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _admit_and_run(state: ServerState, request: Request, chat: bool) -> Response:
    if state.draining:
        raise RequestError("the server is shutting down", status=503, type="server_shutting_down")
    settings = state.settings
    body = parse_json(await _read_body(request, settings.max_body_bytes))
    req = parse_request(body, chat=chat, served_model=settings.model_name, max_len=settings.max_len)
    ids = _encode(state, req)
    check_length(req, len(ids), settings.max_len)
    loop = asyncio.get_running_loop()
    job = Job(ids, req.max_tokens, req.seed, req.temperature, req.top_p, loop, req.sla_tpot_ms)
    state.worker.submit(job)
    deadline = loop.time() + settings.request_timeout_s
    text = TextStream(state.tokenizer, req.stop)
    meta = _Meta(req, len(ids), settings.model_name)
    if req.stream:
        # headers go out with the first token: until then a refusal (shutdown, timeout) keeps its status
        first = await _first_event(state, request, job, deadline)
        if first is None:
            return Response(status_code=499)  # the client left while it waited
        stream = _stream(state, job, text, meta, deadline, first)
        return StreamingResponse(stream, media_type="text/event-stream")
    return await _complete(state, request, job, text, meta, deadline)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its Content-Length, or as it arrives)."""
    too_big = RequestError(f"the request body is larger than this server's limit of {limit} bytes", status=413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _encode(state: ServerState, req: GenerationRequest) -> list[int]:
    tokenizer, vocab = state.tokenizer, state.settings.vocab_size
    if req.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # e.g. a template that wants user/assistant turns to alternate
            raise RequestError(f"the model's chat template refused these messages: {err}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(req.prompt, list):
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"'prompt' holds token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}", param="prompt"
            )
        return req.prompt
    ids = tokenizer.encode(req.prompt) if not callable(tokenizer) else tokenizer(req.prompt)["input_ids"]
    if not ids:
        raise RequestError("'prompt' encodes to no tokens", param="prompt")
    return list(ids)


@dataclass
class _Meta:
    req: GenerationRequest
    prompt_tokens: int
    model: str

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        n = self.prompt_tokens
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def head(self, chunk: bool) -> dict[str, Any]:
        if self.req.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class _Collected:
    """What a request produced: its tokens and their exit layers, up to a stop sequence."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.layers: list[int] = []
        self.reason: str | None = None

    def extras(self, meta: _Meta) -> dict[str, Any]:
        if not meta.req.return_exit_layers:
            return {}
        return {"exit_layers": list(self.layers), "token_ids": list(self.tokens)}


async def _first_event(state: ServerState, request: Request, job: Job, deadline: float) -> tuple | None:
    """The job's first event (a token, or its end), raising its refusal; None if the client left."""
    loop = asyncio.get_running_loop()
    wait = await _unless_gone(request, asyncio.wait_for(job.events.get(), max(0.0, deadline - loop.time())))
    if wait is None:
        state.worker.cancel(job)
        return None
    try:
        event = wait.result()
    except asyncio.TimeoutError:
        _timed_out(state, job)
        raise _timeout(state) from None
    if event[0] == "error":
        raise event[1]
    return event


async def _unless_gone(request: Request, work: Any) -> asyncio.Future | None:
    """Await `work` unless the client disconnects first: its finished future, or None (`work`
    cancelled) when the client left."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        return None
    return work


def _timed_out(state: ServerState, job: Job) -> None:
    """The request's time is up: free its slot, count it."""
    state.worker.cancel(job)
    state.metrics.timeouts.inc()


def _timeout(state: ServerState) -> RequestError:
    return RequestError(
        f"the request timed out after {state.settings.request_timeout_s:g} s (--request-timeout-s) before its "
        f"first token",
        status=504,
        type="timeout_error",
    )


async def _events(
    state: ServerState, job: Job, text: TextStream, got: _Collected, deadline: float, first: tuple | None = None
) -> AsyncIterator[str]:
    """The text pieces of a job as its tokens arrive; sets `got.reason` at the end. A stop sequence
    ends it early (and frees the slot); the deadline ends it with a 504 before any token, else with
    finish_reason "length"."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        try:
            if first is not None:
                event, first = first, None
            elif left <= 0:
                raise asyncio.TimeoutError  # (not the builtin: a different class before Python 3.11)
            else:
                event = await asyncio.wait_for(job.events.get(), left)
        except asyncio.TimeoutError:
            _timed_out(state, job)
            if not got.tokens:
                raise _timeout(state) from None
            got.reason = "length"
            yield text.finish()
            return
        kind = event[0]
        if kind == "error":
            raise event[1]
        if kind == "done":
            got.reason = "length" if event[1] == "cancelled" else event[1]  # cut short by a shutdown
            yield text.finish()
            return
        _, token, layer = event
        got.tokens.append(token)
        got.layers.append(layer)
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            state.worker.cancel(job)
            got.reason = "stop"
            return


async def _complete(
    state: ServerState, request: Request, job: Job, text: TextStream, meta: _Meta, deadline: float
) -> Response:
    """A whole response, unless the client goes away first (then its slot is freed)."""
    got = _Collected()

    async def collect() -> str:
        return "".join([piece async for piece in _events(state, job, text, got, deadline)])

    work = await _unless_gone(request, collect())
    if work is None:
        state.worker.cancel(job)
        return Response(status_code=499)  # nobody reads it; counted as a client that left
    content = work.result()  # re-raises a RequestError (timeout, engine refusal)
    choice: dict[str, Any] = {"index": 0, "finish_reason": got.reason, "logprobs": None}
    if meta.req.chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    choice.update(got.extras(meta))
    return JSONResponse({**meta.head(False), "choices": [choice], "usage": meta.usage(len(got.tokens))})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    state: ServerState, job: Job, text: TextStream, meta: _Meta, deadline: float, first: tuple
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a final chunk with finish_reason (and usage),
    then [DONE]. A client that disconnects cancels this generator, which frees the slot."""
    got = _Collected()
    finished = False
    try:
        if meta.req.chat:
            yield _sse(meta, {"role": "assistant", "content": ""}, None)
        try:
            async for piece in _events(state, job, text, got, deadline, first):
                if piece:
                    yield _sse(meta, piece, None)
        except RequestError as err:  # headers are sent: the error travels as an event
            finished = True
            yield f"data: {json.dumps(error_body(err.message, err.type, err.param))}\n\n"
            yield DONE
            return
        finished = True
        usage = meta.usage(len(got.tokens)) if meta.req.include_usage else None
        yield _sse(meta, "", got.reason, got.extras(meta), usage)
        yield DONE
    finally:
        if not finished:
            state.worker.cancel(job)


def _sse(
    meta: _Meta, piece: Any, reason: str | None, extras: dict[str, Any] | None = None, usage: dict | None = None
) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if meta.req.chat:
        choice["delta"] = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
    else:
        choice.update(text=piece, logprobs=None)
    choice.update(extras or {})
    chunk = {**meta.head(True), "choices": [choice]}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"
