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
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from drex_hf.generation.engine import DrexEngine, synchronize
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.runner import SegmentRunner

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


def row_state_bytes(engine: DrexEngine) -> int:
    """Bytes of the per-slot tensors the engine's runner keeps besides the KV cache."""
    runner = engine.runner
    kept = [runner.hidden, runner.exit_hidden, runner.features, runner.positions, runner.previous]
    return sum(t.nbytes for t in kept if t is not None)


def peak_decode_bytes(engine: DrexEngine) -> int | None:
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
) -> dict:
    """Time drex's exits at no exit cost against full depth, round by round (see the module
    docstring). `exit_layers`: per request, the layer each token left at (a `drex` run's). Returns
    both totals in seconds and their ratio, the measured oracle speed-up over full depth."""
    last = model.num_layers - 1
    boundaries = sorted({layer for row in exit_layers for layer in row[1:] if layer < last})
    n = len(prompts)
    max_len = max(p.shape[0] for p in prompts) + max(len(row) for row in exit_layers) + 1
    device = model.heads_device
    starts = torch.tensor([p.shape[0] - 1 for p in prompts], device=device)  # each prompt's last position

    def runner(bounds: list[int]) -> SegmentRunner:
        run = SegmentRunner(model, RowKVCache.for_model(model, n, max_len), bounds)
        run.positions.copy_(starts)
        run.hidden.normal_()
        return run

    full, oracle = runner([]), runner(boundaries)
    rounds = rows_per_segment(exit_layers, boundaries)

    tokens = {"full": [0] * n, "oracle": [0] * n}

    # a round on either side: embed each active row's last token (advancing its position), run the
    # layers, project onto the vocabulary once per token and pick the tokens, as a decode step does;
    # the engine's own bookkeeping is left out on both sides. The segments read the embedded states
    # (their outputs are not carried from one segment to the next: the cost is the same)
    def full_round(active: int) -> None:
        rows = list(range(active))
        full.embed(rows, tokens["full"][:active])
        logits = full.final_logits(full.run_segment(0, rows))
        tokens["full"][:active] = logits.float().argmax(dim=-1).tolist()

    def oracle_round(reach: list[int]) -> None:
        rows = list(range(reach[0]))
        oracle.embed(rows, tokens["oracle"][: reach[0]])
        for s, count in enumerate(reach):
            if count:
                oracle.run_segment(s, rows[:count])
        logits = oracle.final_logits(oracle.hidden[: reach[0]])  # every token's one vocabulary projection
        tokens["oracle"][: reach[0]] = logits.float().argmax(dim=-1).tolist()

    full_round(n)  # warm-up
    oracle_round(rounds[0] if rounds else [n])
    for run in (full, oracle):
        run.positions.copy_(starts)
    spent = {"full": 0.0, "oracle": 0.0}
    for i, reach in enumerate(rounds):
        order = ["full", "oracle"] if i % 2 == 0 else ["oracle", "full"]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            if name == "full":
                full_round(reach[0])
            else:
                oracle_round(reach)
            synchronize(device)
            spent[name] += time.perf_counter() - start
    speedup = spent["full"] / spent["oracle"] if spent["oracle"] > 0 else None
    return {"full_s": spent["full"], "oracle_s": spent["oracle"], "speedup": speedup, "segments": boundaries}
