"""Evaluation of trained heads, and publishing them with `eval_results.json`, a plot and the card.

Per held-out group (`human` text, `self`-generated text) and exit: top-1 agreement with the final
layer (teacher-forced), perplexity of the next token, and the AUC of each confidence measure for
predicting agreement. For each agreement target, thresholds are fitted per exit on half of the
documents and tested on the other half with first-passing-exit semantics: the realised agreement,
the share of tokens leaving at each exit, and the ideal speed-up L / mean layers per token (the
heads' own cost not counted — on a small-vocabulary-dominated model that cost is large; see the card).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from drex_hf.calibration.thresholds import fit_thresholds
from drex_hf.heads import margin_confidence, max_prob_confidence, saturation_confidence
from drex_hf.plotting import pyplot
from drex_hf.training.features import Features
from drex_hf.training.recipe import Recipe

MEASURES = ("max_prob", "margin", "classifier", "saturation")
RESULTS_NAME = "eval_results.json"
PLOT_NAME = "exit_profile.png"


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None when one class is absent."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(unique) < len(scores):  # average ranks of ties
        sums = torch.zeros(len(unique), dtype=torch.double).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts.double())[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def exit_outputs(model: Any, feats: Features, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Per exit [k, N]: agreement, next-token NLL and each confidence; final layer's NLL [N]."""
    arch = model.arch
    lm_dtype = arch.lm_head.weight.dtype
    device = arch.lm_head.weight.device
    k = len(model.exit_layers)
    out = {name: [] for name in ("agree", "nll", "final_nll", *MEASURES)}
    for start in range(0, len(feats), chunk):
        sl = slice(start, start + chunk)
        states = feats.states[sl].to(device)
        nxt = feats.next_token[sl].to(device)
        top1 = feats.teacher_top1[sl].to(device)
        final_logits = arch.lm_head(feats.final[sl].to(device, lm_dtype)).float()
        out["final_nll"].append(F.cross_entropy(final_logits, nxt, reduction="none").cpu())
        rows = {name: [] for name in ("agree", "nll", *MEASURES)}
        for j, head in enumerate(model.heads):
            hidden = states[:, j + 1]
            feat = head.features(hidden.to(next(head.parameters()).dtype))
            logits = arch.lm_head(feat.to(lm_dtype)).float()
            rows["agree"].append((logits.argmax(-1) == top1).cpu())
            rows["nll"].append(F.cross_entropy(logits, nxt, reduction="none").cpu())
            rows["max_prob"].append(max_prob_confidence(logits).cpu())
            rows["margin"].append(margin_confidence(logits).cpu())
            rows["classifier"].append(head.classifier(feat).float().cpu())
            rows["saturation"].append(saturation_confidence(hidden, states[:, j]).cpu())
        for name, values in rows.items():
            out[name].append(torch.stack(values))
    result = {name: torch.cat(values, dim=-1) for name, values in out.items() if values}
    if not result:
        empty = torch.zeros(k, 0)
        result = {name: empty for name in ("agree", "nll", *MEASURES)} | {"final_nll": torch.zeros(0)}
    return result


@torch.no_grad()
def final_perplexity(model: Any, feats: Features, chunk: int = 2048) -> float | None:
    """Perplexity of the final layer on the next tokens of `feats`."""
    if len(feats) == 0:
        return None
    head = model.arch.lm_head
    total = 0.0
    for start in range(0, len(feats), chunk):
        logits = head(feats.final[start : start + chunk].to(head.weight.device, head.weight.dtype)).float()
        nxt = feats.next_token[start : start + chunk].to(logits.device)
        total += float(F.cross_entropy(logits, nxt, reduction="sum"))
    return math.exp(total / len(feats))


