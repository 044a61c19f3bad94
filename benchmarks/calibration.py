"""Does a calibration hold on fresh text? Agreement of its thresholds on prompts it never saw.

    python benchmarks/calibration.py model_cards/smollm2-135m-drex --data fresh.txt --out runs/bench-calibration

Loads the heads without applying their calibration, draws prompts from `--data` (text the calibration
did not use), decodes them greedily at full depth and measures, under first-passing-exit semantics,
how many tokens agree with full depth for the file's guaranteed thresholds and for every device
entry's thresholds, each under its own confidence measure. With `--answers` (the default when the
file's guarantee is a sequence guarantee, `drex calibrate --metric`), every threshold set also
generates drex's whole greedy answers to the prompts, scored against full depth's (ROUGE-L F1 on
token ids, exact match) — what a sequence guarantee promises — with the share of generated tokens
that left at each exit. Writes calibration_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.calibration.calibrate import drex_answers, observe, shown_thresholds
from drex_hf.calibration.sequences import score
from drex_hf.calibration.thresholds import agreement_counts, binomial_p_value
from drex_hf.calibration_file import entry_guarantee, guarantee_kind
from drex_hf.cli.calibrate import draw_prompts
from drex_hf.cli.common import tokenizer_for
from drex_hf.config import CALIBRATION_NAME, parse_threshold, thresholds_to_json
from drex_hf.device import device_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="exit-heads folder with a calibration.json")
    parser.add_argument("--data", type=Path, required=True, help="fresh held-out text")
    parser.add_argument("--prompts", type=int, default=96, help="prompts drawn (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="prompt draw seed (default: %(default)s)")
    parser.add_argument(
        "--answers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also score drex's whole answers against full depth's (default: on for a sequence guarantee)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-calibration"))
    args = parser.parse_args(argv)
    calibration = json.loads((args.model / CALIBRATION_NAME).read_text())
    sequence = guarantee_kind(calibration["guarantee"]) == "sequence"
    answers = sequence if args.answers is None else args.answers
    model = EarlyExitModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, calibration=False).eval()
    prompts = draw_prompts(
        args.data.read_text(encoding="utf-8"), tokenizer_for(model), args.prompts, args.prompt_tokens, args.seed
    )
    device = device_name(model.heads_device)
    own = calibration.get("confidence", model.exit_config.confidence)
    sets = {"guaranteed": (own, [parse_threshold(t) for t in calibration["guarantee"]["thresholds"]])}
    promises = {"guaranteed": calibration["guarantee"]}
    for name, entry in calibration["cost_models"].items():  # every device's thresholds, under its measure
        label = f"{name}{' (this device)' if name == device else ''}"
        sets[label] = (entry.get("confidence", own), [parse_threshold(t) for t in entry["thresholds"]])
        promises[label] = entry_guarantee(entry, calibration)
    references: list[list[int]] = []
    obs = observe(
        model, prompts, args.max_new_tokens, measures=sorted({m for m, _ in sets.values()}), answers=references
    )
    rows = []
    for name, (measure, thresholds) in sets.items():
        k, n, counts = agreement_counts(obs.with_measure(measure), thresholds)
        row = {
            "thresholds": name,
            "measure": measure,
            "values": thresholds_to_json(thresholds),
            "guarantee": promises[name],
            "tokens": n,
            "agreement": k / n,
            "exit_fractions": [c / n for c in counts],
        }
        if "target_agreement" in promises[name] and guarantee_kind(promises[name]) == "token_agreement":
            target = promises[name]["target_agreement"]
            row |= {"meets_target": k / n >= target, "p_value_vs_target": binomial_p_value(k, n, target)}
        if answers:
            row["answers"] = answer_scores(model, prompts, references, thresholds, measure, args.max_new_tokens)
            if guarantee_kind(promises[name]) == "sequence":
                metric, target = promises[name]["metric"], promises[name]["target"]
                row["meets_target"] = row["answers"][f"mean_{metric}"] >= target
        rows.append(row)
    result = {"model": str(args.model), "data": str(args.data), "device": device, "prompts": len(prompts), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"fresh text {args.data}, {obs.tokens} full-depth tokens from {len(prompts)} prompts, on {device}")
    print(table(rows, len(prompts)))
    return 0


@torch.no_grad()
def answer_scores(
    model: EarlyExitModelForCausalLM,
    prompts: list[torch.Tensor],
    references: list[list[int]],
    thresholds: list[float],
    measure: str,
    max_new_tokens: int,
) -> dict:
    """drex's greedy answers under `thresholds` against full depth's `references`: mean ROUGE-L F1 and
    exact-match rate (what a sequence guarantee promises), and the share of the generated tokens that
    left at each exit (the rest ran at full depth)."""
    got, exits = drex_answers(model, prompts, thresholds, max_new_tokens, measure=measure)
    tokens = sum(len(e) for e in exits)
    return {
        "mean_rouge_l": sum(score("rouge_l", a, r) for a, r in zip(got, references)) / len(prompts),
        "mean_exact": sum(score("exact", a, r) for a, r in zip(got, references)) / len(prompts),
        "identical": sum(a == r for a, r in zip(got, references)),
        "tokens": tokens,
        "exit_fractions": [sum(e.count(j) for e in exits) / max(tokens, 1) for j in range(len(thresholds))],
    }


def table(rows: list[dict], prompts: int) -> str:
    """The markdown table of `rows`: token agreement under first-passing-exit semantics and, where
    answers were generated, their scores; each row's promise and whether fresh text met it."""
    head = "| thresholds | promise | measure | values | token agreement | tokens exiting (token check) |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    if any("answers" in r for r in rows):
        lines[0] += " answers: ROUGE-L | identical | tokens exiting (answers) |"
        lines[1] += " --- | --- | --- |"
    for r in rows:
        g = r["guarantee"]
        if guarantee_kind(g) == "sequence":
            promise = f"{g['metric']} >= {g['target']} (delta {g['delta']})"
        else:
            promise = f"agreement >= {g['target_agreement']}" if "target_agreement" in g else "none stated"
        if "meets_target" in r:
            promise += " — met" if r["meets_target"] else " — **not met**"
        shown = shown_thresholds(r["values"])
        exits = " / ".join(f"{f:.1%}" for f in r["exit_fractions"])
        line = f"| {r['thresholds']} | {promise} | {r['measure']} | {shown} | {r['agreement']:.4f} | {exits} |"
        if "answers" in r:
            a = r["answers"]
            taken = " / ".join(f"{f:.1%}" for f in a["exit_fractions"])
            line += f" {a['mean_rouge_l']:.3f} | {a['identical']}/{prompts} | {taken} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
