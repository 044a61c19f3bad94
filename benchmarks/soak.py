"""Soak `drex serve`: many streamed requests from a seeded schedule against a live server, counted.

    python benchmarks/soak.py                                  # 10,000 requests on the tiny model
    python benchmarks/soak.py --requests 500 --rate 200 --out runs/soak-500

The script starts `python -m drex_hf.cli.main serve --synthetic-config tiny --port 0` as a subprocess
on 127.0.0.1 (the real CLI and its own interpreter, so the server's memory is its own and the client
does not share its GIL), sends `--requests` streamed completions with Poisson arrivals at `--rate`
(prompts of 1-200 random token ids, `max_tokens` 1-64, `--cancel-frac` of them closed by the client
after 1-3 chunks, half sampled with their own temperature / top_p / seed, the rest greedy) through an
httpx.AsyncClient with at most `--concurrency` requests in flight, polls `/metrics` and the server's
resident memory, then stops the server with SIGTERM. It checks:

* nothing lost: every request got a whole stream (one final chunk, then `[DONE]`) or was cancelled
  by the client on purpose; nothing duplicated: no response id twice, one final chunk and one
  `[DONE]` per stream, the streamed text equal to the decoded `token_ids` (so no chunk twice), and
  `usage` equal to the tokens returned;
* every finished greedy response, and `--check-sampled` of the sampled ones, equal (token ids and exit
  layers) to an offline `DrexEngine` (per-request sampling) on the same weights in this process, a
  cancelled one's text a prefix of its reference's; `--check-decoder` of them also equal to the
  reference decoder (`generate_reference`), one request at a time;
* resident memory and slot use (running rows, queue depth) in the first and the last 1,000 requests,
  and an idle server (no row, nothing queued) once all have ended: a cancelled stream freed its slot;
* p50/p99 time to first token (request sent to the stream's headers, which the server sends with the
  first token) and time per output token, requests/s and tokens/s.

Writes soak.json and soak.md to `--out`; a progress line per 1,000 requests on stderr. Exits 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256  # the tiny shape's vocabulary: prompts are random ids below it
MAX_PROMPT, MAX_TOKENS = 200, 64
MIB = 1 << 20
# Memory "flat": the median resident set size of the last window may exceed the first window's by at
# most this much. A server that kept anything per request (a Job, its prompt and tokens: >= 2 KB)
# would grow by >= 16 MiB over the 8,000 requests between the windows of a 10,000-request soak;
# glibc's arenas and torch's CPU allocator move the resident set by a few MiB either way.
RSS_TOLERANCE_MIB = 16.0
# Slots "flat": running rows and queue depth follow the load (and, on a shared machine, how fast the
# server is at the moment), so they are reported, not judged. What a leak changes is the number of
# rows and queued requests no open client request accounts for (server busy - client in flight): a
# leaked slot adds one for good. Cancelled streams add a little while the server has yet to see the
# disconnect (within a step, a few ms of every 250 ms sample), so its mean over the last window may
# exceed the first's by at most half a row; and the server must be idle at the end (the sharp test).
ROWS_TOLERANCE = 0.5


@dataclass
class Plan:
    """One request of the schedule."""

    index: int
    at: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    sampled: bool
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cancel_after: int | None = None  # chunks read before the client closes the stream

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},  # OpenAI's last chunk: the usage, no choices
            "return_exit_layers": True,
        }
        if self.sampled:
            body.update(top_p=self.top_p, seed=self.seed)
        return body


@dataclass
class Outcome:
    """What came back for one request."""

    index: int
    start: float = math.nan  # seconds after the start
    status: int | None = None
    ids: list[str] = field(default_factory=list)  # the response id of every chunk
    text: str = ""
    chunks: int = 0  # data events with a choice (not [DONE])
    finals: int = 0  # chunks with a finish_reason
    dones: int = 0  # [DONE] events
    after_done: int = 0  # events after [DONE]
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    exit_layers: list[int] | None = None
    usage: dict[str, int] | None = None
    cancelled: bool = False  # the client closed the stream on purpose
    ttft: float | None = None
    end: float | None = None
    error: str | None = None
    retries: int = 0  # 429s retried
    replica: str | None = None  # the x-drex-replica header: which Ray Serve replica answered (ray_soak.py)

    @property
    def finished(self) -> bool:
        return self.status == 200 and self.finals == 1 and self.dones == 1 and self.error is None


def schedule(n: int, rate: float, seed: int, cancel_frac: float = 0.1) -> list[Plan]:
    """`n` requests with Poisson arrivals at `rate` per second, from `seed`."""
    rng = random.Random(seed)
    plans, at = [], 0.0
    for i in range(n):
        at += rng.expovariate(rate)
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, MAX_PROMPT))]
        cancel = rng.random() < cancel_frac
        # a cancelled stream asks for enough tokens to be cut mid-stream, after 1-3 chunks
        max_tokens = rng.randint(8, MAX_TOKENS) if cancel else rng.randint(1, MAX_TOKENS)
        plan = Plan(
            i, at, prompt, max_tokens, sampled=rng.random() < 0.5, cancel_after=rng.randint(1, 3) if cancel else None
        )
        if plan.sampled:
            plan.temperature = round(rng.uniform(0.3, 1.5), 3)
            plan.top_p = round(rng.uniform(0.5, 1.0), 3)
            plan.seed = rng.getrandbits(32)
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------- the server
def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """`drex serve --synthetic-config SHAPE --port 0` in a subprocess; (process, base URL)."""
    cmd = [
        sys.executable, "-m", "drex_hf.cli.main", "serve", "--synthetic-config", args.shape, "--host", "127.0.0.1",
        "--port", "0", "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
        "--max-queue", str(args.max_queue), "--policy", args.policy, "--grace-s", "10",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=sink, env=env, cwd=ROOT)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"drex serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"drex serve did not start within 120 s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (the server drains), then the exit code; killed if it outstays `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def rss_of(pid: int) -> int:
    """Resident bytes of a process: psutil, else /proc/PID/statm."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gauges(text: str) -> dict[str, float]:
    """Unlabelled and labelled samples of Prometheus text, as {'name{labels}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ---------------------------------------------------------------------- the client
async def send(client: httpx.AsyncClient, url: str, model: str, plan: Plan, t0: float) -> Outcome:
    """One streamed completion; the client closes it after `plan.cancel_after` chunks."""
    out = Outcome(plan.index)
    body = plan.body(model)
    while True:
        out.start = time.perf_counter() - t0
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                out.status, out.replica = response.status_code, response.headers.get("x-drex-replica")
                if response.status_code == 429:  # the queue is full: wait as told, try again
                    out.retries += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                out.ttft = time.perf_counter() - t0 - out.start
                if response.status_code != 200:
                    out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return out
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if out.dones:
                        out.after_done += 1
                        continue
                    if data == "[DONE]":
                        out.dones += 1
                        continue
                    read(out, json.loads(data))
                    if plan.cancel_after is not None and out.chunks >= plan.cancel_after and not out.finals:
                        out.cancelled = True
                        break  # leaving the block closes the connection mid-stream
                out.end = time.perf_counter() - t0
                return out
        except (httpx.HTTPError, json.JSONDecodeError) as err:
            out.error = f"{type(err).__name__}: {err}"
            return out


def read(out: Outcome, chunk: dict[str, Any]) -> None:
    if "error" in chunk:
        out.error = f"error event: {chunk['error'].get('message')}"
        return
    out.ids.append(chunk.get("id"))
    if not chunk["choices"]:  # the usage chunk ends the stream
        out.usage = chunk.get("usage")
        return
    out.chunks += 1
    choice = chunk["choices"][0]
    out.text += choice.get("text") or ""
    if choice.get("finish_reason") is not None:
        out.finals += 1
        out.finish_reason = choice["finish_reason"]
        out.token_ids, out.exit_layers = choice.get("token_ids"), choice.get("exit_layers")


async def drive(args: argparse.Namespace, url: str, model: str, plans: list[Plan], pid: int) -> dict[str, Any]:
    """Send the schedule; poll /metrics and memory meanwhile; the outcomes and the samples."""
    outcomes: dict[int, Outcome] = {}
    samples: list[dict[str, float]] = []
    done, started = [0], [0]
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    t0 = time.perf_counter()
    every = max(1, min(1000, len(plans) // 10))

    async def one(client: httpx.AsyncClient, plan: Plan) -> None:
        try:
            outcomes[plan.index] = await send(client, url, model, plan, t0)
        finally:
            gate.release()
            done[0] += 1
            if done[0] % every == 0 or done[0] == len(plans):
                progress(done[0], len(plans), time.perf_counter() - t0, outcomes, samples)

    async def poll(client: httpx.AsyncClient) -> None:
        while True:
            try:
                before = started[0] - done[0]
                g = gauges((await client.get(url + "/metrics")).text)
                in_flight = max(before, started[0] - done[0])  # the server's reading lies in between
                running, queue = g.get("drex_running_requests", math.nan), g.get("drex_queue_depth", math.nan)
                samples.append({"t": time.perf_counter() - t0, "done": done[0], "rss": rss_of(pid), "running": running,
                                "queue": queue, "in_flight": in_flight,
                                "unowned": max(0.0, running + queue - in_flight)})  # fmt: skip
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(args.poll_s)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, httpx.AsyncClient(timeout=10) as side:
        poller = asyncio.ensure_future(poll(side))

        def launch(plan: Plan) -> Any:
            started[0] += 1
            return one(client, plan)

        timed_out = await dispatch_schedule(plans, t0, gate, launch, args.timeout_s)
        wall = time.perf_counter() - t0
        idle = await wait_idle(side, url)
        final = gauges((await side.get(url + "/metrics")).text)
        poller.cancel()
    return {"outcomes": outcomes, "samples": samples, "wall_s": wall, "timed_out": timed_out, "idle": idle,
            "metrics": final, "rss_idle": rss_of(pid)}  # fmt: skip


async def dispatch_schedule(
    plans: list[Plan], t0: float, gate: asyncio.Semaphore, launch: Any, timeout_s: float
) -> bool:
    """Start `launch(plan)` at each plan's time (after `t0`), holding `gate` (at most its count in
    flight: the rest wait here, which is the send lag), and wait for all of them; past `timeout_s`
    the rest are cancelled and it returns True."""
    tasks: list[asyncio.Future] = []

    async def dispatch() -> None:
        for plan in plans:
            delay = plan.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            tasks.append(asyncio.ensure_future(launch(plan)))
        await asyncio.gather(*tasks)

    try:
        await asyncio.wait_for(dispatch(), timeout_s)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return True
    return False


async def wait_idle(client: httpx.AsyncClient, url: str, within_s: float = 10.0) -> dict[str, float]:
    """Running rows and queue depth once the server settles (a cancelled slot is freed within a step)."""
    end = time.monotonic() + within_s
    while True:
        g = gauges((await client.get(url + "/metrics")).text)
        now = {"running": g["drex_running_requests"], "queue": g["drex_queue_depth"]}
        if (now["running"] == 0 and now["queue"] == 0) or time.monotonic() > end:
            return now
        await asyncio.sleep(0.05)


def progress(done: int, total: int, elapsed: float, outcomes: dict[int, Outcome], samples: list[dict]) -> None:
    bad = sum(1 for o in outcomes.values() if not (o.finished or o.cancelled))
    last = samples[-1] if samples else {"rss": math.nan, "running": math.nan}
    print(
        f"soak: {done}/{total} requests, {elapsed:.1f} s, {done / elapsed:.1f} req/s, {bad} lost, "
        f"server rss {last['rss'] / MIB:.0f} MiB, running rows {last['running']:g}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------- checks
def references(plans: list[Plan], args: argparse.Namespace) -> dict[int, tuple[list[int], list[int]]]:
    """(tokens, exit layers) of each plan, decoded offline by a `DrexEngine` with per-request sampling,
    built as the server builds its own (`drex_hf.serve.server.new_engine`), on the same weights
    (the synthetic model is drawn from a fixed seed)."""
    import torch

    from drex_hf.cli.serve import load
    from drex_hf.generation.sampling import RequestSampling
    from drex_hf.serve.server import ServeOptions, new_engine

    model, _, _ = load(synthetic=args.shape)
    engine = new_engine(model, ServeOptions(max_batch=args.reference_batch, max_len=args.max_len, policy=args.policy))
    got: dict[int, Any] = {}
    rid_of: dict[int, int] = {}
    with torch.no_grad():
        pending = list(plans)
        while pending or engine.requests or engine.prefill_queue:
            while pending and engine.has_free_slot:
                p = pending.pop()
                rid = engine.add_request(
                    torch.tensor(p.prompt, dtype=torch.long),
                    max_new_tokens=p.max_tokens,
                    seed=p.seed if p.seed is not None else 0,
                    sampling=RequestSampling(temperature=p.temperature, top_p=p.top_p),
                    on_finish=lambda o: got.__setitem__(o.request_id, o),
                )
                rid_of[p.index] = rid
            if not engine.step() and not pending:
                break
    return {i: (list(got[rid].tokens), list(got[rid].exit_layers)) for i, rid in rid_of.items()}


def decoder_references(plans: list[Plan], args: argparse.Namespace) -> dict[int, tuple[list[int], list[int]]]:
    """The same from the reference decoder, one request at a time (`generate_reference`), with the
    server's settings but no top-k: a request's sampling is its temperature and top_p only (the OpenAI
    API has no top_k), not the generation config's default top_k of 50."""
    import dataclasses

    import torch

    from drex_hf.cli.serve import load
    from drex_hf.generation.reference import generate_reference
    from drex_hf.serve.server import ServeOptions, new_engine

    model, _, _ = load(synthetic=args.shape)
    base = new_engine(model, ServeOptions(max_batch=1, max_len=args.max_len, policy=args.policy)).settings
    thresholds = model.exit_config.threshold_list()
    out = {}
    with torch.no_grad():
        for p in plans:
            settings = dataclasses.replace(base, max_new_tokens=p.max_tokens, do_sample=p.sampled,
                                           temperature=p.temperature if p.sampled else 1.0,
                                           top_p=p.top_p if p.sampled else None, top_k=None)  # fmt: skip
            ids = torch.tensor(p.prompt, dtype=torch.long)
            r = generate_reference(model, [ids], settings, thresholds, [p.seed or 0])[0]
            out[p.index] = (list(r.tokens), list(r.exit_layers))
    return out


