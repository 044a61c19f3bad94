"""Which decoding policy to use on this device at each batch size: `full`, `drex` or `self_spec`.

`drex calibrate --choose-policy` runs, per batch size, full depth, drex (the thresholds being
calibrated) and self-speculation with each draft source (the exit head at each candidate exit, each
row's own text, or both: `self_spec:E:K`, `self_spec:ngram:K`, `self_spec:ngram+E:K`) and k on the
same prompts — every prompt, in batches of that size — their engines stepped round-robin (one step
each in turn, each timing its own steps) so the machine's drift falls on all of them, and keeps per
policy its decode tokens/s (the median of the repeats, each summed over the batches), its ratio to
full depth, what it keeps of full depth's output (exact answers and
ROUGE-L over token ids; self_spec keeps it all by construction — measured, not assumed) and, for
self_spec, the acceptance rate. The choice is the fastest policy that beats full depth by
`margin`; where none does, `full`, and the entry says why. `from_pretrained` reads the entry for
its device, and `generate()` without `policy=` follows it (`drex_hf.calibration_file.choice_for`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from drex_hf.calibration.sequences import rouge_l
from drex_hf.config import DRAFT_SOURCES
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine, step_in_turn
from drex_hf.generation.settings import DecodeSettings

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


def _new_engine(
    model: EarlyExitModelForCausalLM, policy: str, batch: int, max_len: int, settings: DecodeSettings, options: dict
) -> Any:
    """An empty engine of `policy` for `batch` rows (built once per batch size, reused every round)."""
    from drex_hf.generation.spec.engine import SpecEngine, model_drafting

    if policy == "self_spec":
        drafting = model_drafting(model, options.get("draft_tokens"), options.get("draft_source", "head"))
        options = {**options, **drafting}  # the folder's draft corpus, vocabulary and priors
        return SpecEngine(model, max_batch=batch, max_len=max_len, settings=settings, **options)
    return DrexEngine(model, max_batch=batch, max_len=max_len, policy=policy, settings=settings, **options)


def _interleaved_round(engines: dict[str, Any], prompts: list[torch.Tensor]) -> dict[str, Any]:
    """The same prompts through every engine, stepped round-robin (one step each in turn, each engine
    timing only its own steps), so the machine's drift falls on all of them alike; per engine its
    tokens per prompt, its decode seconds (prefill excluded) and its statistics."""
    ids = {}
    for name, engine in engines.items():
        engine.reset_stats()
        ids[name] = [engine.add_request(prompt) for prompt in prompts]
    step_in_turn(engines.values())
    out = {}
    for name, engine in engines.items():
        stats = engine.stats
        out[name] = ([engine.finished[i].tokens for i in ids[name]], stats.wall_s - stats.prefill_s, stats.to_dict())
    return out


def measure_policies(
    model: EarlyExitModelForCausalLM,
    prompts: list[torch.Tensor],
    *,
    batch_sizes: Sequence[int],
    max_new_tokens: int,
    draft_exits: Sequence[int],
    draft_tokens: Sequence[int | str],
    draft_sources: Sequence[str] = ("head",),
    repeats: int = 3,
    margin: float = 1.05,
    check_prompts: list[torch.Tensor] | None = None,
    eos: Sequence[int] = (),
    lossless: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per batch size (the JSON key), every policy's measurements and the choice; see the module
    docstring. `prompts` must hold at least max(batch_sizes) prompts; at each batch size b they run
    in batches of b (a last short batch is dropped). `check_prompts`: prompts the choice was not made
    on, on which the chosen policy is timed against full depth again (`checked`: its ratio there and
    the prediction's error) — what a user's new prompts would see. `eos`: answers end there (chat
    prompts: the end of the turn); default none, every answer `max_new_tokens` long. `lossless`: choose
    only among policies that keep full depth's tokens (`_choose`)."""
    if not prompts or max(batch_sizes) > len(prompts):
        raise GenerationInputError(
            f"choosing a policy at batch sizes {list(batch_sizes)} needs at least {max(batch_sizes)} prompts, "
            f"got {len(prompts)}"
        )
    if any(e not in model.exit_layers for e in draft_exits):
        raise GenerationInputError(
            f"draft exits {list(draft_exits)} must be exit layers of the model {model.exit_layers}"
        )
    unknown = [s for s in draft_sources if s not in DRAFT_SOURCES]
    if unknown or not draft_sources:
        raise GenerationInputError(f"draft sources must be some of {', '.join(DRAFT_SOURCES)}, got {unknown!r}")
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos))
    out: dict[str, dict[str, Any]] = {}
    for batch in batch_sizes:
        policies = candidate_policies(model, draft_exits, draft_tokens, draft_sources)
        rows = _timed(model, policies, _batches(prompts, batch), settings, repeats, progress, f"batch {batch}")
        out[str(batch)] = entry = _choose(rows, margin, lossless)
        if check_prompts and entry["policy"] != "full":
            chosen = _chosen_name(entry, rows)
            pair = {"full": policies["full"], chosen: policies[chosen]}
            checked = _timed(model, pair, _batches(check_prompts, batch), settings, repeats, progress, "check")
            ratio = checked[chosen]["ratio"]
            entry["checked"] = {"ratio": ratio, "prompts": len(_batches(check_prompts, batch)) * batch,
                                "error": ratio / entry["measured"][chosen]["ratio"] - 1}  # fmt: skip
    return out


