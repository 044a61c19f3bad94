"""Quick start-up measurement of the scheduler's cost constants on the current device.

When no calibration file is given, the engine times each segment (with its exit check, or the
final norm and lm_head) on 1 and on all slots, and on half the slots contiguous vs every other slot
(the regrouping cost: a gathered copy of keys/values), then fits `T_s(n) = a_s + b_s·n`. It runs on
the still-empty slots, so it writes nothing a request will read. `drex calibrate` does this properly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from drex_hf.generation.runner import SegmentRunner
from drex_hf.generation.scheduler import CostModel


def _time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def segment_time_ms(runner: SegmentRunner, s: int, rows: list[int], repeats: int = 3) -> float:
    """Median milliseconds of one step of segment `s` on `rows`: the layers, then the exit check
    (or, for the last segment, the final norm and lm_head)."""
    last = s == len(runner.segments) - 1

    def once() -> None:
        x = runner.run_segment(s, rows)
        if last:
            runner.final_logits(x)
        else:
            runner.check(s, rows, x)

    return _time_ms(once, repeats, torch.device(runner.device))


@torch.no_grad()
def measure_cost_model(runner: SegmentRunner, context: int = 128, repeats: int = 3) -> CostModel:
    """Fit the cost model on the engine's empty slots, keys/values at `context` positions."""
    slots = runner.store.slots
    context = max(1, min(context, runner.store.max_len))
    saved = runner.positions.clone()
    runner.positions.fill_(context - 1)
    a, b, regroup = [], [], []
    try:
        for s in range(len(runner.segments)):
            one = segment_time_ms(runner, s, [0], repeats)
            every = segment_time_ms(runner, s, list(range(slots)), repeats) if slots > 1 else one
            slope = max(0.0, (every - one) / (slots - 1)) if slots > 1 else 0.0
            a.append(max(0.0, one - slope))
            b.append(slope)
            if slots >= 3:
                half = slots // 2
                together = segment_time_ms(runner, s, list(range(half)), repeats)
                apart = segment_time_ms(runner, s, list(range(0, 2 * half, 2)), repeats)
                regroup.append(max(0.0, (apart - together) / half))
            else:
                regroup.append(0.0)
    finally:
        runner.positions.copy_(saved)
    from drex_hf.generation.engine import device_name

    device = device_name(runner.device)
    return CostModel(a, b, regroup, context, source=f"measured at start-up on {device}", device=device)
