"""The whole `drex calibrate` run: observe, pick the exits that pay, test thresholds, save.

1. Observe: greedy full-depth continuations of held-out prompts (the deployment decoding for greedy
   generation), then one pass over prompt + continuation giving every exit's confidence and whether
   its token equals the full-depth token at that position (`Observations`).
2. Time the segments, exit checks and KV fill at several row counts on this device (`CostTable`).
3. On the learn half of the prompts, switch off the exits that cost more than they save.
4. Learn-then-Test thresholds for the exits left on (learn half fits, test half certifies).
5. Write `calibration.json` (thresholds, the guarantee, the cost constants keyed by device, fit errors,
   sample sizes, the command) and a plot beside the heads.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from drex_hf.calibration.costs import CostTable, choose_exits, expected_token_ms, prediction_errors, profile_runner
from drex_hf.calibration.thresholds import (
    CalibrationDataError,
    Observations,
    agreement_counts,
    fit_thresholds,
    learn_then_test,
    split_by_prompt,
)
from drex_hf.config import CALIBRATION_NAME, parse_threshold, thresholds_to_json

PLOT_NAME = "calibration.png"


@torch.no_grad()
def observe(
    model: Any,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Observations:
    """Every exit's confidence and agreement with full depth, over greedy full-depth continuations."""
    if not prompts:
        raise CalibrationDataError("no prompts to calibrate on")
    device = model.heads_device
    pad = 0
    confidence, agree, prompt_of = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(p.shape[0] for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, p in enumerate(batch):  # left padding, as generation wants
            ids[b, width - p.shape[0] :] = p
            mask[b, width - p.shape[0] :] = 1
        ids, mask = ids.to(device), mask.to(device)
        full = model.base_model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        new = full[:, width:]
        eos = model.base_model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        keep = torch.ones_like(new, dtype=torch.bool)
        for b in range(len(batch)):  # positions after the first end-of-sequence are padding
            ends = [t for t in range(new.shape[1]) if int(new[b, t]) in eos]
            if ends:
                keep[b, ends[0] + 1 :] = False
        full_mask = torch.cat([mask, keep.long()], dim=1)
        out = model(input_ids=full, attention_mask=full_mask, output_exit_logits=True)
        # position width-1+t predicts new token t
        at = slice(width - 1, width - 1 + new.shape[1])
        for b in range(len(batch)):
            valid = keep[b]
            conf = out.exit_confidences[:, b, at][:, valid]
            hits = torch.stack([logits[b, at].argmax(-1)[valid] == new[b][valid] for logits in out.exit_logits])
            confidence.append(conf.float().cpu())
            agree.append(hits.cpu())
            prompt_of.append(torch.full((int(valid.sum()),), start + b))
        if progress:
            progress(len(batch))
    return Observations(torch.cat(confidence, 1), torch.cat(agree, 1), torch.cat(prompt_of))


def _merge(costs: CostTable, enabled: list[bool]) -> CostTable:
    """The cost table of the segmentation with only the enabled exits: disabled exits' segments join
    the next one, and their checks and fills disappear."""
    layers, check, fill, regroup, run, gather = [], [], [], [], None, 0.0
    for s, times in enumerate(costs.layers_ms):
        run = times if run is None else [a + b for a, b in zip(run, times)]
        gather += costs.regroup_ms[s] if costs.regroup_ms else 0.0
        if s == len(costs.layers_ms) - 1 or enabled[s]:
            layers.append(run)
            regroup.append(gather)
            run, gather = None, 0.0
            if s < len(costs.check_ms):
                check.append(costs.check_ms[s])
                fill.append(costs.fill_ms[s])
    return CostTable(costs.rows, layers, check, fill, regroup if costs.regroup_ms else None, costs.project_ms)


def calibrate(
    model: Any,
    prompts: list[torch.Tensor],
    *,
    target: float = 0.95,
    delta: float = 0.1,
    bound: str = "binomial",
    max_new_tokens: int = 48,
    rows: list[int] | None = None,
    holdout_rows: list[int] | None = None,
    decision_rows: int = 8,
    context: int = 128,
    repeats: int = 5,
    seed: int = 0,
    command: str = "",
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Run steps 1-4 of the module docstring; returns what `calibration.json` holds."""
    from drex_hf.generation.engine import DrexEngine, device_name

    rows = rows or [1, 2, 4, 8, 16, 32]
    holdout_rows = holdout_rows or [3, 6, 12, 24]
    started = time.time()
    obs = observe(model, prompts, max_new_tokens, progress=(lambda n: progress("observe", n)) if progress else None)
    learn, _ = split_by_prompt(obs, 0.5, seed)  # the same split learn_then_test makes with this seed

    exits = list(model.exit_layers)
    engine = DrexEngine(model, max_batch=max(rows + holdout_rows), max_len=context + 1, thresholds=[0.5] * len(exits))
    timer = profile_runner(engine.runner, context, repeats)
    tick = (lambda: progress("profile", 1)) if progress else None
    costs = CostTable.measure(timer, len(exits) + 1, rows, progress=tick, regroup=True, project=True)
    device = device_name(model.heads_device)

    fitted = fit_thresholds(learn.confidence, learn.agree, target)  # per exit, on the learn half

    def fractions_for(enabled: list[bool]) -> list[float]:
        thresholds = [t if on else math.inf for t, on in zip(fitted, enabled)]
        _, n, counts = agreement_counts(learn, thresholds)
        return [c / n for c in counts]

    enabled, steps = choose_exits(costs, fractions_for, decision_rows)
    # the guarantee for any device (every exit may open), and this device's (only the exits that pay)
    guarantee = learn_then_test(obs, target, delta, bound=bound, seed=seed)
    result = learn_then_test(obs, target, delta, bound=bound, seed=seed, enabled=enabled)
    thresholds = result.thresholds
    on = [math.isfinite(t) for t in thresholds]
    merged = _merge(costs, on)
    model_costs = merged.cost_model(context, device)
    merged_timer = _merged_timer(timer, on)
    errors = prediction_errors(model_costs, merged_timer, holdout_rows)
    token_ms = expected_token_ms(costs, result.exit_fractions, on, decision_rows)
    full_ms = expected_token_ms(costs, [0.0] * len(exits), [False] * len(exits), decision_rows)
    ends = [e for e, o in zip(exits, on) if o]
    starts = [0, *(e + 1 for e in ends)]
    stops = [*ends, model.arch.num_layers - 1]
    return {
        "format": 1,
        "command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1),
        "timing": f"median of {repeats} synchronised runs after a warm-up, {context} cached positions",
        "exit_layers": exits,
        "confidence": model.exit_config.confidence,
        "observations": {"prompts": len(prompts), "tokens": obs.tokens, "max_new_tokens": max_new_tokens},
        "guarantee": guarantee.to_dict(),
        "curves": curves(obs),
        "cost_models": {
            device: {
                **model_costs.to_dict(),
                "segments": [[a, b] for a, b in zip(starts, stops)],
                "thresholds": thresholds_to_json(thresholds),
                "test_agreement": result.test_agreement,
                "exit_fractions": result.exit_fractions,
                "exits_enabled": on,
                "exits_paying": enabled,
                "exit_choice": steps,
                "profile": costs.to_dict(),
                "prediction_error": errors,
                "decision_rows": decision_rows,
                "expected_token_ms": token_ms,
                "full_depth_token_ms": full_ms,
                "expected_speedup": full_ms / token_ms if token_ms > 0 else None,
            }
        },
    }


def curves(obs: Observations, grid: int = 21) -> list[dict]:
    """Per exit, over thresholds 0, 0.05, ..., 1: the share of tokens whose confidence passes and the
    agreement among them (for the plot and the card)."""
    out = []
    for j in range(obs.confidence.shape[0]):
        points = []
        for i in range(grid):
            tau = i / (grid - 1)
            passing = obs.confidence[j] >= tau
            share = float(passing.float().mean())
            agreement = float(obs.agree[j][passing].float().mean()) if passing.any() else None
            points.append({"threshold": tau, "passing": share, "agreement": agreement})
        out.append({"exit": j, "points": points})
    return out


def plot(calibration: dict, device: str) -> bytes | None:
    """Agreement vs threshold per exit, exit fractions, and measured vs predicted step time (PNG);
    None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    entry = calibration["cost_models"][device]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    target = calibration["guarantee"]["target_agreement"]
    for curve, layer in zip(calibration["curves"], calibration["exit_layers"]):
        pts = [p for p in curve["points"] if p["agreement"] is not None]
        axes[0].plot([p["threshold"] for p in pts], [p["agreement"] for p in pts], marker=".", label=f"exit {layer}")
    axes[0].axhline(target, color="grey", linestyle="--", label=f"target {target}")
    axes[0].set(xlabel="threshold", ylabel="agreement of passing tokens", title="Agreement vs threshold")
    axes[0].legend(fontsize=8)
    fractions = calibration["guarantee"]["exit_fractions"]
    labels = [str(layer) for layer in calibration["exit_layers"]] + ["full"]
    axes[1].bar(labels, [*fractions, 1 - sum(fractions)])
    axes[1].set(xlabel="exit layer", ylabel="share of test tokens", title="Where tokens leave (test half)")
    profile, table = entry["profile"], entry["table_ms"]
    for s, times in enumerate(table):
        axes[2].plot(entry["rows"], times, marker="o", label=f"segment {s} measured")
    axes[2].set(xlabel="rows", ylabel="ms per step", title=f"Segment time on {device}")
    err = entry["prediction_error"]
    axes[2].text(
        0.02, 0.95, f"held-out rows {err['rows']}: median error {err['median']:.0%}, p95 {err['p95']:.0%}",
        transform=axes[2].transAxes, fontsize=8, va="top",
    )  # fmt: skip
    axes[2].legend(fontsize=8)
    del profile
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _merged_timer(timer: Callable, on: list[bool]) -> Callable:
    """A timer over the merged segmentation, built from the per-segment timer."""
    groups, current = [], []
    for s in range(len(on) + 1):
        current.append(s)
        if s == len(on) or on[s]:
            groups.append(current)
            current = []

    def merged(kind: str, index: int, n: int) -> float:
        group = groups[index]
        if kind == "layers":
            return sum(timer("layers", s, n) for s in group)
        return timer(kind, group[-1], n)

    return merged


def shown_thresholds(values: list) -> str:
    """'inf, 0.996' for thresholds given as floats or in their JSON form ("inf")."""
    return ", ".join("inf" if t == math.inf else f"{t:.3f}" for t in map(parse_threshold, values))


CARD_BEGIN, CARD_END = "<!-- drex calibrate: begin -->", "<!-- drex calibrate: end -->"


def card_section(calibration: dict) -> str:
    """The model card's calibration section: the guarantee, and per device the exits used and the fit."""

    g, obs = calibration["guarantee"], calibration["observations"]
    layers = calibration["exit_layers"]
    lines = [
        CARD_BEGIN,
        "## Calibration (`drex calibrate`)",
        "",
        f"Made by `{calibration['command']}` on {calibration['created']}: {obs['tokens']} greedy full-depth tokens "
        f"from {obs['prompts']} held-out prompts, split by prompt into {g['learn_tokens']} learn and "
        f"{g['test_tokens']} test tokens.",
        "",
        f"**Guarantee.** With thresholds {shown_thresholds(g['thresholds'])} at exits {layers}, tokens agree "
        f"with full depth at ≥ {g['target_agreement']} with probability ≥ {1 - g['delta']:.2f} "
        f"(Learn-then-Test, {g['bound']} bound; test agreement {g['test_agreement']:.4f}; exits "
        + ", ".join(f"{f:.1%}" for f in g["exit_fractions"])
        + "). These apply on a device without its own entry below.",
        "",
        "| device | exits that pay | thresholds used | expected speed-up | cost fit error (median / p95) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for device, entry in calibration["cost_models"].items():
        paying = [str(e) for e, p in zip(layers, entry["exits_paying"]) if p] or ["none"]
        err, speed = entry["prediction_error"], entry.get("expected_speedup")
        lines.append(
            f"| {device} | {', '.join(paying)} | {shown_thresholds(entry['thresholds'])} | "
            f"{'n/a' if speed is None else f'{speed:.2f}x'} at {entry['decision_rows']} rows | "
            f"{err['median']:.1%} / {err['p95']:.1%} |"
        )
    lines += ["", "![calibration](calibration.png)", CARD_END]
    return "\n".join(lines) + "\n"


def with_card_section(card: str, calibration: dict) -> str:
    """`card` with its calibration section replaced (or appended)."""
    section = card_section(calibration)
    if CARD_BEGIN in card and CARD_END in card:
        head, rest = card.split(CARD_BEGIN, 1)
        return head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def save(calibration: dict, folder: Path, plot: bytes | None) -> None:
    """Write calibration.json (keeping other devices' entries already there), the plot, and the
    card's calibration section beside the heads; all appear together or not at all."""
    from drex_hf.fileio import staged_folder

    path = folder / CALIBRATION_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            others = {k: v for k, v in old.get("cost_models", {}).items() if k not in calibration["cost_models"]}
            calibration["cost_models"] = {**others, **calibration["cost_models"]}
        except (OSError, json.JSONDecodeError, AttributeError):
            pass  # an unreadable old file is replaced
    card = folder / "README.md"
    with staged_folder(folder, order=[CALIBRATION_NAME]) as tmp:
        if plot is not None:
            (tmp / PLOT_NAME).write_bytes(plot)
        if card.is_file():
            (tmp / "README.md").write_text(with_card_section(card.read_text(), calibration))
        (tmp / CALIBRATION_NAME).write_text(json.dumps(calibration, indent=2) + "\n")
