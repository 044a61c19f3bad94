"""`drex serve` as a Ray Serve application (drex_hf/cli/ray_serve.py, drex_hf/serve/ray_app.py): a local
Ray instance on 127.0.0.1 only, 2 replicas of the tiny synthetic model behind Ray's HTTP proxy.

Requests spread over both replicas and give what the offline engine gives; a replica killed while
requests are in flight is restarted by Ray, and every request caught on it either completes (with
the right output) or fails in a way a client sees and can retry (a 5xx with a body, or a stream cut
mid-body, a transport error); none vanishes, and each retried one completes. Ray is shut down by the
test itself. Skipped only where Ray Serve is not installed (the `ray` extra, in requirements-cpu.txt).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Read when Ray is imported: a Ray that is not meant to be a cluster takes 127.0.0.1 as its node
# address, and every process it starts listens there (set before `import ray`; the fixture checks it)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
serve_api = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'drex-hf[ray]'")
import httpx  # noqa: E402
import ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = "drex"  # the application's name; its deployment is named "drex" too (ray_app.py)
MODEL = "synthetic-tiny"
MAX_LEN = 512
ARGS = {
    "synthetic_config": "tiny",
    "num_replicas": 2,
    "num_cpus": 0.5,  # logical: both fit beside the replacement of a killed one on a 2-CPU Ray
    "torch_threads": 1,  # as the offline references: the same reductions, the same tokens
    "max_batch": 4,
    "max_len": MAX_LEN,
    "health_check_period_s": 1.0,
}
# Ray's processes inherit these (set before ray.init starts them): every Ray port on 127.0.0.1, one
# torch thread, this checkout's drex_hf
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def bounded(work, seconds: float, what: str):
    """Run `work()` in a daemon thread; its result, or a test failure after `seconds`."""
    box: dict = {}

    def run():
        try:
            box["value"] = work()
        except BaseException as err:  # handed to the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not finish within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """A local Ray, Serve's proxy on a free loopback port, the application with 2 replicas; its URL."""
    from drex_hf.cli.ray_serve import app

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    temp = tempfile.mkdtemp(prefix="drexray")  # short: Ray puts unix sockets under it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        node = ray.util.get_node_ip_address()
        assert node == "127.0.0.1", (
            f"Ray's node address is {node}: ray was imported before this module could keep it on loopback"
        )
        port = free_port()
        serve_api.start(http_options={"host": "127.0.0.1", "port": port})
        bounded(lambda: serve_api.run(app(ARGS), name=APP, route_prefix="/"), 120, "starting 2 replicas")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            if ray.is_initialized():
                serve_api.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(temp, ignore_errors=True)


def offline(prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[list[int], list[int]]]:
    """(tokens, exit layers) of each greedy request from an offline DrexEngine built as a replica
    builds its own, on the same weights (the synthetic model is drawn from a fixed seed), one thread."""
    import torch

    from drex_hf.cli.serve import load
    from drex_hf.generation.sampling import RequestSampling
    from drex_hf.serve.server import ServeOptions, new_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _, _ = load(synthetic="tiny")
        engine = new_engine(model, ServeOptions(max_batch=8, max_len=MAX_LEN))
        got: dict = {}
        rids = []
        with torch.no_grad():
            pending = list(range(len(prompts)))
            while pending or engine.requests or engine.prefill_queue:
                while pending and engine.has_free_slot:
                    i = pending.pop(0)
                    rids.append((i, engine.add_request(
                        torch.tensor(prompts[i]), max_new_tokens=max_tokens[i], seed=0,
                        sampling=RequestSampling(temperature=0.0, top_p=1.0),
                        on_finish=lambda o: got.__setitem__(o.request_id, o),
                    )))  # fmt: skip
                if not engine.step() and not pending:
                    break
    finally:
        torch.set_num_threads(threads)
    out: list = [None] * len(prompts)
    for i, rid in rids:
        out[i] = (list(got[rid].tokens), list(got[rid].exit_layers))
    return out


def body(prompt: list[int], max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "return_exit_layers": True}  # fmt: skip


