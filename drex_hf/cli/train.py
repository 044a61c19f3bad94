"""`drex train RECIPE`: train exit heads from a YAML recipe (see recipes/README.md for every key)."""

from __future__ import annotations

import argparse
from typing import Any

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import HelpFormatter


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train exit heads for a base model from a recipe: data (text, JSON lines, datasets, "
        "shakespeare, self-distillation), per-exit KL + CE loss, optional joint LoRA; checkpoints, resumes, "
        "evaluates and writes a heads folder with eval_results.json, a plot and a model card.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("recipe", help="YAML recipe file, e.g. recipes/smollm2-135m.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.lr=3e-4 --set data.sources.0.num_prompts=8 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--output", default=None, help="heads folder to write (default: the recipe's train.output_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from drex_hf.fileio import check_output_folder
    from drex_hf.training.recipe import load_recipe
    from drex_hf.training.trainer import train

    if args.output:
        check_output_folder(args.output, "--output", beside=True)
    recipe = load_recipe(args.recipe, list(args.overrides))
    if args.output:  # a path, taken literally (not parsed as YAML like --set values)
        recipe.train.output_dir = args.output
    result = train(recipe, resume=args.resume, progress=not args.no_progress)
    print(
        f"done    {result.steps} steps, training {result.train_seconds / 60:.1f} min, "
        f"whole run {result.total_seconds / 60:.1f} min -> {result.output_dir}"
    )
    return 0
