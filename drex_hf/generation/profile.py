"""Start-up measurement of the scheduler's cost constants: the runner's own steps, timed.

When no calibration file is given, the engine times whole steps as they will run — the plan upload,
the programs (CUDA graphs where captured) and the verdict read — for each segment on 1, 2, 4, ... all
slots (at row buckets, the buckets themselves), the last segment with its rows' vocabulary
projection, and (eager programs) on three slots in four against as many contiguous ones: the
regrouping cost of a gathered copy of keys/values. It keeps the table and fits `T_s(n) = a_s + b_s·n`.
It runs on the still-empty slots (rows staged into a queue, the queues emptied after each run), so it
writes nothing a request will read.
"""

from __future__ import annotations

import torch

from drex_hf.device import device_name, time_ms
from drex_hf.generation.plan import StepPlan, bucket_of
from drex_hf.generation.runner import Runner
from drex_hf.generation.scheduler import CostModel


def staged_step(runner: Runner, s: int, slots: list[int], position: int) -> None:
    """One whole step of segment s on `slots`, each row's token at `position` (staged, then run:
    upload, programs, verdict read); the queues are emptied after it."""
    runner.stage(s, slots, position)
    bucket = bucket_of(runner.buckets, len(slots))
    runner.launch(StepPlan(0, s, bucket, bucket if s == len(runner.segments) - 1 else 0))
    runner.read()
    runner.clear()


@torch.no_grad()
def step_time_ms(runner: Runner, s: int, slots: list[int], position: int, repeats: int = 3) -> float:
    """Fastest milliseconds of one whole step of segment s on `slots` (upload, programs, read-back)."""
    return time_ms(lambda: staged_step(runner, s, slots, position), repeats, runner.device)


def row_counts(slots: int, buckets: list[int] | None = None) -> list[int]:
    """1, 2, 4, ... up to `slots`, and `slots` itself; at row buckets (graphs), the buckets among
    those, and the largest (the table is interpolated between them: timing all 35 buckets of 256
    rows would capture and time every segment's 35 programs at start-up)."""
    if buckets is not None and len(buckets) < slots:
        kept = [b for b in buckets if b <= slots and b & (b - 1) == 0]
        return sorted({*kept, max(b for b in buckets if b <= slots)}) if kept else [slots]
    counts, n = [], 1
    while n < slots:
        counts.append(n)
        n *= 2
    return [*counts, slots]


def fit_line(rows: list[int], times: list[float]) -> tuple[float, float]:
    """Least-squares a + b·n (b >= 0)."""
    if len(rows) < 2:
        return times[0], 0.0
    mean_n, mean_t = sum(rows) / len(rows), sum(times) / len(times)
    var = sum((n - mean_n) ** 2 for n in rows)
    slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in zip(rows, times)) / var)
    return mean_t - slope * mean_n, slope


@torch.no_grad()
def measure_cost_model(runner: Runner, context: int = 128, repeats: int = 3) -> CostModel:
    """Time a step of every segment at 1, 2, 4, ... all slots (or at every bucket) with keys/values
    at `context` positions, on the runner's empty slots, and the regrouping cost of eager programs
    (three slots in four, scattered vs contiguous)."""
    slots = runner.store.slots
    position = max(1, min(context, runner.store.max_len)) - 1
    bucketed = runner.options.static
    rows = row_counts(slots, runner.buckets if bucketed else None)
    a, b, regroup, table = [], [], [], []
    for s in range(len(runner.segments)):
        times = [step_time_ms(runner, s, list(range(n)), position, repeats) for n in rows]
        table.append(times)
        line = fit_line(rows, times)
        a.append(line[0])
        b.append(line[1])
        if slots >= 4 and not bucketed:
            # three rows in four, as after an exit point: scattered (gathered copies) vs contiguous
            scattered = [i for i in range(slots) if i % 4 != 3]
            together = step_time_ms(runner, s, list(range(len(scattered))), position, repeats)
            apart = step_time_ms(runner, s, scattered, position, repeats)
            regroup.append(max(0.0, (apart - together) / len(scattered)))
        else:
            regroup.append(0.0)
    device = device_name(runner.device)
    how = "graphs" if runner.graphs.graphs else "eager programs"
    source = f"measured at start-up on {device} ({how})"
    return CostModel(a, b, regroup, position + 1, source=source, device=device, rows=rows, table_ms=table,
                     buckets=list(runner.buckets) if bucketed else None)  # fmt: skip
