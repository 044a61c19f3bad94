"""Where a policy's decode time goes: the engine's runner and scheduler wrapped in synchronised timers.

    python benchmarks/profile_engine.py llama-7b --device cuda --dtype bf16 --batch 256 --out runs/profile-7b
    python benchmarks/profile_engine.py moderate --batch 32 --out runs/profile-moderate

For each policy (default full, batch_all, drex) on the same random prompts and trace exits: decode
wall time, steps, and the time inside each runner method (segment runs, exit checks, KV fill, the
deferred vocabulary projections, feature keeping, row gathers) and the scheduler's decision, each
timed with a device synchronisation before and after (which itself slows the run a little: compare
the shares, not the totals, with `drex bench`'s). For drex also: how many rows each segment step ran
(own rows and riders) and how many steps each segment took. Writes profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from drex_hf.bench.run import build_engine, random_prompts
from drex_hf.bench.synthetic import SHAPES, synthetic_model
from drex_hf.generation.engine import device_name, synchronize
from drex_hf.generation.exits import ExitDistribution

RUNNER_METHODS = ("run_segment", "check", "fill", "project", "keep_features", "keep", "final_logits", "_gather")


def build(model, prompts, policy, tokens, distribution):  # noqa: ANN001, ANN201
    return build_engine(model, prompts, policy, tokens, distribution)[0]


def gpu_busy(model, prompts, policy, tokens, distribution) -> dict:  # noqa: ANN001
    """Decode under torch.profiler, no timers: wall time against the summed time of the GPU's kernels
    (a host-bound run leaves the GPU idle between launches)."""
    from torch.profiler import ProfilerActivity, profile

    engine = build(model, prompts, policy, tokens, distribution)
    while engine.prefill_queue:
        engine.step()
    synchronize(model.heads_device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.run()
        synchronize(model.heads_device)
        wall = time.perf_counter() - start
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    launches = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return {"policy": policy, "wall_s": wall, "gpu_kernels_s": kernels_us / 1e6, "kernel_launches": launches}


def profiled(model, prompts, policy, tokens, distribution) -> dict:  # noqa: ANN001
    engine = build(model, prompts, policy, tokens, distribution)
    while engine.prefill_queue:
        engine.step()
    device = model.heads_device
    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    depth = [0]  # only the outermost timed call counts (run_segment calls _gather inside)

    def wrap(owner, name: str, label: str) -> None:  # noqa: ANN001
        inner = getattr(owner, name)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if depth[0]:
                return inner(*args, **kwargs)
            depth[0] += 1
            synchronize(device)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                synchronize(device)
                spent[label] += time.perf_counter() - start
                calls[label] += 1
                depth[0] -= 1

        setattr(owner, name, timed)

    for name in RUNNER_METHODS:
        wrap(engine.runner, name, name)
    wrap(engine.policy, "pick", "scheduler")
    shapes: list[tuple[int, int, int]] = []
    run_segment = engine.runner.run_segment

    def counted(s, rows, riders=(), refill=()):  # noqa: ANN001, ANN202
        shapes.append((s, len(rows), len(riders)))
        return run_segment(s, rows, riders, refill)

    engine.runner.run_segment = counted
    start = time.perf_counter()
    engine.run()
    synchronize(device)
    wall = time.perf_counter() - start
    per_segment = collections.Counter(s for s, _, _ in shapes)
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
            s: sum(n for t, n, _ in shapes if t == s) / max(per_segment[s], 1) for s in sorted(per_segment)
        },
        "mean_riders_per_step": {
            s: sum(r for t, _, r in shapes if t == s) / max(per_segment[s], 1) for s in sorted(per_segment)
        },
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
            f"{ {s: round(v, 1) for s, v in r['mean_rows_per_step'].items()} }; riders per step "
            f"{ {s: round(v, 1) for s, v in r['mean_riders_per_step'].items()} }",
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
