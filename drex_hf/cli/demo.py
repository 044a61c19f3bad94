"""`drex demo`: the real SmolLM2-135M-Instruct through the early-exit wrapper, offline.

Loads the base (converting the packaged GGUF once) with the exit heads shipped in
model_cards/smollm2-135m-drex/ (trained by `drex train recipes/smollm2-135m.yaml`; --heads picks
another folder, --untrained puts new untrained heads on instead), answers a few chat prompts at full
depth with HF's `generate` and with per-token early exit, and prints the answers, the exit layers,
the exits per layer, tokens/s of both and their token agreement.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import (
    DTYPES,
    HelpFormatter,
    encode_prompts,
    exit_histogram,
    int_list,
    pick_device,
    pick_dtype,
    positive_int,
    threshold_value,
)
from drex_hf.config import EarlyExitConfig, parse_threshold
from drex_hf.device import synchronize
from drex_hf.errors import GenerationInputError, ModelNotFoundError
from drex_hf.generation.api import full_depth_layers
from drex_hf.hub import SMOLLM2_ID
from drex_hf.modeling import EarlyExitModelForCausalLM

SHIPPED_HEADS = Path(__file__).resolve().parents[2] / "model_cards" / "smollm2-135m-drex"

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning Python.",
)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help=COMMANDS["demo"],
        description="Load SmolLM2-135M-Instruct (offline, from the packaged GGUF) through "
        "EarlyExitModelForCausalLM and compare full-depth and early-exit generation.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=SMOLLM2_ID, help="base model (folder or hub id)")
    parser.add_argument(
        "--heads",
        default=None,
        help="saved exit-heads folder (default: the shipped model_cards/smollm2-135m-drex when --model is SmolLM2)",
    )
    parser.add_argument("--untrained", action="store_true", help="put new, untrained 'shared' heads on instead")
    parser.add_argument(
        "--exit-layers", type=int_list, default=None, help="exit layers for --untrained (default: 5,11,17,23)"
    )
    parser.add_argument(
        "--threshold",
        type=threshold_value,
        default=None,
        help="max-prob threshold for --untrained heads, which are right only when very sure (default: 0.999)",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="trained heads: use the thresholds their eval_results.json fitted for this agreement target "
        "(0.9, 0.95, 0.99), or 'saved' for the thresholds in exit_config.json (default: 0.99: a token that "
        "differs changes the rest of the answer, so the demo asks for near-exact tokens)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens per answer")
    parser.add_argument("--no-stream", action="store_true", help="skip the streamed answer at the end")
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.set_defaults(run=run)


def check_options(args: argparse.Namespace) -> bool:
    """Refuse options the chosen heads would ignore; True when trained heads are used."""
    trained = not args.untrained and (args.heads is not None or args.model == SMOLLM2_ID)
    if args.untrained and args.heads is not None:
        raise GenerationInputError("--heads and --untrained exclude each other: pick one")
    if trained:
        ignored = [name for name in ("exit_layers", "threshold") if getattr(args, name) is not None]
        if ignored:
            options = " and ".join("--" + name.replace("_", "-") for name in ignored)
            raise GenerationInputError(
                f"{options} {'apply' if len(ignored) > 1 else 'applies'} to --untrained heads; the trained "
                f"heads ({args.heads or 'shipped'}) keep their own (use --target for their thresholds)"
            )
        target = "0.99" if args.target is None else args.target
        if target != "saved":
            try:
                wanted = float(target)
            except ValueError:
                wanted = math.nan
            if not 0 < wanted < 1:
                raise GenerationInputError(f"--target must be a number such as 0.99, or 'saved'; got {target!r}")
        args.target = target
    elif args.target is not None:
        raise GenerationInputError("--target picks trained heads' thresholds; untrained heads use --threshold")
    args.exit_layers = args.exit_layers or [5, 11, 17, 23]
    args.threshold = 0.999 if args.threshold is None else args.threshold
    return trained


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from drex_hf.cli.common import tokenizer_for

    check_options(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    start = time.perf_counter()
    heads_dir = args.heads
    if heads_dir is None and not args.untrained and args.model == SMOLLM2_ID:
        if not (SHIPPED_HEADS / "exit_config.json").is_file():
            raise ModelNotFoundError(
                f"the shipped heads are missing ({SHIPPED_HEADS}); run `drex train recipes/smollm2-135m.yaml` "
                "or pass --untrained"
            )
        heads_dir = str(SHIPPED_HEADS)
    if heads_dir and not args.untrained:
        override = {} if args.model == SMOLLM2_ID else {"base_model": args.model}  # else the heads' own base, checked
        model = EarlyExitModelForCausalLM.from_pretrained(heads_dir, dtype=dtype, device=device, **override)
        heads = f"trained heads from {heads_dir}"
    else:
        config = EarlyExitConfig(
            exit_layers=args.exit_layers, head="shared", confidence="max_prob", thresholds=args.threshold
        )
        model = EarlyExitModelForCausalLM.from_base(args.model, config, dtype=dtype, device=device)
        heads = "new, untrained 'shared' heads (the base's final norm + lm_head)"
    load_s = time.perf_counter() - start
    source = model.base_source
    how = {"gguf": "the packaged GGUF, " + ("converted now" if source.converted else "cached")}.get(
        source.kind, source.kind
    )
    print(f"base    {source.name} ({how}: {source.path}), loaded in {load_s:.1f} s on {device}, {dtype}")
    thresholds, why = None, ""
    if heads_dir and not args.untrained and args.target != "saved":
        thresholds, why = _fitted_thresholds(Path(heads_dir), args.target, model.exit_config.confidence)
    elif model.exit_config.extra.get("ship_target"):
        why = f"fitted for {100 * model.exit_config.extra['ship_target']:.0f} % agreement, saved in exit_config.json"
    shown = ", ".join(f"{t:.3g}" for t in thresholds) if thresholds else model.exit_config.describe_thresholds()
    print(
        f"heads   {heads} after layers {model.exit_layers} of {model.num_layers}; "
        f"{model.exit_config.confidence} >= {shown}"
    )
    if why:
        print(f"        thresholds {why}")
    if args.untrained or not heads_dir:
        print(
            "        Untrained heads are right only where the model is already sure, so they exit rarely;\n"
            "        the shipped heads come from `drex train recipes/smollm2-135m.yaml`."
        )

    tokenizer = tokenizer_for(model)
    batch = encode_prompts(tokenizer, list(PROMPTS), "auto", device)
    width = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    drex_kwargs = {"thresholds": thresholds} if thresholds else {}
    model.generate(**batch, policy="full", max_new_tokens=2)  # warm-up, not timed
    model.generate(**batch, policy="drex", max_new_tokens=2, **drex_kwargs)  # also measures drex's cost model once
    runs = {}
    start = time.perf_counter()
    hf = model.base_model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    synchronize(device)
    runs["hf"] = (hf[:, width:], time.perf_counter() - start)
    for policy in ("full", "drex"):
        start = time.perf_counter()
        out = model.generate(**batch, policy=policy, **kwargs, **(drex_kwargs if policy == "drex" else {}))
        synchronize(device)
        runs[policy] = (out, time.perf_counter() - start)

    full, drex = runs["full"][0], runs["drex"][0]
    for i, prompt in enumerate(PROMPTS):
        n_full, n_drex = int((full.exit_layers[i] >= 0).sum()), int((drex.exit_layers[i] >= 0).sum())
        print(f"\n[{i + 1}] {prompt}")
        print(f"    full depth : {_text(tokenizer, full.sequences[i, width : width + n_full])}")
        print(f"    early exit : {_text(tokenizer, drex.sequences[i, width : width + n_drex])}")
        print(f"    exit layers: {' '.join(str(e) for e in drex.exit_layers[i, :n_drex].tolist())}")
        a, b = full.sequences[i, width : width + n_full].tolist(), drex.sequences[i, width : width + n_drex].tolist()
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"    identical  : {'yes' if a == b else f'first {same} tokens'}")

    print()
    eos_ids = model.generation_config.eos_token_id
    eos = tuple(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    hf_tokens = int((full_depth_layers(runs["hf"][0], eos, model.num_layers - 1) >= 0).sum())
    hf_s = runs["hf"][1]
    label = "HF generate, full depth (batched)"
    print(f"{label:<52} {hf_tokens:4d} tokens {hf_s:6.2f} s {hf_tokens / hf_s:7.1f} tokens/s")
    for label, policy in (("drex_hf engine, policy full", "full"), ("drex_hf engine, policy drex", "drex")):
        out, seconds = runs[policy]
        tokens = int((out.exit_layers >= 0).sum())
        print(f"{label:<52} {tokens:4d} tokens {seconds:6.2f} s {tokens / seconds:7.1f} tokens/s")
    both = (
        (full.exit_layers >= 0) & (drex.exit_layers >= 0) if full.exit_layers.shape == drex.exit_layers.shape else None
    )
    if both is not None and bool(both.any()):
        same = (full.sequences[:, width:] == drex.sequences[:, width:]) & both
        print(
            f"token agreement with full depth: {int(same.sum())}/{int(both.sum())} "
            f"({100 * float(same.sum()) / float(both.sum()):.0f} %) of positions where both produced a token"
        )
    print(f"exits per layer (early exit): {exit_histogram(drex.exit_layers, model)}")
    stats = drex.stats
    print(
        f"drex: involuntary exits {stats.involuntary_exits}, missed exits {stats.missed_exits}, "
        f"layer-rows {stats.layer_rows} for a minimum of "
        f"{stats.min_layer_rows}; cost model {stats.cost_source}"
    )
    print(
        "On this 135M model each max-prob check projects onto a 49152-token vocabulary (~8 layers' cost),\n"
        "so exits are a correctness demonstration here; benchmarks/README.md shows the engine's speed."
    )

    _lossless(model, tokenizer, device, args.max_new_tokens)
    if not args.no_stream:
        print(f"\nstreamed, early exit: {PROMPTS[0]}")
        one = encode_prompts(tokenizer, [PROMPTS[0]], "auto", device)
        model.generate(
            **one,
            policy="drex",
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **drex_kwargs,
        )
    return 0


def _lossless(model: EarlyExitModelForCausalLM, tokenizer: Any, device: torch.device, new_tokens: int) -> None:
    """One request at a time: what `generate()` runs without `policy=` (the calibrated choice) against full
    depth, HF's generate and HF's prompt lookup, each prompt through all four in turn (two rounds, the
    first a warm-up); tokens must equal full depth's."""
    from drex_hf.calibration_file import choice_for, describe_choice

    choice = choice_for(model.policy_choice, 1)
    print(f"\none request at a time: generate() without policy= runs {describe_choice(choice) if choice else 'drex'}")
    if choice is not None and choice.get("reason"):
        print(f"        (drex calibrate --choose-policy: {choice['reason']})")
    seconds = dict.fromkeys(("full", "default", "hf", "hf_lookup"), 0.0)
    tokens, same = dict.fromkeys(seconds, 0), True
    for round_ in range(2):
        for prompt in PROMPTS:
            one = encode_prompts(tokenizer, [prompt], "auto", device)
            width = one["input_ids"].shape[1]
            outs = {}
            for name in seconds:
                synchronize(device)
                start = time.perf_counter()
                if name.startswith("hf"):
                    extra = {"prompt_lookup_num_tokens": 10} if name == "hf_lookup" else {}
                    out = model.base_model.generate(**one, max_new_tokens=new_tokens, do_sample=False, **extra)
                else:
                    out = model.generate(**one, policy="full" if name == "full" else None, max_new_tokens=new_tokens)
                outs[name] = out[0, width:].tolist()
                synchronize(device)
                if round_:
                    seconds[name] += time.perf_counter() - start
                    tokens[name] += len(outs[name])
            same &= outs["default"] == outs["full"]
    labels = {"full": "drex_hf engine, policy full", "default": "generate() default (calibrated choice)",
              "hf": "HF generate", "hf_lookup": "HF generate, prompt_lookup_num_tokens=10"}  # fmt: skip
    base = tokens["full"] / seconds["full"]
    for name, label in labels.items():
        rate = tokens[name] / seconds[name]
        line = f"{label:<52} {tokens[name]:4d} tokens {seconds[name]:6.2f} s {rate:7.1f} tokens/s"
        print(f"{line} {rate / base:5.2f}x full")
    print(f"default's tokens identical to full depth's: {'yes' if same else 'NO'}")
    if choice is None or choice["policy"] == "full":
        print("Nothing beats full depth on this device, so the default is full depth (see the reason above).")
    print("Whole answers (prefill included), a few prompts: benchmarks/README.md has the interleaved measurement.")


