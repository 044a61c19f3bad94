"""`drex bench`: every policy on the same prompts in one process — speed, latency, exits, quality.

    drex bench model_cards/smollm2-135m-drex --prompts prompts.txt --batch-sizes 1,8,32 --out runs/bench
    drex bench --synthetic-config llama-7b --exit-dist 0.2,0.25,0.2,0.35 --device cuda --batch-sizes 8,64,256
    drex bench --synthetic-config moderate --policies full,self_spec --acceptance 0.6,0.8,0.9

A heads folder runs with its real confidences (and its calibration, when it has one); a synthetic
config is a random-weight model of a named shape whose exits come from `--exit-dist` or
`--exit-trace` — there only speed means anything, the tokens do not. Self-speculative rows
(`self_spec@EXIT/K`) draft with a heads folder's own heads, or, in trace mode (a synthetic config,
`--exit-dist` or `--exit-trace`), accept each draft with each `--acceptance` probability.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import (
    DTYPES,
    HelpFormatter,
    count_list,
    int_list,
    pick_device,
    pick_dtype,
    positive_float,
    positive_int,
    progress_bar,
    seed_value,
)
from drex_hf.errors import ConfigError, GenerationInputError, ModelNotFoundError


def add_parser(sub: Any) -> None:
    from drex_hf.bench.run import POLICIES
    from drex_hf.bench.synthetic import SHAPES

    parser = sub.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description="Run every policy on the same prompts and seeds in one process (stepped round-robin, each "
        "timing its own steps), with HF's own generate as the reference, and print one table: decode tokens/s, "
        "time per output token, speed-ups, exits per layer, involuntary and missed exits, agreement and ROUGE-L "
        "against full depth, memory (KV cache, row state, peak decode allocations), and two oracles: full x L / "
        "drex's mean exit depth, and drex's exits re-run at no exit cost on this machine; self-speculative "
        "rows (self_spec) in a section of their own: acceptance, tokens per round, layers per token (draft + "
        "verify), their layer-count ceiling. Writes bench.json, bench.md, speed.png, exits.png and (with "
        "self_spec rows) self_spec.png into --out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model", nargs="?", metavar="MODEL_DIR", help="an exit-heads folder (omit with --synthetic-config)"
    )
    parser.add_argument(
        "--synthetic-config",
        choices=tuple(SHAPES),
        default=None,
        help="a random-weight model of this shape instead (exits from --exit-dist or --exit-trace)",
    )
    parser.add_argument(
        "--thresholds",
        default="calibrated",
        help="heads folder: 'calibrated' (this device's calibration entry, as from_pretrained applies it), "
        "'guaranteed' (the calibration's device-independent thresholds), 'trained' (exit_config.json's), or "
        "comma-separated values (one, or one per exit)",
    )
    parser.add_argument(
        "--confidence",
        choices=("max_prob", "margin", "classifier", "saturation"),
        default=None,
        help="heads folder: score exits with this measure instead of the one --thresholds comes with",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="a text file, one prompt per line, or .jsonl with a 'prompt' field per line (default: drawn from the "
        "chat and Shakespeare sets)",
    )
    parser.add_argument(
        "--num-prompts", type=positive_int, default=None, help="prompts to use (default: the largest batch)"
    )
    parser.add_argument("--chat", choices=("auto", "on", "off"), default="auto", help="chat template for --prompts")
    parser.add_argument("--batch-sizes", type=count_list, default=[1, 8, 32], help="batch sizes to run, each once")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated; drex@SLACK sets its slack, NAME:eager runs that engine without CUDA graphs "
        "(e.g. full,full:eager to compare them); self_spec@EXIT/K is a self-speculative row drafting K tokens "
        "(or K=adaptive) per round from exit layer EXIT, self_spec@EXIT/K/aP one accepting each draft with "
        "probability P (trace mode); a plain self_spec is a row per --draft-exits x --draft-tokens "
        "(x --acceptance), self_spec@EXIT one per --draft-tokens; self_spec@ngram/K drafts up to K tokens from "
        "each row's own prompt and tokens (prompt lookup, batched), self_spec@ngram+EXIT/K from its text where "
        "it matches, else from EXIT's head",
    )
    parser.add_argument(
        "--draft-exits",
        type=int_list,
        default=None,
        help="the draft exits a plain self_spec expands into (default: every exit point)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=draft_tokens_list,
        default=None,
        help="the k a plain self_spec (or self_spec@EXIT) expands into: positive integers or 'adaptive' "
        "(default: 1,2,4,adaptive)",
    )
    parser.add_argument(
        "--acceptance",
        type=acceptance_list,
        default=None,
        help="trace mode (a synthetic config, --exit-dist or --exit-trace): run each self_spec row at each of "
        "these draft acceptance probabilities, as self_spec@EXIT/K/aP (e.g. 0.6,0.8,0.9)",
    )
    parser.add_argument("--exit-dist", default=None, help="P(exit) per exit point, then full depth (trace exits)")
    parser.add_argument(
        "--exit-trace",
        default=None,
        help="per-request exit layers to replay: a JSON list of lists (one per request), given inline "
        "(e.g. '[[3,0,1],[3,2,2]]') or as a file holding it (or {\"exit_layers\": ...})",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per batch; the median run counts")
    parser.add_argument("--no-hf", action="store_true", help="skip timing HF's own generate")
    parser.add_argument(
        "--hf-lossless",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time HF's own lossless tricks on the same prompts: generate(prompt_lookup_num_tokens=10) and "
        "generate(assistant_early_exit=first exit + 1); HF refuses them at batch > 1, and the table says so "
        "(default: off)",
    )
    parser.add_argument(
        "--hf-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time HF's fastest path: generate(cache_implementation='static'), which transformers "
        "compiles itself on CUDA (torch.compile, mode='reduce-overhead'); default: on for CUDA unless --no-hf",
    )
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engines' programs as CUDA graphs, captured at start-up (default: on for CUDA)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="synthetic configs: every prompt this many tokens long (default: 8-64 random tokens), so long "
        "contexts, where keys/values dominate a step, are measured",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one policy's engine at a time instead of all interleaved (for key/value stores too large to "
        "hold side by side, e.g. a 7B shape at a long context)",
    )
    parser.add_argument(
        "--gpu-busy",
        action="store_true",
        help="CUDA: also decode each policy once under torch.profiler and report the share of wall time "
        "the GPU's kernels were busy",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the untimed memory pass per policy (row state and peak decode allocations)",
    )
    parser.add_argument(
        "--no-measured-oracle",
        action="store_true",
        help="skip the measured oracle (drex's exits re-run at no exit cost against full depth, untimed in the table)",
    )
    parser.add_argument(
        "--sla-tpot-ms",
        type=positive_float,
        default=None,
        help="instead of the table: an SLA run — requests arrive as a Poisson process at --request-rate into an "
        "engine of the largest batch size; per policy, the requests whose time per output token stays within "
        "this many ms, per second (goodput)",
    )
    parser.add_argument(
        "--request-rate", type=positive_float, default=4.0, help="arrivals per second for --sla-tpot-ms"
    )
    parser.add_argument(
        "--sweep-thresholds",
        type=float_list,
        default=None,
        help="instead of the table: for each threshold (one for every exit), each policy's speed-up and agreement "
        "with full depth at the largest batch size, drawn as a quality-vs-speed plot (sweep.png)",
    )
    parser.add_argument(
        "--sweep-depths",
        type=float_list,
        default=None,
        help="instead of the table (synthetic configs): mean exit depths as fractions of L, e.g. 0.5,0.65,0.8,0.95; "
        "drex's gain over batch_all and full at each depth x batch size, drawn as a heat map (heatmap.png)",
    )
    parser.add_argument(
        "--fit-memory",
        type=positive_float,
        default=None,
        metavar="GIB",
        help="synthetic configs: before anything is allocated, add up weights, key/value stores (one engine at a "
        "time with --sequential, else one per policy, and HF's cache), fill weights, row state and a graph pool, "
        "and shrink the largest batch (then the context) until it fits this many GiB, saying so (default: no check)",
    )
    parser.add_argument(
        "--lazy-capture",
        action="store_true",
        help="capture each CUDA graph the first time a step needs it (only the buckets steps use) instead of every "
        "bucket's at start-up; the warm-up run pays the capture",
    )
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of prompt draws and trace exits")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, else float32"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json and the plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    parser.set_defaults(run=run)


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _comma_values(text: str, parse: Any, expected: str) -> list:
    """argparse helper: each comma-separated value of `text` through `parse(value, repr(text))`,
    duplicates dropped; an empty list or a value `parse` refuses is an ArgumentTypeError."""
    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    try:
        return list(dict.fromkeys(parse(v, repr(text)) for v in values))
    except GenerationInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def draft_tokens_list(text: str) -> list[int | str]:
    """argparse type for --draft-tokens: '1,2,4,adaptive'."""
    from drex_hf.bench.run import draft_tokens_value

    return _comma_values(text, draft_tokens_value, "positive integers or 'adaptive'")


def acceptance_list(text: str) -> list[float]:
    """argparse type for --acceptance: '0.6,0.8,0.9', each a probability."""
    from drex_hf.bench.run import acceptance_value

    return _comma_values(text, acceptance_value, "probabilities in [0, 1]")


def _exit_points(args: argparse.Namespace) -> list[int]:
    """The model's exit points, read before it loads (a synthetic shape's, or exit_config.json's)."""
    from drex_hf.config import CONFIG_NAME, EarlyExitConfig

    if args.synthetic_config:
        from drex_hf.bench.synthetic import SHAPES

        return SHAPES[args.synthetic_config].exits
    path = Path(args.model) / CONFIG_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{args.model} is not an exit-heads folder (no {CONFIG_NAME})")
    return list(EarlyExitConfig.from_json_file(path).exit_layers)


