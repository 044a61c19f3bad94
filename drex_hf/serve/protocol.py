"""The OpenAI wire format: request bodies checked into `GenerationRequest`s, errors as OpenAI bodies.

Sits between the HTTP routes (`app.py`) and the engine thread (`worker.py`): everything a client can
get wrong is refused here, before a request queues, as a `RequestError` that names the field
(`param`) and carries the HTTP status. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4  # OpenAI's limit on stop sequences
SEED_LIMIT = 2**64  # as drex_hf.generation.sampling: seeds are integers in [0, 2**64)
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty / frequency_penalty is [-2, 2]
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on a completion's `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on a chat completion's `top_logprobs`
ROLES = ("system", "user", "assistant", "developer", "tool")

# OpenAI fields we parse; any other field is refused by name (a typo must not be silently ignored)
COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
    "sla_tpot_ms", "return_exit_layers", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
    "response_format", "parallel_tool_calls",
}  # fmt: skip


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, an OpenAI error `type`, the field at fault."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's name for it
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:  # noqa: A002
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


@dataclass
class GenerationRequest:
    """A checked completion or chat request; the prompt is still text (or ids) until `encode`."""

    chat: bool
    model: str
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: one choice each, in order
    messages: list[dict[str, str]] | None = None  # chat
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    seed_given: bool = False
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    user: str | None = None
    sla_tpot_ms: float | None = None
    return_exit_layers: bool = False
    echo: bool = False  # completions: the prompt before the completion (with its logprobs, if asked)
    logprobs: int | None = None  # each token's logprob and this many top ones (None: no logprobs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: refuses a non-UTF-8 body, malformed JSON, and anything but an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the request body is not UTF-8: byte {err.start} is {raw[err.start]:#04x}") from None
    if not text.strip():
        raise RequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise RequestError(f"the request body is not valid JSON: {err.msg} at {where}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got a JSON {_kind(body)}")
    return body


def parse_request(
    body: dict[str, Any], *, chat: bool, served_model: str, max_len: int, max_prompts: int = 64
) -> GenerationRequest:
    """Check every field of a completion (`chat` False) or chat completion body; a completion takes
    at most `max_prompts` prompts."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}", param=unknown[0]
        )
    req = GenerationRequest(chat=chat, model=served_model)
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {_show(model)}", param="model")
    if model != served_model:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {served_model!r}",
            param="model",
            status=404,
            type="not_found_error",
        )
    if chat:
        req.messages = _messages(body)
    else:
        req.prompts = _prompts(body, max_prompts)
    _unsupported(body, chat)
    req.logprobs = _logprobs(body, chat)
    if not chat:
        req.echo = _flag(body, "echo")
    req.presence_penalty = _number(body, "presence_penalty", 0.0, lo=-MAX_PENALTY, hi=MAX_PENALTY, what="in [-2, 2]")
    req.frequency_penalty = _number(body, "frequency_penalty", 0.0, lo=-MAX_PENALTY, hi=MAX_PENALTY, what="in [-2, 2]")
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(limit_name)
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise RequestError(f"'{limit_name}' must be an integer, got {_show(max_tokens)}", param=limit_name)
        if max_tokens < 1:
            raise RequestError(f"'{limit_name}' must be at least 1, got {max_tokens}", param=limit_name)
        if max_tokens > max_len:
            raise RequestError(
                f"'{limit_name}' is {max_tokens}, past this server's limit: a request's prompt and tokens "
                f"share {max_len} positions (--max-len)",
                param=limit_name,
            )
        req.max_tokens = int(max_tokens)
    req.temperature = _number(body, "temperature", 1.0, lo=0.0, hi=MAX_TEMPERATURE, what="in [0, 2]")
    req.top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True, what="in (0, 1]")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise RequestError(f"'seed' must be an integer, got {_show(seed)}", param="seed")
        if not 0 <= seed < SEED_LIMIT:
            raise RequestError(f"'seed' must be in [0, 2**64), got {seed}", param="seed")
        req.seed, req.seed_given = int(seed), True
    else:
        req.seed = random.getrandbits(63)
    req.stop = _stop(body.get("stop"))
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise RequestError(f"'n' must be an integer, got {_show(n)}", param="n")
        if n != 1:
            raise RequestError(f"'n' must be 1: this server returns one choice per request, got {n}", param="n")
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError(
                f"'stream_options' must be an object with 'include_usage', got {_show(options)}", param="stream_options"
            )
        if not req.stream:
            raise RequestError("'stream_options' applies to stream=true only", param="stream_options")
        req.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"'user' must be a string, got {_show(user)}", param="user")
    req.user = user
    if body.get("sla_tpot_ms") is not None:
        req.sla_tpot_ms = _number(body, "sla_tpot_ms", None, lo=0.0, hi=math.inf, lo_open=True, what="positive")
    req.return_exit_layers = _flag(body, "return_exit_layers")
    return req


