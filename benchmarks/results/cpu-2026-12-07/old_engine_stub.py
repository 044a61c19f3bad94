"""The engine before engine v2 (commit f72e6ee) with its device stubbed out, for the host-overhead
table's "old" column: run with that commit's tree first on the path, e.g.

    git worktree add /tmp/old f72e6ee
    PYTHONPATH=/tmp/old python benchmarks/results/cpu-2026-12-07/old_engine_stub.py

Its `StepExecutor.execute` / `prefill` are replaced by functions that return the verdict the device
would (zero confidences, made-up tokens: trace exits are decided on the host there), timing
themselves; host µs per round = the decode's wall time minus theirs, as `host_overhead.py
--stub-device` measures the new engine; the read -> launch gap is the time from one `execute`'s return
to the next one's call (the old engine's step is synchronous: everything between is the host's)."""

import statistics
import time
from typing import Any

import numpy as np
import torch

from drex_hf.bench.run import add, new_engine, random_prompts
from drex_hf.bench.synthetic import synthetic_model
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.plan import Verdict


def stub(engine: Any) -> tuple[dict, list, list]:
    spent = {"device": 0.0}
    ends, starts = [], []

    def execute(plan: Any) -> Verdict:
        t = time.perf_counter()
        starts.append(t)
        n = len(plan.slots)
        verdict = Verdict(
            confidence=np.zeros(n, dtype=np.float32) if plan.segment is not None else None,
            tokens=None,
            projected=np.full(len(plan.project_slots), 1000.0, dtype=np.float32) if plan.project_slots else None,
        )
        done = time.perf_counter()
        ends.append(done)
        spent["device"] += done - t
        return verdict

    def prefill(slots: list, prompts: list, seeds: list, sampling: Any = None) -> list:
        t = time.perf_counter()
        out = [1000 + s for s in slots]
        spent["device"] += time.perf_counter() - t
        return out

    engine.executor.execute, engine.executor.prefill = execute, prefill
    return spent, ends, starts


def main() -> None:
    model = synthetic_model("tiny")
    dist = ExitDistribution((0.2, 0.25, 0.2, 0.35), seed=0)
    tokens = 16
    for rows in (64, 256):
        prompts = random_prompts(rows, 8, 16, 256, seed=0)
        engines = {p: new_engine(model, p, tokens, rows, 40, dist) for p in ("full", "batch_all", "drex")}
        times = {p: [] for p in engines}
        gaps = {p: [] for p in engines}
        steps = {}
        with torch.no_grad():
            for _ in range(5):
                for p, engine in engines.items():
                    engine.reset_stats()
                    spent, ends, starts = stub(engine)
                    for i, prompt in enumerate(prompts):
                        add(engine, prompt, i, dist, tokens)
                    while engine.prefill_queue:
                        engine.step()
                    start, device = time.perf_counter(), spent["device"]
                    n0 = len(ends)
                    engine.run()
                    times[p].append((time.perf_counter() - start - (spent["device"] - device)) / (tokens - 1) * 1e6)
                    gaps[p] += [(b - a) * 1e6 for a, b in zip(ends[n0:], starts[n0 + 1 :])]
                    steps[p] = engine.stats.steps
        full = statistics.median(times["full"])
        for p in engines:
            g = sorted(gaps[p])
            med = statistics.median(times[p])
            print(
                f"| {rows} | {p} | {steps[p] / (tokens - 1):.2f} | {med:.0f} | {med / full:.2f} | "
                f"{statistics.fmean(g):.1f} / {g[int(0.95 * (len(g) - 1))]:.1f} / {g[-1]:.1f} |"
            )


if __name__ == "__main__":
    main()
