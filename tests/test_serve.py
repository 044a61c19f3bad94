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
        client.completions.create(
            model=served.name, prompt="w9 w10", max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage, chunks = chunks[-1], chunks[:-1]  # OpenAI's last chunk: the usage, and no choices
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    assert len(chunks) > 2  # one event per token, not one at the end


def test_stream_ends_with_done(served):
    body = {"model": served.name, "prompt": "w9", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last  # no usage unless asked


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


def test_concurrent_sampled_requests_equal_generate_alone(served, client):
    """Seeded sampling, each request with its own temperature / top_p, several at once: each gets the
    tokens generate() gives it alone with the same seed and parameters."""
    params = [(0.7, 1.0, 11), (1.0, 0.9, 12), (1.3, 0.8, 13), (0.5, 0.95, 14), (1.0, 1.0, 15), (0.9, 0.7, 16)]
    prompts = [[5 + i, 30 + i] for i in range(len(params))]
    want = [
        # top_k=0: OpenAI's API has no top-k, while HF's generate() defaults to top_k=50
        reference(served.model, p, 10, do_sample=True, temperature=t, top_p=top_p, top_k=0, seed=seed)[0]
        for p, (t, top_p, seed) in zip(prompts, params)
    ]

    def ask(i):
        t, top_p, seed = params[i]
        out = client.completions.create(
            model=served.name,
            prompt=prompts[i],
            max_tokens=10,
            temperature=t,
            top_p=top_p,
            seed=seed,
            extra_body={"return_exit_layers": True},
        )
        return out.choices[0].token_ids

    with ThreadPoolExecutor(len(params)) as pool:
        got = list(pool.map(ask, range(len(params))))
    assert got == want
    greedy = [reference(served.model, p, 10)[0] for p in prompts]
    assert got != greedy  # sampling did happen


# ---------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def one_slot(heads_dir):
    """One slot, room for long requests: a request left running would hold up the next."""
    with serving(heads_dir, max_batch=1, max_len=512, max_queue=4) as served:
        yield served


def _tokens_and_cancels(served):
    values = metric_values(httpx.get(served.url + "/metrics").text)
    return values[("drex_generation_tokens_total", ())], values.get(
        ("drex_requests_finished_total", (("reason", "cancelled"),)), 0.0
    )


def _next_request_is_served(served, before):
    """A short request completes (equal to generate() alone), and the abandoned one was cut short:
    the tokens emitted since `before` fall short of the abandoned one's max_tokens plus this one's."""
    ids = [9, 10]
    want, _ = reference(served.model, ids, 4)
    body = {"model": served.name, "prompt": ids, "max_tokens": 4, "temperature": 0, "return_exit_layers": True}
    out = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()
    assert out["choices"][0]["token_ids"] == want
    tokens, cancels = _tokens_and_cancels(served)
    assert cancels - before[1] == 1  # the abandoned request ended by cancel, not by eos or its length
    assert tokens - before[0] < 500 + len(want)


def test_a_stream_abandoned_mid_way_frees_its_slot(one_slot):
    before = _tokens_and_cancels(one_slot)
    body = {"model": one_slot.name, "prompt": [5, 6, 7], "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", one_slot.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        got = [line for line, _ in zip((x for x in lines if x.startswith("data:")), range(2))]
        assert len(got) == 2  # two chunks, then the client hangs up
    _next_request_is_served(one_slot, before)


def test_a_client_that_gives_up_on_a_whole_response_frees_its_slot(one_slot):
    before = _tokens_and_cancels(one_slot)
    body = {"model": one_slot.name, "prompt": [5, 6, 7], "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.2))
    _next_request_is_served(one_slot, before)


def test_a_request_past_its_timeout_ends_with_what_it_has(heads_dir):
    with serving(heads_dir, max_batch=1, max_len=4096, request_timeout_s=0.5) as served:
        body = {"model": served.name, "prompt": [5, 6], "max_tokens": 4000, "temperature": 0}
        out = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert 0 < out["usage"]["completion_tokens"] < 4000
        values = metric_values(httpx.get(served.url + "/metrics").text)
        assert values[("drex_request_timeouts_total", ())] == 1
        assert values[("drex_running_requests", ())] == 0  # its slot is free


def _start_cli_server(heads_dir, *options):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "drex_hf.cli.main", "serve", str(heads_dir), "--port", "0", *options]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stderr.readline()  # "drex serve: NAME on http://127.0.0.1:PORT/v1"
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, line.split(" on ")[1].strip().removesuffix("/v1")


def test_sigterm_under_load_loses_no_completed_response_and_exits_0(heads_dir):
    grace = 30.0
    proc, url = _start_cli_server(heads_dir, "--max-batch", "2", "--max-len", "256", "--grace-s", str(grace))
    try:
        from drex_hf.cli.serve import load

        model, _, name = load(str(heads_dir))
        prompts = [[5 + i, 11 + i] for i in range(6)]
        results = [None] * len(prompts)

        def ask(i):
            body = {"model": name, "prompt": prompts[i], "max_tokens": 60, "temperature": 0}
            body.update(return_exit_layers=True, stream=i % 2 == 0)
            try:
                if not body["stream"]:
                    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                    results[i] = (r.status_code, r.json())
                    return
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    if r.status_code != 200:
                        results[i] = (r.status_code, json.loads(r.read()))
                        return
                    events = [line for line in r.iter_lines() if line.startswith("data:")]
                    complete = events and events[-1] == "data: [DONE]"
                    results[i] = (200, json.loads(events[-2][5:]) if complete else "truncated")
            except httpx.TransportError as err:
                results[i] = ("transport", repr(err))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until both slots decode and the rest wait
            values = metric_values(httpx.get(url + "/metrics").text)
            if values[("drex_running_requests", ())] == 2 and values[("drex_generation_tokens_total", ())] > 0:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        late = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "w5"}, timeout=10)
        for t in threads:
            t.join(60)
        code = proc.wait(timeout=grace + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
    completed = 0
    for i, (status, body) in enumerate(results):
        assert status in (200, 503), (i, status, body)  # nothing dropped on the floor
        if status == 503:
            assert "shutting down" in body["error"]["message"]
        if status == 200:
            choice = body["choices"][0]
            assert choice["finish_reason"] in ("stop", "length")
            assert choice["token_ids"] == reference(model, prompts[i], 60)[0]  # whole, and right
            completed += 1
    assert completed >= 2  # those running when the signal came finished within the grace period


def test_a_synthetic_model_serves_with_a_byte_tokenizer():
    from drex_hf.cli.serve import load
    from drex_hf.serve.server import ServeOptions, run_server

    model, tokenizer, name = load(synthetic="tiny")
    with run_server(model, tokenizer, model_name=name, options=ServeOptions(max_batch=2, max_len=128)) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=30)
        out = client.completions.create(model=name, prompt="hello", max_tokens=5, temperature=0)
        assert name == "synthetic-tiny" and out.usage.prompt_tokens == len(b"hello")
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve"], "give MODEL_DIR or --synthetic-config SHAPE"),
        (["serve", "{heads}", "--synthetic-config", "tiny"], "give MODEL_DIR or --synthetic-config SHAPE"),
        (["serve", "--synthetic-config", "huge"], "unknown synthetic shape 'huge'"),
        (["serve", "{heads}", "--max-queue", "0"], "--max-queue: must be a positive integer"),
        (["serve", "{heads}", "--port", "70000"], "a port is in 0..65535"),
    ],
)
def test_serve_cli_bad_input_is_one_line_and_exit_code_2(argv, message, heads_dir, capsys):
    from drex_hf.cli.main import main

    with pytest.raises(SystemExit) as exc:
        sys.exit(main([a.format(heads=heads_dir) for a in argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_finished_requests_are_not_kept(served, client):
    """Bounded memory: the engine hands a finished request to its waiter and keeps nothing of it,
    and its per-step statistics are a fixed-size window."""
    from drex_hf.serve.server import STATS_WINDOW

    for _ in range(3):
        client.completions.create(model=served.name, prompt="w5", max_tokens=3, temperature=0)
    engine = served.state.worker.engine
    assert engine.finished == {} and len(engine.requests) == 0
    assert engine.keep_finished is False and engine.stats_window == STATS_WINDOW


def test_a_port_in_use_is_one_line_before_the_model_loads(heads_dir, capsys):
    import socket

    from drex_hf.cli.main import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code = main(["serve", str(heads_dir), "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot listen there" in err, err


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_messages(heads_dir):
    with serving(heads_dir, max_batch=1, max_len=64) as served:
        served.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
        r = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                       json={"model": served.name, "messages": [{"role": "user", "content": "w5"}]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "roles must alternate" in r.json()["error"]["message"]


def test_a_failed_engine_thread_refuses_requests_and_health_says_so(heads_dir):
    """The engine thread dying must not leave a server that looks healthy while requests hang."""
    with serving(heads_dir, max_batch=1, max_len=64, request_timeout_s=30) as served:
        engine = served.state.worker.engine

        def broken():
            raise RuntimeError("a device error")

        engine.step = broken
        first = httpx.post(served.url + "/v1/completions", timeout=30,
                           json={"model": served.name, "prompt": "w5", "max_tokens": 4})  # fmt: skip
        assert first.status_code == 500 and first.json()["error"]["type"] == "server_error"
        health = httpx.get(served.url + "/health", timeout=10)
        later = httpx.post(served.url + "/v1/completions", timeout=10,
                           json={"model": served.name, "prompt": "w5", "max_tokens": 4})  # fmt: skip
    assert health.status_code == 503 and health.json()["status"] == "engine failed"
    assert later.status_code == 503 and "engine failed" in later.json()["error"]["message"]
