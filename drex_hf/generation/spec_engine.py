"""`SpecEngine`: batched self-speculative decoding with continuous batching — lossless early exit.

Each row decodes in rounds. A round drafts up to k tokens with the exit head after layer
`draft_exit` (layers 0..draft_exit run for each draft's input, so their keys/values there are exact),
then one verify pass runs the drafted positions through the remaining layers — the last input
through all of them — and keeps the longest prefix on which the drafts agree with full depth, plus
one token from full depth. Rejected positions are dropped by shortening the row: the row's pending
position moves back, and whatever the rejected drafts wrote past it is rewritten before anything
reads it. `SelfSpecDecoder` (self_spec.py) is the one-request reference this engine equals.

Rows are grouped by phase, and one step runs one group:

    prefill   the queued prompts at full depth; each gets its first token    (`_prefill`)
    draft     every drafting row drafts its next token                       (`_draft_step`)
    verify    when no row drafts: every row's round is verified at once      (`_verify_step`)

so rows accept different numbers of tokens and go on independently; a row joining mid-run drafts
with the others from its next step. Greedy output equals full depth token for token; sampling uses
the standard speculative acceptance rule with counter-based draws (sub-streams FULL / DRAFT / ACCEPT
of the request's seed, `self_spec.spec_counter`), so a request's tokens are distributed as full
depth's and do not depend on its neighbours.

How many tokens a row drafts (`draft_tokens`): a fixed k, or "adaptive": each round, the k in
0..max_draft_tokens that maximises expected tokens per unit of cost under the row's own measured
per-draft acceptance and the engine's `SpecCost` (k = 0 is a plain full-depth step: `adaptive_k`).
`draft_confidence`: a row
also stops drafting at a draft whose head confidence (max probability) is below it — that draft is
not proposed, and its input's layers are already run, so the verify pass needs no extra shallow pass.

`exit_source="trace"` replays acceptance instead of comparing: each draft is accepted with
probability `acceptance` (seeded per request), everything else runs as with heads — the machinery's
cost on random-weight models of real sizes, where heads would never agree.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from drex_hf.arch import build_attention_mask
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.engine import (
    FinishCallback,
    RequestOutput,
    SlotEngine,
    TokenCallback,
    TokenRates,
    check_request,
    check_special_tokens,
)
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import row_buckets
from drex_hf.generation.runner import StepExecutor
from drex_hf.generation.sampling import as_seed, pick_tokens, uniforms
from drex_hf.generation.self_spec import ACCEPT, DRAFT, FULL, check_spec_arguments, spec_counter
from drex_hf.generation.settings import DecodeSettings
from drex_hf.seeds import check_seed

if TYPE_CHECKING:
    from drex_hf.generation.protocol import EarlyExitModel

MAX_ADAPTIVE_DRAFT = 8  # the largest k adaptive drafting considers, unless max_draft_tokens says otherwise
_TRACE_STREAM = 3  # a trace's acceptance coin: a sub-stream of the request's trace seed


@dataclass
class SpecCost:
    """The cost of a round, per row, in milliseconds (or any unit: only ratios matter): a draft step
    costs `draft` per drafted token; a verify pass costs `verify_fixed` + `verify_per_position` per
    verified position (k drafts verify k + 1 positions). `full`: one full-depth decode step, what a
    round must beat per token. `source`: `layers` (counted in layer evaluations: the CPU, where a
    position costs its layers) or the file / measurement the constants came from."""

    draft: float
    verify_fixed: float
    verify_per_position: float
    full: float
    source: str = "layers"

    @classmethod
    def from_layers(cls, num_layers: int, draft_exit: int) -> SpecCost:
        """Costs counted in layer evaluations: a draft runs layers 0..draft_exit, a verify the rest per
        position plus one shallow pass; a full step runs every layer."""
        shallow, deep = draft_exit + 1, num_layers - 1 - draft_exit
        return cls(draft=shallow, verify_fixed=shallow, verify_per_position=deep, full=num_layers)

    def round_cost(self, k: int) -> float:
        return k * self.draft + self.verify_fixed + (k + 1) * self.verify_per_position

    def best_k(self, acceptance: float, max_k: int) -> int:
        """The draft length in 0..max_k with the most expected tokens per cost when each draft is
        accepted with probability `acceptance` (independently): a round yields
        (1 - a^(k+1)) / (1 - a) tokens."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-9)
        rates = [((1 - a ** (k + 1)) / (1 - a)) / self.round_cost(k) for k in range(max_k + 1)]
        return max(range(max_k + 1), key=lambda k: (rates[k], -k))

    def speedup(self, acceptance: float, k: int) -> float:
        """Predicted tokens per cost against full depth's, at acceptance `acceptance` and k drafts."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-9)
        return ((1 - a ** (k + 1)) / (1 - a)) / self.round_cost(k) * self.full

    def to_dict(self) -> dict[str, Any]:
        return {
            "draft": self.draft,
            "verify_fixed": self.verify_fixed,
            "verify_per_position": self.verify_per_position,
            "full": self.full,
            "source": self.source,
        }


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
        return {
            "policy": self.policy,
            "tokens": self.tokens,
            "decoded_tokens": self.decoded_tokens,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "tested": self.tested,
            "acceptance_rate": self.acceptance_rate,
            "per_draft_acceptance": self.per_draft_acceptance,
            "mean_draft_tokens": self.mean_draft_tokens,
            "tokens_per_round": self.tokens_per_round,
            "layers_per_token": self.layers_per_token,
            "draft_layers_per_token": self.draft_layers_per_token,
            "verify_layers_per_token": self.verify_layers_per_token,
            "layer_rows": self.layer_rows,
            "draft_layer_rows": self.draft_layer_rows,
            "padded_layer_rows": self.padded_layer_rows,
            "steps": self.steps,
            "draft_steps": self.draft_steps,
            "verify_steps": self.verify_steps,
            "prefill_steps": self.prefill_steps,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "uploads": self.uploads,
            "reads": self.reads,
            "draft_lengths": {str(k): v for k, v in sorted(self.draft_lengths.items())},
        }


@dataclass
class _Row:
    """One request's round state, on the host. Its pending token (the last emitted, whose keys/values
    are not stored yet) sits at `position`; `drafts` are this round's proposals after it."""

    output: SpecRequestOutput
    prompt: torch.Tensor
    max_new_tokens: int
    seed: int
    slot: int
    callback: TokenCallback | None
    on_finish: FinishCallback | None
    trace_seed: int = 0
    position: int = 0
    k: int = 0  # drafts this round may make
    drafts: list[int] = field(default_factory=list)
    drafting: bool = False
    states_complete: bool = False  # the last input's shallow layers ran already (a confidence stop)

    @property
    def index(self) -> int:
        """The number of the first token this round decides (tokens so far)."""
        return len(self.output.tokens)


