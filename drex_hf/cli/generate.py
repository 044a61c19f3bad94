"""`drex generate MODEL --prompt ...`: decode prompts with per-token early exit and show, per token,
the layer it left at."""

from __future__ import annotations

import argparse
import time
from typing import Any

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import (
    HelpFormatter,
    add_model_arguments,
    encode_prompts,
    exit_histogram,
    load_model,
    non_negative_int,
    positive_float,
    positive_int,
    seed_value,
    tokenizer_for,
)
from drex_hf.errors import GenerationInputError
from drex_hf.generation.scheduler import POLICY_NAMES as POLICIES


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be non-empty text, got {text!r}")
    return text


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "generate",
        help=COMMANDS["generate"],
        description="Generate text for one or more prompts with an early-exit model and print, for every "
        "new token, the decoder layer it left at.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="exit-heads folder (from save_pretrained), or a base model folder / hub id with --exit-layers",
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt; repeat the option for a batch (required)"
    )
    parser.add_argument(
        "--policy",
        choices=(*POLICIES, "self_spec"),
        default="drex",
        help="drex: per-token early exit with rebatching; full: full depth; self_spec: lossless "
        "self-speculation (an exit head drafts, the remaining layers verify: full depth's tokens); "
        "batch_all / batch_majority: the batch-wide early-exit baselines (their tokens depend on the batch)",
    )
    parser.add_argument(
        "--draft-source",
        choices=("head", "ngram", "mixed"),
        default=None,
        help="self_spec: where drafts come from: head (the exit head at --draft-exit), ngram (each prompt's own "
        "text and tokens, as HF's prompt lookup, batched) or mixed (its text where it matches, else the head) "
        "(default: head)",
    )
    parser.add_argument(
        "--draft-exit",
        type=int,
        default=None,
        help="self_spec: the exit layer whose head drafts (default: the deepest exit point)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=_draft_tokens,
        default=4,
        help="self_spec: drafts per round, a positive integer or 'adaptive'",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    parser.add_argument("--seed", type=seed_value, default=0, help="sampling seed; prompt i uses seed + i")
    # HF's logits processors and stop strings, each prompt seeing only its own tokens
    parser.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=1.0,
        help="HF's repetition_penalty: divide the scores of tokens already in the prompt or output (1.0: off)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=non_negative_int,
        default=0,
        help="HF's no_repeat_ngram_size: no n-gram of this size occurs twice in a prompt + its output (0: off)",
    )
    parser.add_argument(
        "--min-new-tokens",
        type=non_negative_int,
        default=0,
        help="HF's min_new_tokens: no end-of-sequence before this many new tokens",
    )
    parser.add_argument(
        "--bad-words",
        action="append",
        type=_text,
        default=None,
        metavar="TEXT",
        help="text never to generate (its tokens as HF's bad_words_ids); repeat for more (default: none)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        type=_text,
        default=None,
        metavar="TEXT",
        help="end a prompt's output once it ends with this text (HF's stop_strings); repeat for more (default: none)",
    )
    parser.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def _draft_tokens(text: str) -> int | str:
    if text == "adaptive":
        return text
    return positive_int(text)


def run(args: argparse.Namespace) -> int:
    spec = args.policy == "self_spec"
    if not spec and (args.draft_exit is not None or args.draft_tokens != 4 or args.draft_source is not None):
        raise GenerationInputError(
            f"--draft-source, --draft-exit and --draft-tokens apply to --policy self_spec, not {args.policy}"
        )
    if spec and args.threshold is not None:
        raise GenerationInputError(
            f"--threshold {args.threshold:g} does not apply to --policy self_spec (every token is full depth's)"
        )
    if args.policy == "full" and args.threshold is not None:
        raise GenerationInputError(
            f"--threshold {args.threshold:g} does not apply to --policy full (it never exits); drop one of them"
        )
    model = load_model(args.model, args)
    tokenizer = tokenizer_for(model)
    batch = encode_prompts(tokenizer, args.prompt, args.chat, model.heads_device)
    sampling = {}
    if args.do_sample:
        sampling = dict(
            do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
    start = time.perf_counter()
    out = model.generate(
        **batch,
        policy=args.policy,
        max_new_tokens=args.max_new_tokens,
        return_dict_in_generate=True,
        **(
            {"draft_exit": args.draft_exit, "draft_tokens": args.draft_tokens, "draft_source": args.draft_source}
            if spec
            else {}
        ),
        **sampling,
        **_processor_options(args, tokenizer),
    )
    seconds = time.perf_counter() - start
    width = batch["input_ids"].shape[1]
    real = out.exit_layers >= 0
    total = int(real.sum())
    for i, prompt in enumerate(args.prompt):
        n = int(real[i].sum())
        tokens = out.sequences[i, width : width + n]
        print(f"=== prompt {i + 1}: {prompt}")
        print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        print("--- token / exit layer")
        print(
            " ".join(f"{tokenizer.decode([t])!r}@{e}" for t, e in zip(tokens.tolist(), out.exit_layers[i, :n].tolist()))
        )
    print(f"=== policy {args.policy}: {total} tokens in {seconds:.2f} s ({total / seconds:.1f} tokens/s)")
    stats = out.stats
    if spec:
        print(
            f"self_spec: {stats.rounds} rounds, {stats.accepted} of {stats.drafted} drafts accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per round, "
            f"{stats.layers_per_token:.1f} layers per token (full depth: {model.num_layers})"
        )
        return 0
    print(f"exits per layer: {exit_histogram(out.exit_layers, model)}")
    print(
        f"involuntary exits {stats.involuntary_exits}, missed exits {stats.missed_exits}, "
        f"layer-rows {stats.layer_rows} (minimum {stats.min_layer_rows})"
    )
    return 0


def _processor_options(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """generate()'s HF processor arguments for the options given (none at their defaults)."""
    options: dict[str, Any] = {}
    if args.repetition_penalty != 1.0:
        options["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size:
        options["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    if args.min_new_tokens:
        options["min_new_tokens"] = args.min_new_tokens
    if args.bad_words:  # as HF's docs say: each text's tokens, without special tokens
        options["bad_words_ids"] = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in args.bad_words]
    if args.stop:
        options.update(stop_strings=list(args.stop), tokenizer=tokenizer)
    return options
