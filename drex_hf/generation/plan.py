"""What the host hands the device for one step, and the layout of what comes back (DESIGN.md §10).

The rows themselves live on the device: each segment's buffer is a queue of slot tickets there, and
a step's program takes its rows from the front of one queue. So a `StepPlan` names programs, not
rows — which queue, how many rows to take at most (its bucket), whether the exited rows' deferred
projections and KV fills run first — plus the rare host events (slots to kill). `build_plan` is pure:
a scheduler `Decision` and the host's mirror of the device's counts in, a plan out. The `Verdict` is
one small read-back: every queue's count, and the rows the step ran with the tokens it emitted.
Row buckets are chosen here, so that the programs a device may capture are known up front.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

# flags of a verdict row
VALID = 1  # a live row that ran (not padding, not a stale ticket)
EMITTED = 2  # its token is final: emitted at `layer`
FINISHED = 4  # the token ended the request (end of sequence, or max_new_tokens)
INVOLUNTARY = 8  # it left below its own threshold (batch_majority)
MISSED = 16  # it passed a shallower exit point it did not leave at (batch policies)
EOS = 32  # the token is an end-of-sequence id
ROW_FIELDS = ("ticket", "token", "layer", "flags", "confidence")


def row_buckets(max_rows: int, graphs: bool) -> list[int]:
    """Row counts a program is built for, ascending, the last >= `max_rows`.

    For captured programs (static shapes): 1, 2, 4, 8, then steps of 8 (as vLLM): each bucket is a
    CUDA graph (capture time and pool memory), and a GPU decode step at these sizes is bound by
    weight reads, so up to 7 padding rows cost little. Eager programs (the CPU) run every count: no
    capture to amortise, and a padding row costs as much as a real one there."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    if not graphs:
        return list(range(1, max_rows + 1))
    out = [n for n in (1, 2, 4) if n < max_rows]
    out += range(8, max_rows, 8)
    return [*out, max_rows]


def bucket_of(buckets: list[int], n: int) -> int:
    """The smallest bucket holding n rows (0 for none)."""
    if n <= 0:
        return 0
    if n <= len(buckets) == buckets[-1]:  # every count is a bucket (eager programs)
        return n
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass
class Book:
    """The host's mirror of the device's queues, as of the last verdict read: rows (tickets, stale
    ones included) waiting per segment, deferred projections and KV fills pending, the shallowest
    first layer among those fills, and per segment the step its oldest entry joined and the step its
    oldest token started (-1: empty / not tracked). A step takes min(count, its bucket) entries."""

    counts: list[int]
    projections: int = 0
    fills: int = 0
    fill_from: int = 0
    joined: list[int] = field(default_factory=list)
    token_started: list[int] = field(default_factory=list)

    @property
    def waiting(self) -> bool:
        return any(self.counts)


@dataclass(slots=True)
class StepPlan:
    """One step: `kills` (slots whose requests the host ended) first; then `project` > 0 (a bucket)
    projects the waiting tokens — before the segment when `project_first` (a first segment's rows
    embed them), else after it (the last segment's rows with the deferred ones); `fill` > 0 fills
    that many exited rows' keys/values from layer `fill_from` on, before the segment; `segment` (None:
    none) runs on the first min(count, `bucket`) entries of its queue. `step` numbers it (the device
    stamps rows' waiting and token starts with it)."""

    step: int
    segment: int | None
    bucket: int = 0
    project: int = 0
    fill: int = 0
    fill_from: int = 0
    kills: tuple[int, ...] = ()
    project_first: bool = False

    @property
    def rows(self) -> int:
        """Verdict rows the step fills: its segment's bucket, then its projections' bucket."""
        return self.bucket + self.project


def build_plan(
    step: int,
    decision: tuple[int, int] | None,
    book: Book,
    buckets: list[int],
    *,
    first_projects: bool,
    last: int,
    kills: tuple[int, ...] = (),
) -> StepPlan:
    """The plan for a decision `(segment, rows)` (None: only the pending projections); `rows` is a
    bucket or the queue's whole count, since the device takes min(count, bucket). A step of the last
    segment (`last`) projects its rows after it together with every deferred token waiting (one
    product); a step of the first segment fills every exited row's keys/values first (before its next
    token overwrites the hidden state they come from) and, when `first_projects`, projects the
    deferred tokens first (its rows embed them). The buckets cover all that is pending (a queue may
    hold stale tickets too: the device takes at most the largest bucket)."""
    largest = buckets[-1]
    if decision is None:
        return StepPlan(step, None, project=bucket_of(buckets, min(book.projections, largest)), kills=kills)
    segment, rows = decision
    bucket = bucket_of(buckets, min(rows, largest))
    if segment == last:
        project = bucket_of(buckets, min(book.projections + bucket, largest))
        return StepPlan(step, segment, bucket, project, kills=kills)
    if segment != 0:
        return StepPlan(step, segment, bucket, kills=kills)
    fill = bucket_of(buckets, min(book.fills, largest))
    project = bucket_of(buckets, min(book.projections, largest)) if first_projects else 0
    return StepPlan(step, 0, bucket, project, fill, book.fill_from if fill else 0, kills, project_first=True)


@dataclass(slots=True)
class Verdict:
    """One step's read-back: the queues' `counts` after the step (segment queues, then projections,
    then fills), `fill_from`, `joined` and `token_started` per segment (see `Book`), `ran` (live rows
    the segment ran), and the rows: `block [bucket + project, 5]` (`ROW_FIELDS` columns, float64: a
    view of the host staging buffer, valid until the next read) — the segment's `bucket` rows, then
    the `project` projected ones, each section with its `emitted` rows first."""

    step: int
    segment: int | None
    bucket: int
    project: int
    counts: list[int]
    fill_from: int
    joined: list[int]
    token_started: list[int]
    ran: int
    emitted: tuple[int, int]
    block: np.ndarray

    @property
    def rows(self) -> dict[str, np.ndarray]:
        """The block's columns by name."""
        return {name: self.block[:, i] for i, name in enumerate(ROW_FIELDS)}
