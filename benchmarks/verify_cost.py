"""What a verify pass over q positions per row costs against a full-depth step, on the real model.

A lossless round that drafts k tokens from the rows' own text costs one verify pass over k + 1
positions per row (every layer); it pays only if it yields more tokens per row than that pass costs
in full-depth steps. This times the `SpecEngine`'s own fresh verify program (the one n-gram rounds
run) at 1 to 6 and 9 positions per row on the shipped model, with the measured CPU product kernels
(`drex_hf.products`, what the engines run) and with F.linear for every product, all interleaved, and
prints the tokens per round a round must yield to reach a target speed-up:

    python benchmarks/verify_cost.py --out benchmarks/results/cpu-2026-12-07/lossless/verify_cost-products.json

`needed for 1.25x` = 1.25 × cost(q) / cost(1), each against a step with the same kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.device import device_name
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.products import use_products

POSITIONS = (1, 2, 3, 4, 5, 6, 9)


def time_verify(engine: SpecEngine, b: int, context: int, repeats: int) -> dict[str, dict[int, list[float]]]:
    """Seconds of a fresh verify pass over q positions in each of `b` rows, per q, with the measured
    product kernels (`products`) and with F.linear for every product (`linear`), interleaved."""
    slots, zeros, ones = list(range(b)), [0] * b, [1] * b
    tables = {"products": engine.runner.products, "linear": None}
    times: dict[str, dict[int, list[float]]] = {name: {q: [] for q in POSITIONS} for name in tables}
    with torch.no_grad():
        for warm_up in (True, *[False] * repeats):
            for q in POSITIONS:  # interleaved: the machine's drift falls on every size and kernel alike
                for name, table in tables.items():
                    columns = [slots, [context] * b, [q - 1] * b, zeros, zeros, zeros, zeros, ones]
                    with use_products(table):
                        start = time.perf_counter()
                        engine.programs.run("verify", columns, [[0] * (q - 1)] * b)
                        spent = time.perf_counter() - start
                    if not warm_up:
                        times[name][q].append(spent)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="model_cards/smollm2-135m-drex", help="exit-heads folder")
    parser.add_argument("--batch-sizes", default="1,8", help="default: 1,8")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per size (default: 15)")
    parser.add_argument("--context", type=int, default=128, help="tokens already in each row's cache (default: 128)")
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the results")
    args = parser.parse_args()
    model = EarlyExitModelForCausalLM.from_pretrained(args.model).eval()
    out = {"machine": device_name(model.heads_device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "context": args.context, "batches": {}}  # fmt: skip
    k_max = max(POSITIONS) - 1
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        engine = SpecEngine(model, max_batch=b, max_len=args.context + k_max + 2, draft_tokens=k_max,
                            draft_source="ngram", settings=DecodeSettings(max_new_tokens=1))  # fmt: skip
        if engine.runner.products is None:
            raise SystemExit("the measured CPU products do not apply here (not a CPU, or DREX_CPU_PRODUCTS=off)")
        times = time_verify(engine, b, args.context, args.repeats)
        one, old = statistics.median(times["products"][1]), statistics.median(times["linear"][1])
        rows = {}
        for q in POSITIONS:
            ratio = statistics.median(times["products"][q]) / one
            rows[q] = {"ms": 1000 * statistics.median(times["products"][q]), "x_step": ratio,
                       "ms_linear": 1000 * statistics.median(times["linear"][q]),
                       "x_step_linear": statistics.median(times["linear"][q]) / old,
                       "needed_for_1.25x": 1.25 * ratio, "needed_for_1.15x": 1.15 * ratio}  # fmt: skip
        out["batches"][str(b)] = {"products": engine.runner.products.describe(), "rows": rows}
        print(f"batch {b}: a full-depth step (q = 1) takes {1000 * one:.1f} ms ({1000 * old:.1f} ms with F.linear)")
        print("  positions q | ms (F.linear) | × a step (F.linear) | tokens/round needed for 1.25x | for 1.15x")
        for q, row in rows.items():
            ms = f"{row['ms']:.1f} ({row['ms_linear']:.1f})"
            cost = f"{row['x_step']:.2f} ({row['x_step_linear']:.2f})"
            needed = f"{row['needed_for_1.25x']:29.2f} | {row['needed_for_1.15x']:9.2f}"
            print(f"  {q:11d} | {ms:>13} | {cost:>19} | {needed}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
