"""Engine benchmark: full / batch_all / batch_majority / drex on the same prompts, one process.

    python benchmarks/engine.py moderate --batch-sizes 8,32 --max-new-tokens 64 --out runs/bench-engine
    python benchmarks/engine.py smollm2 --batch-sizes 8,32 --max-new-tokens 64 --out runs/bench-engine
    python benchmarks/engine.py llama-7b --device cuda --dtype bf16 --batch-sizes 8,64,256 --out runs/bench-7b

`moderate`: a random-weight Llama (16 layers, hidden 1024, 16 heads / 4 kv heads, MLP 2816, vocab
32000), exits after layers 3/7/11 with `norm` heads and the cheap `classifier` check; exits are drawn
per token from a stated distribution (`trace` source, default 20/25/20 % at the exits, 35 % full
depth), so only speed means anything. `smollm2`: SmolLM2-135M-Instruct with the shipped heads and
their real max-prob confidences on held-out chat and Shakespeare prompts. The other shapes of
`drex_hf.bench.synthetic` (`llama-1b`, `llama-7b`, `llama3-8b`; exits after L/4, L/2, 3L/4) run like
`moderate`, with `--device cuda --dtype bf16` on a GPU (each batch first runs 8 untimed tokens there,
so that Triton compiles every kernel variant outside the timed run).

Decode tokens/s excludes the prefill (identical for every policy). All policies' engines run in one
process on the same prompts, stepped round-robin (each times its own steps), so drift of the
machine's speed falls on every policy alike. ideal = full × L ÷ mean layers
per token (the measured exit depths); efficiency = drex ÷ ideal. Writes engine.json and engine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.bench.report import _ratio
from drex_hf.bench.run import agreement, random_prompts, run_interleaved
from drex_hf.bench.synthetic import SHAPES, synthetic_model
from drex_hf.config import thresholds_to_json
from drex_hf.generation.engine import device_name
from drex_hf.generation.exits import ExitDistribution

POLICIES = ("full", "batch_all", "batch_majority", "drex")


def moderate_model(dtype: torch.dtype, device: str = "cpu") -> EarlyExitModelForCausalLM:
    return synthetic_model("moderate", dtype, device)


def smollm2_model() -> EarlyExitModelForCausalLM:
    folder = Path(__file__).resolve().parents[1] / "model_cards" / "smollm2-135m-drex"
    return EarlyExitModelForCausalLM.from_pretrained(folder).eval()


def smollm2_prompts(model: EarlyExitModelForCausalLM, count: int, seed: int) -> list[torch.Tensor]:
    """Held-out prompts: the recipe's eval prompts are drawn with another seed from the same sets."""
    from drex_hf.cli.common import tokenizer_for
    from drex_hf.training.prompts import draw_prompts

    tokenizer = tokenizer_for(model)
    texts = draw_prompts(["chat", "shakespeare"], count, seed=seed)
    out = []
    for _, text in texts:
        chat = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        out.append(ids.reshape(-1))
    return out