def _spec_policies(args: argparse.Namespace, policies: list[str]) -> list[str]:
    """The policies with every self_spec spelling expanded into rows (`expand_policies`), after the
    checks that need no model: trace mode for an acceptance, an acceptance on a synthetic config
    (whose random heads' drafts would mean nothing), no option that no row uses."""
    from drex_hf.bench.run import DRAFT_TOKENS, expand_policies, is_spec, parse_spec

    specs = [parse_spec(p) for p in policies if is_spec(p)]
    trace = bool(args.synthetic_config or args.exit_dist or args.exit_trace)
    if not specs:
        given = [o for o, v in (("--draft-exits", args.draft_exits), ("--draft-tokens", args.draft_tokens),
                                ("--acceptance", args.acceptance)) if v is not None]  # fmt: skip
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise GenerationInputError(f"{' and '.join(given)} {verb} to self_spec rows; --policies names none")
        return policies
    if args.draft_exits is not None and all(s.draft_exit is not None for s in specs):
        raise GenerationInputError("--draft-exits fills in a plain self_spec; every self_spec row here names its exit")
    if args.draft_tokens is not None and all(s.draft_tokens is not None for s in specs):
        raise GenerationInputError("--draft-tokens fills in self_spec rows without K; every row here names its K")
    if args.acceptance is not None and all(s.acceptance is not None for s in specs):
        raise GenerationInputError("--acceptance fills in self_spec rows without /aP; every row here names its P")
    if args.sweep_thresholds or args.sweep_depths:
        raise GenerationInputError(
            "self_spec rows run in the table and --sla-tpot-ms, not in the sweeps (their tokens depend on "
            "neither thresholds nor exit depths)"
        )
    named = any(s.acceptance is not None for s in specs)
    if not trace and (args.acceptance is not None or named):
        raise GenerationInputError(
            "a self_spec acceptance (--acceptance or /aP) is trace mode: it needs --synthetic-config, --exit-dist "
            "or --exit-trace; with a heads folder alone, self_spec rows measure their own heads' acceptance"
        )
    if args.synthetic_config and args.acceptance is None and not all(s.acceptance is not None for s in specs):
        raise GenerationInputError(
            "self_spec rows on a synthetic config need --acceptance (or /aP): random heads' drafts mean nothing"
        )
    exits = _exit_points(args)
    return expand_policies(policies, exits, args.draft_exits, args.draft_tokens or DRAFT_TOKENS, args.acceptance)


