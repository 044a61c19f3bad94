"""Which decoding policy to use on this device at each batch size: `full`, `drex` or `self_spec`.

`drex calibrate --choose-policy` runs, per batch size, full depth, drex (the thresholds being
calibrated) and self-speculation at each candidate draft exit and k on the same prompts, their
engines stepped round-robin (one step each in turn, each timing its own steps) so the machine's
drift falls on all of them, and keeps per policy its decode tokens/s (median of
the repeats), its ratio to full depth, what it keeps of full depth's output (exact answers and
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
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine, step_in_turn
from drex_hf.generation.settings import DecodeSettings

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


def _new_engine(
    model: EarlyExitModelForCausalLM, policy: str, batch: int, max_len: int, settings: DecodeSettings, options: dict
) -> Any:
    """An empty engine of `policy` for `batch` rows (built once per batch size, reused every round)."""
    from drex_hf.generation.spec.engine import SpecEngine

    if policy == "self_spec":
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
    draft_tokens: Sequence[int],
    repeats: int = 3,
    margin: float = 1.05,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per batch size (the JSON key), every policy's measurements and the choice; see the module
    docstring. `prompts` must hold at least max(batch_sizes) prompts (the first b are used)."""
    if not prompts or max(batch_sizes) > len(prompts):
        raise GenerationInputError(
            f"choosing a policy at batch sizes {list(batch_sizes)} needs at least {max(batch_sizes)} prompts, "
            f"got {len(prompts)}"
        )
    if any(e not in model.exit_layers for e in draft_exits):
        raise GenerationInputError(
            f"draft exits {list(draft_exits)} must be exit layers of the model {model.exit_layers}"
        )
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=())
    out: dict[str, dict[str, Any]] = {}
    for batch in batch_sizes:
        chosen = prompts[:batch]
        max_len = max(p.shape[0] for p in chosen) + max_new_tokens
        policies: dict[str, tuple[str, dict[str, Any]]] = {"full": ("full", {})}
        thresholds = model.exit_config.threshold_list()
        if any(t != float("inf") for t in thresholds):
            policies["drex"] = ("drex", {"thresholds": thresholds})
        for e in draft_exits:
            for k in draft_tokens:
                policies[f"self_spec:{e}:{k}"] = ("self_spec", {"draft_exit": e, "draft_tokens": k})
        engines = {name: _new_engine(model, p, batch, max_len, settings, o) for name, (p, o) in policies.items()}
        times: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, Any] = {}
        for repeat in range(repeats + 1):  # the first round warms every engine up and is not counted
            for name, (tokens, seconds, stats) in _interleaved_round(engines, chosen).items():
                if repeat:
                    times[name].append(seconds)
                outputs[name] = (tokens, stats)
            if progress is not None:
                progress(f"batch {batch}")
        del engines  # their key/value stores, before the next batch size's
        full_tokens = outputs["full"][0]
        rows: dict[str, dict[str, Any]] = {}
        for name, (tokens, stats) in outputs.items():
            seconds = statistics.median(times[name])
            decoded = sum(len(t) - 1 for t in tokens)
            row = {
                "tokens_per_s": decoded / seconds if seconds > 0 else 0.0,
                "exact": sum(a == b for a, b in zip(tokens, full_tokens)) / len(tokens),
                "rouge_l": statistics.fmean(rouge_l(a, b) for a, b in zip(tokens, full_tokens)),
            }
            if name.startswith("self_spec"):
                row["acceptance_rate"] = stats["acceptance_rate"]
                row["tokens_per_round"] = stats["tokens_per_round"]
            rows[name] = row
        base = rows["full"]["tokens_per_s"]
        for row in rows.values():
            row["ratio"] = row["tokens_per_s"] / base if base > 0 else 0.0
        out[str(batch)] = _choose(rows, margin)
    return out


def _choose(rows: dict[str, dict[str, Any]], margin: float) -> dict[str, Any]:
    """The fastest policy if it beats full depth by `margin`, else full; with the reason, every
    policy's row, and self_spec's best (exit, k)."""
    spec = {name: row for name, row in rows.items() if name.startswith("self_spec")}
    best_spec = max(spec, key=lambda name: spec[name]["ratio"]) if spec else None
    contenders = {"full": rows["full"]}
    if "drex" in rows:
        contenders["drex"] = rows["drex"]
    if best_spec is not None:
        contenders["self_spec"] = rows[best_spec]
    fastest = max(contenders, key=lambda name: contenders[name]["ratio"])
    entry: dict[str, Any] = {"policy": "full", "measured": rows, "margin": margin}
    if best_spec is not None:
        _, e, k = best_spec.split(":")
        entry["self_spec_best"] = {"draft_exit": int(e), "draft_tokens": int(k), **rows[best_spec]}
    notes = []
    for name in ("drex", "self_spec"):
        if name in contenders and contenders[name]["ratio"] < margin:
            notes.append(f"{name} does not pay here ({contenders[name]['ratio']:.2f}x full depth)")
    if fastest != "full" and contenders[fastest]["ratio"] >= margin:
        entry["policy"] = fastest
        if fastest == "self_spec":
            entry["draft_exit"] = entry["self_spec_best"]["draft_exit"]
            entry["draft_tokens"] = entry["self_spec_best"]["draft_tokens"]
        entry["reason"] = "; ".join([f"{fastest} is fastest: {contenders[fastest]['ratio']:.2f}x full depth", *notes])
    else:
        entry["reason"] = "; ".join(notes) or f"nothing beats full depth by {margin}x"
    if "drex" not in rows:  # not timed: with every exit off it is full depth
        entry["reason"] += "; drex is full depth here (every exit is off on this device)"
    return entry