class SpecEngine(SlotEngine):
    """Continuous batching by self-speculation; see the module docstring.

    Args:
        model: an `EarlyExitModel`.
        max_batch: slots (requests decoding at once).
        max_len: positions per slot; a request needs prompt + max_new_tokens of them.
        draft_exit: the exit layer whose head drafts (one of `model.exit_layers`).
        draft_tokens: k, the drafts per round, or "adaptive" (see the module docstring).
        max_draft_tokens: adaptive: the largest k considered (default 8).
        draft_confidence: stop drafting at a draft whose head confidence is below this (None: never).
        settings: decoding settings (greedy/sampling, eos, default max_new_tokens); logits processors
            and stop strings are refused (not supported here yet).
        cost: the `SpecCost` adaptive drafting weighs k with (default: `measure_spec_cost` times this
            engine's own draft and verify steps at max_batch rows when it is built).
        prior_acceptance: adaptive: the acceptance a row starts from, worth two drafts (a calibrated
            acceptance of the draft exit is the natural value).
        exit_source: `heads`, or `trace` with `acceptance`: each draft accepted with that probability.
        trace_seed: a trace's coins: request i's come from trace_seed + i (or + its seed when given).
        keep_finished: keep finished requests in `finished` (what `run()` returns).
    """

    def __init__(
        self,
        model: EarlyExitModel,
        *,
        max_batch: int,
        max_len: int,
        draft_exit: int,
        draft_tokens: int | str = 4,
        max_draft_tokens: int | None = None,
        draft_confidence: float | None = None,
        settings: DecodeSettings | None = None,
        cost: SpecCost | None = None,
        exit_source: str = "heads",
        acceptance: float | None = None,
        trace_seed: int = 0,
        keep_finished: bool = True,
        prior_acceptance: float = 0.5,
    ) -> None:
        model.arch.check_attention_implementation()
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise GenerationInputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
            raise GenerationInputError(f"max_len must be an integer >= 2, got {max_len!r}")
        settings = settings or DecodeSettings(max_new_tokens=32)
        self.adaptive = draft_tokens == "adaptive"
        if self.adaptive:
            k_max = MAX_ADAPTIVE_DRAFT if max_draft_tokens is None else max_draft_tokens
        else:
            if isinstance(draft_tokens, str):
                raise GenerationInputError(
                    f"draft_tokens must be a positive integer or 'adaptive', got {draft_tokens!r}"
                )
            if max_draft_tokens is not None:
                raise GenerationInputError("max_draft_tokens applies to draft_tokens='adaptive'")
            k_max = draft_tokens
        check_spec_arguments(model, settings, draft_exit, k_max)
        if draft_confidence is not None and (
            isinstance(draft_confidence, bool)
            or not isinstance(draft_confidence, numbers.Real)
            or not 0 <= draft_confidence <= 1
        ):
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
        if isinstance(prior_acceptance, bool) or not isinstance(prior_acceptance, numbers.Real):
            raise GenerationTypeError(f"prior_acceptance must be a number, got {prior_acceptance!r}")
        if not 0 < prior_acceptance < 1:
            raise GenerationInputError(f"prior_acceptance must be in (0, 1), got {prior_acceptance}")
        if cost is not None and not isinstance(cost, SpecCost):
            raise GenerationTypeError(f"cost must be a SpecCost, got {type(cost).__name__}")
        check_special_tokens(settings, model.arch.vocab_size)
        self.model, self.arch, self.settings = model, model.arch, settings
        self.num_layers = self.arch.num_layers
        self.draft_exit, self.k_max = draft_exit, k_max
        self.fixed_k = None if self.adaptive else draft_tokens
        self.draft_confidence = draft_confidence
        self.exit_source, self.acceptance, self.trace_seed = exit_source, acceptance, int(trace_seed)
        self.prior_acceptance = prior_acceptance
        self.eos = set(settings.eos_token_ids)
        self.keep_finished = keep_finished

        limit = self.arch.position_limit
        self.max_len = min(max_len, limit) if limit is not None else max_len
        # k + 1 spare positions: a verify pass pads shorter rounds with queries past a row's last
        # draft, whose writes land there (never read: rewritten before any query reaches them)
        self.store = RowKVCache.for_model(model, max_batch, self.max_len + k_max + 1)
        self.executor = StepExecutor(
            model,
            self.store,
            [draft_exit],
            buckets=row_buckets(max_batch, False),
            static=False,
            do_sample=settings.do_sample,
            warpers=settings.warpers(),
        )
        self.head = model.heads[model.exit_layers.index(draft_exit)]
        self.shallow = range(0, draft_exit + 1)
        self.deep = range(draft_exit + 1, self.num_layers)
        device, dtype = self.executor.device, self.store.key_store.dtype
        self.device = device
        slots = max_batch + 1
        # per slot: the exit states of this round's inputs, and (sampling) the drafts' warped distributions
        self.states = torch.zeros(slots, k_max + 1, self.arch.hidden_size, dtype=dtype, device=device)
        self.draft_probs = None
        if settings.do_sample:
            self.draft_probs = torch.zeros(slots, k_max, self.arch.vocab_size, dtype=torch.float64, device=device)
        self.warpers = settings.warpers()
        self.windows = [self.arch.layer_window(i) for i in range(self.num_layers)]

        self.requests: dict[int, _Row] = {}  # running, by slot
        self.prefill_queue: list[_Row] = []
        self.finished: dict[int, SpecRequestOutput] = {}
        self.next_id = 0
        self.stats = SpecStats()
        self._stepping = False
        self._cancels: list[int] = []
        self._step_start = time.perf_counter()
        if cost is None and self.adaptive:
            cost = measure_spec_cost(self)
        self.cost = cost or SpecCost.from_layers(self.num_layers, draft_exit)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: torch.Tensor | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        callback: TokenCallback | None = None,
        on_finish: FinishCallback | None = None,
    ) -> int:
        """Queue a prompt (1-D token ids); returns its request id. Errors before any work, as
        `DrexEngine.add_request`: an empty prompt, ids outside the vocabulary, no room, no free slot."""
        default = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids, max_new = check_request(prompt, default, self.arch, self.max_len)
        seed = None if seed is None else check_seed(seed)
        slot = self.store.allocate()
        rid = self.next_id
        self.next_id += 1
        trace_seed = as_seed(self.trace_seed + (rid if seed is None else int(seed)))
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,))) if self.settings.do_sample else 0
        row = _Row(
            SpecRequestOutput(rid, int(ids.numel())),
            ids,
            int(max_new),
            as_seed(seed),
            slot,
            callback,
            on_finish,
            trace_seed=trace_seed,
        )
        self.prefill_queue.append(row)
        return rid

    # ------------------------------------------------------------------ stepping (`SlotEngine.step`)
    def _step(self) -> bool:
        start = self._step_start = time.perf_counter()
        if self.prefill_queue:
            self._prefill()
        elif not self.requests:
            return False
        elif any(r.drafting for r in self.requests.values()):
            self._draft_step([r for r in self.requests.values() if r.drafting])
        else:
            self._verify_step(list(self.requests.values()))
        self.stats.steps += 1
        self.stats.wall_s += time.perf_counter() - start
        return True

    # ------------------------------------------------------------------ prefill
    def _prefill(self) -> None:
        """One batched full-depth pass over the queued prompts: each gets its first token (FULL draw
        0, as full depth's), then starts its first round."""
        start = time.perf_counter()
        batch, self.prefill_queue = self.prefill_queue, []
        tokens = self.executor.prefill([r.slot for r in batch], [r.prompt for r in batch], [r.seed for r in batch])
        self.stats.uploads += 1
        self.stats.reads += 1
        for row, token in zip(batch, tokens):
            self.requests[row.slot] = row
            row.position = row.output.prompt_length  # the first token's, pending
            if self._emit(row, token):
                self._start_round(row)
        self.stats.prefill_steps += 1
        self.stats.prefill_s += time.perf_counter() - start

    # ------------------------------------------------------------------ a round
    def _start_round(self, row: _Row) -> None:
        """The row's pending token now sits at `position + 1`: choose this round's k (no more than
        tokens the row may still emit, one of them full depth's) and start drafting."""
        row.drafts = []
        row.states_complete = False
        room = row.max_new_tokens - row.index - 1
        k = self.fixed_k if self.fixed_k is not None else self._adaptive_k(row)
        row.k = max(0, min(k, room))
        row.drafting = row.k > 0

    def _adaptive_k(self, row: _Row) -> int:
        """k for the row's next round from its own rounds so far (`adaptive_k`), so a request's k never
        depends on its neighbours (the cost model is the engine's, fixed when it is built)."""
        out = row.output
        return adaptive_k(self.cost, out.drafted, out.accepted, self.prior_acceptance, self.k_max)

    def _upload(self, columns: list[list[int]]) -> torch.Tensor:
        """The step's one host-to-device copy: its integer columns as one `[len(columns), n]` tensor."""
        self.stats.uploads += 1
        return torch.tensor(columns, dtype=torch.long).to(self.device)

    def _read(self, tensors: list[torch.Tensor]) -> list[list[float]]:
        """The step's one device-to-host copy: its results (each `[n, *]`) as float64 rows."""
        self.stats.reads += 1
        flat = torch.cat([t.reshape(t.shape[0], -1).double() for t in tensors], dim=1)
        return flat.cpu().tolist()

    def _shallow(self, slots: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Each row's last token (in the executor's `tokens`) at its position through layers
        0..draft_exit, writing their keys/values; its exit state goes to `states[slot, offset]`."""
        pos = positions.unsqueeze(1)
        ids = self.executor.tokens.index_select(0, slots).unsqueeze(1)
        hidden = self.arch.embed(ids, pos)
        hidden = self._run(hidden, self.shallow, slots, pos)
        self.states[slots, offsets] = hidden[:, 0]
        return hidden[:, 0]

    def _run(self, hidden: torch.Tensor, layers: range, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`layers`, unmodified, on rows `slots` with queries at `positions [n, q]` (eager attention
        over each row's keys/values up to the furthest query)."""
        kv_len = int(positions.max()) + 1
        self.store.bind(slots, positions, kv_len=kv_len)
        masks = {
            w: build_attention_mask(positions, kv_len, window=w, dtype=hidden.dtype)
            for w in {self.windows[i] for i in layers}
        }
        rotary = None
        if self.executor.cos is not None:
            flat = positions.reshape(-1)
            shape = (*positions.shape, -1)
            rotary = (
                self.executor.cos.index_select(0, flat).view(shape),
                self.executor.sin.index_select(0, flat).view(shape),
            )
        for index in layers:
            hidden = self.arch.run_layer(
                index,
                hidden,
                attention_mask=masks[self.windows[index]],
                position_ids=positions,
                position_embeddings=rotary,
                cache=self.store,
            )
        return hidden

    def _draft_step(self, rows: list[_Row]) -> None:
        """Every drafting row drafts one token: its last input through layers 0..draft_exit, the draft
        head's pick (DRAFT draw of the token's index), and its confidence."""
        slots_l = [r.slot for r in rows]
        offsets_l = [len(r.drafts) for r in rows]
        counters_l = [spec_counter(r.index + len(r.drafts), DRAFT) for r in rows]
        positions_l = [r.position + o for r, o in zip(rows, offsets_l)]
        columns = self._upload([slots_l, positions_l, offsets_l, counters_l, [r.seed for r in rows]])
        slots, positions, offsets, counters, seeds = columns
        state = self._shallow(slots, positions, offsets)
        logits = self.head.logits(state).float()
        confidence = torch.softmax(logits, dim=-1).amax(dim=-1)
        tokens = pick_tokens(logits, self.settings.do_sample, self.warpers, seeds, counters)
        if self.draft_probs is not None:
            self.draft_probs[slots, offsets] = self._warped(logits)
        self.executor.tokens.index_copy_(0, slots, tokens)
        result = self._read([tokens, confidence])
        self.stats.draft_steps += 1
        self.stats.layer_rows += len(rows) * len(self.shallow)
        self.stats.draft_layer_rows += len(rows) * len(self.shallow)
        for row, (token, conf) in zip(rows, result):
            if self.draft_confidence is not None and self.exit_source == "heads" and conf < self.draft_confidence:
                row.drafting, row.states_complete = False, True  # not proposed; its input has run
                continue
            row.drafts.append(int(token))
            if len(row.drafts) >= row.k or int(token) in self.eos:
                row.drafting = False

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The float64 softmax of `logits [n, vocab]` through the warpers (what `sample_rows` inverts)."""
        scores = logits.float()
        for warper in self.warpers:
            scores = warper(scores)
        return torch.softmax(scores, dim=-1).double()

    def _warped(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped probabilities (float64, rows summing to 1) of `logits [n, vocab]`, as the reference's."""
        probs = self._softmax(logits)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _verify_step(self, rows: list[_Row]) -> None:
        """Every row's round at once: the last input's shallow pass (rows that need it), the deep pass
        over each row's drafted positions + 1, the acceptance of each draft, then each row's tokens."""
        n_max = max(len(r.drafts) for r in rows)
        q = n_max + 1
        need = [i for i, r in enumerate(rows) if not r.states_complete]
        drafts_l = [r.drafts + [0] * (n_max - len(r.drafts)) for r in rows]
        columns = self._upload(
            [
                [r.slot for r in rows],
                [r.position for r in rows],
                [len(r.drafts) for r in rows],
                [r.index for r in rows],
                [r.seed for r in rows],
                need + [-1] * (len(rows) - len(need)),
                [r.trace_seed for r in rows],
                *(list(column) for column in zip(*drafts_l)),
            ]
        )
        slots, positions, lengths, index, seeds, need_t, trace_seeds = columns[:7]
        drafts = columns[7:].T if n_max else None  # [n, n_max]
        if need:
            which = need_t[: len(need)]
            self._shallow(slots[which], positions[which] + lengths[which], lengths[which])
        grid = positions.unsqueeze(1) + torch.arange(q, device=self.device)  # [n, q]
        hidden = self.states.index_select(0, slots)[:, :q]
        hidden = self._run(hidden, self.deep, slots, grid)
        logits = self.arch.lm_head(self.arch.final_norm(hidden)).float()  # [n, q, vocab]
        accepted, tokens = self._accept(logits, slots, drafts, lengths, index, seeds)
        if self.exit_source == "trace":  # the replayed coin instead of the comparison
            counters = index.unsqueeze(1) + torch.arange(n_max, device=self.device) + (_TRACE_STREAM << 30)
            accepted = uniforms(trace_seeds.unsqueeze(1).expand_as(counters), counters) < self.acceptance
        self._next_pending(slots, accepted, tokens, lengths)
        result = self._read([accepted, tokens])
        self.stats.verify_steps += 1
        real = sum(len(r.drafts) + 1 for r in rows)
        self.stats.layer_rows += len(need) * len(self.shallow) + real * len(self.deep)
        self.stats.padded_layer_rows += (len(rows) * q - real) * len(self.deep)
        for row, values in zip(rows, result):
            self._finish_round(row, values[:n_max], values[n_max:])

    def _accept(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        drafts: torch.Tensor | None,
        lengths: torch.Tensor,
        index: torch.Tensor,
        seeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row and drafted position j: whether draft j is accepted `[n, n_max]`, and the token full
        depth gives at each position j `[n, q]` — on a rejection at j its correction, at j = the row's
        draft count the token after an all-accepted round. Greedy: full depth's argmax; sampling: the
        speculative test (ACCEPT draw), the residual max(0, p - q) (FULL draw) after a rejection, p
        itself (FULL draw) after the last draft."""
        n, q, vocab = logits.shape
        n_max = q - 1
        if not self.settings.do_sample:
            tokens = logits.argmax(dim=-1)
            accepted = tokens[:, :n_max] == drafts if n_max else tokens[:, :0].bool()
            return accepted, tokens
        softmax = self._softmax(logits.reshape(n * q, vocab)).view(n, q, vocab)
        p = softmax / softmax.sum(dim=-1, keepdim=True)
        j = torch.arange(q, device=self.device)
        counters = index.unsqueeze(1) + j  # token numbers of the positions
        row_seeds = seeds.unsqueeze(1).expand(n, q)
        u_full = uniforms(row_seeds, counters + (FULL << 30))
        # the bonus draw from p, exactly as full-depth sampling draws (`sample_rows` on warped scores)
        cdf = softmax.cumsum(dim=-1)
        total = cdf[..., -1:]
        point = torch.minimum(u_full.unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(())))
        plain = torch.searchsorted(cdf, point, right=True).squeeze(-1)
        if not n_max:
            return plain[:, :0].bool(), plain
        qd = self.draft_probs.index_select(0, slots)[:, :n_max]
        pd = p[:, :n_max]
        picked = drafts.unsqueeze(-1)
        u_accept = uniforms(row_seeds[:, :n_max], counters[:, :n_max] + (ACCEPT << 30))
        accepted = u_accept * qd.gather(-1, picked).squeeze(-1) < pd.gather(-1, picked).squeeze(-1)
        residual = (pd - qd).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual, pd)
        rcdf = (residual / residual.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
        rpoint = torch.minimum(u_full[:, :n_max].unsqueeze(-1), rcdf[..., -1:] * (1 - 2**-52))
        corrected = torch.searchsorted(rcdf, rpoint, right=True).squeeze(-1)
        at_end = j[:n_max].unsqueeze(0) >= lengths.unsqueeze(1)  # past the row's drafts: plain p
        tokens = torch.cat([torch.where(at_end, plain[:, :n_max], corrected), plain[:, n_max:]], dim=1)
        return accepted, tokens

    def _next_pending(
        self, slots: torch.Tensor, accepted: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> None:
        """Each row's next pending token into its slot, on the device: full depth's token after the
        longest accepted prefix of its drafts (a row that ends in this round never reads it)."""
        n_max = accepted.shape[1]
        valid = torch.arange(n_max, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        kept = torch.cumprod((accepted & valid).long(), dim=1).sum(dim=1, keepdim=True)
        self.executor.tokens.index_copy_(0, slots, tokens.gather(1, kept).squeeze(1))

    def _finish_round(self, row: _Row, accepted: list[float], full: list[float]) -> None:
        """Emit the row's accepted drafts and full depth's next token; the rejected positions go (the
        row's pending position moves only past what it kept)."""
        n = len(row.drafts)
        kept = 0
        alive = True
        emitted: list[int] = []
        for j in range(n):
            if accepted[j]:
                emitted.append(row.drafts[j])
                kept += 1
                if row.drafts[j] in self.eos:
                    break
            else:
                emitted.append(int(full[j]))
                break
        else:
            emitted.append(int(full[n]))
        out = row.output
        out.drafted.append(n)
        out.accepted.append(kept)
        self.stats.rounds += 1
        self.stats.drafted += n
        self.stats.accepted += kept
        self.stats.tested += judged_drafts(n, kept)
        self.stats.draft_lengths[row.k] = self.stats.draft_lengths.get(row.k, 0) + 1
        for token in emitted:
            alive = self._emit(row, token)
            if not alive:
                return
            row.position += 1
        self._start_round(row)

    def _emit(self, row: _Row, token: int) -> bool:
        """Append one token; False when it ended the request (eos or max_new_tokens)."""
        out = row.output
        out.tokens.append(int(token))
        out.exit_layers.append(self.num_layers - 1)
        out.token_times.append(self.stats.wall_s + time.perf_counter() - self._step_start)
        self.stats.tokens += 1
        if len(out.tokens) > 1:
            self.stats.decoded_tokens += 1
        if row.callback is not None:
            row.callback(out.request_id, int(token), self.num_layers - 1)
        if int(token) in self.eos:
            self._finish(row, "stop")
            return False
        if len(out.tokens) >= row.max_new_tokens:
            self._finish(row, "length")
            return False
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        out = row.output
        out.finished, out.finish_reason = True, reason
        if self.keep_finished:
            self.finished[out.request_id] = out
        if self.requests.get(row.slot) is row:
            del self.requests[row.slot]
        else:
            self.prefill_queue.remove(row)
        self.store.release(row.slot)
        if row.on_finish is not None:
            row.on_finish(out)

    def row_state_bytes(self) -> int:
        """Bytes of the per-slot tensors besides the KV cache: the executor's, this round's exit states
        and (sampling) the drafts' distributions."""
        extra = [self.states, self.draft_probs]
        return self.executor.nbytes() + sum(t.nbytes for t in extra if t is not None)

    def reset_stats(self) -> None:
        """Start counting afresh (and forget finished requests); benchmarks reuse one engine."""
        if self.requests or self.prefill_queue:
            raise RuntimeError("reset_stats() while requests are running")
        self.stats = SpecStats()
        self.finished = {}


def judged_drafts(drafted: int, accepted: int) -> int:
    """Drafts a round's verify pass judged: the accepted ones and the first rejection; the drafts
    after it are dropped unjudged."""
    return min(accepted + 1, drafted)


def adaptive_k(
    cost: SpecCost, drafted: Sequence[int], accepted: Sequence[int], prior_acceptance: float, k_max: int
) -> int:
    """Adaptive drafting's k for a row's next round: `cost.best_k` under the row's per-draft
    acceptance so far — accepted drafts over judged ones (a round's drafts up to its first
    rejection; later ones say nothing), with `prior_acceptance` counted as two judged drafts. A row
    whose prior makes k = 0 best never drafts, so never learns otherwise: give it a calibrated prior
    (the draft exit's measured acceptance). Probing with one draft every few rounds was tried and
    cost more than it found at batch 8, where one row's draft step holds up the whole batch."""
    judged = sum(judged_drafts(d, a) for d, a in zip(drafted, accepted))
    acceptance = (sum(accepted) + 2 * prior_acceptance) / (judged + 2)
    return cost.best_k(acceptance, k_max)


def measure_spec_cost(engine: SpecEngine, repeats: int = 5) -> SpecCost:
    """Time the engine's own steps on its still-empty slots, all `max_batch` of them (it runs before
    any request, so what it writes no request reads): a draft step, and a verify pass over 1 and over
    k_max + 1 positions per row; a straight line through the two verify times gives its fixed and
    per-position parts, and the one-position verify (a full-depth step) is what rounds must beat."""
    from drex_hf.device import time_ms

    n = engine.store.slots
    position = min(16, engine.max_len - engine.k_max - 2)
    slots = torch.arange(n, device=engine.device)
    zeros = torch.zeros(n, dtype=torch.long, device=engine.device)
    at = torch.full((n,), max(position, 0), dtype=torch.long, device=engine.device)
    wrap = torch.inference_mode()

    def draft() -> None:
        with wrap:
            state = engine._shallow(slots, at, zeros)
            logits = engine.head.logits(state).float()
            torch.softmax(logits, dim=-1).amax(dim=-1)
            pick_tokens(logits, engine.settings.do_sample, engine.warpers, zeros, zeros).tolist()

    def verify(q: int) -> Callable[[], None]:
        def run() -> None:
            with wrap:
                engine._shallow(slots, at, zeros)
                grid = at.unsqueeze(1) + torch.arange(q, device=engine.device)
                hidden = engine._run(engine.states[:n, :q], engine.deep, slots, grid)
                engine.arch.lm_head(engine.arch.final_norm(hidden)).float().argmax(dim=-1).tolist()

        return run

    device = engine.device
    t_draft = time_ms(draft, repeats, device)
    t_one = time_ms(verify(1), repeats, device)
    q = engine.k_max + 1
    t_many = time_ms(verify(q), repeats, device)
    per_position = max(t_many - t_one, 0.0) / (q - 1) if q > 1 else 0.0
    return SpecCost(
        draft=t_draft,
        verify_fixed=max(t_one - per_position, 0.0),
        verify_per_position=per_position,
        full=t_one,
        source=f"measured at start-up ({n} rows)",
    )


def spec_speedup_ceiling(num_layers: int, draft_exit: int, acceptance: float, k: int) -> float:
    """Tokens per layer evaluation against full depth's, at `acceptance` and k drafts (the layer-count
    ceiling: what a device where a position costs its layers could gain at most)."""
    return SpecCost.from_layers(num_layers, draft_exit).speedup(acceptance, k)


__all__ = ["SpecEngine", "SpecCost", "SpecRequestOutput", "SpecStats", "measure_spec_cost", "spec_speedup_ceiling"]
