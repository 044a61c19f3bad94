"""Lossless speed on the real model (issue 26): the calibrated default against full depth and HF.

Every policy decodes the same held-out prompts (chat prompts written for this benchmark and First
Folio passages, none from training: `benchmarks/heldout_prompts.py`), in batches of each size, in one
process: the engines step round-robin batch by batch (each timing its own steps), and at batch 1 HF's
plain `generate` and its prompt lookup run on the same prompt right after, all of it `--repeats`
times. Speed is decode tokens per second (prefill excluded; HF's prefill is a 1-token generate of
the same prompt, timed beside it); `× full` is the median over repeats of each repeat's ratio.
Every self_spec row must give full depth's tokens: the table counts the answers that do.

    python benchmarks/lossless.py --out benchmarks/results/cpu-2026-12-07/lossless
    python benchmarks/lossless.py --batch-sizes 1 --policies default,full,self_spec@ngram/4 --repeats 1

`default` is what `generate()` without `policy=` runs at that batch size: the choice `drex calibrate
--choose-policy` recorded for this device in the model's calibration.json. A self_spec row drafts as
`generate()` does, with the folder's draft corpus, vocabulary and draft layer; after a row,
`:whole-vocab` drafts over the whole vocabulary and `:no-draft-layer` with the plain exit head:

    python benchmarks/lossless.py --batch-sizes 1 --no-hf \
        --policies full,self_spec@5/1,self_spec@5/1:no-draft-layer,self_spec@ngram+5/1,self_spec@ngram/1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.bench.run import is_spec, parse_spec
from drex_hf.calibration_file import choice_for, describe_choice
from drex_hf.cli.common import encode_prompts, tokenizer_for
from drex_hf.device import device_name
from drex_hf.generation.engine import DrexEngine, step_in_turn
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine, model_drafting
from drex_hf.training.prompts import read_prompt_file

HERE = Path(__file__).parent
WHOLE_VOCAB = ":whole-vocab"
NO_DRAFT_LAYER = ":no-draft-layer"
PROMPTS = f"{HERE / 'prompts' / 'heldout-chat.txt'},{HERE / 'prompts' / 'heldout-prose.jsonl'}"


def engine_for(
    model: EarlyExitModelForCausalLM, policy: str, batch: int, max_len: int, settings: DecodeSettings
) -> Any:
    """An empty engine: `full`, `default` (the calibrated choice at this batch size) or a bench spelling
    of a self_spec row (self_spec@EXIT/K, self_spec@ngram/K, self_spec@ngram+EXIT/K), drafting as
    `generate()` does with the folder's draft corpus, vocabulary and draft layer; `:whole-vocab` after a
    row: its head drafts over the whole vocabulary; `:no-draft-layer`: its head drafts without the
    folder's draft layer (the plain exit head)."""
    if policy == "default":
        choice = choice_for(model.policy_choice, batch) or {"policy": "drex"}
        if choice["policy"] != "self_spec":
            return DrexEngine(model, max_batch=batch, max_len=max_len, policy=choice["policy"], settings=settings)
        options = {k: choice.get(k) for k in ("draft_exit", "draft_tokens")}
        source = choice.get("draft_source", "head")
        options |= {"draft_source": source, **model_drafting(model, options["draft_tokens"], source)}
        return SpecEngine(model, max_batch=batch, max_len=max_len, settings=settings, **options)
    plain = policy.endswith(NO_DRAFT_LAYER)  # the plain exit head drafts, not the folder's draft layer
    policy = policy.removesuffix(NO_DRAFT_LAYER)
    whole = policy.endswith(WHOLE_VOCAB)  # the head drafts over the whole vocabulary, not the folder's subset
    policy = policy.removesuffix(WHOLE_VOCAB)
    if is_spec(policy):
        spec = parse_spec(policy)
        drafting = model_drafting(model, spec.draft_tokens, spec.draft_source)
        drafting |= {"draft_vocab": None} if whole else {}
        drafting |= {"draft_layer": None} if plain else {}
        return SpecEngine(model, max_batch=batch, max_len=max_len, settings=settings, draft_exit=spec.draft_exit,
                          draft_tokens=spec.draft_tokens, draft_source=spec.draft_source, **drafting)  # fmt: skip
    return DrexEngine(model, max_batch=batch, max_len=max_len, policy=policy, settings=settings)


@torch.no_grad()
def hf_decode_s(model: EarlyExitModelForCausalLM, prompt: torch.Tensor, new_tokens: int, eos: list[int], **kw) -> tuple:
    """HF's generate on one prompt: (decode seconds = whole call - a 1-token call, its new tokens)."""
    ids = prompt.unsqueeze(0)
    mask = torch.ones_like(ids)

    def call(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                        eos_token_id=eos, pad_token_id=eos[0], **kw)  # fmt: skip
        return time.perf_counter() - start, out[0, ids.shape[1] :].tolist()

    prefill, _ = call(1)
    total, tokens = call(new_tokens)
    return max(total - prefill, 1e-9), tokens