def _fitted_thresholds(folder: Path, target: str, measure: str) -> tuple[list[float], str]:
    """Thresholds that `drex train` fitted for `target` on held-out self-generated text (eval_results.json)."""
    import json

    path = folder / "eval_results.json"
    if not path.is_file():
        raise ModelNotFoundError(f"--target {target}: {path} is missing; use --target saved")
    try:
        wanted = float(target)
    except ValueError:
        raise GenerationInputError(f"--target must be a number such as 0.99, or 'saved'; got {target!r}") from None
    results = json.loads(path.read_text(encoding="utf-8"))
    group = "self" if "self" in results.get("groups", {}) else next(iter(results.get("groups", {})), None)
    rows = [
        r
        for r in (results["groups"][group]["targets"] if group else [])
        if r["measure"] == measure and abs(r["target"] - wanted) < 1e-9
    ]
    if not rows:
        known = sorted({r["target"] for r in results["groups"][group]["targets"]}) if group else []
        raise GenerationInputError(f"--target {target}: {path} has thresholds for targets {known}, not {target}")
    row = rows[0]
    values = [parse_threshold(t, f"{path} thresholds") for t in row["thresholds"]]
    why = (
        f"fitted for {100 * wanted:.0f} % agreement on held-out {group} text "
        f"(measured there: {100 * row['agreement']:.1f} %, ideal speed-up {row['ideal_speedup']:.2f}x)"
    )
    return values, why


def _text(tokenizer: Any, tokens: torch.Tensor) -> str:
    return " ".join(tokenizer.decode(tokens, skip_special_tokens=True).split())
