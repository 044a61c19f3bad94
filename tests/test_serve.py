"""`drex serve` end to end: a real server on 127.0.0.1 with a tiny model, the official openai client
(completions and chat, streaming and not), concurrent requests equal to generate() alone, /metrics
counters that add up, and a SIGTERM under load in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_support import make_heads_dir, metric_values, reference, serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return make_heads_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(heads_dir):
    with serving(heads_dir, max_batch=4, max_len=64, max_queue=64) as served:
        yield served


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=30)


def ids_of(served, text):
    return served.tokenizer(text)["input_ids"]


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [served.name]
    health = httpx.get(served.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_equals_generate_with_exit_layers(served, client):
    prompt, ids = "w5 w6 w7", ids_of(served, "w5 w6 w7")
    tokens, layers = reference(served.model, ids, 12)
    out = client.completions.create(
        model=served.name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_exit_layers": True}
    )
    choice = out.choices[0]
    assert choice.token_ids == tokens and choice.exit_layers == layers
    assert choice.text == served.tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == len(ids) + len(tokens)
    assert len(set(layers)) > 1, layers  # early exits were taken, not only full depth


def test_token_id_prompt(served, client):
    ids = [7, 8, 9, 10]
    tokens, _ = reference(served.model, ids, 6)
    out = client.completions.create(model=served.name, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == served.tokenizer.decode(tokens, skip_special_tokens=True)


def test_streaming_completion_equals_the_whole_one(served, client):
    whole = client.completions.create(model=served.name, prompt="w9 w10", max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(model=served.name, prompt="w9 w10", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) > 2  # one event per token, not one at the end


def test_stream_ends_with_done(served):
    body = {"model": served.name, "prompt": "w9", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["usage"]["completion_tokens"] == 3


def test_chat_uses_the_template_streaming_and_not(served, client):
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6"}]
    ids = served.tokenizer(
        served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    tokens, _ = reference(served.model, ids, 8)
    out = client.chat.completions.create(model=served.name, messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == served.tokenizer.decode(tokens, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model=served.name, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_stop_sequence_cuts_the_text_before_it(served, client):
    full = client.completions.create(model=served.name, prompt="w5 w6 w7", max_tokens=12, temperature=0)
    words = full.choices[0].text.split()
    stop = " " + words[3]  # the text up to the first occurrence of the fourth word
    want = full.choices[0].text[: full.choices[0].text.index(stop)]
    out = client.completions.create(model=served.name, prompt="w5 w6 w7", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=served.name, prompt="w5 w6 w7", max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_generate_alone(served, client):
    """More requests than slots, of different lengths, at once: each gets the tokens it gets alone."""
    prompts = [[5 + i, 20 + 3 * i, 40 + i][: 1 + i % 3] for i in range(10)]
    lengths = [3 + (5 * i) % 11 for i in range(10)]
    want = [reference(served.model, p, n) for p, n in zip(prompts, lengths)]

    def ask(i):
        out = client.completions.create(
            model=served.name,
            prompt=prompts[i],
            max_tokens=lengths[i],
            temperature=0,
            stream=i % 2 == 1,
            extra_body={"return_exit_layers": True},
        )
        if i % 2 == 1:
            last = list(out)[-1].choices[0]
            return last.token_ids, last.exit_layers
        return out.choices[0].token_ids, out.choices[0].exit_layers

    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(ask, range(10)))
    assert got == [(tokens, layers) for tokens, layers in want]


def test_metrics_parse_and_add_up(served, client):
    before = metric_values(httpx.get(served.url + "/metrics").text)
    sent_ok, sent_bad, tokens = 3, 2, 0
    for i in range(sent_ok):
        out = client.completions.create(model=served.name, prompt="w5", max_tokens=2 + i, temperature=0)
        tokens += out.usage.completion_tokens
    for _ in range(sent_bad):
        assert httpx.post(served.url + "/v1/completions", json={"prompt": "w5", "n": 2}).status_code == 400
    after = metric_values(httpx.get(served.url + "/metrics").text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("drex_requests_total", endpoint="completions", status="200") == sent_ok
    assert delta("drex_requests_total", endpoint="completions", status="400") == sent_bad
    finished = sum(delta("drex_requests_finished_total", reason=r) for r in ("stop", "length"))
    assert finished == sent_ok
    assert delta("drex_time_to_first_token_seconds_count") == sent_ok
    exits = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == "drex_exits_total")
    assert exits == delta("drex_generation_tokens_total") == tokens
    assert after[("drex_queue_depth", ())] == 0 and after[("drex_running_requests", ())] == 0
    for name in ("drex_tokens_per_second", "drex_involuntary_exits_total", "drex_sla_misses_total"):
        assert any(k[0] == name for k in after), name
    assert any(k[0] == "drex_time_per_output_token_seconds_bucket" for k in after)
