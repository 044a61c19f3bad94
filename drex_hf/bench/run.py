"""Policies side by side on the same prompts, in one process (DESIGN.md §6).

Every policy's engine gets the same prompts and seeds and is stepped round-robin with the others, each
timing only its own steps (and stamping its tokens with its own clock), so the machine's drift falls
on all of them alike. HF's own `generate` (full depth) is timed on the same prompts as the reference
users have today. Per policy: decode tokens/s (the prefill, the same full-depth pass for every
policy, is left out), time per output token p50/p99, exits per layer, involuntary and missed exits,
agreement with full depth's tokens, ROUGE-L against full depth's text (with a tokenizer and
`rouge-score`), KV-cache bytes; and the oracle: full × L ÷ the mean exit depth drex measured.
Then, untimed, each policy's memory (KV cache, row state, peak decode allocations) and the measured
oracle (drex's exits at no exit cost on this machine): `drex_hf.bench.measure`.

Self-speculative rows (`self_spec@EXIT/K`, `SpecEngine`) run interleaved with the others on the same
prompts: a SpecEngine is stepped like any engine. Their statistics are SpecStats' (acceptance, tokens
per round, layer evaluations per token split into draft and verify) plus the layer-count ceiling
`spec_speedup_ceiling` at the measured per-draft acceptance; `/aP` replays acceptance P (trace mode).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from drex_hf.bench.measure import gpu_busy_share, measured_oracle, peak_decode_bytes, row_state_bytes
from drex_hf.device import synchronize
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine, step_in_turn
from drex_hf.generation.exits import ExitDistribution, ExitReplay
from drex_hf.generation.scheduler import percentile
from drex_hf.generation.settings import DecodeSettings, left_padded
from drex_hf.generation.spec.cost import spec_speedup_ceiling
from drex_hf.generation.spec.engine import SpecEngine, model_drafting

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM

POLICIES = ("full", "batch_all", "batch_majority", "drex")
SELF_SPEC = "self_spec"  # self_spec[@EXIT[/K[/aP]]]: SpecEngine rows, see `parse_spec`
DRAFT_TOKENS: tuple[int | str, ...] = (1, 2, 4, "adaptive")  # the k a plain `self_spec` expands into
MEMORY_TOKENS = 8  # tokens of the untimed memory pass: every kind of step occurs within them
Exits = ExitDistribution | ExitReplay | None  # None: the heads decide (the real thing)
Engine = DrexEngine | SpecEngine


def policy_name(policy: str) -> str:
    """The policy a spelling names: "drex@0.5:eager" -> "drex", "self_spec@3/4" -> "self_spec"."""
    return policy.partition(":")[0].partition("@")[0]


def is_spec(policy: str) -> bool:
    """Whether `policy` names self-speculative rows (`self_spec`, `self_spec@3/4`, ...)."""
    return policy_name(policy) == SELF_SPEC


def check_policies(policies: Sequence[str]) -> None:
    """Refuse an empty list or a name that is no policy ("drex@SLACK", "full:eager" and
    "self_spec@3/4" are policies; a self_spec spelling is checked by `parse_spec`)."""
    unknown = [p for p in policies if policy_name(p) not in (*POLICIES, SELF_SPEC)]
    if unknown or not policies:
        raise GenerationInputError(
            f"unknown policy {unknown[0] if unknown else ''!r}; choose from {', '.join(POLICIES)}, {SELF_SPEC}[@EXIT/K]"
        )
    for policy in policies:
        if is_spec(policy):
            parse_spec(policy)


@dataclass(frozen=True)
class SpecPolicy:
    """A self_spec row's settings; None where the spelling left a part to be filled in
    (`expand_policies`). `acceptance`: trace mode's P (each draft accepted with it), None: the heads."""

    draft_exit: int | None = None
    draft_tokens: int | str | None = None
    acceptance: float | None = None
    draft_source: str = "head"

    @property
    def name(self) -> str:
        """The row's name in bench.json and the tables: self_spec@EXIT/K (ngram/K: drafts from each
        row's own text; ngram+EXIT/K: its text where it matches, else EXIT's head), then /aP in trace
        mode."""
        where = {"head": f"{self.draft_exit}", "ngram": "ngram", "mixed": f"ngram+{self.draft_exit}"}
        return f"{SELF_SPEC}@{where[self.draft_source]}/{self.draft_tokens}" + (
            "" if self.acceptance is None else f"/a{self.acceptance:.15g}"
        )