def _number(text: str) -> float | str:
    text = text.strip()
    return text if text.lower() in ("inf", "+inf", "infinity") else float(text)


def _load_heads(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> Any:
    """The heads folder with the thresholds --thresholds names."""
    from drex_hf import EarlyExitModelForCausalLM
    from drex_hf.config import CALIBRATION_NAME, parse_threshold

    choice = args.thresholds
    calibrated = choice == "calibrated"
    model = EarlyExitModelForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, calibration=calibrated)
    if choice in ("calibrated", "trained"):
        return model.eval()
    if choice == "guaranteed":
        from drex_hf.calibration_file import read_calibration
        from drex_hf.fileio import sha256_file
        from drex_hf.modeling import WEIGHTS_NAME

        path = Path(args.model) / CALIBRATION_NAME
        if not path.is_file():
            raise ModelNotFoundError(f"--thresholds guaranteed: {path} does not exist (run drex calibrate)")
        heads = model.exit_config.weights_sha256 or sha256_file(Path(args.model) / WEIGHTS_NAME)
        data = read_calibration(path, list(model.exit_layers), heads)  # the checks from_pretrained makes
        values = [parse_threshold(t, "the guaranteed thresholds") for t in data["guarantee"]["thresholds"]]
        model.exit_config.confidence = data.get("confidence", model.exit_config.confidence)
    else:
        try:
            values = [parse_threshold(_number(t), "--thresholds") for t in choice.split(",")]
        except (ValueError, ConfigError):
            raise ConfigError(
                f"--thresholds {choice!r}: use calibrated, guaranteed, trained or comma-separated numbers"
            ) from None
        if len(values) == 1:
            values = values * len(model.exit_layers)
        if len(values) != len(model.exit_layers):
            raise ConfigError(f"--thresholds gives {len(values)} values for {len(model.exit_layers)} exits")
    model.exit_config.thresholds = values
    return model.eval()