def candidate_policies(
    model: EarlyExitModelForCausalLM, draft_exits: Sequence[int], draft_tokens: Sequence[int | str],
    draft_sources: Sequence[str],
) -> dict[str, tuple[str, dict[str, Any]]]:  # fmt: skip
    """Every policy to time, by name: full, drex (when some exit is on), and self_spec per source,
    exit and k."""
    policies: dict[str, tuple[str, dict[str, Any]]] = {"full": ("full", {})}
    thresholds = model.exit_config.threshold_list()
    if any(t != float("inf") for t in thresholds):
        policies["drex"] = ("drex", {"thresholds": thresholds})
    for source in draft_sources:
        for e in [None] if source == "ngram" else draft_exits:
            where = {"head": f"{e}", "ngram": "ngram", "mixed": f"ngram+{e}"}[source]
            for k in draft_tokens:
                options = {"draft_exit": e, "draft_tokens": k, "draft_source": source}
                policies[f"self_spec:{where}:{k}"] = ("self_spec", options)
    return policies


def _batches(prompts: list[torch.Tensor], batch: int) -> list[list[torch.Tensor]]:
    return [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]


def _timed(
    model: EarlyExitModelForCausalLM, policies: dict[str, tuple[str, dict[str, Any]]],
    batches: list[list[torch.Tensor]], settings: DecodeSettings, repeats: int,
    progress: Callable[[str], None] | None, label: str,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each policy's row: tokens/s (median over repeats of its decode seconds summed over the
    batches), ratio to full depth, exact and ROUGE-L against full depth's tokens, self_spec's
    acceptance. One engine per policy, built once, warmed up by an untimed first round."""
    batch = len(batches[0])
    max_len = max(p.shape[0] for chunk in batches for p in chunk) + settings.max_new_tokens
    engines = {name: _new_engine(model, p, batch, max_len, settings, o) for name, (p, o) in policies.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[list[int]]] = {name: [] for name in engines}
    accepted: dict[str, list[int]] = {name: [0, 0, 0] for name in engines}  # accepted, drafted, rounds
    _interleaved_round(engines, batches[0])  # warm-up, untimed
    for repeat in range(repeats):
        seconds = dict.fromkeys(engines, 0.0)
        for chunk in batches:
            for name, (out, spent, stats) in _interleaved_round(engines, chunk).items():
                seconds[name] += spent
                if not repeat:
                    tokens[name] += out
                    tally = accepted[name]
                    tally[0] += stats.get("accepted", 0)
                    tally[1] += stats.get("drafted", 0)
                    tally[2] += stats.get("decoded_tokens", 0) if "rounds" not in stats else stats["rounds"]
        for name, spent in seconds.items():
            times[name].append(spent)
        if progress is not None:
            progress(label)
    del engines  # their key/value stores, before the next batch size's
    rows: dict[str, dict[str, Any]] = {}
    for name in policies:
        seconds = statistics.median(times[name])
        decoded = sum(len(t) - 1 for t in tokens[name])
        row = {
            "tokens_per_s": decoded / seconds if seconds > 0 else 0.0,
            "exact": sum(a == b for a, b in zip(tokens[name], tokens["full"])) / len(tokens[name]),
            "rouge_l": statistics.fmean(rouge_l(a, b) for a, b in zip(tokens[name], tokens["full"])),
        }
        if name.startswith("self_spec"):
            got, drafted, rounds = accepted[name]
            row["acceptance_rate"] = got / drafted if drafted else 0.0
            row["tokens_per_round"] = decoded / rounds if rounds else 0.0
        rows[name] = row
    base = rows["full"]["tokens_per_s"]
    for row in rows.values():
        row["ratio"] = row["tokens_per_s"] / base if base > 0 else 0.0
    return rows


def _spec_options(name: str) -> dict[str, Any]:
    """`self_spec:E:K` / `self_spec:ngram:K` / `self_spec:ngram+E:K` -> its source, exit and k."""
    _, where, k = name.split(":")
    source, exit_ = "head", where
    if where == "ngram":
        source, exit_ = "ngram", ""
    elif where.startswith("ngram+"):
        source, exit_ = "mixed", where[len("ngram+") :]
    return {"draft_source": source, "draft_exit": int(exit_) if exit_ else None,
            "draft_tokens": k if k == "adaptive" else int(k)}  # fmt: skip


def _chosen_name(entry: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    if entry["policy"] != "self_spec":
        return entry["policy"]
    return next(name for name in rows if name.startswith("self_spec") and _spec_options(name) == {
        k: entry[k] for k in ("draft_source", "draft_exit", "draft_tokens")})  # fmt: skip


def model_answers(
    model: EarlyExitModelForCausalLM, prompts: list[torch.Tensor], max_new_tokens: int, eos: Sequence[int],
    batch: int = 32, progress: Callable[[str], None] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Full depth's greedy answers to `prompts` (continuous batching, `batch` rows at a time), ending
    at `eos`: what a draft corpus (`spec.ngram.CorpusIndex`) is built from."""
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos))
    max_len = max(p.shape[0] for p in prompts) + max_new_tokens
    engine = DrexEngine(model, max_batch=min(batch, len(prompts)), max_len=max_len, policy="full", settings=settings)
    ids, waiting = {}, list(range(len(prompts)))
    while waiting or engine.active:
        while waiting and engine.has_free_slot:
            i = waiting.pop(0)
            ids[engine.add_request(prompts[i])] = i
        done = len(engine.finished)
        engine.step()
        for _ in range(len(engine.finished) - done):
            if progress is not None:
                progress("answer")
    out: list[list[int]] = [[] for _ in prompts]
    for rid, i in ids.items():
        out[i] = engine.finished[rid].tokens
    return out