def draft_tokens_value(text: str, where: str) -> int | str:
    """One k: a positive integer or "adaptive" (`where` names the spelling in the error)."""
    text = text.strip()
    if text == "adaptive":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise GenerationInputError(f"{where}: k must be a positive integer or 'adaptive', got {text!r}")
    return k


def acceptance_value(text: str, where: str) -> float:
    """One trace acceptance: a probability in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise GenerationInputError(f"{where}: an acceptance is a probability in [0, 1], got {text.strip()!r}")
    return value


def parse_spec(policy: str) -> SpecPolicy:
    """ "self_spec@23/4/a0.8" -> SpecPolicy(23, 4, 0.8); "self_spec" and "self_spec@23" leave the rest
    None. Refuses a spelling that is not self_spec[@EXIT[/K[/aP]]], naming the part that is wrong
    (whether EXIT is one of the model's exit points is `expand_policies`' and the engine's check)."""
    spec, colon, _ = policy.partition(":")
    if colon:
        raise GenerationInputError(
            f"{policy!r}: self_spec rows take no engine mode (--no-graphs runs every engine eagerly)"
        )
    _, at, rest = spec.partition("@")
    if not at:
        return SpecPolicy()
    parts = rest.split("/")
    if len(parts) > 3 or not parts[0]:
        raise GenerationInputError(f"{policy!r}: spell a self_spec row self_spec@EXIT/K or self_spec@EXIT/K/aP")
    source, where = "head", parts[0].strip()
    if where == "ngram" or where.startswith("ngram+"):
        source, where = ("ngram", "") if where == "ngram" else ("mixed", where[len("ngram+") :])
        if source == "ngram" and len(parts) < 2:
            raise GenerationInputError(f"{policy!r}: spell an n-gram row self_spec@ngram/K or self_spec@ngram+EXIT/K")
    if source != "ngram" and not where.isdigit():
        raise GenerationInputError(
            f"{policy!r}: the draft exit must be a layer index (or ngram, ngram+EXIT), got {parts[0]!r}"
        )
    k = draft_tokens_value(parts[1], repr(policy)) if len(parts) > 1 else None
    acceptance = None
    if len(parts) > 2:
        if not parts[2].startswith("a"):
            raise GenerationInputError(f"{policy!r}: the third part is the trace acceptance, spelled aP (e.g. a0.8)")
        acceptance = acceptance_value(parts[2][1:], repr(policy))
    return SpecPolicy(int(where) if where else None, k, acceptance, source)


def expand_policies(
    policies: Sequence[str],
    exit_points: Sequence[int],
    draft_exits: Sequence[int] | None = None,
    draft_tokens: Sequence[int | str] = DRAFT_TOKENS,
    acceptances: Sequence[float] | None = None,
) -> list[str]:
    """Every self_spec spelling made into rows: a missing EXIT becomes each of `draft_exits` (default
    every exit point), a missing K each of `draft_tokens`, a missing /aP each of `acceptances` (when
    given: trace mode). Other policies pass unchanged; a row named twice is run once. Refuses a draft
    exit that is not one of `exit_points`."""
    check_policies(policies)
    exit_points = list(exit_points)
    for e in draft_exits or []:
        if e not in exit_points:
            raise GenerationInputError(f"--draft-exits: {e} is not one of the model's exit points {exit_points}")
    out: list[str] = []
    for policy in policies:
        if not is_spec(policy):
            out.append(policy)
            continue
        spec = parse_spec(policy)
        if spec.draft_exit is not None and spec.draft_exit not in exit_points:
            raise GenerationInputError(
                f"{policy!r}: draft exit {spec.draft_exit} is not one of the model's exit points {exit_points}"
            )
        exits = [spec.draft_exit] if spec.draft_exit is not None else list(draft_exits or exit_points)
        if spec.draft_source == "ngram":
            exits = [None]
        ks = [spec.draft_tokens] if spec.draft_tokens is not None else list(draft_tokens)
        chances = [spec.acceptance] if spec.acceptance is not None else list(acceptances or [None])
        out += [SpecPolicy(e, k, a, spec.draft_source).name for e in exits for k in ks for a in chances]
    return list(dict.fromkeys(out))


def spec_policy(policy: str) -> SpecPolicy:
    """A complete self_spec row (EXIT and K given), as an engine is built from."""
    spec = parse_spec(policy)
    if (spec.draft_exit is None and spec.draft_source != "ngram") or spec.draft_tokens is None:
        raise GenerationInputError(
            f"{policy!r}: an engine needs self_spec@EXIT/K (expand_policies fills a plain self_spec in)"
        )
    return spec


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """`count` prompts of random token ids (3..vocab-1), lengths uniform in [low, high]."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (rng.randint(low, high),), generator=gen) for _ in range(count)]


def parse_policy(policy: str) -> tuple[str, str, bool]:
    """ "drex@0.5:eager" -> ("drex", "0.5", True): the policy, drex's slack (or ""), and whether its
    engine runs its programs eagerly (no CUDA graphs) where graphs would be on."""
    spec, _, mode = policy.partition(":")
    name, _, slack = spec.partition("@")
    if mode not in ("", "eager"):
        raise GenerationInputError(f"unknown engine mode {mode!r} in policy {policy!r}; the one mode is ':eager'")
    return name, slack, mode == "eager"


def new_engine(
    model: EarlyExitModelForCausalLM,
    policy: str,
    new_tokens: int,
    max_batch: int,
    max_len: int,
    exits: Exits = None,
    trace_seed: int = 0,
    **engine_kwargs: Any,
) -> Engine:
    """An empty engine for `policy` ("drex@SLACK" sets the drex policy's slack, ":eager" turns CUDA
    graphs off) with trace exits when `exits` is given; full depth never takes a trace (its exits are
    the heads', i.e. none). A self_spec row gets a `SpecEngine` (`spec_engine`)."""
    if is_spec(policy):
        return spec_engine(model, policy, new_tokens, max_batch, max_len, trace_seed, **engine_kwargs)
    name, slack, eager = parse_policy(policy)
    if eager:
        engine_kwargs["graphs"] = False
    traced = exits is not None and name != "full"
    engine = DrexEngine(
        model,
        max_batch=max_batch,
        max_len=max_len,
        policy=name,
        settings=DecodeSettings(max_new_tokens=new_tokens),
        exit_source="trace" if traced else "heads",
        exit_distribution=exits if traced and isinstance(exits, ExitDistribution) else None,
        **engine_kwargs,
    )
    if slack:
        engine.policy.slack = float(slack)
    return engine


def spec_engine(
    model: EarlyExitModelForCausalLM,
    policy: str,
    new_tokens: int,
    max_batch: int,
    max_len: int,
    trace_seed: int = 0,
    **engine_kwargs: Any,
) -> SpecEngine:
    """An empty `SpecEngine` for a complete self_spec row: greedy, drafting from EXIT, K drafts per
    round (or adaptive), with the row's acceptance replayed (trace mode, coins seeded by
    `trace_seed` + each request's seed) when it names one; `graphs` and `lazy_capture` as drex's."""
    spec = spec_policy(policy)
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if k in ("graphs", "lazy_capture")}
    return SpecEngine(
        model,
        max_batch=max_batch,
        max_len=max_len,
        draft_exit=spec.draft_exit,
        draft_tokens=spec.draft_tokens,
        draft_source=spec.draft_source,
        settings=DecodeSettings(max_new_tokens=new_tokens),
        exit_source="heads" if spec.acceptance is None else "trace",
        acceptance=spec.acceptance,
        trace_seed=trace_seed,
        **model_drafting(model, spec.draft_tokens, spec.draft_source),
        **engine_kwargs,
    )


def add(engine: Engine, prompt: torch.Tensor, index: int, exits: Exits = None, new_tokens: int | None = None) -> int:
    """Queue prompt number `index` with seed `index` and, under a replayed trace, its row of it."""
    if isinstance(engine, SpecEngine):  # its trace is an acceptance, seeded per request
        return engine.add_request(prompt, seed=index, max_new_tokens=new_tokens)
    replay = engine.exit_source == "trace" and isinstance(exits, ExitReplay)
    trace = exits.layers[index % len(exits.layers)] if replay else None
    return engine.add_request(prompt, seed=index, trace=trace, max_new_tokens=new_tokens)


def build_engine(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    policy: str,
    new_tokens: int,
    exits: Exits = None,
    **engine_kwargs: Any,
) -> tuple[Engine, list[int]]:
    """An engine holding one request per prompt (seed = its index); see `new_engine`."""
    max_len = max(p.shape[0] for p in prompts) + new_tokens
    engine = new_engine(model, policy, new_tokens, len(prompts), max_len, exits, **engine_kwargs)
    return engine, [add(engine, p, i, exits) for i, p in enumerate(prompts)]


@torch.no_grad()
def run_interleaved(
    engines: dict[str, Engine], prompts: Sequence[torch.Tensor], new_tokens: int, exits: Exits = None
) -> dict[str, dict]:
    """The same prompts through every engine (their statistics reset first), stepped round-robin;
    returns each one's summary. Engines are reused from run to run: a CUDA engine captures its
    graphs and measures its costs once."""
    ids = {}
    for policy, engine in engines.items():
        engine.reset_stats()
        ids[policy] = [add(engine, p, i, exits, new_tokens) for i, p in enumerate(prompts)]
    step_in_turn(engines.values())
    return {p: summary(engine, ids[p]) for p, engine in engines.items()}


def speedup(policies: dict[str, dict], name: str, base: str) -> float | None:
    """Median over repeats of `name`'s decode tokens/s over `base`'s in the same repeat (the same
    stretch of time); None when either policy did not run."""
    if base not in policies or name not in policies:
        return None
    a = policies[name].get("decode_tokens_per_s_runs", [policies[name]["decode_tokens_per_s"]])
    b = policies[base].get("decode_tokens_per_s_runs", [policies[base]["decode_tokens_per_s"]])
    ratios = sorted(x / y for x, y in zip(a, b) if y > 0)
    return ratios[len(ratios) // 2] if ratios else None


def summary(engine: Engine, ids: Sequence[int]) -> dict:
    """One engine's statistics, outputs, exit layers and token latencies (its own clock); for a
    SpecEngine, `spec_summary`'s instead of exit layers (its tokens are all full depth's)."""
    results = engine.finished
    stats = engine.stats.to_dict()
    stats["outputs"] = [results[i].tokens for i in ids]
    if isinstance(engine, SpecEngine):
        stats |= spec_summary(engine)
    else:
        stats["mean_layers"] = stats["min_layer_rows"] / max(stats["decoded_tokens"], 1)
        stats["exit_layers"] = [results[i].exit_layers for i in ids]
    gaps = [
        (b - a) * 1e3 for i in ids for a, b in zip(results[i].token_times, results[i].token_times[1:])
    ]  # time per output token, each decoded token's own
    stats["tpot_ms"] = {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "mean": _mean(gaps)}
    if isinstance(engine, DrexEngine) and engine.cost is not None:
        stats["cost_model"] = engine.cost.to_dict() | {"source": engine.cost.source}
    return stats


def spec_summary(engine: SpecEngine) -> dict:
    """A self_spec row's settings, its store's size, its cost constants and the layer-count ceiling:
    `spec_speedup_ceiling` at the per-draft acceptance it measured and its k (adaptive: the mean
    number of drafts per round it made). `mean_layers` is its layer evaluations per decoded token."""
    stats = engine.stats
    k = engine.fixed_k if engine.fixed_k is not None else stats.mean_draft_tokens
    return {
        "draft_source": engine.source,
        "draft_exit": None if engine.source == "ngram" else engine.draft_exit,
        "ngram_acceptance": stats.ngram_accepted / stats.ngram_drafted if stats.ngram_drafted else None,
        "draft_tokens": "adaptive" if engine.adaptive else engine.fixed_k,
        "exit_source": engine.exit_source,
        "acceptance_setting": engine.acceptance,
        "mean_layers": stats.layers_per_token,
        "kv_cache_bytes": engine.store.nbytes(),
        "spec_cost": engine.cost.to_dict(),
        "layer_ceiling": spec_speedup_ceiling(engine.num_layers, engine.draft_exit, stats.per_draft_acceptance, k)
        if engine.source == "head"
        else None,  # text drafts cost no layers and their verify runs every layer: no layer-count ceiling
    }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of positions where two runs emitted the same token (up to the shorter of each pair)."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(int(i == j) for i, j in zip(x[:n], y[:n]))
        total += n
    return same / max(total, 1)


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 of each text against its reference (`rouge-score`); None when not installed."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, cand)["rougeL"].fmeasure for cand, ref in zip(candidates, references)]
    return _mean(scores)


HF_PEERS = {  # HF's own lossless tricks, beside its plain generate: name -> generate() keywords
    "hf_prompt_lookup": lambda model: {"prompt_lookup_num_tokens": 10},
    "hf_assistant_early_exit": lambda model: {"assistant_early_exit": model.exit_layers[0] + 1},
}


def hf_peers(model: EarlyExitModelForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int) -> dict[str, dict]:
    """HF's prompt lookup (10 tokens, its default n-gram sizes) and its `assistant_early_exit` (the
    base model's first exit_layers[0] + 1 layers and its own lm_head draft; no trained heads) on the
    same batch, as `hf_generate` times them; a peer HF refuses (batch > 1) gets its refusal, quoted."""
    out = {}
    for name, keywords in HF_PEERS.items():
        try:
            out[name] = hf_generate(model, prompts, new_tokens, name, **keywords(model))
        except ValueError as error:  # "assisted generate is only supported for batch_size = 1"
            out[name] = {"policy": name, "refused": str(error).splitlines()[0][:200]}
    return out


@torch.no_grad()
def hf_generate(
    model: EarlyExitModelForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int, name: str = "hf_generate",
    **keywords: Any,
) -> dict:  # fmt: skip
    """HF's own greedy `generate` on the base model (full depth), left-padded batch: decode tokens/s
    from the difference of a `new_tokens` run and a 1-token run (which is the prefill). `keywords`:
    more `generate()` arguments (HF's peers, `hf_peers`)."""
    device, pad = model.heads_device, 0
    ids, mask = left_padded(list(prompts), pad, device)
    width = ids.shape[1]

    def timed(n: int) -> tuple[float, torch.Tensor]:
        synchronize(device)
        start = time.perf_counter()
        out = model.base_model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
            **keywords,
        )  # fmt: skip
        synchronize(device)
        return time.perf_counter() - start, out[:, width:]

    timed(2)  # warm-up
    prefill_s, _ = timed(1)
    total_s, new = timed(new_tokens)
    decoded = len(prompts) * (new_tokens - 1)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "policy": name,
        "decode_tokens_per_s": decoded / decode_s,
        "wall_s": total_s,
        "prefill_s": prefill_s,
        "tokens": len(prompts) * new_tokens,
        "outputs": new.tolist(),
    }