def byte_text(tokens: list[int]) -> str:
    from drex_hf.serve.text import ByteTokenizer

    return ByteTokenizer(VOCAB).decode(tokens)


def integrity(plans: list[Plan], outcomes: dict[int, Outcome]) -> tuple[list[tuple], list[tuple]]:
    """(lost, duplicated): requests with neither a whole stream nor a deliberate cancel, and every
    sign of something delivered twice (a response id, a final chunk, [DONE], a chunk of text, a token)."""
    lost = []
    for p in plans:
        o = outcomes.get(p.index)
        if o is None or not (o.finished or o.cancelled):
            lost.append((p.index, o.error if o is not None else "never answered"))
    seen: dict[str, int] = {}
    duplicated = []
    for o in outcomes.values():
        ids = set(o.ids)
        if len(ids) > 1:
            duplicated.append((o.index, "chunks of one stream carry different ids"))
        for rid in ids:
            if rid in seen:
                duplicated.append((o.index, f"response id {rid} also answered request {seen[rid]}"))
            seen[rid] = o.index
        if o.finals > 1 or o.dones > 1 or o.after_done:
            duplicated.append((o.index, f"{o.finals} final chunks, {o.dones} [DONE], {o.after_done} events after it"))
        if o.finished:
            p = plans[o.index]
            n = len(o.token_ids or [])
            if o.text != byte_text(o.token_ids or []):
                duplicated.append((o.index, "the streamed text is not the decoded token_ids"))
            if len(o.exit_layers or []) != n or (o.usage or {}).get("completion_tokens") != n:
                duplicated.append((o.index, f"{n} token_ids, {len(o.exit_layers or [])} exit layers, usage {o.usage}"))
            if n > p.max_tokens or (o.usage or {}).get("prompt_tokens") != len(p.prompt):
                duplicated.append((o.index, f"{n} tokens for max_tokens {p.max_tokens}, usage {o.usage}"))
    return lost, duplicated