async def ask(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, stream: bool,
              on_chunk=None) -> dict:  # fmt: skip
    """One completion, read whole: its status, replica, tokens and exit layers, or how it failed.
    `kind` is "done" (a whole response), "status" (an HTTP error with its body), "cut" (a stream that
    broke off with a transport error) or "silent" (a stream that ended without [DONE] and no error)."""
    out: dict = {"status": None, "replica": None, "kind": None, "tokens": None, "layers": None, "chunks": 0}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body(prompt, max_tokens, stream)) as response:
            out["status"], out["replica"] = response.status_code, response.headers.get("x-drex-replica")
            if response.status_code != 200:
                out["kind"], out["body"] = "status", (await response.aread()).decode(errors="replace")
                return out
            if not stream:
                choice = json.loads(await response.aread())["choices"][0]
                out.update(kind="done", tokens=choice["token_ids"], layers=choice["exit_layers"])
                return out
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    out["kind"] = "done"
                elif line.startswith("data: "):
                    out["chunks"] += 1
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["finish_reason"] is not None:
                        out["tokens"], out["layers"] = choice["token_ids"], choice["exit_layers"]
                    if on_chunk is not None:
                        on_chunk(out)
            out["kind"] = out["kind"] or "silent"
    except (httpx.RemoteProtocolError, httpx.ReadError) as err:
        out["kind"], out["error"] = "cut", f"{type(err).__name__}: {err}"
    finally:
        out["end"] = time.monotonic()
    return out


def prompts_of(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def test_the_shipped_config_is_a_valid_serve_config_whose_args_build_the_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from drex_hf.cli.ray_serve import RayServeArgs, app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serving" / "ray-serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "drex_hf.cli.ray_serve:app"
    assert [d.name for d in application.deployments] == ["drex"]  # the deployment ray_app.py defines
    RayServeArgs.model_validate(application.args)
    assert type(app(application.args)).__name__ == "Application"


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "give model=MODEL_DIR or synthetic_config=SHAPE (exactly one)"),
        ({"model": "heads", "synthetic_config": "tiny"}, "exactly one"),
        ({"synthetic_config": "huge"}, "synthetic_config 'huge' is not one of tiny"),
        ({"synthetic_config": "tiny", "num_replica": 2}, "num_replica\n  Extra inputs are not permitted"),
        ({"synthetic_config": "tiny", "policy": "fastest"}, "policy 'fastest' is not one of drex"),
        ({"synthetic_config": "tiny", "max_batch": 0}, "max_batch\n  Input should be greater than 0"),
        ({"model": "heads", "exit_layers": "5,x"}, "exit_layers is a comma-separated list of layer indices"),
        ({"model": "heads", "threshold": 2}, "threshold is in [0, 1] or inf, got 2"),
        ({"synthetic_config": "tiny", "policy": "self_spec", "draft_source": "book"}, "draft_source 'book' is not"),
        ({"synthetic_config": "tiny", "max_logprobs": 21}, "max_logprobs\n  Input should be less than or equal to 20"),
    ],
)
def test_the_builder_refuses_bad_arguments_naming_them(args, message):
    from pydantic import ValidationError

    from drex_hf.cli.ray_serve import app

    with pytest.raises(ValidationError) as err:
        app(args)
    assert message in str(err.value)


def test_serve_run_key_value_strings_become_typed_arguments():
    from drex_hf.cli.ray_serve import RayServeArgs, usage

    spec = RayServeArgs.model_validate({"model": "heads", "policy": "self_spec", "draft_tokens": "adaptive"})
    assert (spec.policy, spec.draft_tokens, spec.max_logprobs) == ("self_spec", "adaptive", 20)
    assert RayServeArgs.model_validate({"model": "heads"}).policy is None  # the card's calibrated choice
    args = RayServeArgs.model_validate({"model": "heads", "exit_layers": "5,11", "num_replicas": "3", "num_gpus": "1"})
    assert (args.exit_layers, args.num_replicas, args.num_gpus) == ([5, 11], 3, 1.0)
    assert all(name in usage() for name in RayServeArgs.model_fields)


