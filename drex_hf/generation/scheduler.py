"""Scheduling policies: plain decisions from buffer contents, ages and a cost model; no tensors.

Every policy sees a `SchedulerView` (counts per segment buffer, waits, token ages) and returns a
`Decision`: run segment s on that many rows, exiting by this rule. The engine executes it.

* `full`: one segment, every row, no exits.
* `batch_all`: rows move together; the batch exits at an exit point only when every row is
  confident there (the others' exits are *missed*).
* `batch_majority`: rows move together; the batch exits when a fraction >= q is confident, forcing
  the rest out (*involuntary* exits).
* `drex`: per-row exits into per-segment buffers. A cost model `T_s(n) = a_s + b_s·n` picks the
  buffer to run (deepest first unless a shallower one runs far more efficiently), whether to run only
  the row bucket below a buffer's count, and — with `sla_tpot_ms` — runs the buffer whose oldest
  token is about to exceed its time per output token first.

The rows themselves live on the device (DESIGN.md §10): a policy sees how many wait in each buffer,
how long the oldest has waited and how old its oldest token is, and names a count; the device takes
that many from the front of the buffer.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drex_hf.errors import GenerationInputError

POLICY_NAMES = ("drex", "full", "batch_all", "batch_majority")


@dataclass(slots=True, frozen=True)
class Decision:
    """Run `segment` on `rows` rows from the front of its buffer (a row bucket, or the buffer's whole
    count: the device takes min(count, bucket)), exiting by `exit_rule`."""

    segment: int
    rows: int
    exit_rule: str = "own"  # own | all | majority | none
    quorum: float = 0.5
    predicted_ms: float | None = None
    reason: str = ""  # why the policy chose this (recorded with `record_decisions`)


@dataclass
class SchedulerView:
    """What a policy may look at — counts, not rows: the rows live on the device. Per segment buffer:
    `counts` (entries waiting), `waited` (steps its oldest entry has waited), `token_age_ms` (how
    long its oldest token has taken; None when no SLA is tracked). `context`: cached positions of the
    longest request (for the cost model); `buckets`: the row counts programs run at (None: any)."""

    counts: list[int]
    waited: list[int]
    token_age_ms: list[float] | None = None
    context: int = 1
    buckets: list[int] | None = None

    def takes(self, s: int) -> list[int]:
        """The row counts a decision on buffer s may name: every count up to it, or at row buckets the
        buckets below it and the count itself."""
        n = self.counts[s]
        if self.buckets is None:
            return list(range(1, n + 1))
        return [b for b in self.buckets if b < n] + [n]


def interpolate(rows: list[int], table: list[float], n: int, slope: float = 0.0) -> float:
    """Milliseconds at n rows from times measured at `rows`: proportional below the first count,
    linear between counts, the last interval's slope (or `slope` with one count) beyond the last."""
    if n <= rows[0]:
        return table[0] * n / rows[0] if rows[0] > 1 and n < rows[0] else table[0]
    for (n0, t0), (n1, t1) in zip(zip(rows, table), zip(rows[1:], table[1:])):
        if n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    if len(rows) > 1:
        slope = (table[-1] - table[-2]) / (rows[-1] - rows[-2])
    return table[-1] + max(slope, 0.0) * (n - rows[-1])


