"""Quick start-up measurement of the scheduler's cost constants on the current device.

When no calibration file is given, the engine times each segment (with its exit check, or the
final norm and lm_head) on 1, 2, 4, ... all slots, and on three slots in four, contiguous vs
scattered (the regrouping cost: a gathered copy of keys/values); it keeps the table and fits
`T_s(n) = a_s + b_s·n`. It runs on the still-empty slots, so it writes nothing a request will read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from drex_hf.generation.runner import SegmentRunner
from drex_hf.generation.scheduler import CostModel


def _time_ms(fn: Callable[[], object], repeats: int, device: torch.device, statistic: str = "min") -> float:
    """The fastest (or the median, `statistic="median"`) of `repeats` timed calls after a warm-up: on a
    shared machine interference only ever adds time, so the minimum is the stablest estimate of what
    the work itself costs; the median is what a step typically takes, interference included."""
    from drex_hf.generation.engine import synchronize

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if statistic == "median" else min(times)


@torch.no_grad()
def segment_time_ms(runner: SegmentRunner, s: int, rows: list[int], repeats: int = 3) -> float:
    """Fastest milliseconds of one step of segment `s` on `rows`: the layers, then the exit check
    (or, for the last segment, the final norm and lm_head)."""
    last = s == len(runner.segments) - 1

    def once() -> None:
        x = runner.run_segment(s, rows)
        if last:
            runner.final_logits(x)
        else:
            runner.check(s, rows, x)

    return _time_ms(once, repeats, torch.device(runner.device))


def row_counts(slots: int) -> list[int]:
    """1, 2, 4, ... up to `slots`, and `slots` itself."""
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
def measure_cost_model(runner: SegmentRunner, context: int = 128, repeats: int = 3) -> CostModel:
    """Time every segment at 1, 2, 4, ... all slots (keys/values at `context` positions) on the
    engine's empty slots, and the regrouping cost (three slots in four, scattered vs contiguous)."""
    slots = runner.store.slots
    context = max(1, min(context, runner.store.max_len))
    saved = runner.positions.clone()
    runner.positions.fill_(context - 1)
    rows = row_counts(slots)
    a, b, regroup, table = [], [], [], []
    try:
        for s in range(len(runner.segments)):
            times = [segment_time_ms(runner, s, list(range(n)), repeats) for n in rows]
            table.append(times)
            line = fit_line(rows, times)
            a.append(line[0])
            b.append(line[1])
            if slots >= 4:
                # three rows in four, as after an exit point: scattered (gathered copies) vs contiguous
                scattered = [i for i in range(slots) if i % 4 != 3]
                together = segment_time_ms(runner, s, list(range(len(scattered))), repeats)
                apart = segment_time_ms(runner, s, scattered, repeats)
                regroup.append(max(0.0, (apart - together) / len(scattered)))
            else:
                regroup.append(0.0)
    finally:
        runner.positions.copy_(saved)
    from drex_hf.generation.engine import device_name

    device = device_name(runner.device)
    source = f"measured at start-up on {device}"
    return CostModel(a, b, regroup, context, source=source, device=device, rows=rows, table_ms=table)