def test_the_ray_soak_judges_every_replica():
    """benchmarks/ray_soak.py fails a run where a replica is still busy, where the requests leaving
    the engines do not add up, or where a replica answered nothing (soak.py's own checks are
    tested in test_soak.py)."""
    import argparse
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("ray_soak", ROOT / "benchmarks" / "ray_soak.py")
        ray_soak = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ray_soak)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    soak = ray_soak.soak
    args = argparse.Namespace(requests=4, replicas=2, timeout_s=10.0)
    checks = {"lost": 0, "duplicated": 0, "mismatches": 0, "decoder_mismatches": []}

    def metrics(running, left):
        return {"drex_running_requests": running, "drex_queue_depth": 0.0,
                "drex_requests_finished_total{reason=length}": left}  # fmt: skip

    def run(a, b, answered=("a", "a", "b", "b")):
        outcomes = {i: soak.Outcome(i, status=200, replica=r) for i, r in enumerate(answered)}
        return {"outcomes": outcomes, "timed_out": False, "replicas": {"a": a, "b": b}}

    good = ray_soak.summary(run(metrics(0, 2), metrics(0, 2)), checks, args)
    assert good["ok"] and good["replicas"]["a"] == {"running": 0, "queue": 0.0, "left_engine": 2,
                                                    "finished_by_reason": {"length": 2}, "answered": 2}  # fmt: skip
    busy = ray_soak.summary(run(metrics(1, 2), metrics(0, 2)), checks, args)
    assert any("not idle" in f for f in busy["failures"])
    short = ray_soak.summary(run(metrics(0, 2), metrics(0, 1)), checks, args)
    assert any("counted 3 requests leaving their engines, not 4" in f for f in short["failures"])
    one = ray_soak.summary(run(metrics(0, 4), metrics(0, 0), answered="aaaa"), checks, args)
    assert any("did not reach every replica" in f for f in one["failures"])