def run_batch(
    model: EarlyExitModelForCausalLM, prompts: list[torch.Tensor], sets: list[str], batch: int, policies: list[str],
    new_tokens: int, repeats: int, hf: bool, eos: list[int],
) -> dict[str, dict]:  # fmt: skip
    settings = DecodeSettings(max_new_tokens=new_tokens, eos_token_ids=tuple(eos))
    chunks = [list(range(i, i + batch)) for i in range(0, len(prompts) - batch + 1, batch)]
    max_len = max(p.shape[0] for p in prompts) + new_tokens
    engines = {p: engine_for(model, p, batch, max_len, settings) for p in policies}
    names = list(engines) + (["hf_generate", "hf_prompt_lookup"] if hf and batch == 1 else [])
    seconds = {n: [] for n in names}  # per repeat: {set: seconds}
    tokens = {n: {} for n in names}  # prompt index -> tokens (first repeat)
    stats = {n: [] for n in engines}
    for repeat in range(repeats + 1):  # pass 0 warms every engine (and HF) up on the first batch, uncounted
        spent = {n: dict.fromkeys(sets, 0.0) for n in names}
        for chunk in chunks if repeat else chunks[:1]:
            ids = {}
            for name, engine in engines.items():
                engine.reset_stats()
                ids[name] = [engine.add_request(prompts[i]) for i in chunk]
            step_in_turn(engines.values())
            for name, engine in engines.items():
                s = engine.stats
                spent[name][sets[chunk[0]]] += s.wall_s - s.prefill_s
                if repeat == 1:
                    stats[name].append(s.to_dict())
                    for i, rid in zip(chunk, ids[name]):
                        tokens[name][i] = engine.finished[rid].tokens
            if len(names) > len(engines):
                for name, extra in (("hf_generate", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
                    s, out = hf_decode_s(model, prompts[chunk[0]], new_tokens, eos, **extra)
                    spent[name][sets[chunk[0]]] += s
                    if repeat == 1:
                        tokens[name][chunk[0]] = out
        if repeat:
            for name in names:
                seconds[name].append(spent[name])
        print(f"batch {batch}: repeat {repeat}/{repeats} done", flush=True)
    return summarise(names, seconds, tokens, stats, sets, chunks)


def run_continuous(
    model: EarlyExitModelForCausalLM, prompts: list[torch.Tensor], sets: list[str], batch: int, policies: list[str],
    new_tokens: int, repeats: int, eos: list[int],
) -> dict[str, dict]:  # fmt: skip
    """`--continuous`: every prompt queued into one engine per policy with `batch` slots, each slot
    refilled as its request ends (as `drex serve` runs), the engines stepped in turn; decode tokens
    per second over the whole queue (prefill steps excluded), `× full` the median over repeats."""
    settings = DecodeSettings(max_new_tokens=new_tokens, eos_token_ids=tuple(eos))
    max_len = max(p.shape[0] for p in prompts) + new_tokens
    engines = {p: engine_for(model, p, batch, max_len, settings) for p in policies}
    seconds: dict[str, list[float]] = {n: [] for n in engines}
    tokens: dict[str, dict[int, list[int]]] = {n: {} for n in engines}
    stats: dict[str, dict] = {}
    for repeat in range(repeats + 1):  # pass 0 warms up on the first `batch` prompts, uncounted
        queue = list(range(len(prompts) if repeat else batch))
        waiting = {n: list(queue) for n in engines}
        ids: dict[str, dict[int, int]] = {n: {} for n in engines}
        for engine in engines.values():
            engine.reset_stats()
        busy = True
        while busy:
            busy = False
            for name, engine in engines.items():
                while waiting[name] and engine.has_free_slot:
                    i = waiting[name].pop(0)
                    ids[name][engine.add_request(prompts[i])] = i
                busy |= engine.step() or bool(waiting[name])
        if repeat:
            for name, engine in engines.items():
                seconds[name].append(engine.stats.wall_s - engine.stats.prefill_s)
                if repeat == 1:
                    tokens[name] = {i: engine.finished[rid].tokens for rid, i in ids[name].items()}
                    stats[name] = engine.stats.to_dict()
        print(f"batch {batch} (continuous): repeat {repeat}/{repeats} done", flush=True)
    rows = {}
    decoded = {n: sum(len(t) - 1 for t in tokens[n].values()) for n in engines}
    for name in engines:
        ratios = [f / t for f, t in zip(seconds["full"], seconds[name])]
        row = {"decode_tokens_per_s": decoded[name] / statistics.median(seconds[name]),
               "x_full": statistics.median(ratios), "x_full_runs": ratios, "x_full_by_set": {},
               "same_as_full": sum(tokens[name][i] == tokens["full"][i] for i in tokens[name]) / len(prompts),
               "mean_new_tokens": decoded[name] / len(prompts) + 1}  # fmt: skip
        if "rounds" in stats[name]:
            row |= spec_columns(stats[name])
        rows[name] = row
    return rows


def spec_columns(s: dict[str, Any]) -> dict[str, float]:
    """A self_spec row's tokens per round, acceptance and share of rounds with text drafts, from its
    (summed) `SpecStats` counts."""
    return {"tokens_per_round": s["decoded_tokens"] / max(s["rounds"], 1),
            "acceptance": s["accepted"] / max(s["drafted"], 1),
            "rounds_with_text_drafts": s["ngram_rounds"] / max(s["rounds"], 1)}  # fmt: skip


def summarise(
    names: list[str], seconds: dict, tokens: dict, stats: dict, sets: list[str], chunks: list[list[int]]
) -> dict[str, dict]:
    done = [i for chunk in chunks for i in chunk]
    decoded = {n: sum(len(tokens[n][i]) - 1 for i in done) for n in names}
    rows = {}
    for name in names:
        totals = [sum(r.values()) for r in seconds[name]]
        ratios = [f / t for f, t in zip([sum(r.values()) for r in seconds["full"]], totals)]
        row = {
            "decode_tokens_per_s": decoded[name] / statistics.median(totals),
            "x_full": statistics.median(ratios),
            "x_full_runs": ratios,
            "same_as_full": sum(tokens[name][i] == tokens["full"][i] for i in done) / len(done),
            "mean_new_tokens": decoded[name] / len(done) + 1,
            "x_full_by_set": {
                s: statistics.median(f[s] / t[s] for f, t in zip(seconds["full"], seconds[name]) if t[s] > 0)
                for s in sorted({sets[chunk[0]] for chunk in chunks})  # a batch counts for its first prompt's set
            },
        }
        if name in stats and stats[name] and "rounds" in stats[name][0]:
            keys = ("accepted", "drafted", "rounds", "decoded_tokens", "ngram_rounds")
            row |= spec_columns({k: sum(s[k] for s in stats[name]) for k in keys})
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="model_cards/smollm2-135m-drex", help="exit-heads folder")
    parser.add_argument("--prompts", default=PROMPTS, help="comma-separated prompt files (.txt / .jsonl)")
    parser.add_argument("--count", type=int, default=8, help="prompts taken from each file (default: 8)")
    parser.add_argument("--batch-sizes", default="1,8", help="default: 1,8")
    parser.add_argument("--policies", default="default,full,self_spec@ngram/4", help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64 (answers may end at eos)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (default: 3)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF's generate and prompt lookup at batch 1")
    parser.add_argument("--continuous", action="store_true",
                        help="batches above 1: queue every prompt into one engine per policy, refilling slots "
                        "as requests end (as drex serve runs), not batches that start and end together")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder for lossless.json and lossless.md")
    args = parser.parse_args()
    model = EarlyExitModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = tokenizer_for(model)
    texts, sets = [], []
    for path in args.prompts.split(","):
        chosen = read_prompt_file(path)[: args.count]
        texts += chosen
        sets += [Path(path).stem] * len(chosen)
    batch = encode_prompts(tokenizer, texts, "auto", torch.device("cpu"))
    prompts = [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    eos = list(dict.fromkeys(t for t in eos if t is not None))
    policies = [p.strip() for p in args.policies.split(",")]
    if "full" not in policies:
        policies.insert(0, "full")
    results = {"machine": device_name(model.heads_device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "prompts": args.prompts, "count": len(prompts),
               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "batches": {}}  # fmt: skip
    lines = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        if args.continuous and b > 1:
            rows = run_continuous(model, prompts, sets, b, policies, args.max_new_tokens, args.repeats, eos)
        else:
            rows = run_batch(model, prompts, sets, b, policies, args.max_new_tokens, args.repeats, not args.no_hf, eos)
        choice = choice_for(model.policy_choice, b)
        results["batches"][str(b)] = {"default": choice, "rows": rows}
        mode = ", continuous batching" if args.continuous and b > 1 else ""
        lines += [f"\n### Batch {b}{mode} (default: {describe_choice(choice) if choice else 'drex'})", "",
                  "| policy | decode tok/s | × full (runs) | × full by set | same tokens as full | tokens/round | "
                  "accepted | rounds with text drafts | mean new tokens |", "|" + " --- |" * 9]  # fmt: skip
        for name, r in rows.items():
            by_set = ", ".join(f"{s} {v:.2f}" for s, v in r["x_full_by_set"].items())
            runs = "/".join(f"{x:.2f}" for x in r["x_full_runs"])
            lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['x_full']:.2f} ({runs}) | {by_set} | "
                         f"{r['same_as_full']:.0%} | {r.get('tokens_per_round', 1.0):.2f} | "
                         f"{r.get('acceptance', 0.0):.0%} | {r.get('rounds_with_text_drafts', 0.0):.0%} | "
                         f"{r['mean_new_tokens']:.1f} |")  # fmt: skip
    head = (f"Machine: {results['machine']}, torch {results['torch']}, {results['threads']} threads; "
            f"{len(prompts)} held-out prompts ({args.prompts}), up to {args.max_new_tokens} new tokens, "
            f"{args.repeats} repeats after a warm-up, one process.")  # fmt: skip
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lossless.json").write_text(json.dumps(results, indent=1))
        (args.out / "lossless.md").write_text(text)
        print(f"wrote {args.out / 'lossless.json'} and {args.out / 'lossless.md'}")


if __name__ == "__main__":
    main()