def check(plans: list[Plan], run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    outcomes: dict[int, Outcome] = run["outcomes"]
    lost, duplicated = integrity(plans, outcomes)

    # which responses are compared with their offline references
    finished = [p for p in plans if p.index in outcomes and outcomes[p.index].finished]
    cancelled = [p for p in plans if p.index in outcomes and outcomes[p.index].cancelled]
    rng = random.Random(args.seed + 1)
    sampled = [p for p in finished + cancelled if p.sampled]
    chosen_sampled = rng.sample(sampled, min(args.check_sampled, len(sampled)))
    checked = [p for p in finished + cancelled if not p.sampled] + chosen_sampled
    t = time.perf_counter()
    want = references(checked, args)
    engine_s = time.perf_counter() - t
    mismatches = []
    for p in checked:
        o, (tokens, layers) = outcomes[p.index], want[p.index]
        if o.finished and (o.token_ids, o.exit_layers) != (tokens, layers):
            mismatches.append({"request": p.index, "sampled": p.sampled, "got": o.token_ids, "want": tokens,
                               "got_layers": o.exit_layers, "want_layers": layers})  # fmt: skip
        if o.cancelled and not byte_text(tokens).startswith(o.text):
            mismatches.append({"request": p.index, "sampled": p.sampled, "cancelled": True, "text": o.text})
    decoder_sample = rng.sample(checked, min(args.check_decoder, len(checked)))
    t = time.perf_counter()
    by_decoder = decoder_references(decoder_sample, args)
    decoder_s = time.perf_counter() - t
    decoder_mismatches = [p.index for p in decoder_sample if by_decoder[p.index] != want[p.index]]
    return {
        "lost": len(lost),
        "lost_requests": lost[:20],
        "duplicated": len(duplicated),
        "duplicated_requests": duplicated[:20],
        "finished": len(finished),
        "cancelled_by_client": len(cancelled),
        "cancel_planned_but_finished_first": sum(1 for p in finished if p.cancel_after is not None),
        "checked_greedy": sum(1 for p in checked if not p.sampled),
        "checked_sampled": len(chosen_sampled),
        "checked_cancelled": sum(1 for p in checked if outcomes[p.index].cancelled),
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "decoder_checked": len(decoder_sample),
        "decoder_mismatches": decoder_mismatches,
        "reference_engine_s": round(engine_s, 2),
        "reference_decoder_s": round(decoder_s, 2),
    }


def windows(plans: list[Plan], run: dict[str, Any], window: int) -> dict[str, Any]:
    """Memory and slot use while the first and the last `window` requests ended."""
    samples, n = run["samples"], len(plans)
    first = [s for s in samples if s["done"] < window]
    last = [s for s in samples if n - window <= s["done"] < n]

    def summary(rows: list[dict]) -> dict[str, float]:
        if not rows:
            return {"samples": 0}
        return {
            "samples": len(rows),
            "rss_mib_median": round(median([s["rss"] / MIB for s in rows]), 1),
            "rss_mib_max": round(max(s["rss"] / MIB for s in rows), 1),
            "running_mean": round(sum(s["running"] for s in rows) / len(rows), 2),
            "running_max": max(s["running"] for s in rows),
            "queue_mean": round(sum(s["queue"] for s in rows) / len(rows), 2),
            "queue_max": max(s["queue"] for s in rows),
            "unowned_mean": round(sum(s["unowned"] for s in rows) / len(rows), 3),
            "unowned_max": max(s["unowned"] for s in rows),
        }

    a, b = summary(first), summary(last)
    out: dict[str, Any] = {"window": window, "first": a, "last": b, "idle_after": run["idle"],
                           "rss_mib_idle_after": round(run["rss_idle"] / MIB, 1)}  # fmt: skip
    if a["samples"] and b["samples"]:
        out["rss_growth_mib"] = round(b["rss_mib_median"] - a["rss_mib_median"], 1)
        out["rss_flat"] = out["rss_growth_mib"] <= RSS_TOLERANCE_MIB
        out["unowned_growth"] = round(b["unowned_mean"] - a["unowned_mean"], 3)
        out["slots_flat"] = out["unowned_growth"] <= ROWS_TOLERANCE
    out["idle"] = run["idle"]["running"] == 0 and run["idle"]["queue"] == 0
    return out


def median(values: list[float]) -> float:
    return percentile(values, 50)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency(run: dict[str, Any], plans: list[Plan]) -> dict[str, Any]:
    done = [o for o in run["outcomes"].values() if o.finished]
    ttft = [o.ttft * 1e3 for o in done if o.ttft is not None]
    tpot = [(o.end - o.start - o.ttft) * 1e3 / (len(o.token_ids) - 1) for o in done if len(o.token_ids or []) > 1]
    lag = [(o.start - plans[o.index].at) * 1e3 for o in run["outcomes"].values()]
    ended = [o for o in run["outcomes"].values() if o.finished or o.cancelled]
    tokens = sum(len(o.token_ids or []) for o in done)
    generated = run["metrics"].get("drex_generation_tokens_total", math.nan)
    wall = run["wall_s"]
    return {
        "ttft_ms_p50": round(percentile(ttft, 50), 2),
        "ttft_ms_p99": round(percentile(ttft, 99), 2),
        "tpot_ms_p50": round(percentile(tpot, 50), 3),
        "tpot_ms_p99": round(percentile(tpot, 99), 3),
        "send_lag_ms_p50": round(percentile(lag, 50), 2),
        "send_lag_ms_p99": round(percentile(lag, 99), 2),
        "requests_per_s": round(len(ended) / wall, 2),
        "tokens_per_s_delivered": round(tokens / wall, 1),
        "tokens_per_s_generated": round(generated / wall, 1),
        "wall_s": round(wall, 2),
        "retries_429": sum(o.retries for o in run["outcomes"].values()),
    }


# ---------------------------------------------------------------------- report
def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    c, w, lat, a = report["checks"], report["flat"], report["latency"], report["args"]
    first, last = w["first"], w["last"]

    def cell(d: dict, key: str) -> str:
        return str(d.get(key, "-"))

    rows = [
        sent_row(a),
        *check_rows(c),
        (
            f"server RSS MiB, median (max): first / last {w['window']}",
            f"{cell(first, 'rss_mib_median')} ({cell(first, 'rss_mib_max')}) / {cell(last, 'rss_mib_median')} "
            f"({cell(last, 'rss_mib_max')}); growth {w.get('rss_growth_mib', '-')} (tolerance {RSS_TOLERANCE_MIB:g})",
        ),
        (
            f"running rows mean (max): first / last {w['window']}",
            f"{cell(first, 'running_mean')} ({cell(first, 'running_max')}) / {cell(last, 'running_mean')} "
            f"({cell(last, 'running_max')}) of {a['max_batch']}",
        ),
        (
            f"queue depth mean (max): first / last {w['window']}",
            f"{cell(first, 'queue_mean')} ({cell(first, 'queue_max')}) / "
            f"{cell(last, 'queue_mean')} ({cell(last, 'queue_max')})",
        ),
        (
            f"rows + queued with no open client request, mean (max): first / last {w['window']}",
            f"{cell(first, 'unowned_mean')} ({cell(first, 'unowned_max')}) / {cell(last, 'unowned_mean')} "
            f"({cell(last, 'unowned_max')}); growth {w.get('unowned_growth', '-')} (tolerance {ROWS_TOLERANCE:g})",
        ),
        (
            "after the run",
            f"{w['idle_after']['running']:g} rows running, {w['idle_after']['queue']:g} queued; "
            f"server cancelled {report['server']['finished_cancelled']:g}, exit code {report['server']['exit_code']}",
        ),
        *latency_rows(lat),
        (
            "wall",
            f"{lat['wall_s']} s (+ {c['reference_engine_s']} s offline engine, {c['reference_decoder_s']} s decoder)",
        ),
    ]
    title = f"Soak: drex serve, synthetic `{a['shape']}`, max batch {a['max_batch']}"
    write_markdown(out / "soak.md", title, report, rows)


def sent_row(a: dict[str, Any]) -> tuple[str, str]:
    """The report's row for the schedule sent (`a`: the report's args)."""
    return (
        "requests sent",
        f"{a['requests']} (Poisson {a['rate']:g}/s, seed {a['seed']}, concurrency {a['concurrency']})",
    )


def check_rows(c: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's rows for what the checks found (`c`: the report's checks)."""
    checked = c["checked_greedy"] + c["checked_sampled"]
    return [
        (
            "finished / cancelled by the client",
            f"{c['finished']} / {c['cancelled_by_client']}"
            f" ({c['cancel_planned_but_finished_first']} planned cancels finished first)",
        ),
        ("lost", str(c["lost"])),
        ("duplicated", str(c["duplicated"])),
        (
            "equal to the offline engine",
            f"{checked - c['mismatches']} of {checked} ({c['checked_greedy']} greedy = all, {c['checked_sampled']} "
            f"sampled; {c['checked_cancelled']} of them cancelled, prefix)",
        ),
        ("mismatches", str(c["mismatches"])),
        (
            "engine = reference decoder",
            f"{c['decoder_checked'] - len(c['decoder_mismatches'])} of {c['decoder_checked']}",
        ),
    ]


def latency_rows(lat: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's latency and throughput rows (`lat`: the report's latency)."""
    return [
        ("time to first token p50 / p99", f"{lat['ttft_ms_p50']} / {lat['ttft_ms_p99']} ms"),
        ("time per output token p50 / p99", f"{lat['tpot_ms_p50']} / {lat['tpot_ms_p99']} ms"),
        (
            "throughput",
            f"{lat['requests_per_s']} requests/s, {lat['tokens_per_s_delivered']} tokens/s delivered "
            f"({lat['tokens_per_s_generated']} generated, cancelled streams included)",
        ),
        ("client send lag p50 / p99", f"{lat['send_lag_ms_p50']} / {lat['send_lag_ms_p99']} ms"),
    ]


def write_markdown(path: Path, title: str, report: dict[str, Any], rows: list[tuple[str, Any]]) -> None:
    """A soak report as markdown: its title, command, verdict and a two-column table of `rows`."""
    lines = [
        f"# {title}",
        "",
        f"`{report['command']}`",
        "",
        f"**{'PASS' if report['ok'] else 'FAIL'}**: " + "; ".join(report["failures"] or ["all checks hold"]),
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak drex serve with a seeded schedule of streamed requests and check what came back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=10_000, help="requests to send")
    p.add_argument(
        "--rate",
        type=float,
        default=35.0,
        help="Poisson arrival rate, requests/s: about 60 %% of what max batch 8 of the tiny model serves "
        "saturated on the 2-core CPU VM (56/s), so rows are busy and the queue stays short",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule (prompts, lengths, sampling, cancels)")
    p.add_argument("--cancel-frac", type=float, default=0.1, help="share of streams the client closes after 1-3 chunks")
    p.add_argument("--concurrency", type=int, default=48, help="requests in flight at most (httpx connections)")
    p.add_argument("--check-sampled", type=int, default=200, help="sampled responses compared with their reference")
    p.add_argument("--check-decoder", type=int, default=50, help="checked ones also decoded by generate_reference")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit on sending the whole schedule")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="client read timeout per request")
    p.add_argument("--poll-s", type=float, default=0.25, help="seconds between /metrics and memory samples")
    p.add_argument("--shape", default="tiny", help="synthetic model shape the server serves")
    p.add_argument("--max-batch", type=int, default=8, help="server engine slots")
    p.add_argument("--max-len", type=int, default=MAX_PROMPT + MAX_TOKENS, help="server positions per slot")
    p.add_argument("--max-queue", type=int, default=64, help="server queue bound (past it: 429, retried)")
    p.add_argument("--policy", default="drex", help="server scheduling policy")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (OMP_NUM_THREADS) and of the offline references: the tiny model's "
        "matmuls are too small to split, and on a busy 2-core machine two threads spin against each other",
    )
    p.add_argument("--reference-batch", type=int, default=32, help="rows of the offline reference engine")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="folder for soak.json and soak.md")
    args = p.parse_args(argv)
    for name in ("requests", "rate", "concurrency", "timeout_s", "max_batch", "threads", "reference_batch"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.cancel_frac <= 1:
        p.error(f"--cancel-frac must be in [0, 1], got {args.cancel_frac}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plans = schedule(args.requests, args.rate, args.seed, args.cancel_frac)
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args, args.out / "server.log")
    try:
        run = asyncio.run(drive(args, url, f"synthetic-{args.shape}", plans, proc.pid))
    finally:
        exit_code = stop_server(proc)
    import torch

    torch.set_num_threads(args.threads)  # as the server's: the same reductions, the same tokens
    checks = check(plans, run, args)
    flat = windows(plans, run, min(1000, max(1, args.requests // 5)))
    metrics = run["metrics"]
    server = {
        "exit_code": exit_code,
        "finished_cancelled": metrics.get("drex_requests_finished_total{reason=cancelled}", 0.0),
        "finished_by_reason": {
            k.split("=")[1].rstrip("}"): v for k, v in metrics.items() if k.startswith("drex_requests_finished_total{")
        },  # fmt: skip
        "requests_by_status": {k: v for k, v in metrics.items() if k.startswith("drex_requests_total{")},
    }
    failures = []
    if run["timed_out"]:
        failures.append(f"the schedule did not finish within --timeout-s {args.timeout_s:g}")
    for name in ("lost", "duplicated", "mismatches"):
        if checks[name]:
            failures.append(f"{checks[name]} {name}")
    if checks["decoder_mismatches"]:
        failures.append(f"{len(checks['decoder_mismatches'])} engine references differ from the reference decoder")
    if not flat["idle"]:
        failures.append(f"the server is not idle after the run: {flat['idle_after']}")
    if flat.get("rss_flat") is False:
        failures.append(f"server memory grew {flat['rss_growth_mib']} MiB (tolerance {RSS_TOLERANCE_MIB:g})")
    if flat.get("slots_flat") is False:
        failures.append(
            f"rows or queued requests no client request accounts for grew by {flat['unowned_growth']} "
            f"(tolerance {ROWS_TOLERANCE:g})"
        )
    left_engine = sum(server["finished_by_reason"].values())
    if left_engine != args.requests:
        failures.append(f"the server counted {left_engine:g} requests leaving its engine, not {args.requests}")
    if exit_code != 0:
        failures.append(f"the server exited {exit_code} on SIGTERM")
    report = {
        "command": command,
        "ok": not failures,
        "failures": failures,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checks": checks,
        "flat": flat,
        "latency": latency(run, plans),
        "server": server,
        "samples": run["samples"],
        "outcomes_head": [asdict(run["outcomes"][i]) for i in sorted(run["outcomes"])[:5]],
    }
    write(args.out, report)
    print(
        f"soak: {'PASS' if report['ok'] else 'FAIL: ' + '; '.join(failures)} -> {args.out / 'soak.md'}", file=sys.stderr
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