class _Stamps:
    """A logits processor that notes when the first and the last token's logits were ready (the device
    synchronised then only: a sync per token would take away the overlap HF's own loop has)."""

    def __init__(self, device: torch.device, tokens: int) -> None:
        self.device, self.tokens, self.calls, self.times = device, tokens, 0, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls in (0, self.tokens - 1):
            synchronize(self.device)
            self.times.append(time.perf_counter())
        self.calls += 1
        return scores


@torch.no_grad()
def hf_generate_static(model: EarlyExitModelForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int) -> dict:
    """HF's fastest full-depth path: `generate(cache_implementation="static")`, which on CUDA compiles
    the decode step itself (transformers' automatic `torch.compile(mode="reduce-overhead")` of a
    static-cache forward: CUDA graphs of its own). Two untimed runs compile and record; the third is
    timed from the first token's logits to the last's (decode = the tokens after the first). A
    failure is reported in the result, not raised."""
    from transformers import LogitsProcessorList

    device, pad = model.heads_device, 0
    base = model.base_model
    ids, mask = left_padded(list(prompts), pad, device)

    def run() -> tuple[torch.Tensor, _Stamps]:
        stamps = _Stamps(device, new_tokens)
        out = base.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad, cache_implementation="static", logits_processor=LogitsProcessorList([stamps]),
        )  # fmt: skip
        return out, stamps

    try:
        start = time.perf_counter()
        for _ in range(2):
            run()
        prepare_s = time.perf_counter() - start
        out, stamps = run()
    except Exception as error:  # an HF/torch version that cannot run this path: say so in the table
        return {"policy": "hf_generate_static", "error": f"{type(error).__name__}: {str(error)[:300]}"}
    decode_s = max(stamps.times[-1] - stamps.times[0], 1e-9)
    return {
        "policy": "hf_generate_static",
        "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / decode_s,
        "compile_and_warmup_s": prepare_s,
        "compiled": getattr(base, "_compiled_call", None) is not None,  # transformers' own compile ran
        "tokens": len(prompts) * new_tokens,
        "outputs": out[:, ids.shape[1] :].tolist(),
    }