def simulate(
    conf: torch.Tensor, agree: torch.Tensor, thresholds: list[float], exit_layers: list[int], num_layers: int
) -> dict[str, Any]:
    """First passing exit per token: share leaving at each exit, agreement, mean layers, ideal speed-up."""
    n = conf.shape[1]
    if n == 0:
        return {"positions": 0}
    left = torch.ones(n, dtype=torch.bool)
    layers = torch.full((n,), float(num_layers))
    correct = torch.ones(n, dtype=torch.bool)  # full depth agrees with itself
    fractions = []
    for j, (layer, tau) in enumerate(zip(exit_layers, thresholds)):
        go = left & (conf[j] >= tau)
        layers[go] = layer + 1
        correct[go] = agree[j][go]
        fractions.append(float(go.float().mean()))
        left &= ~go
    mean_layers = float(layers.mean())
    return {
        "positions": n,
        "agreement": float(correct.float().mean()),
        "exit_fraction": fractions,
        "full_depth_fraction": float(left.float().mean()),
        "mean_layers": mean_layers,
        "ideal_speedup": num_layers / mean_layers,
    }


def evaluate_group(
    model: Any, feats: Features, measure: str, targets: list[float]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    outs = exit_outputs(model, feats)
    L = model.num_layers
    exits = []
    for j, layer in enumerate(model.exit_layers):
        agree = outs["agree"][j]
        exits.append(
            {
                "layer": layer,
                "layers_run": layer + 1,
                "agreement": float(agree.float().mean()) if len(agree) else None,
                "perplexity": math.exp(float(outs["nll"][j].mean())) if len(agree) else None,
                "auc": {m: auc(outs[m][j], agree) for m in MEASURES},
            }
        )
    # fit on half of the documents, test on the other half
    doc_half = torch.arange(len(feats.documents)) % 2
    fit = doc_half[feats.document] == 0
    test = ~fit
    target_rows: list[dict[str, Any]] = []
    if not bool(fit.any()) or not bool(test.any()):  # one held-out document: nothing to test fitted thresholds on
        targets = []
    for target in targets:
        for m in dict.fromkeys([measure, "max_prob", "classifier"]):
            thresholds = fit_thresholds(outs[m][:, fit], outs["agree"][:, fit], target)
            row = {"target": target, "measure": m, "thresholds": thresholds}
            row.update(simulate(outs[m][:, test], outs["agree"][:, test], thresholds, model.exit_layers, L))
            target_rows.append(row)
    result = {
        "positions": len(feats),
        "documents": len(feats.documents),
        "final_perplexity": math.exp(float(outs["final_nll"].mean())) if len(feats) else None,
        "exits": exits,
        "targets": target_rows,
    }
    return result, outs


def _machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isinf(value)) else fmt.format(value)