def check_length(req: GenerationRequest, prompt_tokens: int, max_len: int, index: int | None = None) -> None:
    """Refuse a request that can never fit in a slot (the engine's own rule: prompt + max_tokens - 1
    positions, the last token never fed back), before it queues; `index`: which prompt of a list."""
    where = "messages" if req.chat else ("prompt" if index is None else f"prompt[{index}]")
    if prompt_tokens >= max_len:
        raise RequestError(
            f"the {where} has {prompt_tokens} tokens; this server's requests hold at most {max_len} positions "
            f"(--max-len), which leaves no room for a token",
            param=where,
        )
    if prompt_tokens + req.max_tokens - 1 > max_len:
        raise RequestError(
            f"the {where} has {prompt_tokens} tokens and 'max_tokens' is {req.max_tokens}: together they need "
            f"{prompt_tokens + req.max_tokens - 1} positions, past this server's --max-len {max_len}; "
            f"ask for at most {max_len - prompt_tokens + 1} tokens",
            param="max_tokens",
        )


# ---------------------------------------------------------------------- fields
def _prompts(body: dict[str, Any], max_prompts: int) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of token ids, or a list of either (one choice
    per prompt, in order)."""
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("'prompt' is required: a string, a list of token ids, or a list of those", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [_one_prompt(prompt, "prompt")]
    if not isinstance(prompt, list):
        raise RequestError(f"'prompt' must be a string or a list of token ids, got {_show(prompt)}", param="prompt")
    if not prompt:
        raise RequestError("'prompt' is empty: give some text or token ids", param="prompt")
    if all(_is_int(t) for t in prompt):  # one prompt of token ids
        return [[int(t) for t in prompt]]
    if all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > max_prompts:
            raise RequestError(
                f"'prompt' holds {len(prompt)} prompts; this server takes at most {max_prompts} in one request "
                f"(--max-queue): send the rest in another",
                param="prompt",
            )
        return [_one_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    bad = next((p for p in prompt if not (_is_int(p) or isinstance(p, (str, list)))), None)
    if bad is None:  # token ids and prompts side by side
        raise RequestError("'prompt' mixes token ids with strings or lists: give one prompt or a list", "prompt")
    raise RequestError(
        f"'prompt' must be a string or a list of integer token ids (or a list of those); got an element {_show(bad)}",
        param="prompt",
    )


def _one_prompt(prompt: Any, where: str) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError(f"'{where}' is empty: give some text or token ids", param=where)
        return prompt
    if not prompt:
        raise RequestError(f"'{where}' is empty: give some text or token ids", param=where)
    bad = next((t for t in prompt if not _is_int(t)), None)
    if bad is not None:
        raise RequestError(
            f"'{where}' must be a string or a list of integer token ids, got an element {_show(bad)}", param=where
        )
    return [int(t) for t in prompt]


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many top logprobs a request wants per token (0: only the token's own), or None: none.
    Completions: `logprobs` an integer in [0, 5]; chat: `logprobs` true, with `top_logprobs` in [0, 20]."""
    value = body.get("logprobs")
    if not chat:
        if value is None:
            return None
        if not _is_int(value) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(
                f"'logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] (how many top tokens per "
                f"token), got {_show(value)}",
                param="logprobs",
            )
        return int(value)
    wanted = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {_show(top)}",
                           param="top_logprobs")  # fmt: skip
    if not wanted:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return int(top)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: a list of {role, content} objects", param="messages")
    if not isinstance(messages, list):
        raise RequestError(f"'messages' must be a list of {{role, content}} objects, got {_show(messages)}", "messages")
    if not messages:
        raise RequestError("'messages' is empty: give at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be a {{role, content}} object, got {_show(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        f'\'{where}.content\' parts must be {{"type": "text", "text": ...}}; got {_show(part)}',
                        param=f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string, got {_show(content)}", param=f"{where}.content")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise RequestError("'messages' have no text: every content is empty", param="messages")
    return out


def _unsupported(body: dict[str, Any], chat: bool) -> None:
    """OpenAI fields this server parses only to refuse a value it does not implement."""
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported by this server", param="logit_bias")
    if chat:
        for name in ("tools", "functions"):
            if body.get(name):
                raise RequestError(f"'{name}' is not supported by this server", param=name)
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise RequestError(f'\'response_format\' must be {{"type": "text"}}, got {_show(fmt)}', "response_format")
        return
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError(f"'best_of' must be 1: this server returns one sample, got {_show(best_of)}", "best_of")
    if body.get("suffix"):
        raise RequestError("'suffix' is not supported by this server", param="suffix")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"'stop' must be a string or a list of strings, got {_show(stop)}", param="stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise RequestError("'stop' holds an empty string", param="stop")
    return list(stops)


def _number(
    body: dict[str, Any], name: str, default: Any, *, lo: float, hi: float, what: str, lo_open: bool = False
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"'{name}' must be a number, got {_show(value)}", param=name)
    value = float(value)
    if not (lo < value if lo_open else lo <= value) or not value <= hi or not math.isfinite(value):
        raise RequestError(f"'{name}' must be {what}, got {value:g}", param=name)
    return value


def _flag(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{param or name}' must be true or false, got {_show(value)}", param=param or name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return f"{_kind(value)} {text if len(text) <= 40 else text[:37] + '...'}"
