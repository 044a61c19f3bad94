"""The FastAPI app: OpenAI-compatible routes over the engine thread.

A generation route reads and checks its body (`protocol`), tokenises the prompt, refuses what can
never fit, queues a `Job` with the engine thread (`worker`) and relays the tokens it sends back, as
one JSON response or as server-sent events. The routes never call torch; they only wait on the
job's asyncio queue, so a slow step never blocks another client's HTTP traffic.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
    max_prompts: int = 64  # prompts in one completion request (--max-queue)
    policy: str = "drex"  # the engine's policy: penalties are refused under self_spec
    max_logprobs: int = 20  # the most top logprobs a request may ask for (--max-logprobs)


class ServerState:
    """Shared by the routes: settings, tokenizer, the engine thread, metrics, and whether we drain."""

    def __init__(self, settings: ServeSettings, tokenizer: Any, worker: EngineWorker, metrics: ServerMetrics) -> None:
        self.settings, self.tokenizer, self.worker, self.metrics = settings, tokenizer, worker, metrics
        self.draining = False
        self.created = int(time.time())
        self.served: Any = None  # server.ServedPolicy: what the engine runs, and why


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
    req = parse_request(
        body, chat=chat, served_model=settings.model_name, max_len=settings.max_len, max_prompts=settings.max_prompts
    )
    _check_policy_fields(req, settings)
    prompts = _encode(state, req)
    for i, ids in enumerate(prompts):
        check_length(req, len(ids), settings.max_len, index=i if len(prompts) > 1 else None)
    loop = asyncio.get_running_loop()
    jobs = [
        Job(ids, req.max_tokens, req.seed if req.seed_given or i == 0 else random.getrandbits(63), req.temperature,
            req.top_p, loop, req.sla_tpot_ms, req.presence_penalty, req.frequency_penalty, logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
        for i, ids in enumerate(prompts)
    ]  # fmt: skip
    state.worker.submit_all(jobs)
    deadline = loop.time() + settings.request_timeout_s
    meta = _Meta(req, settings.model_name)
    choices = [_Choice(i, job, ids, TextStream(state.tokenizer, req.stop), _echo_text(state, req, i, ids))
               for i, (job, ids) in enumerate(zip(jobs, prompts))]  # fmt: skip
    if req.stream:
        # headers go out with the first token: until then a refusal (shutdown, timeout) keeps its status
        firsts = await _unless_gone(request, asyncio.gather(*(_first_event(state, c, deadline) for c in choices)))
        if firsts is None:
            _cancel(state, choices)
            return Response(status_code=499)  # the client left while it waited
        try:
            for c, first in zip(choices, firsts.result()):
                c.first = first
        except RequestError:
            _cancel(state, choices)
            raise
        return StreamingResponse(_stream(state, choices, meta, deadline), media_type="text/event-stream")
    return await _complete(state, request, choices, meta, deadline)


def _check_policy_fields(req: GenerationRequest, settings: ServeSettings) -> None:
    """Fields the server's engine cannot honour, refused by name."""
    if settings.policy == "self_spec":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise RequestError(
                    f"'{name}' does not apply to this server's policy self_spec: its tokens are full depth's own "
                    f"distribution's (serve --policy full or drex for penalties)",
                    param=name,
                )
    if req.logprobs is not None and req.logprobs > settings.max_logprobs:
        param = "top_logprobs" if req.chat else "logprobs"
        raise RequestError(
            f"'{param}' is {req.logprobs}; this server keeps at most {settings.max_logprobs} (--max-logprobs)", param
        )


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


def _encode(state: ServerState, req: GenerationRequest) -> list[list[int]]:
    """Each prompt's token ids (a chat request's messages through the chat template: one prompt)."""
    tokenizer, vocab = state.tokenizer, state.settings.vocab_size
    if req.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # e.g. a template that wants user/assistant turns to alternate
            raise RequestError(f"the model's chat template refused these messages: {err}", param="messages") from None
        return [list(tokenizer(text, add_special_tokens=False)["input_ids"])]
    out = []
    for i, prompt in enumerate(req.prompts):
        where = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"'{where}' holds token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}", param=where
                )
            out.append(prompt)
            continue
        ids = tokenizer.encode(prompt) if not callable(tokenizer) else tokenizer(prompt)["input_ids"]
        if not ids:
            raise RequestError(f"'{where}' encodes to no tokens", param=where)
        out.append(list(ids))
    return out


def _echo_text(state: ServerState, req: GenerationRequest, index: int, ids: list[int]) -> str:
    """What `echo` puts before the completion: the prompt as sent (its decoded ids for token ids)."""
    if not req.echo:
        return ""
    prompt = req.prompts[index]
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class _Meta:
    req: GenerationRequest
    model: str

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def head(self, chunk: bool) -> dict[str, Any]:
        if self.req.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(len(c.ids) for c in choices)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(eq=False)
