"""`drex calibrate MODEL_DIR --data held_out.txt`: thresholds with a stated guarantee and the
scheduler's cost constants for this device, written beside the heads as calibration.json + a plot.
The guarantee is on tokens (agreement with full depth) or, with `--metric rouge_l|exact`, on whole
greedy answers (their mean score against full depth's answers)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from drex_hf.calibration.sequences import DEFAULT_BOUNDS, METRICS
from drex_hf.calibration.thresholds import BOUNDS, CalibrationDataError
from drex_hf.cli import COMMANDS
from drex_hf.cli.common import (
    DTYPES,
    HelpFormatter,
    count_list,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
    progress_bar,
    seed_value,
    tokenizer_for,
)
from drex_hf.config import CONFIDENCE_MEASURES
from drex_hf.errors import ModelNotFoundError


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


TOKEN_NEW_TOKENS, SEQUENCE_NEW_TOKENS = 48, 32
SEQUENCE_TARGET = 0.9


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "calibrate",
        help=COMMANDS["calibrate"],
        description="Measure on held-out text how often each exit's token agrees with full depth, choose "
        "per-exit thresholds that reach --target-agreement with probability >= 1 - --delta (Learn-then-"
        "Test), time the segments on this device, switch off exits that cost more than they save, and "
        "write calibration.json and calibration.png into MODEL_DIR (from_pretrained then uses them). With "
        "--metric, the thresholds are certified on whole answers instead: drex's greedy answers to held-out "
        "prompts must score a mean --metric >= --target against the full-depth answers with probability >= "
        "1 - --delta (Learn-then-Test over prompts).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="an exit-heads folder (from save_pretrained or drex train)")
    parser.add_argument("--data", type=Path, help="held-out plain text (UTF-8) to draw prompts from")
    parser.add_argument(
        "--reuse-observations",
        action="store_true",
        help="skip the greedy decoding: reuse the observations an earlier run saved in MODEL_DIR and only "
        "profile this device (adds its entry; the guarantee is recomputed from the same tokens)",
    )
    parser.add_argument(
        "--target-agreement",
        type=probability,
        default=0.95,
        help="token agreement to guarantee (with --metric: the token agreement the learn half's fits aim at "
        "when deciding which exits pay on this device)",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="certify whole greedy answers instead of tokens, scored against full depth's answers: rouge_l "
        "(ROUGE-L F1 on token ids) or exact (identical token ids); default: no, a token-agreement guarantee",
    )
    parser.add_argument(
        "--target",
        type=probability,
        default=None,
        help="with --metric: the mean score to guarantee on new prompts (default: 0.9)",
    )
    parser.add_argument("--delta", type=probability, default=0.1, help="allowed probability of missing the target")
    parser.add_argument(
        "--bound",
        choices=BOUNDS,
        default=None,
        help="tail bound of the test (default: binomial; with --metric: "
        + ", ".join(f"{b} for {m}" for m, b in DEFAULT_BOUNDS.items())
        + "; binomial needs 0/1 losses)",
    )
    parser.add_argument("--prompts", type=positive_int, default=64, help="prompts drawn from --data")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="tokens per prompt")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"greedy tokens per prompt (default: {TOKEN_NEW_TOKENS}; {SEQUENCE_NEW_TOKENS} with --metric)",
    )
    parser.add_argument("--rows", type=count_list, default=[1, 2, 4, 8, 16, 32], help="row counts to time")
    parser.add_argument("--holdout-rows", type=count_list, default=[3, 6, 12, 24], help="row counts to test the fit on")
    parser.add_argument(
        "--decision-rows",
        type=positive_int,
        default=8,
        help="batch at which exits must pay (at most the largest row count)",
    )
    parser.add_argument(
        "--min-speedup",
        type=float,
        default=1.05,
        help="expected speed-up over a real full-depth step below which every exit is switched off (the "
        "margin covers the engine's per-step bookkeeping, which the timing leaves out)",
    )
    parser.add_argument("--context", type=positive_int, default=128, help="cached positions while timing")
    parser.add_argument(
        "--long-context",
        type=positive_int,
        default=None,
        help="cached positions of the second timing that gives attention's per-position cost (default: 4 x --context)",
    )
    parser.add_argument(
        "--choose-policy",
        action="store_true",
        help="also time full, drex (the thresholds just calibrated) and self_spec (each --draft-exits x "
        "--draft-tokens) on the drawn prompts at each --choice-batch-sizes, and record this device's fastest "
        "per batch size; generate() without policy= then follows it (full unless something beats it by "
        "--min-speedup)",
    )
    parser.add_argument(
        "--choice-batch-sizes", type=count_list, default=[1, 8], help="with --choose-policy: batch sizes to time"
    )
    parser.add_argument(
        "--draft-exits",
        type=count_list,
        default=None,
        help="with --choose-policy: self_spec's draft exits to try (default: every exit point)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=draft_tokens_list,
        default=[1, 2, 4],
        help="with --choose-policy: self_spec's k to try, positive integers or 'adaptive' (default: 1,2,4)",
    )
    parser.add_argument(
        "--draft-sources",
        type=source_list,
        default=["head"],
        help="with --choose-policy: where self_spec's drafts come from, some of head (the exit head at each "
        "--draft-exits), ngram (each row's own prompt and tokens), mixed (its text where it matches, else the "
        "head) (default: head)",
    )
    parser.add_argument(
        "--choice-prompts",
        default=None,
        help="with --choose-policy: the prompts to time on instead of the windows of --data: comma-separated "
        "sets (chat, shakespeare, kjv: drex_hf.training.prompts) or prompt files (.txt one per line, .jsonl with "
        "a 'prompt' field), chat template applied, answers ending at the end of the turn; allows "
        "--reuse-observations",
    )
    parser.add_argument(
        "--choice-check-prompts",
        default=None,
        help="with --choose-policy: prompts the choice is not made on (same spelling as --choice-prompts), on "
        "which the chosen policy is timed against full depth again: the entry records that ratio and the "
        "prediction's error (default: none)",
    )
    parser.add_argument(
        "--choice-lossless",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --choose-policy: choose only among policies that keep full depth's tokens (full, self_spec); "
        "drex is still timed and reported (default: on; --no-choice-lossless lets drex's exits be the default)",
    )
    parser.add_argument(
        "--draft-corpus",
        type=int,
        default=0,
        help="with --choose-policy: first answer this many prompts of the chat, shakespeare and kjv sets at full "
        "depth (up to 128 tokens each) and save the answers beside the heads as draft_corpus.safetensors: rows "
        "drafting from their own text (ngram, mixed) draft from these when their text has no match "
        "(default: 0, keep the folder's corpus if it has one)",
    )
    parser.add_argument(
        "--draft-vocab",
        type=float,
        default=None,
        metavar="COVERAGE",
        help="alone (no --data, --reuse-observations or --choose-policy): rank the tokens of the folder's "
        "draft_corpus.safetensors (the model's own answers) by frequency and save, as draft_vocab.safetensors, "
        "the smallest prefix covering COVERAGE of them (e.g. 0.95): head drafts project onto those tokens only "
        "(verification and the output keep the whole vocabulary); prints coverage by size on answers the ranking "
        "did not see (default: none)",
    )
    parser.add_argument(
        "--draft-priors",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="alone (no --data, --reuse-observations, --choose-policy or --draft-corpus): answer N prompts "
        "(--choice-prompts, default chat,shakespeare,kjv) at full depth and save, as draft_priors.json, how "
        "often each kind of text draft (a match of n tokens in the row's own text, or the draft corpus) is "
        "accepted at each depth: adaptive drafting from text (draft_tokens 'adaptive') then verifies only "
        "the drafts worth their cost to the batch (default: 0, none)",
    )
    parser.add_argument(
        "--draft-priors-k",
        type=positive_int,
        default=8,
        help="with --draft-priors: the deepest draft position measured (default: 8)",
    )
    parser.add_argument(
        "--choice-prompt-count",
        type=positive_int,
        default=16,
        help="with --choice-prompts / --choice-check-prompts: prompts drawn from each (default: 16)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (their median counts)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the prompt draw and the learn/test split")
    parser.add_argument(
        "--measures",
        type=measure_list,
        default=None,
        help="confidence measures to compare, comma-separated (default: all of "
        f"{','.join(CONFIDENCE_MEASURES)}; the heads' own is always included); each device gets the fastest",
    )
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    parser.set_defaults(run=run)


def check_sequence_arguments(args: argparse.Namespace) -> float:
    """--metric's options, refused before the model loads: --target only with --metric, no saved
    observations (the answers are generated), a bound the metric's losses allow, and enough prompts
    that even answers all equal to full depth's could pass. Returns the target."""
    from drex_hf.calibration.sequences import check_enough_prompts
    from drex_hf.calibration.sequences import check_options as check_sequence_options
    from drex_hf.calibration.thresholds import learn_prompts

    if args.metric is None:
        if args.target is not None:
            raise CalibrationDataError(
                "--target is the mean score of a sequence guarantee and needs --metric rouge_l or exact; a token "
                "guarantee takes --target-agreement"
            )
        return SEQUENCE_TARGET
    target = SEQUENCE_TARGET if args.target is None else args.target
    if args.reuse_observations:
        raise CalibrationDataError(
            "--metric generates drex's answers to the prompts: use --data, not --reuse-observations"
        )
    try:
        bound = check_sequence_options(args.metric, target, args.delta, args.bound)
    except CalibrationDataError as err:
        raise CalibrationDataError(f"--metric {args.metric}: {err}") from None
    if args.prompts < 2:
        raise CalibrationDataError("--prompts must be at least 2: learn and test are split by prompt")
    tested = args.prompts - len(learn_prompts(torch.arange(args.prompts), 0.5, args.seed))
    try:
        check_enough_prompts(tested, args.metric, target, args.delta, bound, args.prompts)
    except CalibrationDataError as err:
        raise CalibrationDataError(f"--prompts {args.prompts}: {err}") from None
    return target


