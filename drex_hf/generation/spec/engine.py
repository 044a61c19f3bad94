"""`SpecEngine`: batched self-speculative decoding with continuous batching — lossless early exit.

Each row decodes in rounds. A round drafts up to k tokens with the exit head after layer
`draft_exit` (layers 0..draft_exit run for each draft's input, so their keys/values there are exact),
then one verify pass runs the drafted positions through the remaining layers — the last input
through all of them — and keeps the longest prefix on which the drafts agree with full depth, plus
one token from full depth. Rejected positions are dropped by shortening the row: its pending
position moves back, and whatever the rejected drafts wrote past it is rewritten before anything
reads it. `spec.reference.SelfSpecDecoder` is the one-request reference this engine equals.

It runs on the same `Runner` as `DrexEngine` (slot state, store, prefill, graphs), whose segments
are the draft exit's, with two more programs (`spec.programs`): a step is the prefill, a draft
step (every row still drafting drafts one token) or, when none drafts, one verify pass over every
row. The host plans each step from the last (which rows draft, how many): one upload, one program
at the rows' bucket (a captured graph on CUDA), one read. Greedy output equals full depth token for
token; sampling uses the standard speculative acceptance rule with counter-based draws (sub-streams
FULL / DRAFT / ACCEPT of the request's seed), so a request's tokens are distributed as full depth's
and do not depend on its neighbours.

`draft_tokens`: a fixed k, or "adaptive": each round, the k in 0..max_draft_tokens that maximises
expected tokens per unit of cost under the row's own per-draft acceptance and the engine's `SpecCost`
(k = 0 is a plain full-depth step). `draft_confidence`: a row stops drafting at a draft whose head
confidence is below it (not proposed; its input's layers have run, the verify pass redoes them).
`exit_source="trace"` replays acceptance instead: each draft accepted with probability `acceptance`
(seeded per request) — the machinery's cost on random-weight models of real sizes.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from drex_hf.config import DRAFT_SOURCES
from drex_hf.device import time_ms
from drex_hf.draft_layer import DraftLayer
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.checks import check_request, check_special_tokens
from drex_hf.generation.engine import (
    SlotEngine,
    TokenRates,
    _graph_mode,
    check_logprobs_capacity,
    check_request_logprobs,
)
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import row_buckets
from drex_hf.generation.protocol import EarlyExitModel
from drex_hf.generation.runner import Options, Runner
from drex_hf.generation.sampling import RequestSampling, as_seed
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.cost import SpecCost, best_k, judged_drafts
from drex_hf.generation.spec.ngram import MAX_NGRAM, MIN_NGRAM, CorpusIndex, NgramIndex, check_ngram_sizes
from drex_hf.generation.spec.priors import DraftPriors, VerifyCurve, allocate, text_draft
from drex_hf.generation.spec.programs import SpecPrograms
from drex_hf.generation.spec.reference import DRAFT, check_spec_arguments, spec_counter
from drex_hf.generation.spec.vocab import SubsetHead
from drex_hf.generation.state import (
    FinishCallback,
    Phase,
    Request,
    RequestOutput,
    Requests,
    TokenCallback,
    TokenLogprob,
)
from drex_hf.products import use_products
from drex_hf.seeds import check_seed

MAX_ADAPTIVE_DRAFT = 8  # the largest k adaptive drafting considers, unless max_draft_tokens says otherwise


@dataclass
class SpecRequestOutput(RequestOutput):
    """A request's tokens (every one full depth's: `exit_layers` hold L-1) and, per verify round, how
    many tokens it drafted and how many of them were accepted."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        total = sum(self.drafted)
        return sum(self.accepted) / total if total else 0.0


