"""What the host spends per decode round, per policy: ops dispatched, transfers, waits and microseconds.

    python benchmarks/host_overhead.py                       # tiny shape, batch 8 and 32, CPU
    python benchmarks/host_overhead.py --device cuda --dtype bf16 --out runs/host-overhead-gpu
    python benchmarks/host_overhead.py --stub-device         # the host alone: 64 and 256 rows

**--stub-device**: the engine's device is replaced by a stub that answers every launch with the
verdict the device would give (`stub_device.StubRunner`: the same queues, exits, budgets, in numpy;
made-up tokens). Each policy's decode runs once on it, recorded; the timed decodes replay the
recorded verdicts (`stub_device.ReplayRunner`, which checks that the engine launches the same plans,
and the outputs are checked against the recorded decode's), so the simulation neither costs host time
nor crowds the host's caches, as a real device's work does not; what a round costs is the host's own
work, as it would be under CUDA graphs, where a step's device side is a few replays. Per policy and
row count: host µs per round (median of `--repeats` decodes, the policies interleaved; the first
decode step also emits the prefill's first tokens, for every policy alike) and the host time the
device would wait on per step — from reading one step's verdict to launching the next (mean, p95,
max).

On the `tiny` synthetic shape compute is close to nothing, so a round costs what the host spends on
it. For each policy, on the same random prompts and trace exits (20/25/20/35 % by default), after the
prefill:

* **ops** dispatched per round (a `TorchDispatchMode` sees every aten op), split into those inside the
  decoder layers (forward hooks mark them) and those outside; of the latter, those inside the heads
  (the exit heads' norms, adapters and confidence classifiers, the final norm, the lm_head: exit
  checks and vocabulary projections) are also counted apart from the engine's own;
* **uploads** (tensors made from Python data, copies from host buffers or across devices), **reads**
  (`.item()`, `.tolist()`, `.numpy()` of a device tensor, copies into host buffers) and **waits** (the
  reads plus explicit synchronisations), per round and per step — on a GPU each is a transfer or a
  stall; an engine that names its host staging buffers (`engine.executor.host_buffers`) has copies
  into and out of them counted as its uploads and reads;
* **host µs per round**: uncounted decodes of the same requests by the same engines, timed (median
  of `--repeats`, the policies interleaved; each policy's engine — its cost model, so its schedule —
  is built once, for the counted decode and the timed ones).

A round is one token for every row (drex runs several steps per round). Writes host_overhead.json
and host_overhead.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stub_device beside this script

from drex_hf.bench.run import add, new_engine, random_prompts
from drex_hf.bench.synthetic import SHAPES, synthetic_model
from drex_hf.device import device_name, synchronize
from drex_hf.generation.exits import ExitDistribution

MADE_FROM_DATA = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.lift.default"}
SCALAR_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}


class HostCounter(TorchDispatchMode):
    """Counts every dispatched op, inside or outside the decoder layers, and the transfers among them."""

    def __init__(self, host_buffers: set[int]) -> None:
        super().__init__()
        self.host = host_buffers
        self.inside = 0
        self.in_heads = 0
        self.ops_inside = 0
        self.ops_in_heads = 0
        self.ops_outside: collections.Counter[str] = collections.Counter()
        self.uploads = 0
        self.reads = 0

    def _is_host(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = str(func)
        if self.inside:
            self.ops_inside += 1
        else:
            self.ops_outside[name] += 1
            self.ops_in_heads += self.in_heads > 0
        if name in MADE_FROM_DATA:
            self.uploads += 1
        elif name in SCALAR_READS:
            self.reads += 1
        elif name in ("aten.copy_.default", "aten._to_copy.default"):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            target = kwargs.get("device")
            if name == "aten.copy_.default" and len(tensors) >= 2:
                dst, src = tensors[0], tensors[1]
                if self._is_host(src) or (src.device.type == "cpu" and dst.device.type != "cpu"):
                    self.uploads += 1
                elif self._is_host(dst) or (dst.device.type == "cpu" and src.device.type != "cpu"):
                    self.reads += 1
            elif target is not None and tensors and torch.device(target) != tensors[0].device:
                if tensors[0].device.type == "cpu":
                    self.uploads += 1
                else:
                    self.reads += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting(model: Any, host_buffers: set[int]) -> Iterator[tuple[HostCounter, dict[str, int]]]:
    """A `HostCounter` active for the block, with the decoder layers marked and `.tolist()`/`.numpy()`
    reads of non-host tensors and explicit synchronisations counted (those dispatch no op)."""
    mode = HostCounter(host_buffers)
    extra = {"reads": 0, "syncs": 0}
    hooks = []
    for layer in model.arch.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *_: setattr(mode, "inside", mode.inside + 1)))
        hooks.append(layer.register_forward_hook(lambda *_: setattr(mode, "inside", mode.inside - 1)))
    parts = [model.arch.final_norm, model.arch.lm_head]
    parts += [m for head in model.heads for m in (head.norm, head.adapter, head.classifier) if m is not None]
    for part in {id(m): m for m in parts}.values():
        hooks.append(part.register_forward_pre_hook(lambda *_: setattr(mode, "in_heads", mode.in_heads + 1)))
        hooks.append(part.register_forward_hook(lambda *_: setattr(mode, "in_heads", mode.in_heads - 1)))
    patched = {}
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)
        patched[method] = original

        def counted(self, *a, _original=original, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if self.untyped_storage().data_ptr() not in host_buffers:
                extra["reads"] += 1
            return _original(self, *a, **k)

        setattr(torch.Tensor, method, counted)
    sync_original = torch.cuda.synchronize
    event_original = torch.cuda.Event.synchronize

    def sync(*a, **k):  # noqa: ANN002, ANN003, ANN202
        extra["syncs"] += 1
        return sync_original(*a, **k)

    def event_sync(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        extra["syncs"] += 1
        return event_original(self, *a, **k)

    torch.cuda.synchronize = sync
    torch.cuda.Event.synchronize = event_sync
    try:
        with mode:
            yield mode, extra
    finally:
        for method, original in patched.items():
            setattr(torch.Tensor, method, original)
        torch.cuda.synchronize = sync_original
        torch.cuda.Event.synchronize = event_original
        for hook in hooks:
            hook.remove()


def host_buffers_of(engine: Any) -> set[int]:
    runner = getattr(engine, "runner", None)
    return set(getattr(runner, "host_buffers", ()))


def prefilled(engine: Any, prompts: list, tokens: int, dist: ExitDistribution) -> Any:
    """The engine holding the prompts again (its statistics reset), their prefill done."""
    if hasattr(engine, "reset_stats"):
        engine.reset_stats()
    for i, prompt in enumerate(prompts):
        add(engine, prompt, i, dist, tokens)
    while engine.prefill_queue:
        engine.step()
    synchronize(engine.model.heads_device)
    return engine


@torch.no_grad()
def count_policy(engine: Any, policy: str, prompts: list, tokens: int, dist: ExitDistribution) -> dict:
    engine = prefilled(engine, prompts, tokens, dist)
    model = engine.model
    steps0 = engine.stats.steps
    with counting(model, host_buffers_of(engine)) as (mode, extra):
        engine.run()
        synchronize(model.heads_device)
    steps = engine.stats.steps - steps0
    rounds = tokens - 1  # the prefill gives each row its first token
    outside = sum(mode.ops_outside.values())
    reads = mode.reads + extra["reads"]
    return {
        "policy": policy,
        "rows": len(prompts),
        "rounds": rounds,
        "steps": steps,
        "steps_per_round": steps / rounds,
        "ops_outside_per_round": outside / rounds,
        "ops_in_heads_per_round": mode.ops_in_heads / rounds,
        "ops_engine_per_round": (outside - mode.ops_in_heads) / rounds,
        "ops_inside_per_round": mode.ops_inside / rounds,
        "uploads_per_round": mode.uploads / rounds,
        "reads_per_round": reads / rounds,
        "waits_per_round": (reads + extra["syncs"]) / rounds,
        "copies_per_step": (mode.uploads + reads) / max(steps, 1),
        "top_ops_outside": dict(mode.ops_outside.most_common(12)),
    }


@torch.no_grad()
def time_policies(engines: dict, prompts: list, tokens: int, dist: ExitDistribution, repeats: int) -> dict[str, float]:
    """Host µs per round of an uncounted decode, median of `repeats`, the policies interleaved."""
    times: dict[str, list[float]] = {p: [] for p in engines}
    for _ in range(repeats):
        for policy, engine in engines.items():
            prefilled(engine, prompts, tokens, dist)
            start = time.perf_counter()
            engine.run()
            synchronize(engine.model.heads_device)
            times[policy].append((time.perf_counter() - start) / (tokens - 1) * 1e6)
    return {p: statistics.median(t) for p, t in times.items()}


@torch.no_grad()
def stub_policies(engines: dict, prompts: list, tokens: int, dist: ExitDistribution, repeats: int) -> list[dict]:
    """Host µs per round and the read-to-launch gaps, the policies interleaved: each engine's decode
    runs once on a `Recording` stub (untimed), then `repeats` times on a `ReplayRunner` of it (timed),
    whose outputs must be the recorded decode's."""
    from stub_device import Recording, ReplayRunner

    times: dict[str, list[float]] = {p: [] for p in engines}
    gaps: dict[str, list[float]] = {p: [] for p in engines}
    steps: dict[str, int] = {}
    recordings: dict[str, tuple[Recording, list]] = {}
    for repeat in range(repeats + 1):
        for policy, engine in engines.items():
            engine.reset_stats()
            real = engine.runner
            engine.runner = stub = ReplayRunner(recordings[policy][0]) if repeat else Recording(real)
            for i, prompt in enumerate(prompts):
                add(engine, prompt, i, dist, tokens)
            engine.step()  # the prefill's launch
            start, device = time.perf_counter(), stub.device_s
            engine.run()
            host = time.perf_counter() - start - (stub.device_s - device)
            engine.runner = real
            outputs = [(o.tokens, o.exit_layers) for _, o in sorted(engine.finished.items())]
            if not repeat:
                recordings[policy] = (stub, outputs)
                continue
            if outputs != recordings[policy][1]:
                raise RuntimeError(f"{policy}: the replayed decode's outputs differ from the recorded one's")
            times[policy].append(host / (tokens - 1) * 1e6)
            gaps[policy] += [(b - a) * 1e6 for a, b in zip(stub.reads, stub.launches)]
            steps[policy] = engine.stats.steps
    out = []
    for policy in engines:
        g = sorted(gaps[policy])
        out.append({
            "policy": policy, "rows": len(prompts), "rounds": tokens - 1,
            "steps_per_round": steps[policy] / (tokens - 1),
            "host_us_per_round": statistics.median(times[policy]), "host_us_runs": times[policy],
            "gap_us_mean": statistics.fmean(g), "gap_us_p95": g[int(0.95 * (len(g) - 1))], "gap_us_max": g[-1],
        })  # fmt: skip
    full = next((r for r in out if r["policy"] == "full"), out[0])
    for r in out:
        r["host_us_vs_full"] = r["host_us_per_round"] / full["host_us_per_round"]
    return out