def test_requests_spread_over_both_replicas_and_equal_the_offline_engine(served):
    prompts = prompts_of(24, seed=1)
    max_tokens = [random.Random(i).randint(1, 32) for i in range(24)]

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            work = [ask(client, served, p, m, stream=i % 2 == 0) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
            got = await asyncio.wait_for(asyncio.gather(*work), 90)
            models = await client.get(served + "/v1/models")
            proxy, replica = await client.get(served + "/-/healthz"), await client.get(served + "/health")
            bad = await client.post(served + "/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 0})
            return got, models, bad, proxy, replica

    got, models, bad, proxy, replica = asyncio.run(go())
    assert [g["kind"] for g in got] == ["done"] * 24, [g for g in got if g["kind"] != "done"]
    assert len({g["replica"] for g in got}) == 2, [g["replica"] for g in got]  # both replicas answered
    want = offline(prompts, max_tokens)
    assert [(g["tokens"], g["layers"]) for g in got] == want
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    assert models.headers["x-drex-replica"]
    # Ray's proxy answers its own health route; /health is one replica's (named in the header)
    assert proxy.status_code == 200 and "x-drex-replica" not in proxy.headers
    assert replica.json()["status"] == "ok" and replica.headers["x-drex-replica"] in {g["replica"] for g in got}
    # a refusal comes back through the proxy as the server's own OpenAI error body
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text


def replica_states() -> dict[str, int]:
    return dict(serve_api.status().applications[APP].deployments["drex"].replica_states)


def test_a_killed_replica_is_restarted_and_no_request_caught_on_it_vanishes(served):
    n, max_tokens = 16, 300  # long streams (about 1-3 s each here): the kill lands mid-stream
    prompts = prompts_of(n, seed=2)
    killed: dict = {}

    def kill_once(out: dict) -> None:
        """After the first 3 chunks of any stream, kill the replica sending it (force, like a crash)."""
        if killed or out["chunks"] < 3:
            return
        killed["replica"] = out["replica"]
        # a Serve replica is the actor SERVE_REPLICA::<app>#<deployment>#<replica id> in namespace "serve"
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#drex#{out['replica']}", namespace="serve")
        ray.kill(actor, no_restart=True)

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
            # every 4th one not streamed: its response starts only when it has all its tokens
            work = [
                ask(client, served, p, max_tokens, stream=i % 4 != 3, on_chunk=kill_once) for i, p in enumerate(prompts)
            ]
            first = await asyncio.wait_for(asyncio.gather(*work), 120)  # bounded: a hang fails here
            # what a client does with a failed request: send it again, after a second, up to 3 times (as
            # the OpenAI client does with a 5xx; Ray may not have seen the death yet on the first retry)
            again = [i for i, g in enumerate(first) if g["kind"] != "done"]
            retried = await asyncio.wait_for(
                asyncio.gather(*[retry(client, prompts[i], i % 4 != 3) for i in again]), 120
            )
            return first, dict(zip(again, retried))

    async def retry(client: httpx.AsyncClient, prompt: list[int], stream: bool) -> dict:
        attempts = 0
        while attempts < 3:
            attempts += 1
            await asyncio.sleep(1.0)
            got = await ask(client, served, prompt, max_tokens, stream=stream)
            if got["kind"] == "done":
                break
        return {**got, "attempts": attempts}

    first, retried = asyncio.run(go())
    victim = killed.get("replica")
    assert victim is not None, "no stream reached 3 chunks: nothing was killed"
    want = offline(prompts, [max_tokens] * n)
    kinds = [g["kind"] for g in first]
    # every request is accounted for: a whole response, a 5xx with a body, or a stream cut on the victim
    assert set(kinds) <= {"done", "status", "cut"}, first
    for i, g in enumerate(first):
        if g["kind"] == "done":
            assert (g["tokens"], g["layers"]) == want[i], f"request {i}"
        elif g["kind"] == "status":
            assert g["status"] >= 500 and g["body"].strip(), g
        else:  # cut: a stream whose headers came from the killed replica; the client got a transport error
            assert i % 4 != 3 and g["replica"] == victim and g["error"], g
    assert kinds.count("cut") >= 1, kinds  # the stream that triggered the kill was caught on it
    assert "done" in kinds  # the other replica kept serving
    # each failed request, sent again, completes with the right output
    assert sorted(retried) == [i for i, k in enumerate(kinds) if k != "done"]
    for i, g in retried.items():
        assert g["kind"] == "done" and (g["tokens"], g["layers"]) == want[i], (i, g)
        assert g["replica"] != victim

    # Ray starts a new replica in the killed one's place, which then serves; 2 running again
    survivor = {g["replica"] for g in first if g["replica"] is not None} - {victim}
    assert len(survivor) == 1, survivor

    async def until_a_new_replica_answers() -> set[str]:
        seen: set[str] = set()
        async with httpx.AsyncClient(timeout=30) as client:
            while not seen - survivor:
                got = await ask(client, served, [7, 8, 9], 2, stream=False)
                assert got["kind"] == "done", got
                seen.add(got["replica"])
                await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(asyncio.wait_for(until_a_new_replica_answers(), 90))  # a TimeoutError fails the test
    assert victim not in seen and len(seen - survivor) == 1, (seen, victim, survivor)
    end = time.monotonic() + 30
    while replica_states() != {"RUNNING": 2}:
        assert time.monotonic() < end, f"not 2 replicas running: {replica_states()}"
        time.sleep(0.5)


def test_deleting_the_application_lets_the_requests_in_flight_finish(served):
    """Ray stops a replica gracefully (scale-down, redeploy, `serve delete`): it routes nothing new
    to it, waits for the requests it has, then calls its `__del__` (the `drex serve` drain). Run last:
    it ends the application."""
    n, max_tokens = 8, 300
    prompts = prompts_of(n, seed=3)
    started = threading.Event()
    deleted: dict = {}

    def note(out: dict) -> None:
        if out["chunks"] >= 3:
            started.set()

    def delete() -> None:
        started.wait(60)
        deleted["at"] = time.monotonic()
        serve_api.delete(APP)  # blocks until Ray has stopped every replica
        deleted["done"] = time.monotonic()

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
            work = [ask(client, served, p, max_tokens, stream=True, on_chunk=note) for p in prompts]
            return await asyncio.wait_for(asyncio.gather(*work), 120)

    stopper = threading.Thread(target=lambda: bounded(delete, 90, "serve.delete"), daemon=True)
    stopper.start()
    got = asyncio.run(go())
    stopper.join(100)
    assert "done" in deleted and not stopper.is_alive(), deleted
    # the delete began while streams were running, and they ran on to their end
    assert sum(g["end"] > deleted["at"] for g in got) >= 1, (deleted, [g["end"] for g in got])
    assert APP not in serve_api.status().applications
    assert [g["kind"] for g in got] == ["done"] * n, got
    assert [(g["tokens"], g["layers"]) for g in got] == offline(prompts, [max_tokens] * n)