class _Choice:
    """One prompt's choice: its job, prompt ids, text, and what it produced — its tokens, their exit
    layers and logprobs, up to a stop sequence."""

    index: int
    job: Job
    ids: list[int]
    text: TextStream
    echo: str = ""
    first: tuple | None = None  # its first event, read before a stream's headers go out
    tokens: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprob per token (a request that asked)
    prompt_logprobs: list[Any] | None = None  # echo with logprobs: per prompt token (the first None)
    reason: str | None = None
    sent: int = 0  # tokens whose logprobs a stream has sent
    chars: int = field(init=False)  # a stream's text offset of the next token's logprobs (after the echo)

    def __post_init__(self) -> None:
        self.chars = len(self.echo)

    def extras(self, req: GenerationRequest) -> dict[str, Any]:
        if not req.return_exit_layers:
            return {}
        return {"exit_layers": list(self.layers), "token_ids": list(self.tokens)}


async def _next_event(choice: _Choice, timeout: float) -> tuple:
    """The choice's next token, end or error event; the prompt's logprobs (echo) are kept on the way."""
    while True:
        event = await asyncio.wait_for(choice.job.events.get(), timeout)
        if event[0] != "prompt_logprobs":
            return event
        choice.prompt_logprobs = event[1]


async def _first_event(state: ServerState, choice: _Choice, deadline: float) -> tuple:
    """The choice's first event (a token, or its end), raising its refusal or a timeout."""
    loop = asyncio.get_running_loop()
    try:
        event = await _next_event(choice, max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        _timed_out(state, choice.job)
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


def _cancel(state: ServerState, choices: list[_Choice]) -> None:
    """Free the slots of a request's prompts (a job already ended is left as it is)."""
    for choice in choices:
        state.worker.cancel(choice.job)


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


async def _events(state: ServerState, choice: _Choice, deadline: float) -> AsyncIterator[str]:
    """The text pieces of a choice as its tokens arrive; sets `choice.reason` at the end. A stop
    sequence ends it early (and frees the slot); the deadline ends it with a 504 before any token,
    else with finish_reason "length"."""
    loop = asyncio.get_running_loop()
    job, text = choice.job, choice.text
    while True:
        left = deadline - loop.time()
        try:
            if choice.first is not None:
                event, choice.first = choice.first, None
            elif left <= 0:
                raise asyncio.TimeoutError  # (not the builtin: a different class before Python 3.11)
            else:
                event = await _next_event(choice, left)
        except asyncio.TimeoutError:
            _timed_out(state, job)
            if not choice.tokens:
                raise _timeout(state) from None
            choice.reason = "length"
            yield text.finish()
            return
        kind = event[0]
        if kind == "error":
            raise event[1]
        if kind == "done":
            choice.reason = "length" if event[1] == "cancelled" else event[1]  # cut short by a shutdown
            yield text.finish()
            return
        _, token, layer, logprob = event
        choice.tokens.append(token)
        choice.layers.append(layer)
        if logprob is not None:
            choice.logprobs.append(logprob)
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            state.worker.cancel(job)
            choice.reason = "stop"
            return


async def _complete(
    state: ServerState, request: Request, choices: list[_Choice], meta: _Meta, deadline: float
) -> Response:
    """A whole response, unless the client goes away first (then the slots are freed)."""

    async def collect(choice: _Choice) -> str:
        if choice.first is None:
            choice.first = await _first_event(state, choice, deadline)
        return "".join([piece async for piece in _events(state, choice, deadline)])

    work = await _unless_gone(request, asyncio.gather(*(collect(c) for c in choices)))
    if work is None:
        _cancel(state, choices)
        return Response(status_code=499)  # nobody reads it; counted as a client that left
    try:
        contents = work.result()  # re-raises a RequestError (timeout, engine refusal)
    except RequestError:
        _cancel(state, choices)
        raise
    out = []
    for choice, content in zip(choices, contents):
        body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.reason, "logprobs": None}
        if meta.req.chat:
            body["message"] = {"role": "assistant", "content": content}
        else:
            body["text"] = choice.echo + content
        if meta.req.logprobs is not None:
            body["logprobs"] = _logprobs_body(state, meta.req, choice)
        body.update(choice.extras(meta.req))
        out.append(body)
    return JSONResponse({**meta.head(False), "choices": out, "usage": _usage(choices)})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(state: ServerState, choices: list[_Choice], meta: _Meta, deadline: float) -> AsyncIterator[str]:
    """Server-sent events: per choice, a chunk per piece of text (with the logprobs of the tokens it
    holds) and a final chunk with its finish_reason; with stream_options.include_usage, one more chunk
    with the usage and no choices; then [DONE]. Choices of a prompt list interleave, each chunk naming
    its index. A client that disconnects cancels this generator, which frees the slots."""
    queue: asyncio.Queue = asyncio.Queue()
    finished = False

    async def one(choice: _Choice) -> None:
        try:
            if meta.req.chat:
                await queue.put(_sse(meta, choice, {"role": "assistant", "content": ""}, None))
            elif choice.echo or (meta.req.echo and choice.prompt_logprobs):
                logprobs = _prompt_part(state, choice) if meta.req.logprobs is not None else None
                await queue.put(_sse(meta, choice, choice.echo, None, logprobs=logprobs))
            async for piece in _events(state, choice, deadline):
                if piece:
                    await queue.put(_sse(meta, choice, piece, None, logprobs=_new_logprobs(state, meta.req, choice)))
            rest = _new_logprobs(state, meta.req, choice)
            await queue.put(_sse(meta, choice, "", choice.reason, choice.extras(meta.req), logprobs=rest))
        except RequestError as err:  # headers are sent: the error travels as an event
            await queue.put(err)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(one(c)) for c in choices]
    try:
        ended = 0
        while ended < len(choices):
            item = await queue.get()
            if item is None:
                ended += 1
            elif isinstance(item, RequestError):
                finished = True
                yield f"data: {json.dumps(error_body(item.message, item.type, item.param))}\n\n"
                yield DONE
                return
            else:
                yield item
        finished = True
        if meta.req.include_usage:
            yield f"data: {json.dumps({**meta.head(True), 'choices': [], 'usage': _usage(choices)})}\n\n"
        yield DONE
    finally:
        unfinished = any(not t.done() for t in tasks)  # an error event ended the stream: free the others' slots
        for task in tasks:
            task.cancel()
        if not finished or unfinished:
            _cancel(state, choices)


