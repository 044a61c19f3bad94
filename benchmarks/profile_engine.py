"""Where a policy's decode time goes: the engine's runner and scheduler wrapped in synchronised timers.

    python benchmarks/profile_engine.py llama-7b --device cuda --dtype bf16 --batch 256 --out runs/profile-7b
    python benchmarks/profile_engine.py moderate --batch 32 --out runs/profile-moderate

For each policy (default full, batch_all, drex) on the same random prompts and trace exits: decode
wall time, steps, and the time inside each piece of a step — the host's decision and its application
of the verdict (emitting tokens, statistics), the upload, the device programs (taking rows from a
queue, the segment's layers, the exit check, routing rows to their next queues, KV fill, deferred
projections, the verdict report) and the verdict read — each timed with a device synchronisation
before and after (which itself slows the run a little: compare the shares, not the totals, with
`drex bench`'s; a piece called inside another is subtracted from it). For drex also: how many live
rows each segment step ran and how many steps each segment took, and every decision the engine made
(segment, rows, bucket, fills, projections, buffer sizes, predicted and measured ms, the policy's
reason), so a surprising step count can be explained. Writes profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from drex_hf.bench.measure import gpu_busy_share
from drex_hf.bench.run import build_engine, random_prompts
from drex_hf.bench.synthetic import SHAPES, synthetic_model
from drex_hf.device import device_name, synchronize
from drex_hf.generation.exits import ExitDistribution

RUNNER_METHODS = ("_upload", "read")
PROGRAM_METHODS = ("take", "run_layers", "check", "route_exit", "route_final", "fill", "project", "append")
ENGINE_METHODS = ("_decide", "_apply")


def build(model, prompts, policy, tokens, distribution, **kwargs):  # noqa: ANN001, ANN003, ANN201
    return build_engine(model, prompts, policy, tokens, distribution, **kwargs)[0]


def gpu_busy(model, prompts, policy, tokens, distribution) -> dict:  # noqa: ANN001
    """Decode under torch.profiler, no timers: wall time against the summed time of the GPU's kernels
    (a host-bound run leaves the GPU idle between launches)."""
    return {"policy": policy} | gpu_busy_share(build(model, prompts, policy, tokens, distribution))


def profiled(model, prompts, policy, tokens, distribution) -> dict:  # noqa: ANN001
    engine = build(model, prompts, policy, tokens, distribution, record_decisions=True)
    while engine.prefill_queue:
        engine.step()
    device = model.heads_device
    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    inner_time = [0.0]  # time spent in timed pieces called inside the one running now

    def wrap(owner, name: str, label: str) -> None:  # noqa: ANN001
        inner = getattr(owner, name)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            outer, inner_time[0] = inner_time[0], 0.0
            synchronize(device)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                synchronize(device)
                took = time.perf_counter() - start
                spent[label] += took - inner_time[0]  # its own time: nested pieces count for themselves
                calls[label] += 1
                inner_time[0] = outer + took

        setattr(owner, name, timed)

    for name in RUNNER_METHODS:
        wrap(engine.runner, name, name.strip("_"))
    for name in PROGRAM_METHODS:
        wrap(engine.runner.programs, name, name)
    wrap(engine.runner, "_report", "report")
    for name in ENGINE_METHODS:
        wrap(engine, name, name.strip("_"))
    wrap(engine.policy, "pick", "scheduler")
    start = time.perf_counter()
    engine.run()
    synchronize(device)
    wall = time.perf_counter() - start
    shapes = [(d["segment"], d["rows"]) for d in engine.stats.decisions if d["segment"] is not None]
    per_segment = collections.Counter(s for s, _ in shapes)
    result = {
        "policy": policy,
        "decode_s": wall,
        "steps": engine.stats.steps,
        "decoded_tokens": engine.stats.to_dict()["decoded_tokens"],
        "seconds": dict(spent),
        "calls": dict(calls),
        "other_s": wall - sum(spent.values()),
        "steps_per_segment": dict(sorted(per_segment.items())),
        "mean_rows_per_step": {
            s: sum(n for t, n in shapes if t == s) / max(per_segment[s], 1) for s in sorted(per_segment)
        },
        # every decision with its reason, rows, bucket and predicted vs measured ms: what explains a step count
        "decisions": engine.stats.decisions,
        "cost_source": engine.stats.cost_source,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=tuple(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--policies", default="full,batch_all,drex", help="drex@SLACK sets the drex policy's slack")
    parser.add_argument("--exit-dist", default="0.2,0.25,0.2,0.35")
    parser.add_argument(
        "--gpu-busy", action="store_true", help="CUDA: also decode under torch.profiler and sum the kernels' time"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/profile-engine"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = synthetic_model(args.model, dtype, args.device)
    distribution = ExitDistribution(tuple(float(p) for p in args.exit_dist.split(",")), seed=0)
    prompts = random_prompts(args.batch, 8, 64, model.arch.vocab_size, seed=args.batch)
    report = {"device": device_name(model.heads_device), "model": args.model, "batch": args.batch, "policies": []}
    for policy in args.policies.split(","):
        build(model, prompts, policy, 4, distribution).run()  # warm-up: compile kernels, fill the allocator
        r = profiled(model, prompts, policy, args.max_new_tokens, distribution)
        report["policies"].append(r)
        shares = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(r["seconds"].items(), key=lambda kv: -kv[1]))
        print(
            f"{policy:10s} decode {r['decode_s'] * 1e3:.0f} ms, {r['steps']} steps; {shares}; other "
            f"{r['other_s'] * 1e3:.0f} ms; steps per segment {r['steps_per_segment']}; rows per step "
            f"{ {s: round(v, 1) for s, v in r['mean_rows_per_step'].items()} }",
            flush=True,
        )
        if args.gpu_busy:
            busy = gpu_busy(model, prompts, policy, args.max_new_tokens, distribution)
            r["gpu_busy"] = busy
            print(
                f"{policy:10s} under torch.profiler: wall {busy['wall_s'] * 1e3:.0f} ms, GPU kernels "
                f"{busy['gpu_kernels_s'] * 1e3:.0f} ms ({busy['gpu_kernels_s'] / busy['wall_s']:.0%} busy), "
                f"{busy['kernel_launches']} kernel launches",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