def render_evaluation(results: dict[str, Any], recipe: Recipe, has_plot: bool = True) -> str:
    """Markdown tables for the card."""
    groups = results["groups"]
    L = results["num_layers"]
    measure = results["confidence"]
    lines = [
        f"Measured by `drex train` on {results['machine']['processor']} ({results['machine']['cpu_count']} cores"
        + (f", {results['machine']['gpu']}" if "gpu" in results["machine"] else "")
        + f"), torch {results['machine']['torch']}; training took {results['train_minutes']:.1f} min "
        f"({results['steps']} steps on {results['train_positions']} positions), the whole run "
        f"{results['total_minutes']:.1f} min.",
        "",
        "Held-out sets: "
        + "; ".join(f"**{g}** — {v['positions']} positions from {v['documents']} documents" for g, v in groups.items())
        + ".",
        "",
        "### Per exit (teacher-forced)",
        "",
        "Agreement = the exit's top token equals the final layer's. AUC = how well a confidence "
        "separates agreeing from disagreeing tokens.",
        "",
    ]
    header = "| exit after layer | layers saved when exiting |"
    sep = "| --- | --- |"
    for g in groups:
        header += f" agreement ({g}) | perplexity ({g}) |"
        sep += " --- | --- |"
    for m in MEASURES:
        header += f" AUC {m} |"
        sep += " --- |"
    lines += [header, sep]
    main = "self" if "self" in groups else next(iter(groups))
    for j, layer in enumerate(results["exit_layers"]):
        row = f"| {layer} | {L - layer - 1} of {L} |"
        for g in groups:
            e = groups[g]["exits"][j]
            row += f" {_pct(e['agreement'])} | {_num(e['perplexity'], '{:.1f}')} |"
        for m in MEASURES:
            row += f" {_num(groups[main]['exits'][j]['auc'][m])} |"
        lines.append(row)
    final = "| final layer | — |"
    for g in groups:
        final += f" 100 % | {_num(groups[g]['final_perplexity'], '{:.1f}')} |"
    final += " |" * len(MEASURES)
    lines += [final, "", f"AUCs are on the **{main}** set.", ""]

    for g, v in groups.items():
        lines += [
            f"### Thresholds for agreement targets ({g} text)",
            "",
            "Thresholds fitted per exit on half of the documents, tested on the other half; first passing exit "
            "wins. Ideal speed-up = L / mean layers per token, exit heads' own cost not counted.",
            "",
            "| target | measure | thresholds | agreement (test half) | "
            + " | ".join(f"exits @ {layer}" for layer in results["exit_layers"])
            + " | mean layers | ideal speed-up |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in results["exit_layers"]) + " | --- | --- |",
        ]
        for row in v["targets"]:
            if not row.get("positions"):
                continue
            th = ", ".join("inf" if math.isinf(t) else f"{t:.3f}" for t in row["thresholds"])
            fr = " | ".join(_pct(f) for f in row["exit_fraction"])
            bold = "**" if row["measure"] == measure else ""
            lines.append(
                f"| {100 * row['target']:.0f} % | {bold}{row['measure']}{bold} | {th} | {_pct(row['agreement'])} | "
                f"{fr} | {row['mean_layers']:.2f} | {row['ideal_speedup']:.3f}× |"
            )
        lines.append("")
    ref = recipe.eval.reference
    if isinstance(ref, dict) and isinstance(ref.get("rows"), list):
        lines += [f"### Reference: {ref.get('label', 'published figures')}", ""]
        lines += ["| figure | reference | these heads |", "| --- | --- | --- |"]
        for row in ref["rows"]:
            group, kind = row.get("group"), row.get("kind")
            if group not in groups:
                continue
            if kind == "agreement":
                ours = "/".join(f"{100 * e['agreement']:.0f}" for e in groups[group]["exits"])
                what = f"agreement per exit (%), held-out {group} text"
            else:
                ours = "/".join(
                    f"{r['ideal_speedup']:.2f}"
                    for r in groups[group]["targets"]
                    if r["measure"] == "max_prob" and r.get("positions")
                )
                targets = "/".join(f"{100 * t:.0f}" for t in recipe.eval.targets)
                what = f"ideal speed-up at {targets} % agreement, max-prob, held-out {group} text"
            values = "/".join(str(v) for v in row.get("values", []))
            lines.append(f"| {what} | {values} ({row.get('label', '')}) | {ours} |")
        if ref.get("note"):
            lines += ["", str(ref["note"])]
        lines.append("")
    if "lora" in results:
        lines += [
            "### Joint LoRA: how far the final layer moved",
            "",
            "Agreement above is with the *adapted* final layer. Against the original model:",
            "",
            "| held-out set | final argmax changed | final perplexity, original → adapted |",
            "| --- | --- | --- |",
        ]
        for g, d in results["lora"]["final_layer_drift"].items():
            lines.append(
                f"| {g} | {_pct(d['final_argmax_changed'])} | {_num(d['final_perplexity_original'], '{:.1f}')} → "
                f"{_num(d['final_perplexity_adapted'], '{:.1f}')} |"
            )
        lines.append("")
    if has_plot:
        lines += [f"![agreement and exit rate per exit layer]({PLOT_NAME})", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any]) -> bytes | None:
    """PNG: agreement per exit layer (each held-out set), and exit share per exit at each target."""
    plt = pyplot()
    if plt is None:
        return None
    groups = results["groups"]
    layers = results["exit_layers"]
    L = results["num_layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for g, v in groups.items():
        left.plot([*layers, L - 1], [100 * e["agreement"] for e in v["exits"]] + [100], marker="o", label=f"{g} text")
    left.set_xlabel("exit after layer")
    left.set_ylabel("top-1 agreement with final layer (%)")
    left.set_ylim(0, 105)
    left.set_xlim(-0.5, L - 0.5)
    left.grid(alpha=0.3)
    left.legend()
    main = "self" if "self" in groups else next(iter(groups))
    rows = [r for r in groups[main]["targets"] if r["measure"] == results["confidence"] and r.get("positions")]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(layers))]
        right.bar(xs, [100 * f for f in r["exit_fraction"]], width=width, label=f"target {100 * r['target']:.0f} %")
    right.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(layers))], [str(x) for x in layers])
    right.set_xlabel("exit after layer")
    right.set_ylabel(f"tokens exiting ({main} text, %)")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    fig.suptitle(f"{results['base_model']}: exits at {layers} of {L} layers ({results['confidence']})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def evaluate_and_publish(
    model: Any,
    recipe: Recipe,
    eval_feats: dict[str, Features],
    *,
    history: list[dict[str, Any]],
    train_seconds: float,
    total_seconds: float,
    data_description: list[str],
    train_positions: int,
    lora_drift: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Evaluate, set the shipped thresholds, write the heads folder (atomically) and return the results."""
    from drex_hf.model_card import render_model_card

    began = time.perf_counter()
    measure = recipe.heads.confidence
    groups = {}
    for g, feats in eval_feats.items():
        groups[g], _ = evaluate_group(model, feats, measure, recipe.eval.targets)
    config = model.exit_config
    ship = recipe.eval.ship_target
    main = "self" if "self" in groups else (next(iter(groups)) if groups else None)
    row = None
    if ship is not None and main is not None:
        row = next((r for r in groups[main]["targets"] if r["target"] == ship and r["measure"] == measure), None)
        if row is None:
            log(
                f"warning no thresholds fitted for target {ship}: the held-out {main} set needs at least 2 documents "
                f"(one to fit on, one to test); keeping heads.thresholds"
            )
    if row is not None:
        config.thresholds = list(row["thresholds"])
        config.extra["ship_target"] = ship
        config.extra["thresholds_fitted_on"] = f"half of the held-out {main} documents ({measure})"
    total_seconds += time.perf_counter() - began
    results = {
        "base_model": config.base_model,
        "num_layers": model.num_layers,
        "exit_layers": list(model.exit_layers),
        "head": config.head,
        "confidence": measure,
        "shipped_thresholds": {"target": ship, "measured_on": main, "values": config.threshold_list()},
        "steps": recipe.optim.steps,
        "train_positions": train_positions,
        "train_minutes": train_seconds / 60,
        "total_minutes": total_seconds / 60,
        "machine": _machine(),
        "recipe": recipe.source_file,
        "data": data_description,
        "groups": groups,
        "train_history_tail": history[-3:],
    }
    if lora_drift is not None:
        results["lora"] = {"settings": dict(config.extra.get("lora", {})), "final_layer_drift": lora_drift}
    png = plot(results) if groups else None  # None without matplotlib: the card then has no picture
    evaluation = (
        render_evaluation(results, recipe, png is not None) if groups else "No held-out data: nothing was evaluated."
    )
    command = f"drex train {recipe.source_file}" if recipe.source_file else "drex train (recipe built in code)"
    evaluation = (
        f"Trained and evaluated with `{command}`.\n\nData:\n"
        + "".join(f"- {d}\n" for d in data_description)
        + "\n"
        + evaluation
    )
    card = render_model_card(config, datasets=None, evaluation_markdown=evaluation)
    extra = {RESULTS_NAME: (json.dumps(_jsonable(results), indent=1) + "\n").encode()}
    if png:
        extra[PLOT_NAME] = png
    model.save_pretrained(recipe.output_dir, card=card, extra_files=extra)
    log(f"saved   {recipe.output_dir} (heads, {RESULTS_NAME}, {PLOT_NAME if png else 'no plot'}, README.md)")
    for g, v in groups.items():
        agree = " / ".join(_pct(e["agreement"]) for e in v["exits"])
        log(f"eval    {g}: agreement per exit {agree}")
        for r in v["targets"]:
            if r["measure"] == measure and r.get("positions"):
                log(
                    f"        target {100 * r['target']:.0f} %: agreement {_pct(r['agreement'])}, exits "
                    + "/".join(f"{100 * f:.1f}" for f in r["exit_fraction"])
                    + f" %, ideal speed-up {r['ideal_speedup']:.3f}x"
                )
    for g, d in (lora_drift or {}).items():
        log(
            f"lora    {g}: final argmax changed on {_pct(d['final_argmax_changed'])} of tokens; final perplexity "
            f"{_num(d['final_perplexity_original'], '{:.2f}')} -> {_num(d['final_perplexity_adapted'], '{:.2f}')}"
        )
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