@dataclass
class CostModel:
    """Predicted milliseconds of one step: `a_ms[s] + b_ms[s]·n` for segment s on n rows, plus
    `regroup_ms[s]·n·context/context_ref` when the rows are not a contiguous run of slots.

    When a measured table is present (`rows`, `table_ms[s]`: milliseconds at those row counts),
    predictions interpolate it instead of the line: CPU matrix products are far from affine at
    small row counts (on the 2-core test machine 2-7 rows cost as much as 8-16), and a line fitted
    through them mispredicts exactly the splits the scheduler decides. `a_ms`/`b_ms` stay the
    least-squares line through the table, for reports."""

    a_ms: list[float]
    b_ms: list[float]
    regroup_ms: list[float]
    context_ref: int = 128
    source: str = "given"
    device: str = ""
    rows: list[int] | None = None
    table_ms: list[list[float]] | None = None
    fill_ms: list[list[float]] | None = None  # [exit point][row count]: KV fill of all layers after it
    project_ms: list[float] | None = None  # [row count]: deferred vocabulary projections
    context_ms: list[float] | None = None  # [segment]: ms per row per cached position beyond context_ref
    buckets: list[int] | None = None  # programs run padded to these row counts: n rows cost their bucket

    def overhead_ms(self, fill_exit: int | None = None, fill_rows: int = 0, projected: int = 0) -> float:
        """Work a step does besides its segment: the KV fill of the tokens it starts (one product from
        the shallowest exit point among them) and the vocabulary projections it completes. 0 when the
        model has no such tables (the start-up measurement)."""
        total = 0.0
        if self.fill_ms and fill_exit is not None and fill_rows:
            total += interpolate(self.rows, self.fill_ms[fill_exit], self.padded(fill_rows))
        if self.project_ms and projected:
            total += interpolate(self.rows, self.project_ms, self.padded(projected))
        return total

    def segment_ms(self, s: int, n: int, context: int | None = None) -> float:
        """Segment s on n rows at `context` cached positions (the reference context when None): the
        table (or line) at the reference, plus `context_ms[s]·n` per position beyond it (attention's
        share, measured at a longer context), never below half the reference time."""
        n = self.padded(n)
        if self.table_ms is None or not self.rows:
            base = self.a_ms[s] + self.b_ms[s] * n
        else:
            base = interpolate(self.rows, self.table_ms[s], n, self.b_ms[s])
        if context is None or not self.context_ms:
            return base
        return max(0.5 * base, base + self.context_ms[s] * n * (context - self.context_ref))

    def padded(self, n: int) -> int:
        """The rows a step of n rows really runs: its bucket, when programs run at buckets."""
        if not self.buckets or n <= 0:
            return n
        from drex_hf.generation.plan import bucket_of

        return bucket_of(self.buckets, min(n, self.buckets[-1]))

    def regroup(self, s: int, n: int, context: int) -> float:
        return self.regroup_ms[s] * n * context / max(self.context_ref, 1)

    def predict(self, s: int, n_run: int, contiguous: bool, context: int) -> float:
        return self.segment_ms(s, n_run, context) + (0.0 if contiguous else self.regroup(s, n_run, context))

    @classmethod
    def constant(cls, segments: int, a_ms: float = 1.0, b_ms: float = 0.1, regroup_ms: float = 0.01) -> CostModel:
        return cls([a_ms] * segments, [b_ms] * segments, [regroup_ms] * segments, source="constant")

    def to_dict(self) -> dict:
        return {
            "a_ms": self.a_ms,
            "b_ms": self.b_ms,
            "regroup_ms": self.regroup_ms,
            "context_ref": self.context_ref,
            "device": self.device,
            "rows": self.rows,
            "table_ms": self.table_ms,
            "fill_ms": self.fill_ms,
            "project_ms": self.project_ms,
            "context_ms": self.context_ms,
            "buckets": self.buckets,
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str, segments: list[list[int]]) -> CostModel:
        """Constants for `device` and these segments from a calibration file (`drex calibrate`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise GenerationInputError(f"cost model file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as err:
            raise GenerationInputError(f"cannot read cost model file {path}: {err}") from None
        table = data.get("cost_models", {data.get("device", device): data}) if isinstance(data, dict) else {}
        entry = table.get(device)
        if entry is None:
            raise GenerationInputError(
                f"{path} has no cost constants for device {device!r} (it has: {sorted(table) or 'none'}); "
                f"run `drex calibrate` on this device"
            )
        if entry.get("segments") != segments:
            raise GenerationInputError(
                f"{path} was calibrated for segments {entry.get('segments')}, but this run uses {segments} "
                f"(other exit points or thresholds of +inf); calibrate again"
            )
        try:
            return cls(
                [float(v) for v in entry["a_ms"]],
                [float(v) for v in entry["b_ms"]],
                [float(v) for v in entry["regroup_ms"]],
                int(entry.get("context_ref", 128)),
                source=f"calibration file {path}",
                device=device,
                rows=[int(v) for v in entry["rows"]] if entry.get("rows") else None,
                table_ms=[[float(v) for v in row] for row in entry["table_ms"]] if entry.get("table_ms") else None,
                fill_ms=[[float(v) for v in row] for row in entry["fill_ms"]] if entry.get("fill_ms") else None,
                project_ms=[float(v) for v in entry["project_ms"]] if entry.get("project_ms") else None,
                context_ms=[float(v) for v in entry["context_ms"]] if entry.get("context_ms") else None,
                buckets=[int(v) for v in entry["buckets"]] if entry.get("buckets") else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GenerationInputError(f"{path}: malformed cost constants for {device!r} ({err})") from None


class Policy:
    name = "policy"
    exit_rule = "own"

    def __init__(self, num_segments: int, cost: CostModel | None = None) -> None:
        self.num_segments = num_segments
        self.cost = cost

    def predict(self, view: SchedulerView, s: int, rows: int) -> float | None:
        if self.cost is None:
            return None
        return self.cost.predict(s, rows, s == 0, view.context)

    def pick(self, view: SchedulerView) -> Decision:
        raise NotImplementedError


class FullPolicy(Policy):
    name = "full"
    exit_rule = "none"

    def pick(self, view: SchedulerView) -> Decision:
        rows = view.counts[0]
        return Decision(0, rows, "none", predicted_ms=self.predict(view, 0, rows), reason="every row")


class BatchPolicy(Policy):
    """Rows move together: the deepest waiting group runs first, so newcomers join at the next token."""

    def __init__(self, num_segments: int, cost: CostModel | None = None, quorum: float = 1.0) -> None:
        super().__init__(num_segments, cost)
        self.quorum = quorum

    def pick(self, view: SchedulerView) -> Decision:
        s = max(i for i, n in enumerate(view.counts) if n)
        rows = view.counts[s]
        return Decision(s, rows, self.exit_rule, self.quorum, self.predict(view, s, rows), reason="the deepest group")


class BatchAllPolicy(BatchPolicy):
    name = "batch_all"
    exit_rule = "all"


class BatchMajorityPolicy(BatchPolicy):
    name = "batch_majority"
    exit_rule = "majority"

    def __init__(self, num_segments: int, cost: CostModel | None = None, quorum: float = 0.5) -> None:
        if not 0.5 <= quorum <= 1.0:
            raise GenerationInputError(f"batch_majority needs a quorum q in [0.5, 1], got {quorum}")
        super().__init__(num_segments, cost, quorum)


@dataclass
class DrexPolicy(Policy):
    """See the module docstring. Efficiency of running a buffer = its rows' linear work b_s·n over
    the predicted time. The deepest buffer runs unless its efficiency is below (1 - slack) × the
    best one's: finishing tokens first keeps a static batch in step, so each segment runs once per
    token round with every row that needs it. The default, slack 1.0, is pure deepest-first (SLA and
    stalled buffers aside): strictly most-efficient-first desynchronised the rows and cost ~10 % more
    steps (CPU), slack 0.75 gave the same steps as 1.0 on the moderate shape and on an H200, and on
    the tiny shape, whose steps cost the same at any row count, it let a noisy cost table skip a
    one-row deepest buffer and desynchronise the rows (60 -> 69 steps for 15 rounds)."""

    num_segments: int
    cost: CostModel
    sla_tpot_ms: float | None = None
    slack: float = 1.0
    max_wait_steps: int | None = None
    name: str = field(default="drex", init=False)
    exit_rule: str = field(default="own", init=False)
    _plans: dict = field(default_factory=dict, init=False, repr=False)  # the plans' costs, by (s, n, context)
    _decisions: dict = field(default_factory=dict, init=False, repr=False)  # deepest-first's, by (s, n, context, why)

    def plan(self, view: SchedulerView, s: int) -> tuple[int, float, str]:
        """Rows, predicted ms and how, for running buffer s: all of it, or — when programs run at row
        buckets — only the bucket below, if its step and a later one for the rest cost less than
        padding all of them up to the next bucket. (The cost model does not change: each answer is
        worked out once.)"""
        key = (s, view.counts[s], view.context)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4096:  # a cost model with a context term: keep the memo small
                self._plans.clear()
            rows, ms, how = self._plan(view, s)
            plan = self._plans[key] = (rows, ms, how)
        return plan

    def _plan(self, view: SchedulerView, s: int) -> tuple[int, float, str]:
        n = view.counts[s]
        whole = self.predict(view, s, n)
        below = [b for b in (view.buckets or ()) if b < n]
        if below and self.cost.padded(n) > n:
            first = self.predict(view, s, below[-1])
            if first + self.predict(view, s, n - below[-1]) < whole:
                return below[-1], first, "rebucket"
        return n, whole, "whole"

    def pick(self, view: SchedulerView) -> Decision:
        if self.slack >= 1.0 and self.sla_tpot_ms is None:  # pure deepest-first: only the stalled rule decides
            return self._deepest(view)
        waiting = [s for s, n in enumerate(view.counts) if n]
        plans = {s: self.plan(view, s) for s in waiting}
        urgent, why = self._urgent(view, plans)
        if urgent is not None:
            s = urgent
        else:
            eff = {s: self.cost.b_ms[s] * plans[s][0] / max(plans[s][1], 1e-9) for s in waiting}
            best = max(eff.values())
            s = max(x for x in waiting if eff[x] >= (1.0 - self.slack) * best)
            why = "deepest" if s == max(waiting) else "more efficient"
        rows, ms, how = plans[s]
        return Decision(s, rows, "own", predicted_ms=ms, reason=f"{why}, {how}")

    def _deepest(self, view: SchedulerView) -> Decision:
        """Deepest-first's pick: the deepest waiting buffer, or the deepest stalled one. It runs every
        step of a decode, so its decisions are kept (a decision is immutable)."""
        limit = self.max_wait_steps if self.max_wait_steps is not None else 4 * self.num_segments
        counts, waited = view.counts, view.waited
        if max(waited) >= limit and any(n and w >= limit for n, w in zip(counts, waited)):
            s, why = max(s for s, (n, w) in enumerate(zip(counts, waited)) if n and w >= limit), "stalled"
        else:
            s, why = len(counts) - 1, "deepest"
            while not counts[s]:
                s -= 1
        key = (s, counts[s], view.context, why)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) > 4096:
                self._decisions.clear()
            rows, ms, how = self.plan(view, s)
            decision = self._decisions[key] = Decision(s, rows, "own", 0.5, ms, f"{why}, {how}")
        return decision

    def _urgent(self, view: SchedulerView, plans: dict) -> tuple[int | None, str]:
        """The buffer closest to breaking the SLA (or waiting too many steps), if any."""
        limit = self.max_wait_steps if self.max_wait_steps is not None else 4 * self.num_segments
        stalled = [s for s in plans if view.waited[s] >= limit]
        if stalled:
            return max(stalled), "stalled"
        if self.sla_tpot_ms is None or view.token_age_ms is None:
            return None, ""
        worst, where = None, None
        for s in plans:
            remaining = sum(
                plans[j][1] if j in plans else self.cost.segment_ms(j, 1) for j in range(s, self.num_segments)
            )
            slack = self.sla_tpot_ms - view.token_age_ms[s] - remaining
            if slack < 0.5 * self.sla_tpot_ms and (worst is None or slack < worst):
                worst, where = slack, s
        return where, "sla"


class RandomPolicy(Policy):
    """Random legal decisions: any waiting buffer, any number of its rows (tests: invariant 4,
    scheduling never changes output)."""

    name = "random"

    def __init__(self, num_segments: int, seed: int = 0) -> None:
        super().__init__(num_segments, None)
        self.rng = random.Random(seed)

    def pick(self, view: SchedulerView) -> Decision:
        s = self.rng.choice([i for i, n in enumerate(view.counts) if n])
        return Decision(s, self.rng.choice(view.takes(s)), "own", reason="random")


def make_policy(
    name: str,
    num_segments: int,
    cost: CostModel | None,
    *,
    sla_tpot_ms: float | None = None,
    quorum: float = 0.5,
) -> Policy:
    if name == "full":
        return FullPolicy(num_segments, cost)
    if name == "batch_all":
        return BatchAllPolicy(num_segments, cost)
    if name == "batch_majority":
        return BatchMajorityPolicy(num_segments, cost, quorum)
    if name == "drex":
        return DrexPolicy(num_segments, cost, sla_tpot_ms)
    raise GenerationInputError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def error_summary(predicted: list[float], measured: list[float]) -> dict[str, float | None]:
    """Median and 95th percentile of |predicted - measured| / measured over steps with a prediction."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured) if p is not None and m > 0]
    if not errors:
        return {"median": None, "p95": None}
    return {"median": statistics.median(errors), "p95": percentile(errors, 95)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
