"""What the host hands the device for one step, and what comes back (DESIGN.md §10).

The engine decides on plain Python state; a `StepPlan` is that decision spelled out in slots and
positions: which rows run which segment (riders and padding included, padded to a row bucket),
which exited rows get their skipped layers' keys/values filled first, and which rows' tokens are
projected onto the vocabulary. The executor uploads it in one copy and answers with one `Verdict`:
each checked row's confidence, the tokens picked at an exit that computed logits, and the projected
tokens. Row buckets are chosen here, so that the programs a device may capture are known up front.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np


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
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass
class StepPlan:
    """One step, in columns (one entry per row, in this order; padding is added by the executor).

    * run: `segment` (None: no segment runs) on `slots` — riders included; in slot order when `span`
      is set — each writing its state to `writes` (its own slot, or the scratch slot for riders,
      whose results are discarded), at `positions`; `riders` marks them; `token_index`/`seeds` are
      each row's draw for a token picked at this exit (sampling only). `kv_len` (eager programs) is
      the longest row + 1; `span` the slot range when the rows are one contiguous run of slots
      (eager programs read it as views).
    * fill: rows whose previous token left at an exit: their keys/values of layers `fill_first` ..
      L-1 at `fill_positions`, from the hidden state still in their slot; `fill_layers_from` is the
      smallest first layer (the one product covers layers from it).
    * project: features of `project_slots` onto the vocabulary, tokens drawn with
      `project_index`/`project_seeds`; before the segment when `project_first` (the segment embeds
      those tokens), after it otherwise (the final segment's rows are among them);
      `project_lengths`: each one's tokens so far, prompt included (what logits processors see).
    """

    segment: int | None
    slots: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    riders: list[int] = field(default_factory=list)
    token_index: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    kv_len: int = 0
    span: tuple[int, int] | None = None
    fill_slots: list[int] = field(default_factory=list)
    fill_positions: list[int] = field(default_factory=list)
    fill_first: list[int] = field(default_factory=list)
    fill_layers_from: int = 0
    project_slots: list[int] = field(default_factory=list)
    project_index: list[int] = field(default_factory=list)
    project_seeds: list[int] = field(default_factory=list)
    project_first: bool = False
    project_lengths: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    """What one step's single read-back holds: per run row its confidence (checked segments) and
    the token its exit's logits picked (confidences that compute logits), and the projected tokens
    (float32 views of the host staging buffer: read them before the next step)."""

    confidence: np.ndarray | None
    tokens: np.ndarray | None
    projected: np.ndarray | None