def measure_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CONFIDENCE_MEASURES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown measure(s) {unknown or text!r}; choose from {CONFIDENCE_MEASURES}")
    return names


def read_text(path: Path) -> str:
    """`--data`: a UTF-8 text file with some text in it."""
    if path.is_dir():
        raise CalibrationDataError(f"--data {path} is a folder; name a UTF-8 text file")
    if not path.is_file():
        raise ModelNotFoundError(f"--data {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(f"--data {path} is not UTF-8 text (byte {err.start} is not text)") from None
    if not text.strip():
        raise CalibrationDataError(f"--data {path} is empty")
    return text


def draw_prompts(text: str, tokenizer: Any, count: int, length: int, seed: int) -> list[torch.Tensor]:
    """`count` windows of `length` tokens at seeded random offsets of the tokenized text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length + 1:
        raise CalibrationDataError(f"the held-out text has {len(ids)} tokens; a prompt needs {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=gen).tolist()
    return [torch.tensor(ids[s : s + length]) for s in starts]


def run(args: argparse.Namespace) -> int:
    from drex_hf.calibration.calibrate import CALIBRATION_NAME, OBSERVATIONS_NAME, PLOT_NAME, calibrate, plot, save
    from drex_hf.calibration.calibrate import check_options as check_calibration_options
    from drex_hf.calibration.thresholds import Observations
    from drex_hf.config import CONFIG_NAME
    from drex_hf.fileio import check_output_folder

    folder = Path(args.model)
    if not (folder / CONFIG_NAME).is_file():
        raise ModelNotFoundError(f"{folder} is not an exit-heads folder (no {CONFIG_NAME})")
    check_calibration_options(
        args.rows, args.holdout_rows, args.decision_rows, args.context, args.long_context, options=True
    )
    check_output_folder(folder, "MODEL_DIR", beside=True)  # calibration.json and the plot go beside the heads
    if args.draft_vocab is not None:
        return build_draft_vocab(folder, args)
    if args.draft_priors:
        return build_draft_priors(folder, args)
    sequence_target = check_sequence_arguments(args)
    max_new_tokens = args.max_new_tokens or (SEQUENCE_NEW_TOKENS if args.metric else TOKEN_NEW_TOKENS)
    observations = None
    if args.reuse_observations:
        if args.data is not None:
            raise CalibrationDataError("--reuse-observations and --data exclude each other: pick one")
        observations = Observations.load(folder / OBSERVATIONS_NAME)
    elif args.data is None:
        raise CalibrationDataError("--data is required (or --reuse-observations, after an earlier run)")
    else:
        text = read_text(args.data)
    model = load_uncalibrated(folder, args)
    prompts = (
        []
        if observations is not None
        else draw_prompts(text, tokenizer_for(model), args.prompts, args.prompt_tokens, args.seed)
    )
    show = not args.no_progress
    bars = {
        "observe": progress_bar(len(prompts), "observe (greedy full depth)", "prompt", show),
        "profile": progress_bar(len(model.exit_layers) + 1, "profile segments", "segment", show),
    }

    def tick(stage: str, n: int) -> None:
        if stage.startswith("certify:"):  # a certification starts: at most n answers (it stops at a failure)
            if "certify" in bars:
                bars["certify"].close()
            bars["certify"] = progress_bar(n, f"certify {stage.split(':', 1)[1]} (drex greedy answers)", "answer", show)
        else:
            bars[stage].update(n)

    command = "drex " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        result = calibrate(
            model,
            prompts,
            target=args.target_agreement,
            delta=args.delta,
            bound=args.bound,
            max_new_tokens=max_new_tokens,
            rows=args.rows,
            holdout_rows=args.holdout_rows,
            decision_rows=args.decision_rows,
            context=args.context,
            long_context=args.long_context,
            repeats=args.repeats,
            seed=args.seed,
            command=command,
            progress=tick,
            observations=observations,
            measures=args.measures,
            min_speedup=args.min_speedup,
            metric=args.metric,
            sequence_target=sequence_target,
        )
    finally:
        for bar in bars.values():
            bar.close()
    device_key = next(iter(result["cost_models"]))
    if args.choose_policy:
        choose_policy(model, prompts, result["cost_models"][device_key], args, max_new_tokens, show)
    save(result, folder, plot(result, device_key))
    print(summary(result, device_key))
    print(f"wrote {folder / CALIBRATION_NAME} and {folder / PLOT_NAME}")
    return 0


def source_list(text: str) -> list[str]:
    from drex_hf.config import DRAFT_SOURCES

    sources = [s.strip() for s in text.split(",") if s.strip()]
    wrong = [s for s in sources if s not in DRAFT_SOURCES]
    if wrong or not sources:
        raise argparse.ArgumentTypeError(f"draft sources are some of {', '.join(DRAFT_SOURCES)}, got {text!r}")
    return sources


def draft_tokens_list(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "adaptive":
            out.append(part)
            continue
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"k must be positive integers or 'adaptive', got {text!r}")
        out.append(int(part))
    return out


def chat_prompts(model: Any, spelling: str, count: int, seed: int) -> list[torch.Tensor]:
    """--choice-prompts: `count` prompts drawn from the named sets or files, each in the chat template."""
    from drex_hf.cli.common import encode_prompts
    from drex_hf.training.prompts import draw_prompts as draw_texts

    sets = [s.strip() for s in spelling.split(",") if s.strip()]
    for name in sets:
        if name not in ("chat", "shakespeare", "kjv") and not Path(name).is_file():
            raise CalibrationDataError(f"--choice-prompts: {name!r} is neither chat, shakespeare, kjv nor a file")
    texts = [text for _, text in draw_texts(sets, count, seed)]
    batch = encode_prompts(tokenizer_for(model), texts, "auto", torch.device("cpu"))
    return [ids[mask.bool()].to(model.heads_device) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def answer_ends(model: Any) -> list[int]:
    """The token ids a chat answer ends at: the tokenizer's eos and, where it has one, <|im_end|>."""
    tokenizer = tokenizer_for(model)
    ends = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return [t for t in dict.fromkeys(ends) if isinstance(t, int) and t != tokenizer.unk_token_id]


def build_corpus(model: Any, folder: Path, count: int, seed: int, show: bool) -> None:
    """--draft-corpus: full depth's answers to `count` prompts, saved beside the heads and used at once."""
    from drex_hf.calibration.choice import model_answers
    from drex_hf.generation.spec.ngram import DRAFT_CORPUS_NAME, CorpusIndex, write_draft_corpus

    prompts = chat_prompts(model, "chat,shakespeare,kjv", count, seed)
    bar = progress_bar(len(prompts), "draft corpus (full-depth answers)", "answer", show)
    try:
        answers = model_answers(model, prompts, 128, answer_ends(model), progress=lambda _: bar.update(1))
    finally:
        bar.close()
    write_draft_corpus(folder / DRAFT_CORPUS_NAME, answers)
    model.draft_corpus = CorpusIndex(answers)
    print(f"wrote {folder / DRAFT_CORPUS_NAME}: {sum(map(len, answers))} tokens of {len(answers)} answers, "
          f"{len(model.draft_corpus)} contexts")  # fmt: skip


def build_draft_vocab(folder: Path, args: argparse.Namespace) -> int:
    """--draft-vocab COVERAGE: the frequency-ranked subset of the draft corpus's tokens, saved beside the heads."""
    from drex_hf.generation.spec.ngram import DRAFT_CORPUS_NAME, read_corpus_answers
    from drex_hf.generation.spec.vocab import DRAFT_VOCAB_NAME, subset_for_coverage, write_draft_vocab

    if args.data is not None or args.reuse_observations or args.choose_policy:
        raise CalibrationDataError(
            "--draft-vocab runs alone: drop --data, --reuse-observations and --choose-policy (build the corpus first "
            "with --choose-policy --draft-corpus N)"
        )
    if not (folder / DRAFT_CORPUS_NAME).is_file():
        raise CalibrationDataError(
            f"--draft-vocab ranks the model's own answers in {folder / DRAFT_CORPUS_NAME}, which is missing: "
            "build it with --choose-policy --draft-corpus N"
        )
    # the ids are the model's own tokens; from_pretrained checks them against its vocabulary when it loads them
    chosen = subset_for_coverage(read_corpus_answers(folder / DRAFT_CORPUS_NAME), args.draft_vocab)
    write_draft_vocab(folder / DRAFT_VOCAB_NAME, chosen)
    held = chosen["coverage_held_out"]
    print(f"wrote {folder / DRAFT_VOCAB_NAME}: {chosen['size']} tokens cover {chosen['coverage_fit']:.1%} of the "
          f"{chosen['ranked_on']} answers ranked" + (f" and {held:.1%} of {chosen['checked_on']} answers not ranked"
                                                     if held is not None else ""))  # fmt: skip
    print("  size  coverage (ranked)  coverage (not ranked)")
    for row in chosen["table"]:
        other = "" if row["coverage_held_out"] is None else f"{row['coverage_held_out']:.1%}"
        print(f"{row['size']:6d}  {row['coverage_fit']:17.1%}  {other:>21}")
    return 0


def load_uncalibrated(folder: Path, args: argparse.Namespace) -> Any:
    """The heads in `folder` on --device in --dtype, without their calibration (it is being made)."""
    from drex_hf import EarlyExitModelForCausalLM

    device = pick_device(args.device)
    return EarlyExitModelForCausalLM.from_pretrained(
        folder, dtype=pick_dtype(args.dtype, device), device=device, calibration=False
    ).eval()


def build_draft_priors(folder: Path, args: argparse.Namespace) -> int:
    """--draft-priors N: full depth's answers to N prompts, the text drafts a row would make at each
    of their positions, and per kind of draft how many of its tokens the answer continues with,
    saved beside the heads as draft_priors.json (`spec.priors`)."""
    from drex_hf.calibration.choice import model_answers
    from drex_hf.generation.spec.priors import DRAFT_PRIORS_NAME, fit_draft_priors, write_draft_priors

    if args.data is not None or args.reuse_observations or args.choose_policy or args.draft_corpus:
        raise CalibrationDataError(
            "--draft-priors runs alone: drop --data, --reuse-observations, --choose-policy and --draft-corpus"
        )
    model = load_uncalibrated(folder, args)
    sets = args.choice_prompts or "chat,shakespeare,kjv"
    prompts = chat_prompts(model, sets, args.draft_priors, args.seed + 3)
    show = not args.no_progress
    bar = progress_bar(len(prompts), "draft priors (full-depth answers)", "answer", show)
    try:
        answers = model_answers(model, prompts, args.max_new_tokens or 128, answer_ends(model),
                                progress=lambda _: bar.update(1))  # fmt: skip
    finally:
        bar.close()
    pairs = [(p.tolist(), a) for p, a in zip(prompts, answers)]
    priors = fit_draft_priors(pairs, model.draft_corpus, k_max=args.draft_priors_k)
    write_draft_priors(folder / DRAFT_PRIORS_NAME, priors, prompts=sets, seed=args.seed + 3,
                       command="drex calibrate " + " ".join(sys.argv[1:]))  # fmt: skip
    print(
        f"wrote {folder / DRAFT_PRIORS_NAME}: {len(answers)} answers, {sum(map(len, answers))} tokens"
        + ("" if model.draft_corpus is not None else " (the folder has no draft corpus: no corpus class)")
    )
    print("  class    rounds  P(first j drafts all accepted), j = 1..")
    for cls, curve in priors.curves.items():
        rounds = priors.fitted_on["rounds"][cls]
        print(f"  {cls:8s} {rounds:6d}  " + " ".join(f"{p:.2f}" for p in curve))
    return 0


def choose_policy(
    model: Any, prompts: list[torch.Tensor], entry: dict, args: argparse.Namespace, max_new_tokens: int, show: bool
) -> None:
    """`--choose-policy`: time the policies with this device's thresholds and record the choice in `entry`."""
    from drex_hf.calibration.choice import measure_policies
    from drex_hf.config import parse_threshold

    if args.choice_prompts is not None:
        prompts = chat_prompts(model, args.choice_prompts, args.choice_prompt_count, args.seed)
    if not prompts:
        raise CalibrationDataError(
            "--choose-policy times decoding on prompts: give --data or --choice-prompts (not only --reuse-observations)"
        )
    if args.draft_corpus > 0:
        build_corpus(model, Path(args.model), args.draft_corpus, args.seed + 2, show)
    check = None
    if args.choice_check_prompts is not None:
        check = chat_prompts(model, args.choice_check_prompts, args.choice_prompt_count, args.seed + 1)
    model.exit_config.thresholds = [parse_threshold(t, "thresholds") for t in entry["thresholds"]]
    model.exit_config.confidence = entry.get("confidence", model.exit_config.confidence)
    exits = args.draft_exits or list(model.exit_layers)
    rounds = len(args.choice_batch_sizes) * args.repeats * (2 if check else 1)
    bar = progress_bar(rounds, "choose policy (timed decoding)", "repeat", show)
    try:
        entry["policy_choice"] = measure_policies(
            model,
            prompts,
            batch_sizes=args.choice_batch_sizes,
            max_new_tokens=max_new_tokens,
            draft_exits=exits,
            draft_tokens=args.draft_tokens,
            draft_sources=args.draft_sources,
            repeats=args.repeats,
            margin=args.min_speedup,
            check_prompts=check,
            eos=answer_ends(model) if args.choice_prompts is not None else (),
            lossless=args.choice_lossless,
            progress=lambda _: bar.update(1),
        )
    finally:
        bar.close()


def summary(result: dict, device: str) -> str:
    from drex_hf.calibration.calibrate import guarantee_cell, shown_thresholds
    from drex_hf.calibration_file import guarantee_kind

    g, entry = result["guarantee"], result["cost_models"][device]
    observed = f"observed {result['observations']['tokens']} tokens from {result['observations']['prompts']} prompts"
    if guarantee_kind(g) == "token_agreement":
        lines = [
            f"{observed} (learn {g['learn_tokens']}, test {g['test_tokens']})",
            f"guaranteed thresholds per exit {result['exit_layers']}: {shown_thresholds(g['thresholds'])} — test "
            f"agreement {g['test_agreement']:.4f} >= {g['target_agreement']} with probability >= "
            f"{1 - g['delta']:.2f} ({g['bound']} bound); exits: " + ", ".join(f"{f:.1%}" for f in g["exit_fractions"]),
        ]
    else:
        lines = [f"{observed} (learn {g['learn_prompts']} prompts, test {g['prompts']})", *sequence_lines(g, result)]
    lines.append(f"guarantee of the thresholds used on {device}: {guarantee_cell(entry['guarantee'])}")
    paying = entry["exits_paying"]
    if not any(paying):
        lines.append(f"on {device} no exit point pays at {entry['decision_rows']} rows: every exit is off here")
    else:
        off = [str(e) for e, p in zip(result["exit_layers"], paying) if not p]
        lines.append(f"exits switched off on {device} (they cost more than they save): {', '.join(off) or 'none'}")
    used = shown_thresholds(entry["thresholds"])
    measure = entry.get("confidence", result["confidence"])
    lines.append(
        f"thresholds used on {device}: {used} with the {measure} measure (test agreement {entry['test_agreement']:.4f})"
    )
    refused = {
        m: o["exit_choice"][-1]["reason"]
        for m, o in entry.get("measures", {}).items()
        if "reason" in o["exit_choice"][-1]
    }
    for m, reason in refused.items():
        lines.append(f"{m}: its paying exits promised {reason}, so they stay off")
    if len(entry.get("measures", {})) > 1:
        lines.append(
            "expected speed-up per measure: "
            + ", ".join(
                f"{m} {o['expected_speedup']:.2f}x" if o["expected_speedup"] else f"{m} n/a"
                for m, o in entry["measures"].items()
            )
        )
    speed, err = entry["expected_speedup"], entry["prediction_error"]
    if speed is not None and math.isfinite(speed):
        lines.append(f"expected speed-up over full depth at {entry['decision_rows']} rows: {speed:.2f}x")
    lines.append(
        f"cost fit error on held-out row counts {err['rows']} at {err.get('contexts', '?')} cached positions: "
        f"median {err['median']:.1%}, p95 {err['p95']:.1%}"
    )
    lines += choice_lines(entry.get("policy_choice"))
    return "\n".join(lines)


def choice_lines(choices: dict | None) -> list[str]:
    """Per batch size: the policy chosen, why, and every policy's measured speed and quality."""
    from drex_hf.calibration_file import describe_choice

    lines = []
    for batch, choice in (choices or {}).items():
        policy = describe_choice(choice)
        lines.append(f"policy at batch {batch}: {policy} — {choice['reason']}")
        if "checked" in choice:
            c = choice["checked"]
            lines.append(f"  on {c['prompts']} prompts it was not chosen on: {c['ratio']:.2f}x full depth "
                         f"({c['error']:+.0%} against the choice's)")  # fmt: skip
        for name, row in choice["measured"].items():
            extra = f", acceptance {row['acceptance_rate']:.0%}" if "acceptance_rate" in row else ""
            lines.append(
                f"  {name}: {row['tokens_per_s']:.1f} tokens/s ({row['ratio']:.2f}x full), exact {row['exact']:.0%}, "
                f"ROUGE-L {row['rouge_l']:.3f}{extra}"
            )
    return lines


def sequence_lines(g: dict, result: dict) -> list[str]:
    """What a sequence certification found: the thresholds and the guarantee, the share of tokens that
    still exit, and where the fixed sequence of candidates stopped."""
    from drex_hf.calibration.calibrate import shown_thresholds

    tested = g["tested"]
    generated = [c for c in tested if any(t != "inf" for t in c["thresholds"])]
    failed = next((c for c in generated if not c["rejected"]), None)
    stop = (
        f"stopped at candidate {tested.index(failed) + 1} of those tried (mean {failed['mean_score']:.4f}, "
        f"p = {failed['p_value']:.3g} > delta {g['delta']})"
        if failed
        else "every candidate passed"
    )
    if not any(t != "inf" for t in g["thresholds"]):
        first = f": {stop}" if generated else ": the learn prompts gave no threshold with an exit to try"
        return [f"no thresholds with an exit passed the sequence test ({g['metric']} >= {g['target']}){first}; every "
                "exit stays off (full depth)"]  # fmt: skip
    return [
        f"certified thresholds per exit {result['exit_layers']}: {shown_thresholds(g['thresholds'])} — drex's greedy "
        f"answers score a mean {g['metric']} of {g['mean_score']:.4f} on {g['prompts']} test prompts: the mean on new "
        f"prompts is >= {g['target']} with probability >= {1 - g['delta']:.2f} ({g['bound']} bound)",
        f"tokens that still exit under them (test answers): {g['exiting']:.1%} (exits "
        + ", ".join(f"{f:.1%}" for f in g["exit_fractions"])
        + f"); {len(generated)} candidate(s) generated, {stop}",
    ]