def _exits(args: argparse.Namespace, model: Any) -> Any:
    from drex_hf.bench.run import parse_distribution
    from drex_hf.generation.exits import ExitReplay, check_trace_row

    if args.exit_dist and args.exit_trace:
        raise GenerationInputError("--exit-dist and --exit-trace exclude each other: pick one")
    if args.exit_dist:
        dist = parse_distribution(args.exit_dist, seed=args.seed)
        dist.check(len(model.exit_layers))
        return dist
    if args.exit_trace:
        rows = args.trace_rows
        for i, row in enumerate(rows):
            check_trace_row(row, model.exit_layers, model.num_layers, f"--exit-trace row {i}")
        return ExitReplay.from_output(rows)
    return None


def trace_rows(given: str) -> list[list[int]]:
    """`--exit-trace`: inline JSON (it starts with [ or {) or a file holding it; a list of
    per-request exit-layer lists, bare or under "exit_layers"."""
    inline = given.lstrip().startswith(("[", "{"))
    if inline:
        where, text = "--exit-trace (inline JSON)", given
    else:
        path = Path(given)
        where = f"--exit-trace {given}"
        if path.is_dir():
            raise GenerationInputError(f"{where} is a folder; give a JSON file or the JSON itself")
        if not path.is_file():
            raise ModelNotFoundError(f"{where}: no such file (inline JSON starts with '[')")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GenerationInputError(f"{where} is not a text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise GenerationInputError(f"{where} is not JSON ({err})") from None
    rows = data.get("exit_layers", data) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise GenerationInputError(f"{where}: expected a list of per-request exit-layer lists")
    return rows


def _prompts(args: argparse.Namespace, model: Any, count: int) -> tuple[list[torch.Tensor], Any]:
    from drex_hf.bench.run import random_prompts

    if args.synthetic_config:
        if args.prompts:
            raise GenerationInputError(
                "--prompts needs a real model's tokenizer; a synthetic config uses random tokens"
            )
        low, high = (args.context, args.context) if args.context else (8, 64)
        return random_prompts(count, low, high, model.arch.vocab_size, args.seed), None
    from drex_hf.cli.common import encode_prompts, tokenizer_for

    if args.context:
        raise GenerationInputError("--context sets synthetic prompts' length; a heads folder's prompts are real text")

    tokenizer = tokenizer_for(model)
    if args.prompts is None:
        from drex_hf.training.prompts import draw_prompts

        texts = [text for _, text in draw_prompts(["chat", "shakespeare"], count, seed=1000 + args.seed)]
    else:
        if not args.prompts.is_file():
            raise ModelNotFoundError(f"--prompts {args.prompts}: no such file")
        if args.prompts.suffix == ".jsonl":  # one JSON object per line with a "prompt" (passages span lines)
            from drex_hf.training.prompts import read_prompt_file

            texts = read_prompt_file(args.prompts)
        else:
            texts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise GenerationInputError(f"--prompts {args.prompts} holds no prompt (one per line)")
    batch = encode_prompts(tokenizer, texts[:count], args.chat, torch.device("cpu"))  # the chat template, once
    out = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return out, tokenizer


def _fit_memory(args: argparse.Namespace, policies: list[str], dtype: torch.dtype) -> dict:
    """`--fit-memory`: the batch sizes and context that fit the budget (`bench.preflight`), set on
    `args` before the model is built, each change printed on one line."""
    from drex_hf.bench.preflight import memory_plan
    from drex_hf.bench.run import is_spec

    if not args.synthetic_config:
        raise ConfigError("--fit-memory sizes a synthetic config's run; a heads folder's model is what it is")
    engines = 1 if args.sequential else len(policies) + (0 if args.no_hf else 1)
    fills = any(not is_spec(p) and p.partition(":")[0].partition("@")[0] != "full" for p in policies)
    context = args.context or 64
    plan = memory_plan(args.synthetic_config, torch.tensor([], dtype=dtype).element_size(), list(args.batch_sizes),
                       context, args.max_new_tokens, engines, fills, args.fit_memory)  # fmt: skip
    for note in plan.notes:
        print(f"fit-memory: {note}", file=sys.stderr)
    if not plan.fits:
        raise GenerationInputError(
            f"--fit-memory {args.fit_memory:g}: even batch {plan.batch_sizes[-1]} at context {plan.context} needs "
            f"{plan.need_bytes / 2**30:.1f} GiB"
        )
    args.batch_sizes = plan.batch_sizes
    if args.context is not None:
        args.context = plan.context
    return {"budget_gib": args.fit_memory, "need_gib": plan.need_bytes / 2**30, "notes": plan.notes,
            "engines_alive": engines}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from drex_hf.bench import report
    from drex_hf.bench.run import bench, check_policies, parse_distribution, policy_name
    from drex_hf.device import device_name
    from drex_hf.fileio import check_output_folder

    if bool(args.model) == bool(args.synthetic_config):
        raise ConfigError("name an exit-heads folder (MODEL_DIR) or --synthetic-config NAME, not both or neither")
    if args.confidence and args.synthetic_config:
        raise ConfigError("--confidence applies to a heads folder; a synthetic config's exits come from a trace")
    if args.sweep_thresholds and args.sweep_depths:
        raise ConfigError("--sweep-thresholds and --sweep-depths are separate runs: pick one")
    if args.sweep_depths and not args.synthetic_config:
        raise ConfigError("--sweep-depths draws trace exits: it needs --synthetic-config")
    if args.sweep_thresholds and args.synthetic_config:
        raise ConfigError(
            "--sweep-thresholds needs real heads (a MODEL_DIR): a synthetic config's confidences mean nothing"
        )
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    check_policies(policies)  # before the model loads
    early = [p for p in policies if policy_name(p) not in ("full", "self_spec")]
    if args.synthetic_config and early and not (args.exit_dist or args.exit_trace or args.sweep_depths):
        raise ConfigError("a synthetic config has untrained heads: give its exits with --exit-dist or --exit-trace")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise GenerationInputError("--max-new-tokens and --repeats must be positive")
    if args.context is not None and args.context < 1:
        raise GenerationInputError(f"--context must be a positive number of tokens, got {args.context}")
    if args.max_new_tokens < 2:
        raise GenerationInputError(
            "--max-new-tokens must be at least 2: the first token comes from the prefill, and decode speed is "
            "measured on the tokens after it"
        )
    if args.exit_dist and not args.exit_trace:  # their JSON / numbers before the model loads; the layers after
        parse_distribution(args.exit_dist, seed=args.seed)
    args.trace_rows = trace_rows(args.exit_trace) if args.exit_trace else None  # read once, checked before the load
    policies = _spec_policies(args, policies)
    check_output_folder(args.out, "--out")  # before the run, whose results would otherwise be lost
    device = pick_device(args.device)
    if args.graphs and device.type != "cuda":
        raise GenerationInputError(f"--graphs captures CUDA graphs: it needs a CUDA device, not {device}")
    dtype = pick_dtype(args.dtype, device)
    fitted = _fit_memory(args, policies, dtype) if args.fit_memory is not None else None
    if args.synthetic_config:
        from drex_hf.bench.synthetic import synthetic_model

        model = synthetic_model(args.synthetic_config, dtype, device, seed=args.seed)
    else:
        from drex_hf.config import CONFIG_NAME

        if not (Path(args.model) / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{args.model} is not an exit-heads folder (no {CONFIG_NAME})")
        model = _load_heads(args, dtype, device)
        if args.confidence:
            model.exit_config.confidence = args.confidence
    exits = _exits(args, model)
    count = args.num_prompts or max(args.batch_sizes)
    prompts, tokenizer = _prompts(args, model, count)
    if args.sweep_thresholds or args.sweep_depths:
        return _sweep(args, model, prompts, tokenizer, policies)
    if args.sla_tpot_ms is not None:
        return _sla(args, model, prompts, exits, policies)
    total = len(args.batch_sizes) * args.repeats
    bar = progress_bar(total, "bench (batch sizes x repeats)", "run", not args.no_progress)
    try:
        results = bench(
            model,
            prompts,
            args.batch_sizes,
            args.max_new_tokens,
            policies,
            exits,
            args.repeats,
            hf=not args.no_hf,
            tokenizer=tokenizer,
            progress=bar.update,
            memory=not args.no_memory,
            oracle=not args.no_measured_oracle,
            hf_static=not args.no_hf and (args.hf_compile if args.hf_compile is not None else device.type == "cuda"),
            hf_lossless=args.hf_lossless and not args.no_hf,
            sequential=args.sequential,
            gpu_busy=args.gpu_busy and device.type == "cuda",
            trace_seed=args.seed,
            **({} if args.graphs is None else {"graphs": args.graphs}),
            **({"lazy_capture": True} if args.lazy_capture else {}),
        )
    finally:
        bar.close()
    machine = f"{device_name(device)}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.type == "cpu":
        machine += f", {torch.get_num_threads()} threads"
    source = args.model or f"synthetic {args.synthetic_config} (random weights: only speed means anything)"
    table = report.render(results, model.num_layers, model.exit_layers, machine)
    document = {
        "model": source,
        "machine": machine,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "num_layers": model.num_layers,
        "vocab_size": model.config.vocab_size,
        "exit_layers": list(model.exit_layers),
        "confidence": model.exit_config.confidence,
        "thresholds": [str(t) for t in model.exit_config.threshold_list()],
        "exits": None if exits is None else type(exits).__name__,
        "exit_distribution": list(getattr(exits, "probabilities", []) or []) or None,
        "policies": policies,
        "fit_memory": fitted,
        "acceptance": args.acceptance,
        "max_new_tokens": args.max_new_tokens,
        "context": args.context,
        "graphs": args.graphs if args.graphs is not None else device.type == "cuda",
        "repeats": args.repeats,
        "batches": report.to_json(results, model.num_layers),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "bench.md").write_text(table)
    written = report.plots(results, model.num_layers, model.exit_layers, args.out)
    print(table)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}" + "".join(f", {p}" for p in written))
    return 0


def _sweep(
    args: argparse.Namespace, model: Any, prompts: list[torch.Tensor], tokenizer: Any, policies: list[str]
) -> int:
    from drex_hf.bench import sweep

    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep_thresholds:
        batch = max(args.batch_sizes)
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        with progress_bar(len(args.sweep_thresholds), "threshold sweep", "threshold", not args.no_progress) as bar:
            points = sweep.threshold_sweep(
                model, chosen, batch, args.max_new_tokens, args.sweep_thresholds, policies, tokenizer, bar.update
            )
        names = [p for p in points[0]["policies"] if p != "full"]
        lines = [
            f"Threshold sweep, batch {batch}, {args.max_new_tokens} new tokens "
            "(speed-up over full / agreement with full):",
            "",
            "| threshold | " + " | ".join(names) + " | oracle speed-up (layer count / measured) |",
            "|" + " --- |" * (len(names) + 2),
        ]
        for p in points:
            cells = [
                f"{p['policies'][n]['speedup_vs_full']:.2f}x / {p['policies'][n]['agreement_with_full']:.1%}"
                for n in names
            ]
            oracles = [p["oracle_speedup"], p.get("measured_oracle_speedup")]
            oracle = " / ".join("–" if v is None else f"{v:.2f}x" for v in oracles)
            lines.append(f"| {p['threshold']:g} | " + " | ".join(cells) + f" | {oracle} |")
        document, plot = {"kind": "thresholds", "batch": batch, "points": points}, sweep.pareto_plot(points, args.out)
    else:
        total = len(args.sweep_depths) * len(args.batch_sizes)
        with progress_bar(total, "depth sweep", "cell", not args.no_progress) as bar:
            cells = sweep.depth_sweep(
                model,
                prompts,
                args.batch_sizes,
                args.max_new_tokens,
                args.sweep_depths,
                policies,
                args.seed,
                bar.update,
            )
        lines = [
            "drex ÷ batch_all / drex ÷ full, by mean exit depth (rows) and batch size (columns):",
            "",
            "| mean depth | " + " | ".join(str(b) for b in args.batch_sizes) + " |",
            "|" + " --- |" * (len(args.batch_sizes) + 1),
        ]
        for depth in args.sweep_depths:
            row = [c for c in cells if c["mean_depth"] == depth]
            lines.append(
                f"| {depth:g} L | "
                + " | ".join(f"{c['drex_vs_batch_all']:.2f} / {c['drex_vs_full']:.2f}" for c in row)
                + " |"
            )
        document, plot = {"kind": "depths", "cells": cells}, sweep.heatmap_plot(cells, args.out)
    table = "\n".join(lines) + "\n"
    (args.out / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "sweep.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'sweep.md'}" + (f", {plot}" if plot else ""))
    return 0


def _sla(args: argparse.Namespace, model: Any, prompts: list[torch.Tensor], exits: Any, policies: list[str]) -> int:
    from drex_hf.bench.run import sla_run

    rows = []
    bar = progress_bar(len(policies), "SLA runs", "policy", not args.no_progress)
    for policy in policies:
        rows.append(
            sla_run(
                model, prompts, policy, args.max_new_tokens, args.request_rate, args.sla_tpot_ms,
                max(args.batch_sizes), exits, args.seed,
            )
        )  # fmt: skip
        bar.update(1)
    bar.close()
    lines = [
        f"SLA run: {len(prompts)} requests arriving at {args.request_rate:g}/s (Poisson), "
        f"{max(args.batch_sizes)} slots, SLA {args.sla_tpot_ms:g} ms per output token.",
        "",
        "| policy | met SLA | goodput req/s | throughput req/s | TPOT p50 / p99 ms | decode tok/s | involuntary |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['met_sla']}/{r['requests']} | {r['goodput_requests_per_s']:.2f} | "
            f"{r['throughput_requests_per_s']:.2f} | {r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p99']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['involuntary_exits']} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sla.json").write_text(json.dumps({"kind": "sla", "runs": rows}, indent=1) + "\n")
    (args.out / "sla.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'sla.json'}, {args.out / 'sla.md'}")
    return 0
