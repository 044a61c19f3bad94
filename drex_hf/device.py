"""The device a model runs on: its name, waiting for its queued work, and timing work on it.

Used alike by the generation engine (statistics, start-up cost measurement), calibration (cost
constants are keyed by `device_name`) and the benchmarks. Nothing here knows about models.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device | str) -> str:
    """What cost constants are keyed by: the GPU's name, or `cpu:<processor>`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device | str, statistic: str = "min") -> float:
    """The fastest (or the median, `statistic="median"`) of `repeats` timed calls after a warm-up: on a
    shared machine interference only ever adds time, so the minimum is the stablest estimate of what
    the work itself costs; the median is what a call typically takes, interference included."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if statistic == "median" else min(times)
