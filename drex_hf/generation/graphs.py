"""The graph runner: every program of the runner by key, replayed from a captured graph when there is one.

As in SGLang's and vLLM's graph runners, a program reads its rows from static buffers (here, the
queues and the plan buffer on the device) and writes into static buffers, so a graph recorded once
replays for any rows of its bucket. `GraphRunner.capture` warms every program up first (every Triton
variant and cuBLAS handle exists before recording), then records them largest bucket first into one
memory pool, with a progress bar, and reports the count, the seconds and the pool's bytes; `lazy`
capture instead records each program the first time a step needs it (only the buckets steps use).
The recording itself is a recorder: `CudaRecorder` (CUDA graphs), or on the CPU the replay recorder
(`recorder.ReplayRecorder`), which replays the recorded ops on the recorded tensors, so that graph
semantics are tested without a GPU. The engine does not know whether a program ran eagerly or as a
graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

Program = Callable[[], None]
logger = logging.getLogger(__name__)


class CudaRecorder:
    """Records programs as CUDA graphs in one pool, on a side stream, on its device."""

    executes = False  # recording does not run the program (a warm-up must have)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
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


class GraphRunner:
    """Runs programs by key: `build(key)` makes one (a function of nothing); `run(key)` replays its
    graph if captured, else runs it eagerly — or, with a recorder and `lazy`, captures it now.
    Without a recorder every program runs eagerly."""

    def __init__(self, build: Callable[[tuple], Program], recorder: Any = None, *, lazy: bool = False) -> None:
        self.build, self.recorder, self.lazy = build, recorder, lazy
        self.graphs: dict[tuple, Program] = {}
        self._eager: dict[tuple, Program] = {}
        self.order: list[tuple] = []
        self.replays = 0
        self.report: dict[str, float | int] = {"graphs": 0, "warmup_s": 0.0, "capture_s": 0.0, "pool_bytes": 0}

    @property
    def captures(self) -> bool:
        return self.recorder is not None

    def program(self, key: tuple) -> Program:
        if key not in self._eager:
            self._eager[key] = self.build(key)
        return self._eager[key]

    def run(self, key: tuple) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph()
            self.replays += 1
        elif self.recorder is not None and self.lazy:
            self._capture_now(key)
        else:
            self.program(key)()

    def _capture_now(self, key: tuple) -> None:
        """Capture `key` the first time a step needs it; the step's work is done exactly once."""
        program = self.program(key)
        start = time.perf_counter()
        if not getattr(self.recorder, "executes", True):
            program()  # the warm-up is this step's own run; the recording does not run it again
        before = self.recorder.memory()
        self.graphs[key] = self.recorder.record(key, program)
        self.order.append(key)
        self.recorder.finish()
        self.report["graphs"] += 1
        self.report["capture_s"] += time.perf_counter() - start
        self.report["pool_bytes"] += self.recorder.memory() - before

    def capture(
        self, keys: Iterable[tuple], bucket_of_key: Callable[[tuple], int], progress: bool | None = None
    ) -> dict[str, float | int]:
        """Warm up every program, then capture them largest bucket first, with a progress bar;
        returns (and logs) the number of graphs, the seconds warm-up and capture took and the memory
        their pool holds."""
        from tqdm.auto import tqdm

        keys = sorted((k for k in keys if k not in self.graphs), key=bucket_of_key, reverse=True)
        programs = {key: self.program(key) for key in keys}
        start = time.perf_counter()
        self.recorder.warm_up(programs)
        warm = time.perf_counter() - start
        before = self.recorder.memory()
        start = time.perf_counter()
        bar = tqdm(total=len(keys), desc="capturing graphs", disable=None if progress is None else not progress)
        with bar:
            for key, program in programs.items():
                self.graphs[key] = self.recorder.record(key, program)
                self.order.append(key)
                bar.update(1)
        self.recorder.finish()
        self.report = {
            "graphs": len(self.graphs),
            "warmup_s": self.report["warmup_s"] + warm,
            "capture_s": self.report["capture_s"] + time.perf_counter() - start,
            "pool_bytes": self.report["pool_bytes"] + self.recorder.memory() - before,
        }
        logger.info(
            "captured %d graphs in %.1f s (warm-up %.1f s), pool %.1f MiB",
            len(keys), self.report["capture_s"], warm, self.report["pool_bytes"] / 2**20,
        )  # fmt: skip
        return dict(self.report)

    def release(self) -> None:
        """Drop every graph (and its pool, once nothing else holds it)."""
        self.graphs.clear()
        self._eager.clear()
        self.order.clear()
