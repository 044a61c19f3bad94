"""A stand-in for the engine's device: the runner's queues and row state simulated in plain Python.

`StubRunner` answers `launch(plan)` / `prefill(...)` / `read()` exactly as `generation.runner.Runner`
does — the same verdict layout, the same queues, tickets, epochs, token starts, exit rule, deferred
projections, fills and budgets — for trace exits (each token's exit layer is the counter-based draw
of its request's trace seed and token number, as on the device), with made-up tokens. So the engine's
host side runs as it does on a real device while the device's work costs nothing that is counted:
the stub times itself (`device_s`), and what a step takes beyond that is the host's.
`benchmarks/host_overhead.py --stub-device` measures with it; `tests/test_host_overhead.py` checks that
it schedules and exits exactly as the real runner does.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Any

import numpy as np

from drex_hf.generation.plan import EMITTED, FINISHED, INVOLUNTARY, MISSED, ROW_FIELDS, VALID, StepPlan, Verdict
from drex_hf.generation.sampling import host_uniform


class StubRunner:
    """A runner without a device (see the module docstring); built from the engine's real runner,
    whose options, segments and buckets it takes. Tokens are `1000 + slot`, never an eos id."""

    def __init__(self, runner: Any) -> None:
        options = runner.options
        if options.boundaries and not options.trace:
            raise ValueError("the stub device replays trace exits: build the engine with exit_source='trace'")
        self.real = runner
        self.options, self.segments, self.boundaries = options, runner.segments, list(options.boundaries)
        self.buckets, self.rows, self.graphs = runner.buckets, runner.rows, runner.graphs
        self.transfers = {"uploads": 0, "reads": 0}
        self.num_layers = runner.num_layers
        self.logits_check = runner.programs.logits_check
        self.total = runner.state.total
        self.state = runner.state  # `total` is what the engine reads of it
        self.points = [*runner.model.exit_layers, self.num_layers - 1]
        self.cumulative = list(itertools.accumulate(options.distribution)) if options.distribution else None
        self.queues: list[collections.deque] = [collections.deque() for _ in range(len(self.segments) + 2)]
        self.rows_of: dict[int, dict[str, Any]] = {}
        self.device_s = 0.0
        self._pending: Verdict | None = None
        self.step = 0

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def read(self) -> Verdict:
        verdict, self._pending = self._pending, None
        self.transfers["reads"] += 1
        return verdict

    # ------------------------------------------------------------------ the simulated device
    def _take(self, queue: int, bucket: int) -> list[tuple[int, int, bool]]:
        out = []
        for _ in range(min(len(self.queues[queue]), bucket)):
            ticket = self.queues[queue].popleft()
            slot, epoch = ticket % self.total, ticket // self.total
            row = self.rows_of.get(slot)
            valid = row is not None and row["epoch"] == epoch and row["alive"]
            out.append((slot if valid else self.total - 1, ticket, valid))
        out += [(self.total - 1, 0, False)] * (bucket - len(out))
        return out if self.options.static else sorted(out, key=lambda r: r[0])  # as eager programs take them

    def _trace_layer(self, row: dict, draw: int) -> int:
        if row["replay"] is not None:
            replay = row["replay"]
            return replay[draw] if draw < len(replay) and replay[draw] >= 0 else self.num_layers - 1
        u = host_uniform(row["trace_seed"], draw)
        at = int(np.searchsorted(np.asarray(self.cumulative), u * self.cumulative[-1], side="right"))
        return self.points[min(at, len(self.points) - 1)]

    def launch(self, plan: StepPlan) -> None:
        start = time.perf_counter()
        self.transfers["uploads"] += 1
        self.step = plan.step
        for slot in plan.kills:
            if slot in self.rows_of:
                self.rows_of[slot]["alive"] = False
        projected, run = [], []
        if plan.project and plan.project_first:
            projected = self._projections(plan.project)
        if plan.fill:
            self._take(len(self.segments) + 1, plan.fill)
        ran = 0
        if plan.segment is not None:
            taken = self._take(plan.segment, plan.bucket)
            live = [self.rows_of[slot] for slot, _, valid in taken if valid]
            ran = len(live)
            if plan.segment == 0:
                for row in live:
                    self._start(row)
            leave = self._rule(plan.segment, live)
            run = [self._run(plan.segment, slot, ticket, valid, leave) for slot, ticket, valid in taken]
        if plan.project and not plan.project_first:
            projected = self._projections(plan.project)
        self._pending = self._verdict(plan.step, plan.segment, plan.bucket, plan.project, run, projected, ran)
        self.device_s += time.perf_counter() - start

    def _start(self, row: dict) -> None:
        row["draw"] += 1
        row["passed_at"] = self.num_layers
        row["token_step"] = self.step
        if self.options.trace:
            row["trace_layer"] = self._trace_layer(row, row["draw"])

    def _rule(self, s: int, live: list[dict]) -> bool | None:
        """The batch's decision at segment s's exit point (None: each row's own)."""
        if s == len(self.segments) - 1 or self.options.rule == "own":
            return None
        owns = [row["trace_layer"] <= self.boundaries[s] for row in live]
        if self.options.rule == "all":
            return all(owns)
        return sum(owns) >= self.options.quorum * len(owns)

    def _run(self, s: int, slot: int, ticket: int, valid: bool, rule: bool | None) -> tuple:
        if not valid:
            return (ticket, 0, -1, 0, 0.0)
        row = self.rows_of[slot]
        if s == len(self.segments) - 1:  # its token is projected with the waiting ones, after the segment
            row["exit_layer"] = self.num_layers - 1
            self.queues[len(self.segments)].append(ticket)
            return (ticket, -1, -1, VALID, 0.0)
        layer = self.boundaries[s]
        own = row["trace_layer"] <= layer
        leave = own if rule is None else rule
        if own and row["passed_at"] > layer:
            row["passed_at"] = layer
        flags = VALID | (INVOLUNTARY if leave and not own else 0)
        if not leave:
            self._append(s + 1, ticket, row)
            return (ticket, 0, -1, flags, 0.0)
        row["fill_from"] = layer
        if self.logits_check:
            return self._emit(row, ticket, layer, flags, fill=True)
        last = row["draw"] + 1 >= row["max_new"]
        row["exit_layer"] = layer
        self.queues[len(self.segments)].append(ticket)
        if not last:
            self._append(0, ticket, row)
            self.queues[len(self.segments) + 1].append(ticket)
        return (ticket, -1, -1, flags, 0.0)

    def _emit(self, row: dict, ticket: int, layer: int, flags: int, fill: bool = False) -> tuple:
        token = 1000 + ticket % self.total
        done = row["draw"] + 1 >= row["max_new"]
        flags |= VALID | EMITTED | (FINISHED if done else 0) | (MISSED if row["passed_at"] < layer else 0)
        if done:
            row["alive"] = False
        else:
            self._append(0, ticket, row)
            if fill:
                self.queues[len(self.segments) + 1].append(ticket)
        return (ticket, token, layer, flags, 0.0)

    def _projections(self, bucket: int) -> list:
        return [self._project(slot, ticket, valid) for slot, ticket, valid in self._take(len(self.segments), bucket)]

    def _project(self, slot: int, ticket: int, valid: bool) -> tuple:
        if not valid:
            return (ticket, 0, -1, 0, 0.0)
        row = self.rows_of[slot]
        token = 1000 + slot
        done = row["draw"] + 1 >= row["max_new"]
        if done:
            row["alive"] = False
        elif row["exit_layer"] == self.num_layers - 1:  # the last segment's row goes on from here
            self._append(0, ticket, row)
        missed = MISSED if row["passed_at"] < row["exit_layer"] else 0
        return (ticket, token, row["exit_layer"], VALID | EMITTED | (FINISHED if done else 0) | missed, 0.0)

    def _append(self, queue: int, ticket: int, row: dict) -> None:
        self.queues[queue].append(ticket)
        row["join_step"] = self.step

    def _verdict(self, step: int, segment: Any, bucket: int, project: int, run: list, projected: list,
                 ran: int) -> Verdict:  # fmt: skip
        counts = [len(q) for q in self.queues]
        joined = []
        for s in range(len(self.segments)):
            head = self.queues[s][0] if self.queues[s] else None
            row = None if head is None else self.rows_of.get(head % self.total)
            joined.append(-1 if row is None else row["join_step"])
        fills = [(t // self.total, self.rows_of.get(t % self.total)) for t in self.queues[-1]]
        fill_from = min((r["fill_from"] + 1 for e, r in fills if r and r["alive"] and r["epoch"] == e),
                        default=self.num_layers)  # fmt: skip
        sections = []
        for rows in (run, projected):  # each section with its emitted rows first, as the device writes them
            sections.append(sorted(rows, key=lambda r: not r[3] & EMITTED))
        block = np.array(sections[0] + sections[1], dtype=np.float64).reshape(-1, len(ROW_FIELDS))
        emitted = tuple(sum(1 for r in rows if r[3] & EMITTED) for rows in (run, projected))
        return Verdict(step, segment, len(run), len(projected), counts, fill_from, joined, [-1] * len(self.segments),
                       ran, emitted, block)  # fmt: skip

    def prefill(self, step: int, requests: list[Any], kills: tuple[int, ...] = (), enqueue: bool = True) -> None:
        start = time.perf_counter()
        self.transfers["uploads"] += 1
        self.step = step
        for slot in kills:
            if slot in self.rows_of:
                self.rows_of[slot]["alive"] = False
        run = []
        for r in sorted(requests, key=lambda r: r.slot):
            ticket = r.slot + self.total * r.epoch
            row = {"epoch": r.epoch, "alive": True, "draw": 0, "max_new": r.max_new_tokens, "trace_seed": r.trace_seed,
                   "replay": list(r.trace) if r.trace is not None else None, "passed_at": self.num_layers,
                   "exit_layer": self.num_layers - 1, "fill_from": self.num_layers - 1, "join_step": step,
                   "token_step": step, "trace_layer": self.num_layers - 1}  # fmt: skip
            self.rows_of[r.slot] = row
            done = r.max_new_tokens <= 1
            row["alive"] = not done
            if not done and enqueue:
                self.queues[0].append(ticket)
            run.append((ticket, 1000 + r.slot, self.num_layers - 1, VALID | EMITTED | (FINISHED if done else 0), 0.0))
        self._pending = self._verdict(step, None, len(run), 0, run, [], 0)
        self.device_s += time.perf_counter() - start
