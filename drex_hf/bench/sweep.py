"""Sweeps for `drex bench`: quality vs speed over thresholds (the real model), and drex's gain over a
grid of exit distributions × batch sizes (synthetic shapes, trace exits)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from drex_hf.bench.run import bench, speedup
from drex_hf.errors import GenerationInputError
from drex_hf.generation.exits import ExitDistribution
from drex_hf.plotting import pyplot

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


def threshold_sweep(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    batch: int,
    new_tokens: int,
    thresholds: Sequence[float],
    policies: Sequence[str],
    tokenizer: Any = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """For each threshold (one value for every exit point), every policy's speed-up over full depth
    and its agreement / ROUGE-L with full depth's outputs, and both oracles' speed-ups (the layer
    count's and the measured one, `drex_hf.bench.measure`). The model's thresholds are restored."""
    if "full" not in policies:
        raise GenerationInputError("a threshold sweep measures against full depth: include the 'full' policy")
    saved = model.exit_config.thresholds
    points = []
    try:
        for tau in thresholds:
            model.exit_config.thresholds = [float(tau)] * len(model.exit_layers)
            (result,) = bench(
                model,
                prompts,
                [batch],
                new_tokens,
                policies,
                None,
                1,
                hf=False,
                tokenizer=tokenizer,
                memory=False,
                oracle=True,
            )
            oracle = result.oracle_tokens_per_s(model.num_layers)
            full = result.policies["full"]["decode_tokens_per_s"]
            measured = result.measured_oracle
            points.append(
                {
                    "threshold": float(tau),
                    "oracle_speedup": None if oracle is None else oracle / full,
                    "measured_oracle_speedup": measured["speedup"] if measured else None,
                    "policies": {
                        name: {
                            "speedup_vs_full": speedup(result.policies, name, "full"),
                            "agreement_with_full": s.get("agreement_with_full"),
                            "rouge_l_vs_full": s.get("rouge_l_vs_full"),
                            "mean_layers": s["mean_layers"],
                            "involuntary_exits": s["involuntary_exits"],
                        }
                        for name, s in result.policies.items()
                    },
                }
            )
            if progress:
                progress(1)
    finally:
        model.exit_config.thresholds = saved
    return points


def distribution_for_depth(fraction: float, exit_layers: Sequence[int], num_layers: int) -> ExitDistribution:
    """An exit distribution with mean depth `fraction` × L: full depth with probability x, the exit
    points equally likely otherwise (x solved for the mean). Refused below the exits' own mean depth."""
    depths = [e + 1 for e in exit_layers]
    mean_exit = sum(depths) / len(depths)
    target = fraction * num_layers
    if not mean_exit / num_layers - 1e-9 <= fraction <= 1.0:
        raise GenerationInputError(
            f"mean depth {fraction} L is outside what these exits give by this family: "
            f"[{mean_exit / num_layers:.3f}, 1.0] L"
        )
    x = (target - mean_exit) / (num_layers - mean_exit)
    rest = (1.0 - x) / len(depths)
    probabilities = [rest] * len(depths) + [x]
    probabilities[-1] = 1.0 - sum(probabilities[:-1])  # sums to 1 exactly
    return ExitDistribution(tuple(probabilities))


def depth_sweep(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
    new_tokens: int,
    fractions: Sequence[float],
    policies: Sequence[str],
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """drex's tokens/s over batch_all's and over full depth's, for each mean depth × batch size."""
    missing = {"full", "batch_all", "drex"} - {p.partition("@")[0] for p in policies}
    if missing:
        raise GenerationInputError(f"a depth sweep compares drex with full and batch_all: add {sorted(missing)}")
    cells = []
    for fraction in fractions:
        dist = distribution_for_depth(fraction, model.exit_layers, model.num_layers)
        dist = ExitDistribution(dist.probabilities, seed=seed)
        for result in bench(
            model, prompts, batch_sizes, new_tokens, policies, dist, 1, hf=False, memory=False, oracle=False
        ):
            cells.append(
                {
                    "mean_depth": fraction,
                    "distribution": list(dist.probabilities),
                    "batch": result.batch,
                    "drex_vs_batch_all": speedup(result.policies, "drex", "batch_all"),
                    "drex_vs_full": speedup(result.policies, "drex", "full"),
                    "drex_mean_layers": result.policies["drex"]["mean_layers"],
                    "drex_involuntary_exits": result.policies["drex"]["involuntary_exits"],
                }
            )
            if progress:
                progress(1)
    return cells


def pareto_plot(points: list[dict], out: Path) -> Path | None:
    """Agreement with full depth against speed-up over full depth, a line per policy over thresholds."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in points[0]["policies"]:
        if name == "full":
            continue
        xs = [p["policies"][name]["speedup_vs_full"] for p in points]
        ys = [p["policies"][name]["agreement_with_full"] for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p['threshold']:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    oracle = [
        (p["oracle_speedup"], p["policies"]["drex"]["agreement_with_full"]) for p in points if p["oracle_speedup"]
    ]
    if oracle:
        ax.plot(*zip(*oracle), linestyle=":", color="grey", label="oracle (drex's exits, layer count)")
    measured = [
        (p["measured_oracle_speedup"], p["policies"]["drex"]["agreement_with_full"])
        for p in points
        if p.get("measured_oracle_speedup")
    ]
    if measured:
        ax.plot(*zip(*measured), linestyle="--", color="grey", label="measured oracle (drex's exits, free, here)")
    ax.axvline(1.0, color="black", linewidth=0.5)
    ax.set(xlabel="speed-up over full depth", ylabel="token agreement with full depth", title="Quality vs speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def heatmap_plot(cells: list[dict], out: Path) -> Path | None:
    """Two heat maps over mean depth × batch size: drex ÷ batch_all and drex ÷ full."""
    plt = pyplot()
    if plt is None:
        return None
    depths = sorted({c["mean_depth"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in zip(axes, ("drex_vs_batch_all", "drex_vs_full"), ("drex ÷ batch_all", "drex ÷ full")):
        grid = [[math.nan] * len(batches) for _ in depths]
        for c in cells:
            grid[depths.index(c["mean_depth"])][batches.index(c["batch"])] = c[key] or math.nan
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5, origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(depths)), [f"{d:g} L" for d in depths])
        ax.set(xlabel="batch size", ylabel="mean exit depth", title=title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = out / "heatmap.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
