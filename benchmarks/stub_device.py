"""A stand-in for the engine's device: the runner's queues and row state simulated with numpy arrays.

`StubRunner` answers `launch(plan)` / `prefill(...)` / `read()` exactly as `generation.runner.Runner`
does — the same verdict layout, the same queue rings of tickets, epochs, token starts, exit rule,
deferred projections, fills and budgets — for trace exits (each token's exit layer is the
counter-based draw of its request's trace seed and token number, as on the device), with made-up
tokens. It is `programs.py` written again in numpy, vectorised like the device's programs, so that it
costs the host little time and leaves its caches alone (a per-row Python simulation slowed the host
code around it by up to half). The engine's host side runs as on a real device while the device's
work is not counted: the stub times itself (`device_s`), and what a step takes beyond that is the
host's. `benchmarks/host_overhead.py --stub-device` measures with it; `tests/test_host_overhead.py`
checks that it schedules and exits step for step as the real runner does.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import numpy as np

from drex_hf.generation.plan import EMITTED, FINISHED, INVOLUNTARY, MISSED, ROW_FIELDS, VALID, StepPlan, Verdict
from drex_hf.generation.sampling import host_uniforms


class _OneVerdict:
    """The runner's read side: one verdict in flight at a time, counted as a read."""

    _pending: Verdict | None
    transfers: dict[str, int]
    products = None  # no products to run: the engine's steps take no CPU product table

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def read(self) -> Verdict:
        verdict, self._pending = self._pending, None
        self.transfers["reads"] += 1
        return verdict