def run_policy(
    model: EarlyExitModelForCausalLM,
    prompts: list[torch.Tensor],
    policy: str,
    new_tokens: int,
    distribution: ExitDistribution | None,
) -> dict:
    return run_interleaved(model, prompts, [policy], new_tokens, distribution)[policy]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "model",
        choices=(*SHAPES, "smollm2", "render"),
        help="a random-weight shape (trace exits), the shipped SmolLM2 heads, or render: reprint --out's engine.json",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (synthetic shapes)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="synthetic shapes")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exit-dist", default="0.2,0.25,0.2,0.35", help="synthetic: P(exit) per exit, then full")
    parser.add_argument("--prompt-lengths", default="8,64", help="synthetic: prompt lengths drawn uniformly in [a,b]")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--only-exits",
        default=None,
        help="smollm2: keep the thresholds of these exit layers (comma-separated) and switch the others off",
    )
    parser.add_argument("--out", default="runs/bench-engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of the whole comparison; the median run per policy is reported (every run steps all the "
        "policies' engines round-robin, so the shared VM's drift of up to 20 %% over minutes falls on all alike)",
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.model == "render":
        report = json.loads((out / "engine.json").read_text())
        layers = report.get("num_layers", 16 if report["model"] == "moderate" else 30)
        (out / "engine.md").write_text(render(report, layers))
        print(render(report, layers))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    synthetic = args.model in SHAPES
    if synthetic:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model = synthetic_model(args.model, dtype, args.device)
        distribution = ExitDistribution(tuple(float(p) for p in args.exit_dist.split(",")), seed=args.seed)
        low, high = (int(v) for v in args.prompt_lengths.split(","))
    else:
        model = smollm2_model()
        distribution = None
        if args.only_exits:
            keep = {int(v) for v in args.only_exits.split(",")}
            thresholds = model.exit_config.threshold_list()
            model.exit_config.thresholds = [
                t if e in keep else float("inf") for e, t in zip(model.exit_layers, thresholds)
            ]
    machine = f"{device_name(model.heads_device)}, {os.cpu_count()} cores, torch {torch.__version__}"
    if model.heads_device.type == "cpu":
        machine += f", {torch.get_num_threads()} threads"
    report: dict = {
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype),
        "machine": machine,
        "python": platform.python_version(),
        "runs": [],
    }
    report["num_layers"] = model.num_layers
    report["thresholds"] = thresholds_to_json(model.exit_config.threshold_list())
    report["confidence"] = model.exit_config.confidence
    if distribution is not None:
        report["exit_distribution"] = list(distribution.probabilities)
    # warm-up: first calls pay one-off costs (allocator, thread pools) that no policy should be charged
    warm = random_prompts(2, 4, 8, model.arch.vocab_size, 99)
    run_policy(model, warm, "full", 4, None)
    lines = []
    for batch in batches:
        if synthetic:
            prompts = random_prompts(batch, low, high, model.arch.vocab_size, args.seed + batch)
        else:
            prompts = smollm2_prompts(model, batch, seed=1000 + batch)
        row = {"batch": batch, "policies": {}}
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        if model.heads_device.type == "cuda":  # compile every kernel variant these rows need, untimed
            run_interleaved(model, prompts, policies, min(8, args.max_new_tokens), distribution)
        for repeat in range(args.repeats):
            for policy, stats in run_interleaved(model, prompts, policies, args.max_new_tokens, distribution).items():
                runs[policy].append(stats)
                print(
                    f"batch {batch:3d} run {repeat} {policy:15s} decode {stats['decode_tokens_per_s']:8.1f} tok/s  "
                    f"mean layers {stats['mean_layers']:.2f}  involuntary {stats['involuntary_exits']:4d}  "
                    f"missed {stats['missed_exits']:4d}  rides {stats['ride_along_rows']}  steps {stats['steps']}",
                    flush=True,
                )
        for policy, done in runs.items():
            ordered = sorted(done, key=lambda s: s["decode_tokens_per_s"])
            median = ordered[len(ordered) // 2]
            median["decode_tokens_per_s_runs"] = [s["decode_tokens_per_s"] for s in done]
            row["policies"][policy] = median
        full = row["policies"].get("full")
        drex = row["policies"].get("drex")
        if full and drex:
            L = model.num_layers
            ideal = full["decode_tokens_per_s"] * L / drex["mean_layers"]
            row["ideal_tokens_per_s"] = ideal
            row["drex_efficiency"] = drex["decode_tokens_per_s"] / ideal
            for stats in row["policies"].values():
                stats["agreement_with_full"] = agreement(stats["outputs"], full["outputs"])
        report["runs"].append(row)
        lines.append(row)
        (out / "engine.json").write_text(json.dumps(report, indent=1))  # a run cut short keeps what it measured
    (out / "engine.json").write_text(json.dumps(report, indent=1))
    (out / "engine.md").write_text(render(report, model.num_layers))
    print(render(report, model.num_layers))
    return 0


def render(report: dict, num_layers: int) -> str:
    rows = [
        f"Machine: {report['machine']}. Model: {report['model']}.",
        "",
        "| batch | policy | decode tok/s | runs | × full | × batch_all | mean layers | involuntary | missed | rides | "
        "agree w/ full | pred. err (median / p95) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        pol = run["policies"]
        for name, s in pol.items():
            tps = s["decode_tokens_per_s"]
            err = s["prediction_error"]
            err_text = "–" if err["median"] is None else f"{100 * err['median']:.0f} % / {100 * err['p95']:.0f} %"
            agree = s.get("agreement_with_full")
            spread = s.get("decode_tokens_per_s_runs", [tps])
            runs = f"{min(spread):.1f}–{max(spread):.1f}" if len(spread) > 1 else "1 run"
            vs_full, vs_all = _ratio(pol, name, "full"), _ratio(pol, name, "batch_all")
            rows.append(
                f"| {run['batch']} | {name} | {tps:.1f} | {runs} | "
                f"{'' if vs_full is None else f'{vs_full:.2f}'} | {'' if vs_all is None else f'{vs_all:.2f}'} | "
                f"{s['mean_layers']:.2f} | {s['involuntary_exits']} | {s['missed_exits']} | {s['ride_along_rows']} | "
                f"{'–' if agree is None else f'{100 * agree:.1f} %'} | {err_text} |"
            )
        if "ideal_tokens_per_s" in run:
            # efficiency = drex ÷ (full × L ÷ mean layers), per run, median over runs
            efficiency = _ratio(pol, "drex", "full") * pol["drex"]["mean_layers"] / num_layers
            rows.append(
                f"| {run['batch']} | *ideal* (full × {num_layers} ÷ drex mean layers) | "
                f"{run['ideal_tokens_per_s']:.1f} | | | | | | | | | drex efficiency **{100 * efficiency:.0f} %** |"
            )
    rows.append("")
    rows.append("× columns: the median over runs of the ratio within each run (the policies ran interleaved).")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
