"""Does a calibration hold on fresh text? Agreement of its thresholds on prompts it never saw.

    python benchmarks/calibration.py model_cards/smollm2-135m-drex --data fresh.txt --out runs/bench-calibration

Loads the heads without applying their calibration, draws prompts from `--data` (text the calibration
did not use), decodes them greedily at full depth and measures, under first-passing-exit semantics,
how many tokens agree with full depth for the file's guaranteed thresholds and for every device
entry's thresholds, each under its own confidence measure. Writes calibration_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.calibration.calibrate import observe, shown_thresholds
from drex_hf.calibration.thresholds import agreement_counts, binomial_p_value
from drex_hf.cli.calibrate import draw_prompts
from drex_hf.cli.common import tokenizer_for
from drex_hf.config import CALIBRATION_NAME, parse_threshold, thresholds_to_json
from drex_hf.generation.engine import device_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="exit-heads folder with a calibration.json")
    parser.add_argument("--data", type=Path, required=True, help="fresh held-out text")
    parser.add_argument("--prompts", type=int, default=96, help="prompts drawn (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="prompt draw seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-calibration"))
    args = parser.parse_args(argv)
    calibration = json.loads((args.model / CALIBRATION_NAME).read_text())
    model = EarlyExitModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, calibration=False).eval()
    prompts = draw_prompts(
        args.data.read_text(encoding="utf-8"), tokenizer_for(model), args.prompts, args.prompt_tokens, args.seed
    )
    device = device_name(model.heads_device)
    own = calibration.get("confidence", model.exit_config.confidence)
    sets = {"guaranteed": (own, [parse_threshold(t) for t in calibration["guarantee"]["thresholds"]])}
    for name, entry in calibration["cost_models"].items():  # every device's thresholds, under its measure
        label = f"{name}{' (this device)' if name == device else ''}"
        sets[label] = (entry.get("confidence", own), [parse_threshold(t) for t in entry["thresholds"]])
    obs = observe(model, prompts, args.max_new_tokens, measures=sorted({m for m, _ in sets.values()}))
    target = calibration["guarantee"]["target_agreement"]
    rows = []
    for name, (measure, thresholds) in sets.items():
        k, n, counts = agreement_counts(obs.with_measure(measure), thresholds)
        rows.append(
            {
                "thresholds": name,
                "measure": measure,
                "values": thresholds_to_json(thresholds),
                "tokens": n,
                "agreement": k / n,
                "meets_target": k / n >= target,
                "p_value_vs_target": binomial_p_value(k, n, target),
                "exit_fractions": [c / n for c in counts],
            }
        )
    result = {"model": str(args.model), "data": str(args.data), "device": device, "target": target, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"fresh text {args.data}, {obs.tokens} tokens from {len(prompts)} prompts, target {target}, on {device}")
    print("| thresholds | measure | values | agreement | meets target | exits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        shown = shown_thresholds(r["values"])
        exits = ", ".join(f"{f:.1%}" for f in r["exit_fractions"])
        print(
            f"| {r['thresholds']} | {r['measure']} | {shown} | {r['agreement']:.4f} | {r['meets_target']} | {exits} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