def _sse(
    meta: _Meta,
    choice: _Choice,
    piece: Any,
    reason: str | None,
    extras: dict[str, Any] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {"index": choice.index, "finish_reason": reason}
    if meta.req.chat:
        body["delta"] = piece if isinstance(piece, dict) else ({"content": piece} if piece else {})
        if meta.req.logprobs is not None:
            body["logprobs"] = logprobs
    else:
        body.update(text=piece, logprobs=logprobs)
    body.update(extras or {})
    chunk = {**meta.head(True), "choices": [body]}
    if meta.req.include_usage:
        chunk["usage"] = None  # as OpenAI: every chunk but the last has a null usage
    return f"data: {json.dumps(chunk)}\n\n"


# ---------------------------------------------------------------------- logprobs
def _token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token], skip_special_tokens=False)


def _new_logprobs(state: ServerState, req: GenerationRequest, choice: _Choice) -> dict[str, Any] | None:
    """A stream's logprobs for the choice's tokens since its last chunk (None when not asked)."""
    if req.logprobs is None:
        return None
    start, choice.sent = choice.sent, len(choice.logprobs)
    tokens, entries = choice.tokens[start : choice.sent], choice.logprobs[start : choice.sent]
    if req.chat:
        return {"content": [_chat_entry(state, t, e) for t, e in zip(tokens, entries)]}
    part = _completion_logprobs(state, tokens, entries, choice.chars)
    choice.chars += sum(len(text) for text in part["tokens"])
    return part


def _prompt_entries(choice: _Choice) -> list[Any]:
    """The echoed prompt's `TokenLogprob`s (the first None: nothing precedes it)."""
    return list(choice.prompt_logprobs or [None] * len(choice.ids))


def _prompt_part(state: ServerState, choice: _Choice) -> dict[str, Any]:
    """An echoing stream's first chunk's logprobs: the prompt's tokens."""
    return _completion_logprobs(state, choice.ids, _prompt_entries(choice), 0)


def _logprobs_body(state: ServerState, req: GenerationRequest, choice: _Choice) -> dict[str, Any]:
    """A whole response's logprobs: chat's `content` list, or a completion's legacy columns (the
    prompt's tokens first with `echo`)."""
    if req.chat:
        return {"content": [_chat_entry(state, t, e) for t, e in zip(choice.tokens, choice.logprobs)]}
    tokens, entries = list(choice.tokens), list(choice.logprobs)
    if req.echo:
        tokens, entries = choice.ids + tokens, _prompt_entries(choice) + entries
    return _completion_logprobs(state, tokens, entries, 0)


def _completion_logprobs(state: ServerState, tokens: list[int], entries: list[Any], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset (a
    prompt's first token has null logprob and top_logprobs: nothing precedes it)."""
    texts = [_token_text(state, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops: list[dict[str, float] | None] = []
    for entry in entries:
        if entry is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token, logprob in entry.top:
            top.setdefault(_token_text(state, token), logprob)  # two ids of one text: the likelier
        tops.append(top)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_entry(state: ServerState, token: int, entry: Any) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(state, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**one(token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
