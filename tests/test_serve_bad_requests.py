"""`drex serve`'s bad-request catalogue: one test per refused request, asserting the HTTP status and an
OpenAI-style error body whose `param` names the field at fault; then a normal request still succeeds."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serve_support import make_heads_dir, metric_values, serving

MAX_LEN = 64
MAX_BODY = 4096
MAX_QUEUE = 8  # also the most prompts one request may hold
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0}
HELLO = [{"role": "user", "content": "w5 w6"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    heads = make_heads_dir(tmp_path_factory.mktemp("serve-bad"))
    with serving(heads, max_batch=2, max_len=MAX_LEN, max_body_bytes=MAX_BODY, max_queue=MAX_QUEUE) as served:
        yield served


def ok(**change):
    return json.dumps({**OK, **change}).encode()


def without(name, base=OK):
    return json.dumps({k: v for k, v in base.items() if k != name}).encode()


def chat(**change):
    return json.dumps({"messages": HELLO, "max_tokens": 2, **change}).encode()


# (case, method, path, raw body, status, param, words the message holds)
# fmt: off
CASES = [
    ("malformed JSON", "POST", C, b'{"prompt": "w5",', 400, None, "not valid JSON"),
    ("non-UTF-8 body", "POST", C, b'{"prompt": "w5 \xff"}', 400, None, "not UTF-8"),
    ("oversized body", "POST", C, ok(prompt="w5 " * 2000), 413, None, f"limit of {MAX_BODY} bytes"),
    ("empty body", "POST", C, b"", 400, None, "empty"),
    ("body not an object", "POST", C, b'["w5"]', 400, None, "JSON object, got a JSON array"),
    ("missing prompt", "POST", C, without("prompt"), 400, "prompt", "'prompt' is required"),
    ("empty prompt", "POST", C, ok(prompt=""), 400, "prompt", "'prompt' is empty"),
    ("blank prompt", "POST", C, ok(prompt="   "), 400, "prompt", "'prompt' is empty"),
    ("empty token list", "POST", C, ok(prompt=[]), 400, "prompt", "'prompt' is empty"),
    ("prompt of the wrong type", "POST", C, ok(prompt=5), 400, "prompt", "string or a list of token ids"),
    ("a prompt list with an empty prompt", "POST", C, ok(prompt=["w5", ""]), 400, "prompt[1]", "'prompt[1]' is empty"),
    ("a prompt list with a float id", "POST", C, ok(prompt=[[5], [6.5]]), 400, "prompt[1]", "integer token ids"),
    ("token ids mixed with prompts", "POST", C, ok(prompt=[5, "w5"]), 400, "prompt", "mixes token ids"),
    ("more prompts than the queue", "POST", C, ok(prompt=["w5"] * (MAX_QUEUE + 1)), 400, "prompt",
     f"at most {MAX_QUEUE}"),
    ("a listed prompt's id outside the vocabulary", "POST", C, ok(prompt=[[5], [1000]]), 400, "prompt[1]",
     "id 1000, outside"),
    ("a float token id", "POST", C, ok(prompt=[5, 6.5]), 400, "prompt", "integer token ids"),
    ("token id outside the vocabulary", "POST", C, ok(prompt=[5, 1000]), 400, "prompt", "id 1000, outside"),
    ("prompt too long", "POST", C, ok(prompt=[5] * 70), 400, "prompt", "70 tokens"),
    ("prompt + max_tokens too long", "POST", C, ok(prompt=[5] * 40, max_tokens=30), 400, "max_tokens", "at most 25"),
    ("max_tokens 0", "POST", C, ok(max_tokens=0), 400, "max_tokens", "at least 1, got 0"),
    ("max_tokens negative", "POST", C, ok(max_tokens=-3), 400, "max_tokens", "at least 1, got -3"),
    ("max_tokens past the limit", "POST", C, ok(max_tokens=1000), 400, "max_tokens", "past this server's limit"),
    ("max_tokens a string", "POST", C, ok(max_tokens="5"), 400, "max_tokens", "must be an integer"),
    ("max_tokens a float", "POST", C, ok(max_tokens=2.5), 400, "max_tokens", "must be an integer"),
    ("negative temperature", "POST", C, ok(temperature=-0.5), 400, "temperature", "in [0, 2], got -0.5"),
    ("temperature a string", "POST", C, ok(temperature="hot"), 400, "temperature", "must be a number"),
    ("top_p 0", "POST", C, ok(top_p=0), 400, "top_p", "in (0, 1], got 0"),
    ("top_p above 1", "POST", C, ok(top_p=1.5), 400, "top_p", "in (0, 1], got 1.5"),
    ("n > 1", "POST", C, ok(n=2), 400, "n", "'n' must be 1"),
    ("unknown model", "POST", C, ok(model="gpt-4"), 404, "model", "'gpt-4' does not exist"),
    ("model not a string", "POST", C, ok(model=7), 400, "model", "must be a string"),
    ("logprobs above 5", "POST", C, ok(logprobs=6), 400, "logprobs", "integer in [0, 5]"),
    ("logprobs a boolean", "POST", C, ok(logprobs=True), 400, "logprobs", "integer in [0, 5]"),
    ("best_of > 1", "POST", C, ok(best_of=3), 400, "best_of", "'best_of' must be 1"),
    ("echo not a boolean", "POST", C, ok(echo="yes"), 400, "echo", "true or false"),
    ("presence_penalty above 2", "POST", C, ok(presence_penalty=2.5), 400, "presence_penalty", "in [-2, 2], got 2.5"),
    ("frequency_penalty a string", "POST", C, ok(frequency_penalty="x"), 400, "frequency_penalty", "must be a number"),
    ("frequency_penalty below -2", "POST", C, ok(frequency_penalty=-3), 400, "frequency_penalty", "in [-2, 2]"),
    ("stream_options not an object", "POST", C, ok(stream=True, stream_options=True), 400, "stream_options",
     "must be an object"),
    ("include_usage not a boolean", "POST", C, ok(stream=True, stream_options={"include_usage": 1}), 400,
     "stream_options.include_usage", "true or false"),
    ("stop a number", "POST", C, ok(stop=5), 400, "stop", "string or a list of strings"),
    ("stop a list with a number", "POST", C, ok(stop=["w5", 3]), 400, "stop", "string or a list of strings"),
    ("five stop sequences", "POST", C, ok(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("an empty stop sequence", "POST", C, ok(stop=[""]), 400, "stop", "empty string"),
    ("negative seed", "POST", C, ok(seed=-1), 400, "seed", "[0, 2**64)"),
    ("seed a string", "POST", C, ok(seed="x"), 400, "seed", "must be an integer"),
    ("stream not a boolean", "POST", C, ok(stream="yes"), 400, "stream", "true or false"),
    ("stream_options without stream", "POST", C, ok(stream_options={"include_usage": True}), 400, "stream_options",
     "stream=true only"),
    ("user not a string", "POST", C, ok(user=5), 400, "user", "must be a string"),
    ("sla_tpot_ms 0", "POST", C, ok(sla_tpot_ms=0), 400, "sla_tpot_ms", "must be positive"),
    ("return_exit_layers not a boolean", "POST", C, ok(return_exit_layers=1), 400, "return_exit_layers",
     "true or false"),
    ("a misspelt field", "POST", C, ok(max_token=5), 400, "max_token", "unknown field 'max_token'"),
    ("chat: missing messages", "POST", CHAT, b'{"max_tokens": 2}', 400, "messages", "'messages' is required"),
    ("chat: messages not a list", "POST", CHAT, chat(messages="w5"), 400, "messages", "must be a list"),
    ("chat: no messages", "POST", CHAT, chat(messages=[]), 400, "messages", "'messages' is empty"),
    ("chat: unknown role", "POST", CHAT, chat(messages=[{"role": "bot", "content": "w5"}]), 400, "messages[0].role",
     "must be one of"),
    ("chat: content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", "must be a string"),
    ("chat: empty content", "POST", CHAT, chat(messages=[{"role": "user", "content": ""}]), 400, "messages",
     "no text"),
    ("chat: a completions field", "POST", CHAT, chat(prompt="w5"), 400, "prompt", "unknown field 'prompt'"),
    ("chat: logprobs not a boolean", "POST", CHAT, chat(logprobs=3), 400, "logprobs", "true or false"),
    ("chat: top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs",
     "needs 'logprobs': true"),
    ("chat: top_logprobs above 20", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs",
     "in [0, 20]"),
    ("chat: echo", "POST", CHAT, chat(echo=True), 400, "echo", "unknown field 'echo'"),
    ("chat: tools", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools", "not supported"),
    ("chat: max_completion_tokens 0", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens",
     "at least 1"),
    ("GET on a POST route", "GET", C, None, 405, None, "GET is not allowed on /v1/completions"),
    ("DELETE on /v1/models", "DELETE", "/v1/models", None, 405, None, "DELETE is not allowed"),
    ("unknown path", "POST", "/v1/embeddings", ok(), 404, None, "no route /v1/embeddings"),
]
# fmt: on


@pytest.mark.parametrize("method, path, raw, status, param, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(served, method, path, raw, status, param, words):
    headers = {"content-type": "application/json"} if raw is not None else {}
    response = httpx.request(method, served.url + path, content=raw, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"], error["message"]
    assert error["type"].endswith("_error")


def test_the_catalogue_is_at_least_25_cases():
    assert len(CASES) >= 25


def test_a_full_queue_is_429_with_retry_after(tmp_path_factory):
    """One slot, a queue of one: a running request, one waiting, and the next is refused with 429."""
    heads = make_heads_dir(tmp_path_factory.mktemp("serve-queue"))
    with serving(heads, max_batch=1, max_len=8192, max_queue=1) as served:
        long = {"prompt": [5, 6], "max_tokens": 8000, "temperature": 0, "stream": True}
        waiting = {}
        with httpx.stream("POST", served.url + C, json=long, timeout=60) as running:
            lines = running.iter_lines()  # kept: closing the iterator would close the stream
            assert next(lines).startswith("data:")  # it holds the slot

            def queued():
                waiting["response"] = httpx.post(served.url + C, json=OK, timeout=60)

            thread = threading.Thread(target=queued)
            thread.start()
            deadline = time.monotonic() + 30
            while metric_values(httpx.get(served.url + "/metrics").text)[("drex_queue_depth", ())] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = httpx.post(served.url + C, json=OK, timeout=30)
        # the running stream was abandoned: the queued request gets the slot and completes
        thread.join(60)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]["message"]
    assert waiting["response"].status_code == 200


def _refused(served) -> float:
    values = metric_values(httpx.get(served.url + "/metrics").text)
    return sum(
        v for (name, labels), v in values.items() if name == "drex_requests_total" and dict(labels)["status"] != "200"
    )


def test_after_the_catalogue_a_normal_request_succeeds(served):
    """Self-contained (any order, alone or with -k): the catalogue's generation-route cases sent again,
    each refusal counted once, then normal requests succeed."""
    routed = [c for c in CASES if c[2] in (C, CHAT) and c[1] == "POST"]
    before = _refused(served)
    for _, method, path, raw, status, _, _ in routed:
        headers = {"content-type": "application/json"} if raw is not None else {}
        assert httpx.request(method, served.url + path, content=raw, headers=headers, timeout=30).status_code == status
    assert _refused(served) - before == len(routed)  # every refusal of a generation route was counted
    for path, body in ((C, OK), (CHAT, {"messages": HELLO, "max_tokens": 2, "temperature": 0})):
        response = httpx.post(served.url + path, json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
