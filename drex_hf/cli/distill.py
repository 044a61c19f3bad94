"""`drex distill MODEL --exit E`: train a draft layer (one decoder layer after exit E, Kangaroo's
shape; `drex_hf.draft_layer`) by distillation on the model's own answers, and save it beside the
heads, where `self_spec`'s head drafts at exit E then use it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import DTYPES, HelpFormatter, positive_float, positive_int, progress_bar
from drex_hf.errors import ConfigError

CURVES_NAME = "draft_layer_curves.json"
PLOT_NAME = "draft_layer_curves.png"


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "distill",
        help=COMMANDS["distill"],
        description="Answer prompts at full depth, then train one decoder layer after exit E (a copy of "
        "layer E+1 sharing its keys and values) to draft what full depth says, by KL to its top-k. "
        "Writes draft_layer.safetensors (other exits' layers in it are kept), draft_layer_curves.json "
        "and draft_layer_curves.png into the folder. self_spec's head drafts at exit E then run through it.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="exit-heads folder (from save_pretrained / drex train)")
    parser.add_argument("--exit", type=int, required=True, dest="exit_layer", help="the exit the layer follows")
    parser.add_argument("--prompts", default="chat,shakespeare,kjv",
                        help="prompt sets (chat, shakespeare, kjv) or files the answers are made for")  # fmt: skip
    parser.add_argument("--prompt-count", type=positive_int, default=320, help="prompts answered")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the answers kept for the curves")
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="tokens per answer, at most")
    parser.add_argument("--steps", type=positive_int, default=300, help="AdamW steps")
    parser.add_argument("--batch", type=positive_int, default=8, help="answers per step")
    parser.add_argument("--lr", type=positive_float, default=3e-4, help="peak learning rate (cosine to a tenth)")
    parser.add_argument("--top-k", type=positive_int, default=64, help="the teacher's top-k the KL is taken over")
    parser.add_argument("--eval-every", type=positive_int, default=25, help="steps between held-out scores")
    parser.add_argument("--seed", type=int, default=7, help="draws the prompts and the batch order")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from drex_hf.calibration.choice import model_answers
    from drex_hf.cli.calibrate import answer_ends, chat_prompts, load_uncalibrated
    from drex_hf.draft_layer import DRAFT_LAYER_NAME, write_draft_layers
    from drex_hf.training.draft_layer import distill_set, train_draft_layer

    folder = Path(args.model)
    if not (folder / "exit_config.json").is_file():
        raise ConfigError(f"{folder} is not an exit-heads folder (no exit_config.json)")
    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out must be in (0, 1), got {args.held_out}")
    model = load_uncalibrated(folder, args)
    if args.exit_layer not in model.exit_layers:
        raise ConfigError(f"--exit {args.exit_layer} is not one of the model's exits {model.exit_layers}")
    held = max(1, round(args.prompt_count * args.held_out))
    if args.prompt_count - held < 1:
        raise ConfigError(f"--prompt-count {args.prompt_count} leaves no answers to train on after --held-out")
    show = not args.no_progress
    started = time.perf_counter()
    prompts = chat_prompts(model, args.prompts, args.prompt_count, args.seed)
    bar = progress_bar(len(prompts), "full-depth answers", "answer", show)
    try:
        answers = model_answers(model, prompts, args.max_new_tokens, answer_ends(model),
                                progress=lambda _: bar.update(1))  # fmt: skip
    finally:
        bar.close()
    sequences = [(p.tolist() + a, p.shape[0]) for p, a in zip(prompts, answers) if len(a) > 1]
    bar = progress_bar(len(sequences), f"exit {args.exit_layer} states and teacher top-{args.top_k}", "answer", show)
    try:
        train = distill_set(model, sequences[held:], args.exit_layer, args.top_k, progress=bar.update)
        held_out = distill_set(model, sequences[:held], args.exit_layer, args.top_k, progress=bar.update)
    finally:
        bar.close()
    bar = progress_bar(args.steps, "distilling", "step", show)
    last = [0]

    def report(point: dict) -> None:
        bar.update(point["step"] - last[0])
        last[0] = point["step"]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"held-out agreement {point['agreement']:.1%}, KL {point['kl']:.3f}")

    try:
        layer, curves = train_draft_layer(model, train, held_out, args.exit_layer, steps=args.steps,
                                          batch=args.batch, lr=args.lr, eval_every=args.eval_every,
                                          seed=args.seed, progress=report)  # fmt: skip
    finally:
        bar.close()
    path = folder / DRAFT_LAYER_NAME
    layers = dict(model.draft_layers)  # the folder's other exits' layers, loaded with the model, stay
    layers[args.exit_layer] = layer
    write_draft_layers(path, layers, model.arch.num_layers)
    curves |= {"command": "drex distill " + " ".join(sys.argv[2:]), "seconds": time.perf_counter() - started,
               "prompts": args.prompts, "seed": args.seed, "lr": args.lr, "batch": args.batch, "top_k": args.top_k,
               "max_new_tokens": args.max_new_tokens}  # fmt: skip
    every = json.loads((folder / CURVES_NAME).read_text()) if (folder / CURVES_NAME).is_file() else {}
    every[str(args.exit_layer)] = curves
    partial = folder / f"{CURVES_NAME}.partial"
    partial.write_text(json.dumps(every, indent=1))
    partial.replace(folder / CURVES_NAME)
    plotted = plot_curves(every, folder / PLOT_NAME)
    print(f"wrote {path} (exits {sorted(layers)}) and {folder / CURVES_NAME}" + (f" and {plotted}" if plotted else ""))
    print(f"  {curves['train_sequences']} answers ({curves['train_positions']} positions) trained on, "
          f"{curves['held_out_sequences']} ({curves['held_out_positions']} positions) held out")  # fmt: skip
    print(f"  held-out agreement with full depth at exit {args.exit_layer}: exit head "
          f"{curves['head_agreement']:.1%}, draft layer {curves['agreement'][0]:.1%} new -> "
          f"{curves['agreement'][-1]:.1%} after {args.steps} steps")  # fmt: skip
    return 0


def plot_curves(every: dict[str, dict], path: Path) -> Path | None:
    """Per exit: held-out agreement (and the exit head's, dashed) and the training loss by step."""
    from drex_hf.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for exit_layer, curves in sorted(every.items(), key=lambda item: int(item[0])):
        line = left.plot(curves["steps"], [100 * a for a in curves["agreement"]], marker="o",
                         label=f"draft layer after exit {exit_layer}")[0]  # fmt: skip
        left.axhline(100 * curves["head_agreement"], color=line.get_color(), linestyle="--",
                     label=f"exit head {exit_layer}")  # fmt: skip
        steps = [s for s, loss in zip(curves["steps"], curves["train_loss"]) if loss is not None]
        right.plot(steps, [x for x in curves["train_loss"] if x is not None], marker="o", label=f"exit {exit_layer}")
    left.set(xlabel="step", ylabel="held-out agreement with full depth (%)", title="draft layer: agreement")
    right.set(xlabel="step", ylabel="KL to full depth's top-k", title="training loss")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(path.name + ".partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(path)
    return path
