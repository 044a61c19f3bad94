"""Start-up measurement of the scheduler's cost constants: the executor's own steps, timed.

When no calibration file is given, the engine times whole steps as they will run — the plan upload,
the programs (CUDA graphs where captured) and the verdict read — for each segment on 1, 2, 4, ... all
slots (at row buckets, the buckets themselves), the last segment with its rows' vocabulary
projection, and on three slots in four, contiguous vs scattered (the regrouping cost of eager
programs: a gathered copy of keys/values). It keeps the table and fits `T_s(n) = a_s + b_s·n`. It
runs on the still-empty slots, so it writes nothing a request will read.
"""

from __future__ import annotations

import torch

from drex_hf.device import device_name, time_ms
from drex_hf.generation.plan import StepPlan
from drex_hf.generation.runner import StepExecutor
from drex_hf.generation.scheduler import CostModel


def segment_plan(executor: StepExecutor, s: int, slots: list[int], position: int) -> StepPlan:
    """A step of segment s on `slots`, every row at `position` (the last segment projects its rows)."""
    plan = StepPlan(
        segment=s,
        slots=list(slots),
        writes=list(slots),
        positions=[position] * len(slots),
        riders=[0] * len(slots),
        token_index=[0] * len(slots),
        seeds=[0] * len(slots),
        kv_len=position + 1,
    )
    lo, hi = min(slots), max(slots) + 1
    plan.span = (lo, hi) if hi - lo == len(slots) else None
    if s == len(executor.segments) - 1:
        plan.project_slots = list(slots)
        plan.project_index = [0] * len(slots)
        plan.project_seeds = [0] * len(slots)
    return plan


@torch.no_grad()
def step_time_ms(executor: StepExecutor, s: int, slots: list[int], position: int, repeats: int = 3) -> float:
    """Fastest milliseconds of one whole step of segment s on `slots` (upload, programs, read-back)."""
    plan = segment_plan(executor, s, slots, position)
    return time_ms(lambda: executor.execute(plan), repeats, executor.device)


def row_counts(slots: int, buckets: list[int] | None = None) -> list[int]:
    """1, 2, 4, ... up to `slots`, and `slots` itself; at row buckets (graphs), the buckets."""
    if buckets is not None and len(buckets) < slots:
        return [b for b in buckets if b <= slots] or [slots]
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
def measure_cost_model(executor: StepExecutor, context: int = 128, repeats: int = 3) -> CostModel:
    """Time a step of every segment at 1, 2, 4, ... all slots (or at every bucket) with keys/values
    at `context` positions, on the executor's empty slots, and the regrouping cost of eager programs
    (three slots in four, scattered vs contiguous)."""
    slots = executor.store.slots
    position = max(1, min(context, executor.store.max_len)) - 1
    bucketed = executor.static
    rows = row_counts(slots, executor.buckets if bucketed else None)
    a, b, regroup, table = [], [], [], []
    for s in range(len(executor.segments)):
        times = [step_time_ms(executor, s, list(range(n)), position, repeats) for n in rows]
        table.append(times)
        line = fit_line(rows, times)
        a.append(line[0])
        b.append(line[1])
        if slots >= 4 and not bucketed:
            # three rows in four, as after an exit point: scattered (gathered copies) vs contiguous
            scattered = [i for i in range(slots) if i % 4 != 3]
            together = step_time_ms(executor, s, list(range(len(scattered))), position, repeats)
            apart = step_time_ms(executor, s, scattered, position, repeats)
            regroup.append(max(0.0, (apart - together) / len(scattered)))
        else:
            regroup.append(0.0)
    device = device_name(executor.device)
    how = "CUDA graphs" if executor.graphs is not None else "eager programs"
    source = f"measured at start-up on {device} ({how})"
    return CostModel(
        a,
        b,
        regroup,
        position + 1,
        source=source,
        device=device,
        rows=rows,
        table_ms=table,
        buckets=list(executor.buckets) if bucketed else None,
    )
