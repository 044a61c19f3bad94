"""Does the calibrated cost model predict steps, and pick the faster of two ways to run one?

    python benchmarks/decisions.py --batch 32 --max-new-tokens 48 --out runs/bench-decisions

On a random-weight shape of drex_hf.bench.synthetic (default `moderate`; `llama-7b --device cuda
--dtype bf16` on a GPU), here the moderate random Llama (16 layers, hidden 1024, exits after 3/7/11, trace exits
20/25/20 %, 35 % full depth): the segments, checks, KV fill and regrouping are profiled as `drex
calibrate` profiles them (median of 5), and the calibrated cost model drives two drex runs on the
same prompts. Run 1 is left alone: its predicted vs measured step times give the prediction error.
Run 2 stops at every decision point where rows could ride along and executes both choices from the
same state — the buffer's rows alone (scattered, a gathered copy) and with the riders (one contiguous
run) — timing each (median of 3); the cost model's pick is right when it names the faster one.
Differences under `--tie` (relative) are ties and counted apart. Writes decisions.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from drex_hf.bench.run import build_engine, random_prompts
from drex_hf.bench.synthetic import SHAPES, synthetic_model
from drex_hf.calibration.costs import CostTable, profile_runner
from drex_hf.device import device_name, time_ms
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.profile import segment_plan

DISTRIBUTION = (0.2, 0.25, 0.2, 0.35)


def engine_for(model, prompts, new_tokens, cost):  # noqa: ANN001, ANN201
    exits = ExitDistribution(DISTRIBUTION, seed=0)
    return build_engine(model, prompts, "drex", new_tokens, exits, cost_model=cost)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", choices=tuple(SHAPES), default="moderate", help="synthetic shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=int, default=32, help="requests (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="(default: %(default)s)")
    parser.add_argument("--context", type=int, default=64, help="positions cached when profiling")
    parser.add_argument("--tie", type=float, default=0.03, help="relative difference under which choices tie")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-decisions"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = synthetic_model(args.model, dtype, args.device)
    prompts = random_prompts(args.batch, 8, 64, model.arch.vocab_size, seed=0)
    device = device_name(model.heads_device)

    probe = engine_for(model, prompts, args.max_new_tokens, None)  # an engine only to profile on
    rows = sorted({r for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.batch} | {args.batch})
    timer = profile_runner(probe.executor, args.context)
    costs = CostTable.measure(timer, len(probe.executor.segments), rows, regroup=True, project=True)
    cost = costs.cost_model(args.context, device)
    del probe

    if model.heads_device.type == "cuda":  # compile the kernels' variants outside the measured runs
        engine_for(model, prompts, min(8, args.max_new_tokens), cost).run()
    clean = engine_for(model, prompts, args.max_new_tokens, cost)
    clean.run()
    error = clean.stats.prediction_error()

    timed = engine_for(model, prompts, args.max_new_tokens, cost)
    executor, policy = timed.executor, timed.policy
    cases = []
    plan = policy.plan

    def step_ms(s: int, rows: list[int], riders: list[int], view) -> float:  # noqa: ANN001
        """A whole step of segment s on `rows` (+ `riders`), at the rows' own positions."""
        slots = sorted([*rows, *riders])
        at = {slot: r.position + (s == 0) for slot, r in timed.requests.items()}  # segment 0 starts a token
        step = segment_plan(executor, s, slots, 0)
        step.positions = [at.get(slot, 0) for slot in slots]
        step.kv_len = max(step.positions) + 1
        step.writes = [slot if slot in rows else timed.store.scratch for slot in slots]
        step.riders = [int(slot not in rows) for slot in slots]
        return time_ms(lambda: executor.execute(step), 3, executor.device, "median")

    def watched(view, s):  # noqa: ANN001, ANN202
        chosen = plan(view, s)
        riders = view.riders_for(s, list(view.buffers[s]))
        if riders:
            buffer = list(view.buffers[s])
            split_pred = policy.predict(view, s, buffer, [])
            ride_pred = cost.predict(s, len(buffer) + len(riders), True, view.context)
            split = step_ms(s, buffer, [], view)
            ride = step_ms(s, buffer, riders, view)
            cases.append(
                {"segment": s, "rows": len(buffer), "riders": len(riders), "split_pred": split_pred,
                 "ride_pred": ride_pred, "split_ms": split, "ride_ms": ride}
            )  # fmt: skip
        return chosen

    policy.plan = watched
    timed.run()
    gaps = [abs(c["split_ms"] - c["ride_ms"]) / min(c["split_ms"], c["ride_ms"]) for c in cases]
    decided = [c for c in cases if abs(c["split_ms"] - c["ride_ms"]) > args.tie * min(c["split_ms"], c["ride_ms"])]
    right = [c for c in decided if (c["ride_pred"] <= c["split_pred"]) == (c["ride_ms"] <= c["split_ms"])]
    result = {
        "device": device,
        "model": args.model,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "profile": costs.to_dict(),
        "prediction_error": error,
        "clean_steps": clean.stats.steps,
        "decision_points": len(cases),
        "ties": len(cases) - len(decided),
        "decided": len(decided),
        "picked_faster": len(right),
        "picked_faster_share": len(right) / len(decided) if decided else None,
        "median_gap": statistics.median(gaps) if gaps else None,
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{device}, batch {args.batch}: step prediction error median {error['median']:.1%}, p95 {error['p95']:.1%} "
          f"over {clean.stats.steps} steps")  # fmt: skip
    share = result["picked_faster_share"]
    print(
        f"ride-or-split decision points: {len(cases)}, ties (< {args.tie:.0%}): {result['ties']}, "
        f"the cost model named the faster choice in {len(right)}/{len(decided)}"
        + (f" ({share:.0%})" if share is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
