"""Prometheus collectors for `GET /metrics`, in a registry of their own (one per server).

The routes count requests by status; the engine thread counts tokens, exits and finished requests
and sets the queue and batch gauges (prometheus_client's collectors are thread-safe). Tokens per
second is measured over a fixed window of recent steps, so nothing here grows with the run.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every collector the server exposes (names prefixed `drex_`)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "drex_requests", "Generation requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "drex_requests_finished", "Requests that left the engine, by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("drex_prompt_tokens", "Prompt tokens admitted to the engine", registry=r)
        self.generation_tokens = Counter("drex_generation_tokens", "Tokens the engine emitted", registry=r)
        self.queue_depth = Gauge("drex_queue_depth", "Requests admitted and waiting for a slot", registry=r)
        self.running = Gauge("drex_running_requests", "Requests holding an engine slot (rows)", registry=r)
        self.tokens_per_s = Gauge(
            "drex_tokens_per_second", f"Tokens emitted per second over the last {window_s:g} s", registry=r
        )
        self.ttft = Histogram(
            "drex_time_to_first_token_seconds",
            "From admission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "drex_time_per_output_token_seconds",
            "A finished request's mean time per output token after its first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exits = Counter("drex_exits", "Tokens by the decoder layer they left at", ["layer"], registry=r)
        self.involuntary = Counter(
            "drex_involuntary_exits", "Tokens that left before they were confident (batch policies)", registry=r
        )
        self.sla_misses = Counter(
            "drex_sla_misses", "Finished requests whose time per output token exceeded their SLA target", registry=r
        )
        self.timeouts = Counter("drex_request_timeouts", "Requests ended by --request-timeout-s", registry=r)
        self.steps = Counter("drex_engine_steps", "Engine steps run", registry=r)
        self._window_s = window_s
        self._emitted: deque[tuple[float, int]] = deque()  # (time, tokens) per step within the window
        self._lock = threading.Lock()

    def step_done(self, tokens: int, now: float | None = None) -> None:
        """After an engine step that emitted `tokens`: the step counter and the tokens/s window."""
        now = time.monotonic() if now is None else now
        self.steps.inc()
        with self._lock:
            self._emitted.append((now, tokens))
            self._refresh(now)

    def render(self) -> bytes:
        with self._lock:
            self._refresh(time.monotonic())
        return generate_latest(self.registry)

    def _refresh(self, now: float) -> None:
        while self._emitted and self._emitted[0][0] < now - self._window_s:
            self._emitted.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._emitted) / self._window_s)
