"""Requests on the host: their outputs, their lifecycle, and which slot holds which (no torch here).

A request is QUEUED (waiting for its prefill), RUNNING (its row state lives on the device: position,
draw counter, pending token, buffer membership) or DONE. Its transitions are explicit methods of
`Requests`, the one table the engines keep: `admit` (a slot and a ticket epoch), `start` (prefilled),
`finish` (the device or the host ended it). A slot is free again at `finish`; the epoch a request
was given tags its tickets in the device's queues, so a verdict row of an earlier occupant of the slot
(still in flight, or a stale queue entry) is told apart and dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# (request id, token, exit layer), and the token's `TokenLogprob` too for a request that asked for logprobs
TokenCallback = Callable[..., None]
FinishCallback = Callable[["RequestOutput"], None]  # the request's output, once, when it ends


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the distribution it was picked from (the exit head's for an
    exited token, full depth's otherwise; before processors, penalties and sampling warps), and the
    `top` most likely tokens there as (token id, log-probability), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_row(cls, row: list[float], top: int) -> TokenLogprob:
        """From a picker's logprob row `[chosen, K values, K ids]` (`runner.logprob_rows`), keeping
        the first `top` of its K."""
        k = (len(row) - 1) // 2
        return cls(float(row[0]), tuple((int(row[1 + k + i]), float(row[1 + i])) for i in range(min(top, k))))


@dataclass
class RequestOutput:
    request_id: int
    prompt_length: int
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    involuntary: int = 0
    missed: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length" or "cancelled"
    # when each token was emitted, in seconds of this engine's own stepping (other engines stepped in
    # between, as benchmarks interleave them, do not count): token latencies without their noise
    token_times: list[float] = field(default_factory=list)
    # with `record_checks`: per token, (exit layer, confidence) of every exit check the engine made for it
    checks: list[list[tuple[int, float]]] = field(default_factory=list)
    # for a request that asked for logprobs: each token's (`TokenLogprob`), else None
    logprobs: list[TokenLogprob] | None = None


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass
class Request:
    """One request on the host. `prompt` is its token ids (a 1-D tensor, kept until its prefill),
    `prompt_tokens` the same as a list when stop strings need the text; `trace` its replayed exit
    layers, `trace_seed` the seed of its drawn ones; `sampling` its own sampling parameters."""

    output: RequestOutput
    prompt: Any
    max_new_tokens: int
    seed: int
    slot: int
    epoch: int
    callback: TokenCallback | None = None
    on_finish: FinishCallback | None = None
    sampling: Any = None
    trace: tuple[int, ...] | None = None
    trace_seed: int = 0
    prompt_tokens: list[int] | None = None
    phase: Phase = Phase.QUEUED
    checks: list[tuple[int, float]] | None = None  # this token's exit checks so far (record_checks)
    logprobs: int | None = None  # keep each token's logprob and this many top ones (None: none)
    sla_tpot_ms: float | None = None  # its own time-per-output-token target (drex's scheduler)


class Requests:
    """The engine's requests: queued ones in arrival order, running ones by slot. `free` gives the
    store's slot bookkeeping (`allocate() -> slot`, `release(slot)`)."""

    def __init__(self, allocate: Callable[[], int], release: Callable[[int], None]) -> None:
        self._allocate, self._release = allocate, release
        self.queued: list[Request] = []
        self.by_slot: dict[int, Request] = {}
        self.next_id = 0
        self._epochs: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.queued) + len(self.by_slot)

    def __iter__(self) -> Iterator[Request]:
        yield from self.queued
        yield from self.by_slot.values()

    def admit(self, make: Callable[[int, int, int], Request]) -> Request:
        """A new QUEUED request in a free slot: `make(request id, slot, epoch)` builds it."""
        slot = self._allocate()
        epoch = self._epochs.get(slot, 0) + 1
        self._epochs[slot] = epoch
        request = make(self.next_id, slot, epoch)
        self.next_id += 1
        self.queued.append(request)
        return request

    def take_queued(self) -> list[Request]:
        """The queued requests, now RUNNING (their prefill is being launched)."""
        batch, self.queued = self.queued, []
        for request in batch:
            request.phase = Phase.RUNNING
            self.by_slot[request.slot] = request
        return batch

    def owner(self, slot: int, epoch: int) -> Request | None:
        """The running request a verdict row of (slot, epoch) belongs to; None for an earlier occupant."""
        request = self.by_slot.get(slot)
        return request if request is not None and request.epoch == epoch else None

    def finish(self, request: Request, reason: str) -> bool:
        """End a request (False if it had ended already): its slot is free for the next one."""
        if request.phase is Phase.DONE:
            return False
        if request.phase is Phase.QUEUED:
            self.queued.remove(request)
        else:
            del self.by_slot[request.slot]
        request.phase = Phase.DONE
        request.output.finished, request.output.finish_reason = True, reason
        self._release(request.slot)
        return True

    def find(self, request_id: int) -> Request | None:
        return next((r for r in self if r.output.request_id == request_id), None)
