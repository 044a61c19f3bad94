"""Two measurements `drex bench` adds beside its timings: memory per policy, and a measured oracle.

* **Memory.** The KV cache (`RowKVCache`, equal for every policy: KV fill keeps full depth's
  shape), the per-row state the segment runner keeps besides it (hidden states waiting between
  segments, exit states awaiting KV fill, exit-head features awaiting their projection), and the
  peak of the tensors decoding allocates on top of what was live when it began: activations,
  logits, gathered copies. On CUDA that peak comes from the caching allocator's statistics; on the
  CPU from `torch.profiler`'s allocation events (every allocation and free, summed in order).
* **Measured oracle.** The speed-up drex's own exits would give if exiting cost nothing on this
  machine: the same rounds, each segment run on exactly the rows that reach it (as one contiguous
  block: no exit checks, KV fill, regrouping or bookkeeping) and one vocabulary projection per
  token, timed round by round in alternation with the same rounds at full depth. Both sides embed
  the tokens, run the layers, project and pick tokens; neither pays the engine's bookkeeping, so
  where that is a large share of a step (a host-bound GPU) the ratio overstates what is possible. Unlike the
  layer-count oracle (full × L ÷ mean exit depth) it charges what no exit can skip (the one
  vocabulary projection every token needs) and what rows cost on this machine (a segment on 11 rows
  is not 11/32 of one on 32: `benchmarks/README.md` has the CPU's curve).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from drex_hf.device import synchronize
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import bucket_of, row_buckets
from drex_hf.generation.programs import Rows
from drex_hf.generation.runner import Options, Runner
from drex_hf.generation.spec.engine import SpecEngine

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


def row_state_bytes(engine: DrexEngine | SpecEngine) -> int:
    """Bytes of the per-slot tensors the engine keeps besides the KV cache (its runner's; a
    SpecEngine's round state too)."""
    if isinstance(engine, SpecEngine):
        return engine.row_state_bytes()
    return engine.runner.nbytes()


def peak_decode_bytes(engine: DrexEngine | SpecEngine) -> int | None:
    """Run the engine's queued requests: the prefill untracked, then the decode, returning the peak
    of the bytes it allocated above what was live when decoding began (None when this torch build's
    profiler gives no allocation events)."""
    while engine.prefill_queue:
        engine.step()
    device = torch.device(engine.model.heads_device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        engine.run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.run()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    if not events:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def gpu_busy_share(engine: DrexEngine | SpecEngine) -> dict | None:
    """Decode the engine's queued requests (the prefill untimed) under torch.profiler: wall time
    against the summed time of the GPU's kernels — a host-bound decode leaves the GPU idle between
    launches. None off CUDA."""
    device = torch.device(engine.model.heads_device)
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    while engine.prefill_queue:
        engine.step()
    synchronize(device)
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.run()
        synchronize(device)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels = sum(e.self_device_time_total for e in events) / 1e6
    return {
        "wall_s": wall,
        "gpu_kernels_s": kernels,
        "busy": kernels / wall if wall > 0 else None,
        "kernel_launches": sum(e.count for e in events),
    }


# what the profiler's C++ side prints on every start and stop, and its note that blocks allocated
# before it started have no free event (which is what the running sum wants: they were never added)
_PROFILER_CHATTER = ("USDT:", "STAGE:", "profiler results will not include the deallocation event")


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Hold back the profiler's own lines on the process's stderr (file descriptor 2, where its C++
    side writes); every other line written meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            rest = [line for line in lines if not any(mark in line for mark in _PROFILER_CHATTER)]
            if rest:
                sys.stderr.write("".join(rest))


def rows_per_segment(exit_layers: Sequence[Sequence[int]], boundaries: Sequence[int]) -> list[list[int]]:
    """For each decoded round (a request's first token is the prefill's and is left out): how many
    rows reach each segment, segments ending at `boundaries` and then the last layer. A request that
    ended early (its end-of-sequence token) drops out of later rounds."""
    rounds = max((len(layers) for layers in exit_layers), default=1) - 1
    starts = [-1, *boundaries]  # a row reaches segment s when its exit layer is past segment s-1's end
    out = []
    for r in range(1, rounds + 1):
        layers = [row[r] for row in exit_layers if len(row) > r]
        out.append([sum(layer > start for layer in layers) for start in starts])
    return out


@torch.no_grad()
def measured_oracle(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    exit_layers: Sequence[Sequence[int]],
    graphs: bool | None = None,
) -> dict:
    """Time drex's exits at no exit cost against full depth, round by round (see the module
    docstring). `exit_layers`: per request, the layer each token left at (a `drex` run's). Returns
    both totals in seconds and their ratio, the measured oracle speed-up over full depth.

    `graphs` (default: on for CUDA): both sides run their programs as CUDA graphs at row buckets, as
    the engine does there (each segment's layers without its exit check, padded to the bucket);
    eagerly, each segment runs on exactly its rows."""
    last = model.num_layers - 1
    boundaries = sorted({layer for row in exit_layers for layer in row[1:] if layer < last})
    n = len(prompts)
    max_len = max(p.shape[0] for p in prompts) + max(len(row) for row in exit_layers) + 1
    starts = [p.shape[0] - 1 for p in prompts]  # each prompt's last position
    device = torch.device(model.heads_device)
    graphs = device.type == "cuda" if graphs is None else graphs

    # one key/value store for both sides: they run the same positions in alternation, and what a side's
    # tokens are does not matter to its time (so a long context costs the store once, not twice)
    store = RowKVCache.for_model(model, n, max_len)

    def side(bounds: list[int]) -> Runner:
        options = Options(boundaries=bounds, thresholds=[math.inf] * len(bounds), buckets=row_buckets(n, graphs),
                          static=graphs, fills=False)  # fmt: skip
        run = Runner(model, store, options, graphs=True if graphs else None, lazy=True)
        run.state.hidden.normal_()
        programs = {
            "oracle_layers": lambda s, b: _oracle_layers(run, s, b),
            "oracle_head": lambda b: _oracle_head(run, b),
        }
        run.extend(programs, list)
        return run

    sides = {"full": side([]), "oracle": side(boundaries)}
    rounds = rows_per_segment(exit_layers, boundaries)

    # a round on either side, as a decode step does it: one upload, segment 0 embeds each active row's
    # last token (advancing its position), each segment runs on the rows that reach it, as one
    # contiguous block with no exit check, one vocabulary projection per token picks the tokens, one
    # read-back; the engine's own bookkeeping is left out on both sides. The segments read the
    # embedded states (their outputs are carried from one segment to the next; exited rows' are not)
    def round_on(name: str, reach: list[int]) -> None:
        run = sides[name]
        active = reach[0]
        run.state.position[:active] += 1
        run.transfers["uploads"] += 1
        for s, count in enumerate(reach):
            if count:  # eager: exactly its rows, as views; with graphs: their bucket's program
                run.graphs.run(("oracle_layers", s, bucket_of(run.buckets, count)))
        run.graphs.run(("oracle_head", bucket_of(run.buckets, active)))
        run.host_verdicts[0].copy_(run.verdict)  # the step's one read-back

    full_reach = [[r[0]] for r in rounds]
    for run in sides.values():
        run.state.position[:n] = torch.tensor(starts, device=device)
    round_on("full", full_reach[0] if rounds else [n])  # warm-up
    round_on("oracle", rounds[0] if rounds else [n])
    for run in sides.values():
        run.state.position[:n] = torch.tensor(starts, device=device)
    spent = {"full": 0.0, "oracle": 0.0}
    for i, reach in enumerate(rounds):
        order = ["full", "oracle"] if i % 2 == 0 else ["oracle", "full"]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            round_on(name, full_reach[i] if name == "full" else reach)
            synchronize(device)
            spent[name] += time.perf_counter() - start
    speedup = spent["full"] / spent["oracle"] if spent["oracle"] > 0 else None
    return {
        "full_s": spent["full"],
        "oracle_s": spent["oracle"],
        "speedup": speedup,
        "segments": boundaries,
        "graphs": graphs,
    }


def _oracle_layers(runner: Runner, s: int, bucket: int) -> None:
    """Segment s's layers on the first `bucket` slots, no exit check: segment 0 embeds their tokens,
    the others read the hidden states the previous segment left there."""
    p = runner.programs
    slots = p.arange(bucket)
    rows = Rows(slots, slots, slots >= 0, runner.state.position.index_select(0, slots))
    out = p.run_layers(s, rows, p.embed(rows) if s == 0 else None, runner.store.max_len)
    runner.state.hidden.index_copy_(0, slots, out)


def _oracle_head(runner: Runner, bucket: int) -> None:
    """One vocabulary projection and pick for the first `bucket` slots' states."""
    p, slots = runner.programs, runner.programs.arange(bucket)
    hidden = runner.state.hidden.index_select(0, slots)
    p.pick(runner.arch.lm_head(runner.arch.final_norm(hidden)), slots, runner.state.position.index_select(0, slots) + 1)