class StubRunner(_OneVerdict):
    """A runner without a device (see the module docstring); built from the engine's real runner,
    whose options, segments and buckets it takes. Tokens are `1000 + slot`, never an eos id."""

    def __init__(self, runner: Any) -> None:
        options = runner.options
        if options.boundaries and not options.trace:
            raise ValueError("the stub device replays trace exits: build the engine with exit_source='trace'")
        self.real, self.options = runner, options
        self.segments, self.boundaries = runner.segments, list(options.boundaries)
        self.buckets, self.rows, self.graphs = runner.buckets, runner.rows, runner.graphs
        self.transfers = {"uploads": 0, "reads": 0}
        self.num_layers = runner.num_layers
        self.logits_check = runner.programs.logits_check
        self.state = runner.state  # `total` is what the engine reads of it
        total = self.total = runner.state.total
        self.scratch = total - 1
        self.points = np.array([*runner.model.exit_layers, self.num_layers - 1])
        self.cumulative = np.array(list(itertools.accumulate(options.distribution))) if options.distribution else None
        zeros = np.zeros(total, dtype=np.int64)
        self.alive = np.zeros(total, dtype=bool)
        self.epoch, self.draw, self.max_new, self.trace_seed = zeros.copy(), zeros.copy(), zeros + 1, zeros.copy()
        self.passed_at, self.join_step = zeros + self.num_layers, zeros.copy()
        self.exit_layer, self.fill_from, self.trace_layer = (zeros + self.num_layers - 1 for _ in range(3))
        self.replay: dict[int, list[int]] = {}
        self.queues, self.capacity = len(self.segments) + 2, 2 * total
        self.project_queue, self.fill_queue = len(self.segments), len(self.segments) + 1
        self.queue = np.zeros((self.queues, self.capacity + 1), dtype=np.int64)
        self.head, self.count = np.zeros(self.queues, dtype=np.int64), np.zeros(self.queues, dtype=np.int64)
        self.device_s = 0.0
        self._pending: Verdict | None = None
        self.step = 0

    # ------------------------------------------------------------------ queues
    def _take(self, q: int, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.arange(bucket)
        n = min(int(self.count[q]), bucket)
        tickets = self.queue[q, (self.head[q] + idx) % self.capacity]
        slots = tickets % self.total
        valid = (idx < n) & (self.epoch[slots] == tickets // self.total) & self.alive[slots]
        slots = np.where(valid, slots, self.scratch)
        self.head[q] = (self.head[q] + n) % self.capacity
        self.count[q] -= n
        if not self.options.static:  # as eager programs take them: in slot order
            order = np.argsort(slots, kind="stable")
            slots, tickets, valid = slots[order], tickets[order], valid[order]
        return slots, tickets, valid

    def _append(self, q: int, tickets: np.ndarray, mask: np.ndarray, slots: np.ndarray | None = None) -> None:
        kept = tickets[mask]
        at = (self.head[q] + self.count[q] + np.arange(len(kept))) % self.capacity
        self.queue[q, at] = kept
        self.count[q] += len(kept)
        if slots is not None:
            self.join_step[slots[mask]] = self.step

    # ------------------------------------------------------------------ a step
    def launch(self, plan: StepPlan) -> None:
        start = time.perf_counter()
        self.transfers["uploads"] += 1
        self.step = plan.step
        if plan.kills:
            self.alive[list(plan.kills)] = False
            self._purge()
        projected = run = None
        if plan.project and plan.project_first:
            projected = self._project(*self._take(self.project_queue, plan.project))
        if plan.fill:
            self._take(self.fill_queue, plan.fill)
        ran = 0
        if plan.segment is not None:
            slots, tickets, valid = self._take(plan.segment, plan.bucket)
            ran = int(valid.sum())
            run = self._segment(plan.segment, slots, tickets, valid)
        if plan.project and not plan.project_first:
            projected = self._project(*self._take(self.project_queue, plan.project))
        self._pending = self._verdict(plan.step, plan.segment, run, projected, ran)
        self.device_s += time.perf_counter() - start

    def _segment(self, s: int, slots: np.ndarray, tickets: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if s == 0:
            live = slots[valid]
            self.draw[live] += 1
            self.passed_at[live] = self.num_layers
            if self.options.trace:
                self.trace_layer[live] = self._trace_layers(live)
        if s == len(self.segments) - 1:  # its tokens are projected with the waiting ones, after the segment
            self.exit_layer[slots] = self.num_layers - 1
            self._append(self.project_queue, tickets, valid)
            none = np.zeros_like(valid)
            return self._rows(tickets, -np.ones_like(tickets), -np.ones_like(tickets), valid, none, none, none, none)
        return self._route_exit(s, slots, tickets, valid)

    def _route_exit(self, s: int, slots: np.ndarray, tickets: np.ndarray, valid: np.ndarray) -> np.ndarray:
        layer = self.boundaries[s]
        own = valid & (self.trace_layer[slots] <= layer)
        rule = self.options.rule
        if rule == "own":
            leave = own
        elif rule == "all":
            leave = valid & bool(np.all(own | ~valid))
        else:
            leave = valid & bool(own.sum() >= self.options.quorum * valid.sum())
        passed = self.passed_at[slots]
        self.passed_at[slots] = np.where(own & (passed > layer), layer, passed)
        self.fill_from[slots] = np.where(leave, layer, self.fill_from[slots])
        stay = valid & ~leave
        self._append(s + 1, tickets, stay, slots)
        last = self.draw[slots] + 1 >= self.max_new[slots]
        none = np.zeros_like(valid)
        if self.logits_check:
            done, emitted, tokens = leave & last, leave, 1000 + slots
            self.alive[slots[done]] = False
            onward = leave & ~done
        else:
            self.exit_layer[slots] = np.where(leave, layer, self.exit_layer[slots])
            self._append(self.project_queue, tickets, leave)
            done, emitted, tokens, onward = none, none, -np.ones_like(slots), leave & ~last
        self._append(0, tickets, onward, slots)
        self._append(self.fill_queue, tickets, onward)
        missed = emitted & (self.passed_at[slots] < layer)
        layers = np.where(emitted, layer, -1)
        return self._rows(tickets, tokens, layers, valid, emitted, done, leave & ~own, missed)

    def _project(self, slots: np.ndarray, tickets: np.ndarray, valid: np.ndarray) -> np.ndarray:
        done = valid & (self.draw[slots] + 1 >= self.max_new[slots])
        self.alive[slots[done]] = False
        layer = self.exit_layer[slots]
        onward = valid & ~done & (layer == self.num_layers - 1)  # a last segment's row goes on from here
        self._append(0, tickets, onward, slots)
        missed = valid & (self.passed_at[slots] < layer)
        return self._rows(tickets, 1000 + slots, np.where(valid, layer, -1), valid, valid, done,
                          np.zeros_like(valid), missed)  # fmt: skip

    def _trace_layers(self, slots: np.ndarray) -> np.ndarray:
        draws = self.draw[slots]
        out = np.full(len(slots), self.num_layers - 1)
        if self.cumulative is not None:
            u = host_uniforms(self.trace_seed[slots].tolist(), draws.tolist())
            at = np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right")
            out = self.points[np.minimum(at, len(self.points) - 1)]
        for i, slot in enumerate(slots.tolist()):  # replayed rows (tests only)
            if slot in self.replay:
                row, d = self.replay[slot], int(draws[i])
                out[i] = row[d] if d < len(row) and row[d] >= 0 else self.num_layers - 1
        return out

    @staticmethod
    def _rows(tickets: Any, tokens: Any, layers: Any, valid: Any, emitted: Any, done: Any, forced: Any,
              missed: Any) -> np.ndarray:  # fmt: skip
        flags = valid * VALID + emitted * EMITTED + done * FINISHED + forced * INVOLUNTARY + missed * MISSED
        block = np.stack([tickets, tokens, layers, flags, np.zeros(len(tickets))], 1).astype(np.float64)
        return block[np.argsort(~emitted, kind="stable")]  # the emitted rows first, as the device writes them

    def _purge(self) -> None:
        for q in range(self.queues):
            tickets = self.queue[q, (self.head[q] + np.arange(self.count[q])) % self.capacity]
            slots = tickets % self.total
            kept = tickets[(self.epoch[slots] == tickets // self.total) & self.alive[slots]]
            self.queue[q, : len(kept)], self.head[q], self.count[q] = kept, 0, len(kept)

    def _verdict(self, step: int, segment: Any, run: Any, projected: Any, ran: int) -> Verdict:
        segments = len(self.segments)
        joined = []
        for s in range(segments):
            slot = self.queue[s, self.head[s]] % self.total
            joined.append(int(self.join_step[slot]) if self.count[s] else -1)
        fills = self.queue[self.fill_queue, (self.head[self.fill_queue] + np.arange(self.count[self.fill_queue]))
                           % self.capacity]  # fmt: skip
        slots = fills % self.total
        live = (self.epoch[slots] == fills // self.total) & self.alive[slots]
        fill_from = int(self.fill_from[slots[live]].min()) + 1 if live.any() else self.num_layers
        empty = np.zeros((0, len(ROW_FIELDS)))
        run, projected = (empty if x is None else x for x in (run, projected))
        emitted = tuple(int(np.count_nonzero(block[:, 3].astype(np.int64) & EMITTED)) for block in (run, projected))
        return Verdict(step, segment, len(run), len(projected), self.count.tolist(), fill_from, joined,
                       [-1] * segments, ran, emitted, np.concatenate([run, projected]))  # fmt: skip

    def prefill(self, step: int, requests: list[Any], kills: tuple[int, ...] = (), enqueue: bool = True) -> None:
        start = time.perf_counter()
        self.transfers["uploads"] += 1
        self.step = step
        if kills:
            self.alive[list(kills)] = False
            self._purge()
        requests = sorted(requests, key=lambda r: r.slot)
        slots = np.array([r.slot for r in requests])
        self.epoch[slots] = [r.epoch for r in requests]
        self.max_new[slots] = [r.max_new_tokens for r in requests]
        self.trace_seed[slots] = [r.trace_seed for r in requests]
        self.draw[slots], self.passed_at[slots], self.join_step[slots] = 0, self.num_layers, step
        self.exit_layer[slots] = self.fill_from[slots] = self.num_layers - 1
        for r in requests:
            if r.trace is not None:
                self.replay[r.slot] = list(r.trace)
            else:
                self.replay.pop(r.slot, None)
        tickets = slots + self.total * self.epoch[slots]
        done = self.max_new[slots] <= 1
        self.alive[slots] = ~done
        if enqueue:
            self._append(0, tickets, ~done)
        valid = np.ones(len(slots), dtype=bool)
        none = np.zeros_like(valid)
        run = self._rows(tickets, 1000 + slots, np.full(len(slots), self.num_layers - 1), valid, valid, done, none,
                         none)  # fmt: skip
        self._pending = self._verdict(step, None, run, None, 0)
        self.device_s += time.perf_counter() - start


class Recording(StubRunner):
    """A `StubRunner` that also keeps each step's plan and verdict, for `ReplayRunner`."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.steps: list[tuple[tuple, Verdict]] = []
        self.epochs: dict[int, int] = {}
        self.requests: list[list[tuple]] = []  # each prefill's requests
        self.first_step = 0

    def prefill(self, step: int, requests: list[Any], kills: tuple[int, ...] = (), enqueue: bool = True) -> None:
        super().prefill(step, requests, kills, enqueue)
        if not self.steps:
            self.first_step = step
        self.epochs.update({r.slot: r.epoch for r in requests})
        self.requests.append(requests_key(requests))
        self.steps.append((("prefill", kills), self._pending))

    def launch(self, plan: StepPlan) -> None:
        super().launch(plan)
        self.steps.append((plan_key(plan), self._pending))


def requests_key(requests: list[Any]) -> list[tuple]:
    """What a replay's requests must share with the recorded ones: slots, prompts, budgets, draws."""
    return [(r.slot, r.prompt.tolist(), r.max_new_tokens, r.trace_seed, r.trace) for r in requests]


def plan_key(plan: StepPlan) -> tuple:
    """A plan without its step number: what a replayed step must repeat."""
    return (plan.segment, plan.bucket, plan.project, plan.fill, plan.fill_from, plan.kills, plan.project_first)


class ReplayRunner(_OneVerdict):
    """The device for a repeat of a recorded decode (the same requests, added in the same order, to the
    same engine): each step is answered with the `Recording`'s verdict, its tickets moved to the
    requests' new epochs. The engine decides from verdicts alone, so it launches the same plans again;
    a different one is an error. Answering costs the host almost nothing and touches little memory,
    as a real device's work does; `StubRunner` simulates in numpy on the host, and beside it the
    engine's own code measured 1.3-1.7x slower (full and drex, 64 rows). `reads` and `launches` are
    the times each verdict was read and each launch began (the device waits on the host between)."""

    def __init__(self, recording: Recording) -> None:
        self.real, self.options, self.state = recording.real, recording.options, recording.state
        self.segments, self.boundaries, self.buckets = recording.segments, recording.boundaries, recording.buckets
        self.rows, self.graphs, self.num_layers = recording.rows, recording.graphs, recording.num_layers
        self.transfers = {"uploads": 0, "reads": 0}
        self.recording, self.total = recording, recording.total
        self.device_s = 0.0
        self.reads: list[float] = []
        self.launches: list[float] = []
        self._next = 0
        self._verdicts: list[Verdict] = []
        self._pending: Verdict | None = None

    def read(self) -> Verdict:
        self.reads.append(time.perf_counter())
        return super().read()

    def prefill(self, step: int, requests: list[Any], kills: tuple[int, ...] = (), enqueue: bool = True) -> None:
        start = time.perf_counter()
        if self._next:
            raise RuntimeError("a replay answers one decode: make a new ReplayRunner for the next")
        if self.recording.requests[:1] != [requests_key(requests)]:
            raise RuntimeError("the replayed decode's requests are not the recorded ones")
        shift = np.zeros(self.total, dtype=np.int64)
        for r in requests:
            shift[r.slot] = self.total * (r.epoch - self.recording.epochs[r.slot])
        later = step - self.recording.first_step  # the engine numbers steps on: so do the verdict's stamps

        def stamps(steps: list[int]) -> list[int]:
            return [j + later if j >= 0 else j for j in steps]

        for _, verdict in self.recording.steps:
            block = verdict.block.copy()
            block[:, 0] += shift[block[:, 0].astype(np.int64) % self.total]
            self._verdicts.append(dataclasses.replace(
                verdict, block=block, joined=stamps(verdict.joined), token_started=stamps(verdict.token_started)
            ))  # fmt: skip
        self._answer(("prefill", kills), step)
        self.device_s += time.perf_counter() - start

    def launch(self, plan: StepPlan) -> None:
        start = time.perf_counter()
        self.launches.append(start)
        self.transfers["uploads"] += 1
        self._answer(plan_key(plan), plan.step)
        self.device_s += time.perf_counter() - start

    def _answer(self, key: tuple, step: int) -> None:
        if self._next >= len(self.recording.steps):
            raise RuntimeError(f"step {self._next}: the engine launched {key} after the recording ended")
        recorded, _ = self.recording.steps[self._next]
        if key != recorded:
            raise RuntimeError(f"step {self._next}: the engine launched {key}, the recording has {recorded}")
        verdict = self._verdicts[self._next]
        verdict.step = step
        self._pending = verdict
        self._next += 1