def parse_distribution(text: str, seed: int = 0) -> ExitDistribution:
    """'0.2,0.25,0.2,0.35' -> an ExitDistribution (P per exit point, then full depth)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GenerationInputError(f"--exit-dist takes comma-separated probabilities, got {text!r}") from None
    return ExitDistribution(values, seed=seed)


@dataclass
class BatchResult:
    batch: int
    policies: dict[str, dict]
    hf: dict | None = None
    measured_oracle: dict | None = None  # see drex_hf.bench.measure.measured_oracle
    hf_static: dict | None = None  # HF's static cache + torch.compile (CUDA)
    hf_peers: dict[str, dict] | None = None  # HF's prompt lookup and assistant_early_exit (`hf_peers`)

    def measured_oracle_tokens_per_s(self) -> float | None:
        """Full depth's tokens/s × the measured oracle's speed-up (drex's exits at no exit cost)."""
        full = self.policies.get("full")
        if not full or not self.measured_oracle or not self.measured_oracle.get("speedup"):
            return None
        return full["decode_tokens_per_s"] * self.measured_oracle["speedup"]

    def oracle_tokens_per_s(self, num_layers: int) -> float | None:
        """Full depth's tokens/s × L ÷ drex's measured mean exit depth: what those exits allow."""
        full, drex = self.policies.get("full"), self.policies.get("drex")
        if not full or not drex or not drex["mean_layers"]:
            return None
        return full["decode_tokens_per_s"] * num_layers / drex["mean_layers"]


def _measure_engine(
    engine: Engine, prompts: Sequence[torch.Tensor], exits: Exits, new_tokens: int, memory: bool, busy: bool
) -> dict:
    """Untimed extras on an engine after its timed runs: memory (row state, peak decode allocations of
    a short run) and, on CUDA, the share of decode wall time the GPU's kernels were busy."""
    out: dict = {}
    if memory:
        engine.reset_stats()
        for i, p in enumerate(prompts):
            add(engine, p, i, exits, min(MEMORY_TOKENS, new_tokens))
        out["row_state_bytes"] = row_state_bytes(engine)
        out["peak_decode_bytes"] = peak_decode_bytes(engine)
    if busy:
        engine.reset_stats()
        for i, p in enumerate(prompts):
            add(engine, p, i, exits, new_tokens)
        out["gpu_busy"] = gpu_busy_share(engine)
    return out


def _run_group(
    model: EarlyExitModelForCausalLM,
    group: Sequence[str],
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    max_len: int,
    exits: Exits,
    repeats: int,
    runs: dict[str, list[dict]],
    extras: dict[str, dict],
    memory: bool,
    busy: bool,
    progress: Any,
    share: float,
    trace_seed: int,
    engine_kwargs: dict,
) -> None:
    """One engine per policy of `group`, their warm-up, `repeats` interleaved runs (into `runs`) and
    the untimed extras (into `extras`); the engines, and their key/value stores, are gone on return."""
    engines = {
        p: new_engine(model, p, new_tokens, len(prompts), max_len, exits, trace_seed, **engine_kwargs) for p in group
    }
    run_interleaved(engines, prompts, min(4, new_tokens), exits)  # warm-up, untimed
    for _ in range(repeats):
        for policy, stats in run_interleaved(engines, prompts, new_tokens, exits).items():
            runs[policy].append(stats)
        if progress:
            progress(share)
    for policy in group:
        extras[policy] = _measure_engine(engines[policy], prompts, exits, new_tokens, memory, busy)


def bench(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
    new_tokens: int,
    policies: Sequence[str] = POLICIES,
    exits: Exits = None,
    repeats: int = 1,
    hf: bool = True,
    tokenizer: Any = None,
    progress: Any = None,
    memory: bool = True,
    oracle: bool = True,
    hf_static: bool = False,
    hf_lossless: bool = False,
    sequential: bool = False,
    gpu_busy: bool = False,
    trace_seed: int = 0,
    **engine_kwargs: Any,
) -> list[BatchResult]:
    """Every batch size: one engine per policy (built once: a CUDA engine captures its graphs and
    measures its costs there), a warm-up, then `repeats` interleaved runs of all policies on the
    batch's prompts (the first `batch` of `prompts`, cycled when there are fewer); the median run per
    policy (by decode tokens/s) is kept, with every run's tokens/s beside it. `sequential`: one
    policy's engine at a time (for shapes whose key/value stores do not fit side by side), each
    with its warm-up and repeats. Agreement and ROUGE-L are against full depth's outputs of the same
    run. Then, untimed, on each engine: with `memory`, its memory on a short run of at most
    `MEMORY_TOKENS` tokens; with `gpu_busy` (CUDA), the share of time its kernels kept the GPU busy;
    with `oracle` (and both full and drex run), the measured oracle on the kept drex run's exits.
    `hf_static` adds HF's static-cache generate (compiled by transformers itself on CUDA) beside HF's
    eager one; `hf_lossless` HF's prompt lookup and assistant_early_exit (`hf_peers`: batch 1 only,
    HF refuses more, and the refusal is recorded). Self_spec rows must be complete (`expand_policies`);
    they get `speedup_vs_full` (the median within-repeat ratio), and their trace coins are seeded by
    `trace_seed`."""
    check_policies(policies)
    for policy in policies:
        if is_spec(policy):
            spec_policy(policy)  # complete, before any engine is built
    if not prompts:
        raise GenerationInputError("no prompts to benchmark")
    out = []
    for batch in batch_sizes:
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        max_len = max(p.shape[0] for p in chosen) + new_tokens
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        extras: dict[str, dict] = {}
        groups = [[p] for p in policies] if sequential else [list(policies)]
        for group in groups:
            _run_group(model, group, chosen, new_tokens, max_len, exits, repeats, runs, extras, memory, gpu_busy,
                       progress, 1 / len(groups), trace_seed, engine_kwargs)  # fmt: skip
        kept = {}
        for policy, done in runs.items():
            median = sorted(done, key=lambda s: s["decode_tokens_per_s"])[len(done) // 2]
            median["decode_tokens_per_s_runs"] = [s["decode_tokens_per_s"] for s in done]
            kept[policy] = median | extras[policy]
        full = kept.get("full")
        for stats in kept.values():
            if full is not None:
                stats["agreement_with_full"] = agreement(stats["outputs"], full["outputs"])
                if tokenizer is not None:
                    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in stats["outputs"]]
                    refs = [tokenizer.decode(t, skip_special_tokens=True) for t in full["outputs"]]
                    stats["rouge_l_vs_full"] = rouge_l(texts, refs)
        for policy, stats in kept.items():
            if is_spec(policy):
                stats["speedup_vs_full"] = speedup(kept, policy, "full")
        result = BatchResult(batch, kept, hf_generate(model, chosen, new_tokens) if hf else None)
        if hf_static:
            result.hf_static = hf_generate_static(model, chosen, new_tokens)
        if hf and hf_lossless:
            result.hf_peers = hf_peers(model, chosen, new_tokens)
        if oracle and "full" in kept and "drex" in kept:
            result.measured_oracle = measured_oracle(model, chosen, kept["drex"]["exit_layers"])
        out.append(result)
    return out


@torch.no_grad()
def sla_run(
    model: EarlyExitModelForCausalLM,
    prompts: Sequence[torch.Tensor],
    policy: str,
    new_tokens: int,
    rate: float,
    sla_tpot_ms: float,
    max_batch: int,
    exits: Exits = None,
    seed: int = 0,
) -> dict:
    """Requests arriving as a Poisson process at `rate` per second (seeded), one per prompt, served by
    one engine of `max_batch` slots (continuous batching: a request joins when it has arrived and a
    slot is free). Time is the engine's own clock plus the idle gaps waiting for arrivals. A request
    meets the SLA when its time per output token is at most `sla_tpot_ms`; goodput = requests meeting
    it per second of the whole run. drex is given the SLA to schedule by."""
    if rate <= 0 or sla_tpot_ms <= 0:
        raise GenerationInputError(f"the request rate and sla_tpot_ms must be positive, got {rate} and {sla_tpot_ms}")
    name = policy.partition("@")[0]
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        t += rng.expovariate(rate)
        arrivals.append(t)
    max_len = max(p.shape[0] for p in prompts) + new_tokens
    sla = {"sla_tpot_ms": sla_tpot_ms} if name == "drex" else {}
    engine = new_engine(model, policy, new_tokens, max_batch, max_len, exits, **sla)
    idle, waiting, ids = 0.0, list(range(len(prompts))), {}
    while waiting or engine.requests or engine.prefill_queue:
        now = engine.stats.wall_s + idle
        while waiting and arrivals[waiting[0]] <= now and engine.has_free_slot:
            i = waiting.pop(0)
            ids[i] = add(engine, prompts[i], i, exits)
        if not engine.step():  # nothing to run: wait for the next arrival
            idle += max(0.0, arrivals[waiting[0]] - now)
    total = engine.stats.wall_s + idle
    tpots, met = [], 0
    for rid in ids.values():
        times = engine.finished[rid].token_times
        tpot = (times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else 0.0
        tpots.append(tpot)
        met += tpot <= sla_tpot_ms
    return {
        "policy": policy,
        "requests": len(prompts),
        "rate": rate,
        "sla_tpot_ms": sla_tpot_ms,
        "met_sla": met,
        "goodput_requests_per_s": met / total if total > 0 else None,
        "throughput_requests_per_s": len(prompts) / total if total > 0 else None,
        "tpot_ms": {"p50": percentile(tpots, 50), "p99": percentile(tpots, 99)},
        "wall_s": total,
        "decode_tokens_per_s": engine.stats.to_dict()["decode_tokens_per_s"],
        "involuntary_exits": getattr(engine.stats, "involuntary_exits", 0),  # self_spec: none, by construction
    }
