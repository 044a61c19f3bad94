"""The engine thread: the only code that touches torch, the model and the `DrexEngine`.

The asyncio routes hand it `Job`s through a bounded, lock-guarded queue (`submit`, `cancel`) and
never wait on it; the thread admits jobs into free slots, runs `engine.step()` while any is running,
and relays every token and the end of every request back to the job's event loop with
`loop.call_soon_threadsafe`. A finished request is handed to its job and dropped from the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drex_hf.serve.metrics import ServerMetrics
from drex_hf.serve.protocol import RequestError

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # a job is itself: `in` / `remove` compare identity, not prompts
class Job:
    """One prompt on its way through the engine. `events` (read on the event loop) receives, when
    `prompt_logprobs` asks, ("prompt_logprobs", [TokenLogprob | None per prompt token]) first, then
    ("token", token, layer, TokenLogprob or None) per token, then one ("done", finish_reason) or
    ("error", RequestError). `logprobs`: each token's logprob with this many top ones (None: none)."""

    ids: list[int]
    max_tokens: int
    seed: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    sla_tpot_ms: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted_at: float = field(default_factory=time.perf_counter)
    rid: int | None = None
    cancelled: bool = False  # set on the engine thread: nothing more is relayed
    closed: bool = False  # a final event was sent
    first_at: float | None = None
    last_at: float | None = None
    tokens: int = 0

    def send(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def close(self, *event: Any) -> None:
        if not self.closed:
            self.closed = True
            self.send(*event)


class EngineWorker:
    """Owns the engine on one thread. `build` makes the engine (on that thread); `max_queue` bounds
    the jobs admitted but not yet holding a slot; `sla_tpot_ms` is the server's default SLA target."""

    def __init__(
        self,
        build: Callable[[], Any],
        metrics: ServerMetrics,
        *,
        max_queue: int,
        sla_tpot_ms: float | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.build, self.metrics, self.max_queue = build, metrics, max_queue
        self.sla_tpot_ms, self.retry_after_s = sla_tpot_ms, retry_after_s
        self.engine: Any = None
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # admitted, waiting for a slot
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}  # in the engine, by request id (engine thread only)
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._running = 0  # len(self._jobs), readable from any thread
        self._admitting: list[Job] = []  # popped from the queue, not yet in the engine
        self.failed = False  # the engine thread died: nothing is admitted, /health says so

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the thread and wait until the engine is built; re-raise an error building it."""
        self._thread = threading.Thread(target=self._main, name="drex-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it: 503 while shutting down, 429 (with Retry-After) when full."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue all the jobs (one request's prompts) or none: 503 while shutting down, 429 (with
        Retry-After) when the queue has no room for all of them."""
        with self._cond:
            if self.failed:
                raise RequestError("the engine failed; the server cannot decode", status=503, type="server_error")
            if self._draining or self._stopping:
                raise RequestError("the server is shutting down", status=503, type="server_shutting_down")
            if len(self._pending) + len(jobs) > self.max_queue:
                room = max(0, self.max_queue - len(self._pending))
                what = "" if len(jobs) == 1 else f" for {len(jobs)} prompts (room for {room})"
                raise RequestError(
                    f"the server's queue is full ({self.max_queue} requests waiting){what}; retry later",
                    status=429,
                    type="rate_limit_error",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away, timed out or a stop sequence ended it: free its slot (by the next step)."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                self.metrics.finished.labels("cancelled").inc()
                job.closed = True
                return
            self._cancels.append(job)
            self._cond.notify()

    def begin_drain(self) -> None:
        """Stop admitting (new requests get 503); jobs still queued are answered 503 now."""
        with self._cond:
            self._draining = True
            dropped, self._pending = list(self._pending), deque()
            self.metrics.queue_depth.set(0)
        for job in dropped:
            job.close("error", RequestError("the server is shutting down", status=503, type="server_shutting_down"))

    def cancel_all(self) -> None:
        """The grace period is over: end every running request (its client gets what it has)."""
        with self._cond:
            self._cancels.append(None)  # type: ignore[arg-type]  # None: all of them
            self._cond.notify()

    @property
    def busy(self) -> int:
        """Requests queued or running."""
        return len(self._pending) + self._running

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self.engine = self.build()
        except BaseException as err:  # handed to start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException:
            logger.exception("the engine thread failed")
            with self._cond:  # no new job comes in; every job it knew of, queued or admitted, is answered
                self.failed = True
                jobs = [*self._jobs.values(), *self._pending, *self._admitting]
                self._pending.clear()
                self._jobs.clear()
                self._running = 0
            for job in jobs:  # logged above; the thread ends, the HTTP side answers 503 from now on
                job.close("error", RequestError("the engine failed", status=500, type="server_error"))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._pending and engine.has_free_slot) and not self._cancels and not self._jobs:
                    if self._stopping:
                        return
                    self._cond.wait()
                if self._stopping:
                    self._cancels.append(None)  # type: ignore[arg-type]
                cancels, self._cancels = self._cancels, []
                admit = self._admitting = []
                while self._pending and engine.has_free_slot and len(admit) < engine.store.free_slots:
                    admit.append(self._pending.popleft())
                self.metrics.queue_depth.set(len(self._pending))
            for job in admit:  # before the cancels: one may be for a job admitted just now
                self._add(job)
            self._admitting = []
            for job in cancels:
                for victim in list(self._jobs.values()) if job is None else [job]:
                    self._cancel(victim)
            self._set_running()
            if self._stopping and not self._jobs:
                return
            if self._jobs:
                self._step()

    def _set_running(self) -> None:
        self._running = len(self._jobs)
        self.metrics.running.set(self._running)

    def _add(self, job: Job) -> None:
        import torch

        from drex_hf.errors import DrexError
        from drex_hf.generation.sampling import RequestSampling

        sampling = RequestSampling(
            temperature=job.temperature,
            top_p=job.top_p,
            presence_penalty=job.presence_penalty,
            frequency_penalty=job.frequency_penalty,
        )
        # a request's sla_tpot_ms reaches the scheduler of an engine that steers by each request's
        steers = getattr(self.engine, "sla_per_request", False)
        extra = {"sla_tpot_ms": job.sla_tpot_ms} if job.sla_tpot_ms is not None and steers else {}
        try:
            if job.prompt_logprobs is not None:  # echo: the prompt's own logprobs, at full depth, first
                from drex_hf.generation.scoring import prompt_logprobs

                job.send("prompt_logprobs", prompt_logprobs(self.engine.model, job.ids, job.prompt_logprobs))
            rid = self.engine.add_request(
                torch.tensor(job.ids, dtype=torch.long),
                max_new_tokens=job.max_tokens,
                seed=job.seed,
                callback=self._on_token,
                on_finish=self._on_finish,
                sampling=sampling,
                logprobs=job.logprobs,
                **extra,
            )
        except DrexError as err:  # the routes check first; this is the engine's own word
            job.close("error", RequestError(" ".join(str(err).split())))
            return
        job.rid = rid
        self._jobs[rid] = job
        self.metrics.prompt_tokens.inc(len(job.ids))

    def _cancel(self, job: Job) -> None:
        if job.rid is None or job.rid not in self._jobs or job.cancelled:
            return
        job.cancelled = True
        self.engine.cancel(job.rid)  # its slot is free now; on_finish runs with "cancelled"

    def _step(self) -> None:
        engine = self.engine
        involuntary = getattr(engine.stats, "involuntary_exits", 0)  # self-speculation never forces one
        before = engine.stats.tokens
        engine.step()
        self.metrics.step_done(engine.stats.tokens - before)
        now = getattr(engine.stats, "involuntary_exits", 0)
        if now > involuntary:
            self.metrics.involuntary.inc(now - involuntary)
        self._set_running()

    def _on_token(self, rid: int, token: int, layer: int, logprob: Any = None) -> None:
        job = self._jobs.get(rid)
        now = time.perf_counter()
        self.metrics.generation_tokens.inc()
        self.metrics.exits.labels(str(layer)).inc()
        if job is None:
            return
        job.tokens += 1
        if job.first_at is None:
            job.first_at = now
            self.metrics.ttft.observe(now - job.admitted_at)
        job.last_at = now
        if not job.cancelled:
            job.send("token", token, layer, logprob)

    def _on_finish(self, output: Any) -> None:
        job = self._jobs.pop(output.request_id, None)
        if job is None:
            return
        reason = output.finish_reason
        self.metrics.finished.labels(reason).inc()
        if job.tokens > 1 and job.first_at is not None and job.last_at is not None:
            tpot = (job.last_at - job.first_at) / (job.tokens - 1)
            self.metrics.tpot.observe(tpot)
            target = job.sla_tpot_ms if job.sla_tpot_ms is not None else self.sla_tpot_ms
            if target is not None and tpot * 1e3 > target:
                self.metrics.sla_misses.inc()
        job.close("done", reason)