def stub_table(results: list[dict]) -> str:
    lines = [
        "| rows | policy | steps / round | host µs / round | × full | read → launch µs per step: mean / p95 / max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['policy']} | {r['steps_per_round']:.2f} | {r['host_us_per_round']:.0f} "
            f"| {r['host_us_vs_full']:.2f} | {r['gap_us_mean']:.1f} / {r['gap_us_p95']:.1f} / {r['gap_us_max']:.1f} |"
        )
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| rows | policy | steps / round | ops outside layers / round (heads + engine) | ops inside / round "
        "| uploads / round | reads / round | waits / round | copies / step | host µs / round | × full (ops outside) "
        "| × full (µs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['policy']} | {r['steps_per_round']:.2f} | {r['ops_outside_per_round']:.1f} "
            f"({r['ops_in_heads_per_round']:.1f} + {r['ops_engine_per_round']:.1f}) "
            f"| {r['ops_inside_per_round']:.1f} | {r['uploads_per_round']:.2f} | {r['reads_per_round']:.2f} "
            f"| {r['waits_per_round']:.2f} | {r['copies_per_step']:.2f} | {r['host_us_per_round']:.0f} "
            f"| {r['ops_outside_vs_full']:.2f} | {r['host_us_vs_full']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="synthetic shape (default: tiny)")
    parser.add_argument("--batch-sizes", default="8,32", help="comma-separated rows (default: 8,32)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request (default: 16)")
    parser.add_argument("--policies", default="full,batch_all,drex", help="default: full,batch_all,drex")
    parser.add_argument("--exit-dist", default="0.2,0.25,0.2,0.35", help="trace exits (default: 0.2,0.25,0.2,0.35)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per policy, median (default: 5)")
    parser.add_argument("--device", default="cpu", help="default: cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default: fp32")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA graphs (default: on for CUDA, where the engine supports them)")  # fmt: skip
    parser.add_argument("--out", default="runs/host-overhead", help="output folder (default: runs/host-overhead)")
    parser.add_argument("--stub-device", action="store_true",
                        help="replace the device by a stub that answers with verdicts: the host alone "
                        "(default batch sizes then 64,256 and policies full,batch_all,drex)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stub_device:
        return stub_main(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = synthetic_model(args.shape, dtype, args.device)
    dist = ExitDistribution(tuple(float(v) for v in args.exit_dist.split(",")), seed=0)
    policies = args.policies.split(",")
    kwargs = {} if args.graphs is None else {"graphs": args.graphs}
    results = []
    for rows in (int(v) for v in args.batch_sizes.split(",")):
        prompts = random_prompts(rows, 8, 16, SHAPES[args.shape].vocab, seed=0)
        max_len = max(p.shape[0] for p in prompts) + args.max_new_tokens
        # one engine per policy, for the counted decode and the timed ones: the same cost model, the same schedule
        engines = {p: new_engine(model, p, args.max_new_tokens, rows, max_len, dist, **kwargs) for p in policies}
        counted = [count_policy(engines[p], p, prompts, args.max_new_tokens, dist) for p in policies]
        micros = time_policies(engines, prompts, args.max_new_tokens, dist, args.repeats)
        del engines
        full = next((r for r in counted if r["policy"] == "full"), counted[0])
        for r in counted:
            r["host_us_per_round"] = micros[r["policy"]]
            r["ops_outside_vs_full"] = r["ops_outside_per_round"] / full["ops_outside_per_round"]
            r["host_us_vs_full"] = micros[r["policy"]] / micros[full["policy"]]
            results.append(r)
    header = (
        f"{args.shape} shape, {args.dtype}, {device_name(model.heads_device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; trace exits {args.exit_dist}; {args.max_new_tokens} new tokens"
    )
    return write(Path(args.out), "host_overhead", header, results, table(results))


def write(out: Path, name: str, header: str, results: list[dict], text: str) -> int:
    """`name`.json (the setup line and every row) and `name`.md (the line and the table), printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"setup": header, "results": results}, indent=1))
    text = f"{header}\n\n{text}\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


def stub_main(args: argparse.Namespace) -> int:
    """`--stub-device`: host µs per round and read-to-launch gaps with the device stubbed out."""
    model = synthetic_model(args.shape, torch.float32, "cpu")
    dist = ExitDistribution(tuple(float(v) for v in args.exit_dist.split(",")), seed=0)
    sizes = "64,256" if args.batch_sizes == "8,32" else args.batch_sizes
    results = []
    for rows in (int(v) for v in sizes.split(",")):
        prompts = random_prompts(rows, 8, 16, SHAPES[args.shape].vocab, seed=0)
        max_len = max(p.shape[0] for p in prompts) + args.max_new_tokens
        engines = {p: new_engine(model, p, args.max_new_tokens, rows, max_len, dist) for p in args.policies.split(",")}
        results += stub_policies(engines, prompts, args.max_new_tokens, dist, args.repeats)
        del engines
    header = (
        f"device stubbed out (benchmarks/stub_device.py: recorded, then replayed); {args.shape} shape's engine on "
        f"{device_name('cpu')}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; trace exits {args.exit_dist}; "
        f"{args.max_new_tokens} new tokens; median of {args.repeats} decodes"
    )
    return write(Path(args.out), "host_overhead_stub", header, results, stub_table(results))


if __name__ == "__main__":
    sys.exit(main())