@dataclass
class SpecStats(TokenRates):
    """What a run did. `layer_rows`: layer evaluations on real positions (drafts' shallow layers, the
    verify pass's, the prefill's excluded), of which `draft_layer_rows` the draft steps' (draft_exit + 1
    per drafting row: the verify pass's own shallow pass for a round's last input counts as verify);
    `padded_layer_rows`: those a verify pass spent on padding positions (rows verifying fewer drafts
    than the longest); `tested`: drafts the verify pass judged (a round's drafts up to and including
    its first rejection: later ones are dropped unjudged); `uploads`/`reads`: host-device copies."""

    policy: str = "self_spec"
    tokens: int = 0
    decoded_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tested: int = 0
    layer_rows: int = 0
    draft_layer_rows: int = 0
    padded_layer_rows: int = 0
    steps: int = 0
    draft_steps: int = 0
    verify_steps: int = 0
    prefill_steps: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    uploads: int = 0
    reads: int = 0
    draft_lengths: dict[int, int] = field(default_factory=dict)  # rounds per k chosen
    fresh_verify_steps: int = 0  # verify passes with some row's drafts from its text (every input, every layer)
    ngram_rounds: int = 0  # rounds whose drafts came from the row's own text, and their drafts
    ngram_drafted: int = 0
    ngram_accepted: int = 0
    allocated_rounds: int = 0  # greedy rows' text drafts offered to a verify pass's allocation (`spec.priors`)
    offered_drafts: int = 0  # the drafts those rows offered, and those the allocation kept
    allocated_drafts: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted ones (a rejection also drops the round's later drafts)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_draft_acceptance(self) -> float:
        """Accepted drafts over judged ones: the chance that a draft the verify pass reaches is
        accepted — the `a` of `SpecCost.speedup`'s model, and what a trace's `acceptance` states."""
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def mean_draft_tokens(self) -> float:
        """Drafts per round (adaptive drafting's mean k; a fixed k's, less rounds cut by the budget)."""
        return self.drafted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.decoded_tokens / self.rounds if self.rounds else 0.0

    @property
    def layers_per_token(self) -> float:
        return self.layer_rows / self.decoded_tokens if self.decoded_tokens else 0.0

    @property
    def draft_layers_per_token(self) -> float:
        return self.draft_layer_rows / self.decoded_tokens if self.decoded_tokens else 0.0

    @property
    def verify_layers_per_token(self) -> float:
        return (self.layer_rows - self.draft_layer_rows) / self.decoded_tokens if self.decoded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["draft_lengths"] = {str(k): v for k, v in sorted(self.draft_lengths.items())}
        for name in ("acceptance_rate", "per_draft_acceptance", "mean_draft_tokens", "tokens_per_round",
                     "layers_per_token", "draft_layers_per_token", "verify_layers_per_token", "tokens_per_s",
                     "decode_tokens_per_s"):  # fmt: skip
            out[name] = getattr(self, name)
        return out


@dataclass
class _Round:
    """A running request's round, on the host: its pending token (the last emitted, whose keys/values
    are not stored yet) sits at `position`; `drafts` are this round's proposals after it."""

    request: Request
    position: int = 0
    k: int = 0  # drafts this round may make
    drafts: list[int] = field(default_factory=list)
    drafting: bool = False
    source: str = "head"  # where this round's drafts come from: "head" (draft steps) or "ngram" (its text)
    text: NgramIndex | None = None  # the row's prompt and tokens, indexed (n-gram drafting)
    draft_class: str | None = None  # a text draft the batch's allocation trims (`spec.priors`), else None
    judged: dict[str, list[int]] = field(default_factory=dict)  # per source: [drafts accepted, judged]

    @property
    def index(self) -> int:
        """The number of the first token this round decides (tokens so far)."""
        return len(self.request.output.tokens)


def _draft_layer(model: Any, draft_layer: Any, draft_exit: int | None, source: str) -> DraftLayer | None:
    """SpecEngine's `draft_layer` option, checked: the `DraftLayer` head drafts go through, or None."""
    if draft_layer is None or source == "ngram":
        return None
    if isinstance(draft_layer, str) and draft_layer == "auto":
        draft_layer = (getattr(model, "draft_layers", None) or {}).get(draft_exit)
        if draft_layer is None:
            return None
    if not isinstance(draft_layer, DraftLayer):
        raise GenerationTypeError(f"draft_layer must be 'auto', None or a DraftLayer, got {draft_layer!r}")
    if draft_layer.exit_layer != draft_exit:
        raise GenerationInputError(
            f"the draft layer follows exit {draft_layer.exit_layer}, but drafts come from exit {draft_exit}"
        )
    if draft_layer.lm_head is not model.arch.lm_head:
        raise GenerationInputError("the draft layer was built on another model (its lm_head is not this model's)")
    weight = model.arch.lm_head.weight
    if draft_layer.gate.device != weight.device or draft_layer.gate.dtype != weight.dtype:
        draft_layer.to(device=weight.device, dtype=weight.dtype)  # the model moved since it was loaded
    return draft_layer


def model_drafting(model: Any, draft_tokens: Any = None, draft_source: str = "head") -> dict[str, Any]:
    """What a heads folder ships for drafting, as `SpecEngine` options: its draft corpus (rows without a
    match in their own text) and draft vocabulary (head drafts), None where it ships none; and, for
    adaptive drafting from text (`draft_tokens` "adaptive", `draft_source` ngram / mixed), its draft
    priors where it ships them. Every front (`generate()`, `drex serve`, `drex bench`, the calibrator)
    builds its self_spec engines with these."""
    options = {"draft_corpus": getattr(model, "draft_corpus", None), "draft_vocab": getattr(model, "draft_vocab", None)}
    priors = getattr(model, "draft_priors", None)
    if priors is not None and draft_tokens == "adaptive" and draft_source != "head":
        options["draft_priors"] = priors
    return options


class SpecEngine(SlotEngine):
    """Continuous batching by self-speculation; see the module docstring.

    Args:
        model: an early-exit model.
        max_batch / max_len: slots, and positions per slot (a request needs prompt + max_new_tokens).
        draft_exit: the exit layer whose head drafts (one of `model.exit_layers`; draft_source "ngram"
            needs none).
        draft_tokens: k, the drafts per round (at most, for n-gram drafts), or "adaptive" (see the
            module docstring).
        draft_source: "head" (the exit head drafts), "ngram" (each row drafts from an n-gram match in
            its own prompt and tokens, `spec.ngram`; a row without a match makes a full-depth step) or
            "mixed" (per row and round: its text's draft where it has one, else the head's).
        ngram_min / ngram_max: the suffix lengths an n-gram draft matches, longest first.
        ngram_prior: adaptive: the acceptance an n-gram draft starts from, worth two drafts.
        draft_corpus: "ngram" / "mixed": a `CorpusIndex` (the model's own answers) a row drafts from
            when its own text has no match (default: none).
        draft_vocab: "head" / "mixed": token ids the head drafts among (`spec.vocab.SubsetHead`: its
            logits are a product with those rows of the lm_head only); verification and every emitted
            token still use the whole vocabulary (default: None, the whole vocabulary).
        max_draft_tokens: adaptive: the largest k considered (default 8).
        draft_priors: adaptive, "ngram" / "mixed": a `DraftPriors` (the folder's `draft_priors.json`):
            each greedy row drafts up to max_draft_tokens from its text, and each verify pass keeps
            the drafted positions worth their cost to the whole batch (`spec.priors.allocate`);
            sampled rows keep their own adaptive k.
        verify_curve: with draft_priors, the verify pass's cost by positions (default: measured at
            start-up, `measure_verify_curve`).
        draft_layer: "head" / "mixed": "auto" (default): the model's trained draft layer at draft_exit
            (`model.draft_layers`, the folder's `draft_layer.safetensors`) where it has one, else the
            exit head; None: the exit head; or a `DraftLayer` for draft_exit. A draft layer runs one
            decoder layer after the exit before the head (`drex_hf.draft_layer`); it drafts, never emits.
        draft_confidence: stop drafting at a draft whose head confidence is below this (None: never).
        settings: decoding settings; logits processors and stop strings are refused (not supported yet).
        cost: the `SpecCost` adaptive drafting weighs k with (default: `measure_spec_cost` at start-up).
        prior_acceptance: adaptive: the acceptance a row starts from, worth two drafts.
        exit_source: `heads`, or `trace` with `acceptance`: each draft accepted with that probability.
        trace_seed: a trace's coins: request i's come from trace_seed + i (or + its seed when given).
        graphs / lazy_capture / static_shapes / buckets: as `DrexEngine`'s (CUDA graphs by default on CUDA).
        keep_finished: keep finished requests in `finished` (what `run()` returns).
    """

    def __init__(self, model: EarlyExitModel, *, max_batch: int, max_len: int, draft_exit: int | None = None,
                 draft_tokens: int | str = 4, max_draft_tokens: int | None = None, draft_source: str = "head",
                 ngram_min: int = MIN_NGRAM, ngram_max: int = MAX_NGRAM, ngram_prior: float = 0.5,
                 draft_corpus: CorpusIndex | None = None, draft_vocab: torch.Tensor | None = None,
                 draft_confidence: float | None = None, settings: DecodeSettings | None = None,
                 cost: SpecCost | None = None, exit_source: str = "heads", acceptance: float | None = None,
                 trace_seed: int = 0, keep_finished: bool = True, prior_acceptance: float = 0.5,
                 graphs: Any = None, lazy_capture: bool = True, static_shapes: bool | None = None,
                 buckets: Sequence[int] | None = None, progress: bool | None = None,
                 per_request_sampling: bool = False, logprobs: int | None = None,
                 draft_priors: DraftPriors | None = None, verify_curve: VerifyCurve | None = None,
                 draft_layer: Any = "auto") -> None:  # fmt: skip
        model.arch.check_attention_implementation()
        for name, value, low in (("max_batch", max_batch, 1), ("max_len", max_len, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GenerationInputError(f"{name} must be an integer >= {low}, got {value!r}")
        settings = settings or DecodeSettings(max_new_tokens=32)
        self.adaptive = draft_tokens == "adaptive"
        k_max = _k_max(draft_tokens, max_draft_tokens, self.adaptive)
        draft_exit = _draft_exit(model, draft_source, draft_exit)
        check_spec_arguments(model, settings, draft_exit, k_max)
        _check_spec_options(draft_confidence, exit_source, acceptance, prior_acceptance, cost)
        check_ngram_sizes(ngram_min, ngram_max)
        _check_prior("ngram_prior", ngram_prior)
        self.source, self.ngram_sizes, self.ngram_prior = draft_source, (ngram_min, ngram_max), ngram_prior
        if draft_corpus is not None and not isinstance(draft_corpus, CorpusIndex):
            raise GenerationTypeError(f"draft_corpus must be a CorpusIndex, got {type(draft_corpus).__name__}")
        self.corpus = draft_corpus if draft_source != "head" else None
        check_special_tokens(settings, model.arch.vocab_size)
        self.model, self.arch, self.settings = model, model.arch, settings
        self.num_layers = self.arch.num_layers
        self.draft_exit, self.k_max = draft_exit, k_max
        self.fixed_k = None if self.adaptive else draft_tokens
        self.draft_confidence, self.prior_acceptance = draft_confidence, prior_acceptance
        self.exit_source, self.acceptance, self.trace_seed = exit_source, acceptance, int(trace_seed)
        self.eos, self.keep_finished = set(settings.eos_token_ids), keep_finished
        limit = self.arch.position_limit
        self.max_len = min(max_len, limit) if limit is not None else max_len
        graphs, static = _graph_mode(settings, graphs, static_shapes, torch.device(model.heads_device))
        # k + 1 spare positions: a verify pass over a shorter round writes past the row's last draft
        self.store = RowKVCache.for_model(model, max_batch, self.max_len + k_max + 1)
        options = Options(boundaries=[draft_exit], thresholds=[float("inf")],
                          buckets=list(buckets) if buckets else row_buckets(max_batch, static), static=static,
                          eos=tuple(settings.eos_token_ids), do_sample=settings.do_sample,
                          warpers=tuple(settings.warpers()), fills=False, per_request=per_request_sampling,
                          logprobs=check_logprobs_capacity(logprobs))  # fmt: skip
        self.runner = Runner(model, self.store, options, graphs=graphs, lazy=lazy_capture)
        self.draft_layer = _draft_layer(model, draft_layer, draft_exit, draft_source)
        self.head = self.draft_layer or model.heads[model.exit_layers.index(draft_exit)]
        if draft_vocab is not None and draft_source != "ngram":  # drafts among the subset's tokens only
            self.head = SubsetHead(self.head, draft_vocab, self.arch.vocab_size)
        self.programs = SpecPrograms(self.runner, self.head, k_max, acceptance if exit_source == "trace" else None,
                                     settings, draft_confidence, self.draft_layer)  # fmt: skip
        self.device = self.runner.device
        self.per_request_sampling, self.logprobs = per_request_sampling, options.logprobs
        self._default_sampling = RequestSampling.from_settings(settings)
        self.shallow, self.deep = range(0, draft_exit + 1), range(draft_exit + 1, self.num_layers)
        self.requests = Requests(self.store.allocate, self.store.release)
        self.rounds: dict[int, _Round] = {}  # by slot
        self.finished: dict[int, SpecRequestOutput] = {}
        self.stats = SpecStats()
        self._stepping, self._cancels, self.step_count = False, [], 0
        self._step_start = time.perf_counter()
        self.priors = _check_priors(draft_priors, verify_curve, self.adaptive, draft_source)
        self.ngram_cost, self.verify_curve = None, verify_curve
        with use_products(self.runner.products):  # timed with the kernels the steps run
            if cost is None and self.adaptive:
                cost, self.ngram_cost = measure_spec_cost(self), measure_ngram_cost(self)
            if self.priors is not None and verify_curve is None:
                self.verify_curve = measure_verify_curve(self)
        self.cost = cost or SpecCost.from_layers(self.num_layers, draft_exit)
        self.ngram_cost = self.ngram_cost or SpecCost(draft=0.0, verify_fixed=self.cost.verify_fixed,
                                                      verify_per_position=self.cost.verify_per_position,
                                                      full=self.cost.full, source=self.cost.source)  # fmt: skip

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: torch.Tensor | Sequence[int], *, max_new_tokens: int | None = None,
                    seed: int | None = None, callback: TokenCallback | None = None,
                    on_finish: FinishCallback | None = None, sampling: RequestSampling | None = None,
                    logprobs: int | None = None) -> int:  # fmt: skip
        """Queue a prompt (1-D token ids); returns its request id. Errors before any work, as
        `DrexEngine.add_request`: an empty prompt, ids outside the vocabulary, no room, no free slot.
        `sampling` and `logprobs` as `DrexEngine.add_request`'s (presence and frequency penalties are
        refused: verification keeps full depth's own distribution)."""
        default = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids, max_new = check_request(prompt, default, self.arch, self.max_len)
        seed = None if seed is None else check_seed(seed)
        sampling = self._check_sampling(sampling)
        if sampling is not None and sampling.penalised:
            raise GenerationInputError(
                "presence_penalty and frequency_penalty do not apply to self_spec: its tokens are full depth's "
                "own distribution's (use policy 'full' or 'drex')"
            )
        logprobs = check_request_logprobs(logprobs, self.logprobs)
        samples = self.settings.do_sample if sampling is None else not sampling.greedy

        def make(rid: int, slot: int, epoch: int) -> Request:
            trace_seed = as_seed(self.trace_seed + (rid if seed is None else int(seed)))
            drawn = seed if seed is not None else (int(torch.randint(0, 2**62, (1,))) if samples else 0)
            output = SpecRequestOutput(rid, int(ids.numel()))
            return Request(output, ids, int(max_new), as_seed(drawn), slot, epoch, callback, on_finish, sampling,
                           trace_seed=trace_seed, logprobs=logprobs)  # fmt: skip

        return self.requests.admit(make).output.request_id

    # ------------------------------------------------------------------ stepping (`SlotEngine.step`)
    def _step(self) -> bool:
        start = self._step_start = time.perf_counter()
        if self.requests.queued:
            self._prefill()
        elif not self.rounds:
            return False
        elif any(r.drafting for r in self.rounds.values()):
            self._draft_step([r for r in self.rounds.values() if r.drafting])
        else:
            self._verify_step(list(self.rounds.values()))
        self.stats.steps += 1
        self.stats.wall_s += time.perf_counter() - start
        self.stats.uploads, self.stats.reads = self.runner.transfers["uploads"], self.runner.transfers["reads"]
        return True

    def _prefill(self) -> None:
        """One batched full-depth pass over the queued prompts: each gets its first token (FULL draw
        0, as full depth's), then starts its first round."""
        start = time.perf_counter()
        batch = self.requests.take_queued()
        texts = {r.slot: self._text(r.prompt) for r in batch}
        self.step_count += 1
        self.runner.prefill(self.step_count, batch, enqueue=False)
        verdict = self.runner.read()
        tokens = verdict.rows["token"].astype(int).tolist()
        by_slot = {r.slot: r for r in batch}
        for slot, token in zip(sorted(by_slot), tokens):
            request = by_slot[slot]
            round_ = self.rounds[slot] = _Round(request, position=request.output.prompt_length, text=texts[slot])
            entry = None
            if request.logprobs is not None:  # the prefill's pick kept it at the token's sequence index
                entry = self._picked_logprob(request, request.output.prompt_length)
            if self._emit(round_, token, entry):
                self._start_round(round_)
        self.stats.prefill_steps += 1
        self.stats.prefill_s += time.perf_counter() - start

    def _start_round(self, round_: _Round) -> None:
        """The row's pending token now sits at `position`: choose this round's k (no more than tokens
        the row may still emit, one of them full depth's) and start drafting."""
        room = round_.request.max_new_tokens - round_.index - 1
        round_.drafts, round_.source, round_.drafting, round_.draft_class = [], "head", False, None
        if round_.text is not None:  # "ngram" / "mixed": the row's own text first, then the model's answers
            # a greedy row under priors drafts up to k_max; the verify pass keeps what pays (`_allocate`)
            allocated = self.priors is not None and not self._samples(round_.request)
            k = min(self.k_max if allocated else self._k("ngram", round_), room)
            draft_class, round_.drafts = text_draft(round_.text, self.corpus, k)
            round_.draft_class = draft_class if allocated else None
            if round_.drafts:
                round_.source, round_.k = "ngram", len(round_.drafts)
                return
        round_.k = max(0, min(self._k("head", round_), room)) if self.source != "ngram" else 0
        round_.drafting = round_.k > 0

    def _k(self, source: str, round_: _Round) -> int:
        """This round's k from `source`: the fixed one, or adaptive drafting's under the row's own
        acceptance of that source's drafts so far."""
        if self.fixed_k is not None:
            return self.fixed_k
        cost, prior = (self.ngram_cost, self.ngram_prior) if source == "ngram" else (self.cost, self.prior_acceptance)
        accepted, judged = round_.judged.get(source, (0, 0))
        return best_k(cost, accepted, judged, prior, self.k_max)

    def _samples(self, request: Request) -> bool:
        return self.settings.do_sample if request.sampling is None else not request.sampling.greedy

    def _allocate(self, rounds: list[_Round]) -> None:
        """Trim the greedy rows' text drafts to the positions worth this verify pass's cost
        (`spec.priors.allocate`); a row left with none makes a plain step."""
        offering = [r.source == "ngram" and r.draft_class is not None for r in rounds]
        if not any(offering):
            return
        offers = [r for r, o in zip(rounds, offering) if o]
        others = [r for r, o in zip(rounds, offering) if not o]
        offered = [(r.draft_class, len(r.drafts)) for r in offers]
        ks = allocate(offered, sum(len(r.drafts) + 1 for r in others), len(others), self.priors, self.verify_curve)
        for round_, k in zip(offers, ks):
            del round_.drafts[k:]
            round_.k = k
            if not k:
                round_.source = "head"  # no text drafts this round: the row takes a full-depth step
        self.stats.allocated_rounds += len(offers)
        self.stats.offered_drafts += sum(n for _, n in offered)
        self.stats.allocated_drafts += sum(ks)

    def _text(self, prompt: Any) -> NgramIndex | None:
        if self.source == "head":
            return None
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        return NgramIndex(ids, min_n=self.ngram_sizes[0], max_n=self.ngram_sizes[1])

    def _draft_step(self, rounds: list[_Round]) -> None:
        """Every drafting row drafts one token: its last input through layers 0..draft_exit, the draft
        head's pick (DRAFT draw of the token's index), and its confidence."""
        offsets = [len(r.drafts) for r in rounds]
        columns = [[r.request.slot for r in rounds], [r.position for r in rounds], offsets,
                   [spec_counter(r.index + o, DRAFT) for r, o in zip(rounds, offsets)],
                   [r.request.seed for r in rounds], [0] * len(rounds)]  # fmt: skip
        result = self.programs.run("draft", columns).tolist()
        self.stats.draft_steps += 1
        self.stats.layer_rows += len(rounds) * len(self.shallow)
        self.stats.draft_layer_rows += len(rounds) * len(self.shallow)
        for round_, (token, confidence, *_) in zip(rounds, result):
            if self.draft_confidence is not None and self.exit_source == "heads" and confidence < self.draft_confidence:
                round_.drafting = False  # not proposed; the verify pass reruns its input
                continue
            round_.drafts.append(int(token))
            if len(round_.drafts) >= round_.k or int(token) in self.eos:
                round_.drafting = False

    def _verify_step(self, rounds: list[_Round]) -> None:
        """Every row's round at once: the last input's shallow pass, the deep pass over each row's
        drafted positions + 1, the acceptance of each draft, then each row's tokens."""
        if self.priors is not None:
            self._allocate(rounds)
        width = max(len(r.drafts) for r in rounds)
        columns = [[r.request.slot for r in rounds], [r.position for r in rounds], [len(r.drafts) for r in rounds],
                   [r.index for r in rounds], [r.request.seed for r in rounds],
                   [r.request.trace_seed for r in rounds], [r.request.output.tokens[-1] for r in rounds],
                   [int(r.source == "ngram") for r in rounds]]  # fmt: skip
        drafts = [r.drafts + [0] * (width - len(r.drafts)) for r in rounds]
        fresh = any(r.source == "ngram" for r in rounds)
        result = self.programs.run("verify", columns, drafts).tolist()
        self.stats.verify_steps += 1
        real = sum(len(r.drafts) + 1 for r in rounds)
        self.stats.fresh_verify_steps += fresh
        layers = self.num_layers if fresh else len(self.deep)  # a fresh pass runs every input through all
        self.stats.layer_rows += (0 if fresh else len(rounds) * len(self.shallow)) + real * layers
        self.stats.padded_layer_rows += (len(rounds) * (width + 1) - real) * layers
        k = self.k_max
        logprobs = self.programs.last_logprobs
        for i, (round_, values) in enumerate(zip(rounds, result)):
            rows = logprobs[i].tolist() if logprobs is not None and round_.request.logprobs is not None else None
            self._finish_round(round_, values[:width], values[k : k + width + 1], rows)

    def _finish_round(
        self, round_: _Round, accepted: list[float], full: list[float], logprobs: list | None = None
    ) -> None:
        """Emit the row's accepted drafts and full depth's next token; the rejected positions go (the
        row's pending position moves only past what it kept). `logprobs`: the verify pass's row per
        position for the emitted token there (a request that asked for logprobs)."""
        n, kept, emitted = len(round_.drafts), 0, []
        for j in range(n):
            if not accepted[j]:
                emitted.append(int(full[j]))
                break
            emitted.append(round_.drafts[j])
            kept += 1
            if round_.drafts[j] in self.eos:
                break
        else:
            emitted.append(int(full[n]))
        out = round_.request.output
        out.drafted.append(n)
        out.accepted.append(kept)
        if n:
            tally = round_.judged.setdefault(round_.source, [0, 0])
            tally[0], tally[1] = tally[0] + kept, tally[1] + judged_drafts(n, kept)
        stats = self.stats
        if n and round_.source == "ngram":
            stats.ngram_rounds, stats.ngram_drafted = stats.ngram_rounds + 1, stats.ngram_drafted + n
            stats.ngram_accepted += kept
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + n, stats.accepted + kept
        stats.tested += judged_drafts(n, kept)
        stats.draft_lengths[round_.k] = stats.draft_lengths.get(round_.k, 0) + 1
        for j, token in enumerate(emitted):
            entry = None if logprobs is None else TokenLogprob.from_row(logprobs[j], round_.request.logprobs)
            if not self._emit(round_, token, entry):
                return
            round_.position += 1
        self._start_round(round_)

    def _emit(self, round_: _Round, token: int, entry: TokenLogprob | None = None) -> bool:
        """Append one token (with its `TokenLogprob` for a request that asked); False when it ended
        the request (eos or max_new_tokens)."""
        request = round_.request
        out = request.output
        out.tokens.append(int(token))
        out.exit_layers.append(self.num_layers - 1)
        if round_.text is not None:
            round_.text.append(token)
        out.token_times.append(self.stats.wall_s + time.perf_counter() - self._step_start)
        self.stats.tokens += 1
        if len(out.tokens) > 1:
            self.stats.decoded_tokens += 1
        self._tell(request, int(token), self.num_layers - 1, entry)
        if int(token) in self.eos:
            self._end(request, "stop")
            return False
        if len(out.tokens) >= request.max_new_tokens:
            self._end(request, "length")
            return False
        return True

    def _end(self, request: Request, reason: str) -> None:
        if request.phase is Phase.RUNNING:
            self.rounds.pop(request.slot, None)
        self._finished(request, reason)

    def row_state_bytes(self) -> int:
        """Bytes of the per-slot tensors besides the KV cache: the runner's, this round's exit states
        and (sampling) the drafts' distributions."""
        return self.runner.nbytes() + sum(t.nbytes for t in self.programs.tensors())

    def reset_stats(self) -> None:
        """Start counting afresh (and forget finished requests); benchmarks reuse one engine."""
        if len(self.requests):
            raise RuntimeError("reset_stats() while requests are running")
        self.stats = SpecStats()
        self.finished = {}
        self.requests.next_id = 0  # a trace's per-request coins are those of a new engine


def _k_max(draft_tokens: Any, max_draft_tokens: int | None, adaptive: bool) -> int:
    if adaptive:
        return MAX_ADAPTIVE_DRAFT if max_draft_tokens is None else max_draft_tokens
    if isinstance(draft_tokens, str):
        raise GenerationInputError(f"draft_tokens must be a positive integer or 'adaptive', got {draft_tokens!r}")
    if max_draft_tokens is not None:
        raise GenerationInputError("max_draft_tokens applies to draft_tokens='adaptive'")
    return draft_tokens


def _check_priors(priors: Any, curve: Any, adaptive: bool, source: str) -> DraftPriors | None:
    if priors is None:
        if curve is not None:
            raise GenerationInputError("verify_curve applies with draft_priors")
        return None
    if not isinstance(priors, DraftPriors):
        raise GenerationTypeError(f"draft_priors must be a DraftPriors, got {type(priors).__name__}")
    if curve is not None and not isinstance(curve, VerifyCurve):
        raise GenerationTypeError(f"verify_curve must be a VerifyCurve, got {type(curve).__name__}")
    if not adaptive:
        raise GenerationInputError("draft_priors choose each row's k: they need draft_tokens='adaptive'")
    if source == "head":
        raise GenerationInputError("draft_priors weigh drafts from the rows' text: draft_source must be ngram or mixed")
    return priors


def _check_prior(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationTypeError(f"{name} must be a number, got {value!r}")
    if not 0 < value < 1:
        raise GenerationInputError(f"{name} must be in (0, 1), got {value}")


def _draft_exit(model: EarlyExitModel, source: Any, draft_exit: int | None) -> int:
    """The exit whose head drafts; n-gram drafting needs none (the runner's split is then the deepest
    exit's, which only rounds without a match use)."""
    if source not in DRAFT_SOURCES:
        raise GenerationInputError(f"draft_source must be one of {list(DRAFT_SOURCES)}, got {source!r}")
    if draft_exit is None:
        if source != "ngram":
            raise GenerationInputError(f"draft_source {source!r} needs draft_exit=, the exit layer whose head drafts")
        return model.exit_layers[-1]
    return draft_exit


def _check_spec_options(
    draft_confidence: Any, exit_source: str, acceptance: Any, prior_acceptance: Any, cost: Any
) -> None:
    """Refuse self-speculation's own options when they are malformed, naming them."""
    if draft_confidence is not None and (
        isinstance(draft_confidence, bool) or not isinstance(draft_confidence, numbers.Real)
        or not 0 <= draft_confidence <= 1
    ):  # fmt: skip
        raise GenerationInputError(
            f"draft_confidence must be a probability in [0, 1] or None, got {draft_confidence!r}"
        )
    if exit_source not in ("heads", "trace"):
        raise GenerationInputError(f"unknown exit source {exit_source!r}; choose 'heads' or 'trace'")
    if exit_source == "trace":
        if acceptance is None or isinstance(acceptance, bool) or not isinstance(acceptance, numbers.Real):
            raise GenerationInputError("exit_source='trace' needs acceptance=, the probability a draft is accepted")
        if not 0 <= acceptance <= 1:
            raise GenerationInputError(f"acceptance must be in [0, 1], got {acceptance}")
    elif acceptance is not None:
        raise GenerationInputError("acceptance applies to exit_source='trace'")
    _check_prior("prior_acceptance", prior_acceptance)
    if cost is not None and not isinstance(cost, SpecCost):
        raise GenerationTypeError(f"cost must be a SpecCost, got {type(cost).__name__}")


def measure_ngram_cost(engine: SpecEngine, repeats: int = 5) -> SpecCost | None:
    """What a round of drafts from the rows' own text costs (None for head drafting): nothing to
    draft, and a fresh verify pass (every input through every layer), timed over 1 and k_max + 1
    positions per row on the still-empty slots, as `measure_spec_cost` times its passes."""
    if engine.source == "head":
        return None
    n = engine.store.slots
    position = max(min(16, engine.max_len - engine.k_max - 2), 0)

    def verify(q: int, fresh: bool) -> Callable[[], None]:
        return _verify_pass(engine, q, position, fresh)

    t_full = time_ms(verify(1, False), repeats, engine.device)
    t_one = time_ms(verify(1, True), repeats, engine.device)
    q = engine.k_max + 1
    if q < 3:
        per_position = max(time_ms(verify(q, True), repeats, engine.device) - t_one, 0.0) / (q - 1) if q > 1 else 0.0
        jump = 0.0
    else:  # a line through 2 and q positions, and the step from 1 to 2 (on a CPU, 2 to 4 rows can cost as 5)
        t_two = time_ms(verify(2, True), repeats, engine.device)
        per_position = max(time_ms(verify(q, True), repeats, engine.device) - t_two, 0.0) / (q - 2)
        jump = max(t_two - t_one - per_position, 0.0)
    return SpecCost(draft=0.0, verify_fixed=max(t_one - per_position, 0.0), verify_per_position=per_position,
                    full=t_full, source=f"measured at start-up ({n} rows, drafts from the rows' text)",
                    draft_fixed=jump)  # fmt: skip


def measure_verify_curve(engine: SpecEngine, repeats: int = 3) -> VerifyCurve:
    """A fresh verify pass's time on all of the engine's still-empty slots at 1, 2, 3, 4, 5 and
    k_max + 1 positions each (the best of `repeats`), as a `VerifyCurve` by packed positions. The
    rows sit half-way into their slots: on the CPU a pass of 3 positions at 16 tokens of context
    cost 1.03x one position, at 128 tokens 1.29x, so a short context would price positions too low."""
    n = engine.store.slots
    position = max(min(engine.max_len // 2, engine.max_len - engine.k_max - 2), 0)
    positions = sorted({q for q in (1, 2, 3, 4, 5) if q <= engine.k_max + 1} | {engine.k_max + 1})
    points = [(n * q, time_ms(_verify_pass(engine, q, position, True), repeats, engine.device)) for q in positions]
    return VerifyCurve(points, source=f"measured at start-up ({n} rows)")


def _verify_pass(engine: SpecEngine, q: int, position: int, fresh: bool) -> Callable[[], None]:
    """A verify pass over q positions in each of the engine's still-empty slots at `position` (fresh:
    every input through every layer, as text drafts run), to time."""
    n = engine.store.slots
    zeros = [0] * n
    columns = [list(range(n)), [position] * n, [q - 1] * n, zeros, zeros, zeros, zeros, [int(fresh)] * n]
    drafts = [[0] * (q - 1)] * n
    return lambda: engine.programs.run("verify", columns, drafts)


def measure_spec_cost(engine: SpecEngine, repeats: int = 5) -> SpecCost:
    """Time the engine's own programs on its still-empty slots, all `max_batch` of them (it runs
    before any request, so what it writes no request reads): a draft step, and a verify pass over 1
    and over k_max + 1 positions per row; a straight line through the two verify times gives its
    fixed and per-position parts, and the one-position verify (a full-depth step) is what rounds
    must beat."""
    n = engine.store.slots
    position = max(min(16, engine.max_len - engine.k_max - 2), 0)
    slots, zeros = list(range(n)), [0] * n
    columns = [slots, [position] * n, zeros, zeros, zeros, zeros, zeros, zeros]
    run = engine.programs.run

    def verify(q: int) -> Callable[[], None]:
        return lambda: run("verify", columns, [[0] * (q - 1)] * n)

    t_draft = time_ms(lambda: run("draft", columns), repeats, engine.device)
    t_one = time_ms(verify(1), repeats, engine.device)
    q = engine.k_max + 1
    t_many = time_ms(verify(q), repeats, engine.device)
    per_position = max(t_many - t_one, 0.0) / (q - 1) if q > 1 else 0.0
    return SpecCost(draft=t_draft, verify_fixed=max(t_one - per_position, 0.0), verify_per_position=per_position,
                    full=t_one, source=f"measured at start-up ({n} rows)")  # fmt: skip


__all__ = [
    "SpecEngine",
    "SpecRequestOutput",
    "SpecStats",
    "measure_ngram_cost",
    "measure_spec_cost",
    "measure_verify_curve",
]