def _choose(rows: dict[str, dict[str, Any]], margin: float, lossless: bool = False) -> dict[str, Any]:
    """The fastest policy if it beats full depth by `margin`, else full; with the reason, every
    policy's row, and self_spec's best (source, exit, k). `lossless`: only policies that keep full
    depth's tokens (full, self_spec) may be chosen; drex is measured and reported, not chosen."""
    spec = {name: row for name, row in rows.items() if name.startswith("self_spec")}
    best_spec = max(spec, key=lambda name: spec[name]["ratio"]) if spec else None
    contenders = {"full": rows["full"]}
    if "drex" in rows and not lossless:
        contenders["drex"] = rows["drex"]
    if best_spec is not None:
        contenders["self_spec"] = rows[best_spec]
    fastest = max(contenders, key=lambda name: contenders[name]["ratio"])
    entry: dict[str, Any] = {"policy": "full", "measured": rows, "margin": margin, "lossless": lossless}
    if best_spec is not None:
        entry["self_spec_best"] = {**_spec_options(best_spec), **rows[best_spec]}
    notes = []
    for name in ("drex", "self_spec"):
        if name in contenders and contenders[name]["ratio"] < margin:
            notes.append(f"{name} does not pay here ({contenders[name]['ratio']:.2f}x full depth)")
    if fastest != "full" and contenders[fastest]["ratio"] >= margin:
        entry["policy"] = fastest
        if fastest == "self_spec":
            for key in ("draft_source", "draft_exit", "draft_tokens"):
                entry[key] = entry["self_spec_best"][key]
        entry["reason"] = "; ".join([f"{fastest} is fastest: {contenders[fastest]['ratio']:.2f}x full depth", *notes])
    else:
        entry["reason"] = "; ".join(notes) or f"nothing beats full depth by {margin}x"
    if "drex" not in rows:  # not timed: with every exit off it is full depth
        entry["reason"] += "; drex is full depth here (every exit is off on this device)"
    elif lossless:
        drex = rows["drex"]
        entry["reason"] += (f"; drex ({drex['ratio']:.2f}x full depth, {drex['exact']:.0%} of answers exact) is not "
                            f"chosen: the default must keep full depth's tokens")  # fmt: skip
    return entry
