"""CUDA graphs of the executor's programs: one per program key, captured once, replayed per step.

As in SGLang's and vLLM's graph runners: every program reads its rows from static buffers sliced
per bucket and writes into static buffers, so a graph recorded once replays for any rows of its
bucket. Capture runs after a warm-up that runs every program eagerly (so every Triton variant and
cuBLAS handle exists before recording), largest bucket first, all graphs in one memory pool; the
engine points every plan row at the scratch slot first, so warm-up and capture write nothing a
request reads. The engine does not know whether a program ran eagerly or as a graph.

The recording itself is a `Recorder` (CUDA's by default), so that the cache's bookkeeping — which
keys exist, the order, that every step finds its graph — can be tested on the CPU with a recorder
that replays a program by running it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

Program = Callable[[], None]


class CudaRecorder:
    """Records programs as CUDA graphs in one pool, on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, programs: dict[tuple, Program]) -> None:
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # the second pass runs with every kernel compiled
                    for program in programs.values():
                        program()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)

    def record(self, key: tuple, program: Program) -> Program:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool):
            program()
        return graph.replay

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory(self) -> int:
        """Reserved memory with the allocator's free cached blocks returned first (a capture does
        that too), so that a difference is what the graphs' pool holds."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)


class GraphCache:
    """Captured programs by key: `capture()` once, then `replay(key)` per step."""

    def __init__(self, device: torch.device | str, recorder: object | None = None) -> None:
        device = torch.device(device)
        if recorder is None:
            if device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
            recorder = CudaRecorder(device)
        self.device = device
        self.recorder = recorder
        self.graphs: dict[tuple, Program] = {}
        self.order: list[tuple] = []
        self.report: dict[str, float | int] = {}
        self.replays = 0

    def capture(
        self,
        keys: Iterable[tuple],
        build: Callable[[tuple], Program],
        bucket_of_key: Callable[[tuple], int],
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float | int]:
        """Warm up every program, then capture them largest bucket first; returns the number of
        graphs, the seconds warm-up and capture took, and the pool memory they hold."""
        keys = sorted(keys, key=bucket_of_key, reverse=True)
        programs = {key: build(key) for key in keys}
        start = time.perf_counter()
        self.recorder.warm_up(programs)
        warm = time.perf_counter() - start
        before = self.recorder.memory()
        start = time.perf_counter()
        for key, program in programs.items():
            self.graphs[key] = self.recorder.record(key, program)
            self.order.append(key)
            if progress is not None:
                progress(1)
        self.recorder.finish()
        self.report = {
            "graphs": len(self.graphs),
            "warmup_s": warm,
            "capture_s": time.perf_counter() - start,
            "pool_bytes": self.recorder.memory() - before,
        }
        return self.report

    def replay(self, key: tuple) -> bool:
        """Replay `key`'s graph; False when none was captured for it (the caller runs it eagerly)."""
        graph = self.graphs.get(key)
        if graph is None:
            return False
        graph()
        self.replays += 1
        return True
