"""`DrexEngine`: continuous-batching early-exit decoding (DESIGN.md §5).

`add_request()` takes a slot in the `RowKVCache`; `step()` runs either a batched full-depth prefill
of the newly added requests or one scheduler decision (one segment on a set of rows, then the exit
check, token emission and buffer moves); `run()` steps until every request has finished. Tokens are
picked per request (greedy, or sampled with the request's own generator), so no neighbour and no
scheduling decision changes a request's output. `generate()` is a static batch run through here.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from drex_hf import kernels
from drex_hf.errors import GenerationInputError
from drex_hf.generation.exits import ExitDistribution, RequestExits, check_trace_row
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.runner import SegmentRunner
from drex_hf.generation.scheduler import (
    CostModel,
    Decision,
    Policy,
    RandomPolicy,
    SchedulerView,
    error_summary,
    make_policy,
)
from drex_hf.generation.settings import DecodeSettings, pick_token

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM

TokenCallback = Callable[[int, int, int], None]  # (request id, token, exit layer)


@dataclass
class RequestOutput:
    request_id: int
    prompt_length: int
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    involuntary: int = 0
    missed: int = 0
    finished: bool = False
    # when each token was emitted, in seconds of this engine's own stepping (other engines stepped in
    # between, as benchmarks interleave them, do not count): token latencies without their noise
    token_times: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    """What a run did. `layer_rows` counts decoder layers × rows executed for decoded tokens (riders
    included); `min_layer_rows` is the sum of the decoded tokens' exit depths."""

    policy: str
    cost_source: str
    tokens: int = 0
    decoded_tokens: int = 0
    exits_per_layer: dict[int, int] = field(default_factory=dict)
    involuntary_exits: int = 0
    missed_exits: int = 0
    ride_along_rows: int = 0
    ride_fill_rows: int = 0  # riders whose ride wrote their KV fill (no separate product needed)
    layer_rows: int = 0
    min_layer_rows: int = 0
    steps: int = 0
    prefill_steps: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    predicted_ms: list[float | None] = field(default_factory=list)
    measured_ms: list[float] = field(default_factory=list)
    step_segments: list[int] = field(default_factory=list)
    kv_cache_bytes: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens decoded after the prefill's, per second of decoding (prefill time excluded)."""
        decode_s = self.wall_s - self.prefill_s
        return self.decoded_tokens / decode_s if decode_s > 0 else 0.0

    def prediction_error(self) -> dict[str, float | None]:
        return error_summary(self.predicted_ms, self.measured_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "cost_source": self.cost_source,
            "tokens": self.tokens,
            "decoded_tokens": self.decoded_tokens,
            "exits_per_layer": {str(k): v for k, v in sorted(self.exits_per_layer.items())},
            "involuntary_exits": self.involuntary_exits,
            "missed_exits": self.missed_exits,
            "ride_along_rows": self.ride_along_rows,
            "ride_fill_rows": self.ride_fill_rows,
            "layer_rows": self.layer_rows,
            "min_layer_rows": self.min_layer_rows,
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prediction_error": self.prediction_error(),
            "kv_cache_bytes": self.kv_cache_bytes,
        }


@dataclass
class _Request:
    output: RequestOutput
    prompt: torch.Tensor
    max_new_tokens: int
    generator: torch.Generator | None
    exits: RequestExits | None
    callback: TokenCallback | None
    slot: int
    segment: int = 0  # the buffer it waits in
    done_through: int = -1  # see SchedulerView
    fill_from: int | None = None  # exit layer whose skipped layers still need KV fill
    trace_layer: int = -1  # this token's exit layer under a trace
    passed_at: int | None = None  # first exit point this token was confident at (batch policies)
    pending_layer: int | None = None  # exited here; its token's vocabulary projection is deferred
    token_start: float = 0.0
    steps_waiting: int = 0


class DrexEngine:
    """Continuous batching with per-token early exit. See the module docstring.

    Args:
        model: an `EarlyExitModelForCausalLM`.
        max_batch: slots (requests decoding at once).
        max_len: positions per slot; a request needs prompt + max_new_tokens of them.
        policy: `drex`, `full`, `batch_all`, `batch_majority`, or a `Policy` object.
        settings: decoding settings (greedy/sampling, eos, default max_new_tokens).
        thresholds: per exit point; default the model's config.
        exit_source: `heads` or `trace` (then each request gives `trace=` or `exit_distribution=` is set).
        exit_distribution: for `trace`: probabilities per exit point and full depth, seeded per request.
        cost_model: a `CostModel`, a calibration file, or None (measured quickly at start-up).
        sla_tpot_ms: drex: the time per output token no request should exceed.
        quorum: batch_majority's q.
        defer_projection: with a confidence that needs no logits (`classifier`, `saturation`), keep
            exited rows' head features and project them to the vocabulary together, at the next
            final-segment step or when the row's next token starts (same tokens, fewer lm_head calls).
    """

    def __init__(
        self,
        model: EarlyExitModelForCausalLM,
        *,
        max_batch: int,
        max_len: int,
        policy: str | Policy = "drex",
        settings: DecodeSettings | None = None,
        thresholds: Sequence[float] | None = None,
        exit_source: str = "heads",
        exit_distribution: ExitDistribution | None = None,
        cost_model: CostModel | str | None = None,
        sla_tpot_ms: float | None = None,
        quorum: float = 0.5,
        defer_projection: bool = True,
    ) -> None:
        model.arch.check_attention_implementation()
        self.defer_projection = defer_projection
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationInputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_len, int) or max_len < 2:
            raise GenerationInputError(f"max_len must be an integer >= 2, got {max_len!r}")
        if exit_source not in ("heads", "trace"):
            raise GenerationInputError(f"unknown exit source {exit_source!r}; choose 'heads' or 'trace'")
        if sla_tpot_ms is not None and not sla_tpot_ms > 0:
            raise GenerationInputError(f"sla_tpot_ms must be positive, got {sla_tpot_ms}")
        kernels.dispatch.requested()  # a bad DREX_KERNELS fails here, before any work
        if sla_tpot_ms is not None and policy != "drex":
            raise GenerationInputError(f"sla_tpot_ms applies to policy 'drex', not {policy!r}")
        if exit_source == "trace" and policy == "full":
            raise GenerationInputError("policy 'full' never exits: a trace does not apply to it")
        self.model, self.arch = model, model.arch
        self.settings = settings or DecodeSettings(max_new_tokens=32)
        self.warpers = self.settings.warpers()
        self.eos = set(self.settings.eos_token_ids)
        self.exit_source = exit_source
        if exit_distribution is not None:
            if exit_source != "trace":
                raise GenerationInputError("exit_distribution applies to exit_source='trace'")
            exit_distribution.check(model.exit_config.num_exits)
        self.distribution = exit_distribution
        self.thresholds = list(thresholds) if thresholds is not None else model.exit_config.threshold_list()
        if len(self.thresholds) != model.exit_config.num_exits:
            raise GenerationInputError(
                f"{len(self.thresholds)} thresholds for {model.exit_config.num_exits} exit points"
            )
        self.num_layers = self.arch.num_layers
        self.policy_name = policy if isinstance(policy, str) else policy.name
        boundaries = segment_boundaries(model.exit_layers, self.thresholds, self.policy_name, exit_source)
        self.threshold_at = dict(zip(model.exit_layers, self.thresholds))

        limit = self.arch.position_limit
        if limit is not None and max_len > limit:
            max_len = limit  # learned positions: no slot can hold more than the model knows
        self.store = RowKVCache.for_model(model, max_batch, max_len)
        self.runner = SegmentRunner(model, self.store, boundaries)
        self.num_segments = len(self.runner.segments)
        if isinstance(policy, Policy):
            if policy.num_segments != self.num_segments:
                raise GenerationInputError(
                    f"the policy was built for {policy.num_segments} segments; this engine has {self.num_segments}"
                )
            self.cost = policy.cost
            self.policy = policy
        else:
            self.cost = self._cost_model(cost_model, policy)
            self.policy = make_policy(policy, self.num_segments, self.cost, sla_tpot_ms=sla_tpot_ms, quorum=quorum)
        self.buffers: list[list[int]] = [[] for _ in range(self.num_segments)]
        self.requests: dict[int, _Request] = {}  # running, by slot
        self.prefill_queue: list[_Request] = []
        self.finished: dict[int, RequestOutput] = {}
        self.next_id = 0
        self.stats = EngineStats(self.policy_name, self.cost.source if self.cost else "none")
        self._step_start = time.perf_counter()
        self.stats.kv_cache_bytes = self.store.nbytes()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _cost_model(self, given: CostModel | str | None, policy: str) -> CostModel | None:
        if isinstance(given, CostModel):
            if len(given.a_ms) != self.num_segments:
                raise GenerationInputError(
                    f"the cost model has constants for {len(given.a_ms)} segments; this engine runs "
                    f"{self.num_segments} ({self.runner.describe()['segments']})"
                )
            return given
        segments = self.runner.describe()["segments"]
        if given is not None:
            return CostModel.from_file(given, device_name(self.model.heads_device), segments)
        if policy != "drex":
            return None
        from drex_hf.generation.profile import measure_cost_model

        return measure_cost_model(self.runner)

    # ------------------------------------------------------------------ requests
    @property
    def has_free_slot(self) -> bool:
        return self.store.free_slots > 0

    @property
    def active(self) -> int:
        return len(self.requests) + len(self.prefill_queue)

    def add_request(
        self,
        prompt: torch.Tensor | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        trace: Sequence[int] | None = None,
        callback: TokenCallback | None = None,
    ) -> int:
        """Queue a prompt (1-D token ids) for decoding; returns its request id. Errors, before any work:
        an empty prompt, ids outside the vocabulary, a prompt + max_new_tokens longer than a slot,
        or no free slot (`EngineFullError`)."""
        ids = torch.as_tensor(prompt)
        if ids.dim() != 1:
            raise GenerationInputError(f"a prompt is one sequence of token ids (1-D), got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
            raise GenerationInputError(f"a prompt holds integer token ids, got dtype {ids.dtype}")
        ids = ids.to(device=self.model.heads_device, dtype=torch.long)
        max_new = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, numbers.Integral):
            raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new!r}")
        max_new = int(max_new)
        if ids.numel() == 0:
            raise GenerationInputError("empty prompt: a request needs at least one token")
        vocab = self.arch.input_vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise GenerationInputError(f"the prompt holds token ids outside the model's vocabulary 0..{vocab - 1}")
        if max_new < 1:
            raise GenerationInputError(f"max_new_tokens must be positive, got {max_new}")
        needed = ids.numel() + max_new - 1  # the last token is never fed back
        if needed > self.store.max_len:
            why = f"max_len={self.store.max_len}"
            if self.store.max_len == self.arch.position_limit:
                why += " (the model's own position limit)"
            raise GenerationInputError(
                f"the prompt has {ids.numel()} tokens; with max_new_tokens={max_new} it needs {needed} cache "
                f"positions but a slot holds {why}"
            )
        if trace is not None:
            if self.exit_source != "trace":
                raise GenerationInputError("a per-request trace needs an engine built with exit_source='trace'")
            check_trace_row(trace, self.model.exit_layers, self.num_layers, "the trace")
        elif self.exit_source == "trace" and self.distribution is None:
            raise GenerationInputError("exit_source='trace' needs a trace per request or an exit_distribution")
        slot = self.store.allocate()
        rid = self.next_id
        self.next_id += 1
        generator = None
        if self.settings.do_sample:
            generator = torch.Generator(device=self.model.heads_device)
            generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        exits = None
        if self.exit_source == "trace":
            dist = None
            if self.distribution is not None and trace is None:
                dist = (self.distribution.probabilities, self.distribution.seed + (rid if seed is None else int(seed)))
            exits = RequestExits(self.model.exit_layers, self.num_layers, trace, dist)
        out = RequestOutput(rid, int(ids.numel()))
        self.prefill_queue.append(_Request(out, ids, max_new, generator, exits, callback, slot))
        return rid

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> bool:
        """Run one prefill or one scheduler decision; False when there was nothing to do."""
        if self.prefill_queue:
            start = self._step_start = time.perf_counter()
            self._prefill()
            synchronize(self.model.heads_device)
            self.stats.prefill_steps += 1
            self.stats.prefill_s += time.perf_counter() - start
            self.stats.wall_s += time.perf_counter() - start
            return True
        if not self.requests:
            return False
        start = self._step_start = time.perf_counter()
        decision = self.policy.pick(self._view(start))
        self._check_decision(decision)
        extra_ms = self._overhead_ms(decision)
        self._execute(decision)
        synchronize(self.model.heads_device)
        elapsed = time.perf_counter() - start
        self.stats.wall_s += elapsed
        self.stats.steps += 1
        predicted = decision.predicted_ms
        if predicted is not None:
            predicted += extra_ms
        self.stats.predicted_ms.append(predicted)
        self.stats.measured_ms.append(elapsed * 1e3)
        self.stats.step_segments.append(decision.segment)
        return True

    def run(self) -> dict[int, RequestOutput]:
        """Step until every request has finished; returns the finished requests by id."""
        while self.step():
            pass
        return self.finished

    # ------------------------------------------------------------------ internals
    def _view(self, now: float) -> SchedulerView:
        done = [-1] * self.store.slots
        ages, waits = {}, {}
        context = 1
        for slot, req in self.requests.items():
            done[slot] = req.done_through
            ages[slot] = (now - req.token_start) * 1e3
            waits[slot] = req.steps_waiting
            context = max(context, req.output.prompt_length + len(req.output.tokens))
        return SchedulerView([list(b) for b in self.buffers], ages, waits, done, context)

    def _check_decision(self, d: Decision) -> None:
        """Refuse an illegal decision (a bug in a policy) before it can corrupt state."""
        buffer = set(self.buffers[d.segment]) if 0 <= d.segment < self.num_segments else set()
        if not d.rows or not set(d.rows) <= buffer or len(set(d.rows)) != len(d.rows):
            raise RuntimeError(f"policy {self.policy_name} chose rows {d.rows} not waiting for segment {d.segment}")
        if len(set(d.riders)) != len(d.riders):
            raise RuntimeError(f"policy {self.policy_name} named a rider twice: {d.riders}")
        for slot in d.riders:
            req = self.requests.get(slot)
            legal = isinstance(slot, int) and 0 <= slot < self.store.slots and slot not in d.rows
            if not legal or (req is not None and (req.done_through >= d.segment or slot in buffer)):
                raise RuntimeError(f"policy {self.policy_name} let slot {slot} ride segment {d.segment} illegally")

    def _prefill(self) -> None:
        batch, self.prefill_queue = self.prefill_queue, []
        logits = self.runner.prefill([r.slot for r in batch], [r.prompt for r in batch])
        now = time.perf_counter()
        for req, row in zip(batch, logits):
            self.requests[req.slot] = req
            req.token_start = now
            self._emit(req, self._pick(row, req), self.num_layers - 1, now)

    def _overhead_ms(self, d: Decision) -> float:
        """Predicted work of this step besides its segment: the first segment starts tokens (KV fill of
        those that exited early, their deferred projections); the last completes deferred projections."""
        if self.cost is None:
            return 0.0
        if d.segment == 0:
            reqs = [self.requests[slot] for slot in d.rows if slot in self.requests]
            filling = [r.fill_from for r in reqs if r.fill_from is not None]
            first = min((self._segment_of(layer) for layer in filling), default=None)
            projected = sum(r.pending_layer is not None for r in reqs)
            return self.cost.overhead_ms(first, len(filling), projected)
        if d.segment == self.num_segments - 1:
            pending = sum(self.requests[slot].pending_layer is not None for slot in self.buffers[0])
            return self.cost.overhead_ms(projected=pending)
        return 0.0

    def _execute(self, d: Decision) -> None:
        s, rows = d.segment, list(d.rows)
        chosen = set(rows)
        for buffer in self.buffers:
            for slot in buffer:
                self.requests[slot].steps_waiting += slot not in chosen
        self.buffers[s] = [slot for slot in self.buffers[s] if slot not in chosen]
        if s == 0:
            # tokens whose vocabulary projection was deferred are needed now; some may end their request
            self._project([self.requests[slot] for slot in rows])
            rows = [slot for slot in rows if slot in self.requests]
            if not rows:
                return
            self._start_tokens([self.requests[slot] for slot in rows])
        reqs = [self.requests[slot] for slot in rows]
        segment = self.runner.segments[s]
        refill = []
        for slot in d.riders:
            rider = self.requests.get(slot)
            if rider is not None and rider.fill_from is not None and rider.fill_from + 1 == segment.start:
                refill.append(slot)
                last = segment.stop - 1  # the ride writes this segment's fill; the rest may follow
                rider.fill_from = None if last == self.num_layers - 1 else last
                rider.done_through = s  # its keys/values here are final now: it may not ride s again
        self.stats.ride_fill_rows += len(refill)
        x = self.runner.run_segment(s, rows, list(d.riders), refill)
        self.stats.ride_along_rows += len(d.riders)
        self.stats.layer_rows += len(self.runner.segments[s]) * (len(rows) + len(d.riders))
        for req in reqs:
            req.steps_waiting = 0
            req.done_through = s
        if s == self.num_segments - 1:
            pending = [self.requests[slot] for slot in self.buffers[0] if self.requests[slot].pending_layer is not None]
            logits = self._project(pending, final=x)  # one lm_head product for both
            self._finish_tokens(reqs, logits, [self.num_layers - 1] * len(reqs), queued=False)
            return
        layer = self.runner.boundaries[s]
        own, logits = self._confident(s, layer, rows, x)
        if d.exit_rule == "own":
            leave = own
        elif d.exit_rule == "all":
            leave = [all(own)] * len(rows)
        elif d.exit_rule == "majority":
            leave = [sum(own) >= d.quorum * len(own)] * len(rows)
        else:
            raise RuntimeError(f"unknown exit rule {d.exit_rule!r}")
        for req, mine, goes in zip(reqs, own, leave):
            if mine and req.passed_at is None:
                req.passed_at = layer
            if goes and not mine:
                req.output.involuntary += 1
                self.stats.involuntary_exits += 1
        out = [i for i, goes in enumerate(leave) if goes]
        stay = [i for i, goes in enumerate(leave) if not goes]
        if stay:
            index = torch.tensor(stay, device=x.device)
            self.runner.keep([rows[i] for i in stay], x.index_select(0, index), exited=False)
            for i in stay:
                reqs[i].segment = s + 1
                self.buffers[s + 1].append(rows[i])
        if out:
            index = torch.tensor(out, device=x.device)
            out_logits = None if logits is None else logits.index_select(0, index)
            self._exit_rows([reqs[i] for i in out], s, layer, x.index_select(0, index), out_logits)

    def _exit_rows(
        self, reqs: list[_Request], s: int, layer: int, x: torch.Tensor, logits: torch.Tensor | None
    ) -> None:
        """Rows leaving at exit point `s`: keep their hidden states for KV fill, then emit their tokens,
        or — when the confidence needed no logits — keep the head's features and defer the vocabulary
        projection until the token is needed, so one lm_head product serves many exits."""
        self.runner.keep([r.slot for r in reqs], x, exited=True)
        if logits is not None:  # the confidence needed them already
            self._finish_tokens(reqs, logits, [layer] * len(reqs), queued=False)
            return
        # a request's last token is emitted now: deferring it would keep its slot busy for nothing
        final = [i for i, r in enumerate(reqs) if len(r.output.tokens) + 1 >= r.max_new_tokens]
        if not self.defer_projection or len(final) == len(reqs):
            self._finish_tokens(reqs, self.runner.head_logits(s, x), [layer] * len(reqs), queued=False)
            return
        if final:
            at = torch.tensor(final, device=x.device)
            logits = self.runner.head_logits(s, x.index_select(0, at))
            self._finish_tokens([reqs[i] for i in final], logits, [layer] * len(final), queued=False)
            rest = [i for i in range(len(reqs)) if i not in set(final)]
            reqs = [reqs[i] for i in rest]
            x = x.index_select(0, torch.tensor(rest, device=x.device))
        self.runner.keep_features(s, [r.slot for r in reqs], x)
        for req in reqs:
            req.pending_layer = layer
            req.fill_from = layer
            req.segment = 0
            req.steps_waiting = 0
            req.done_through = s
            self.buffers[0].append(req.slot)

    def _project(self, pending: list[_Request], final: torch.Tensor | None = None) -> torch.Tensor | None:
        """Emit the deferred tokens of `pending` (those that have one); with `final` (hidden states
        after the last layer) the same lm_head product also gives, and returns, their logits."""
        pending = [r for r in pending if r.pending_layer is not None]
        if not pending:
            return None if final is None else self.runner.final_logits(final)
        slots = [r.slot for r in pending]
        logits = self.runner.project(slots, final)
        if final is not None:
            logits, final_logits = logits[len(final) :], logits[: len(final)]
        layers = [r.pending_layer for r in pending]
        for req in pending:
            req.pending_layer = None
        self._finish_tokens(pending, logits, layers, queued=True)
        return final_logits if final is not None else None

    def _confident(
        self, s: int, layer: int, rows: list[int], x: torch.Tensor
    ) -> tuple[list[bool], torch.Tensor | None]:
        """Each row's own verdict at this exit point (its confidence against the threshold, or its
        trace), and the logits if the confidence measure computed them."""
        confidence, logits = self.runner.check(s, rows, x)
        if self.exit_source == "trace":
            return [self.requests[slot].trace_layer <= layer for slot in rows], logits
        return (confidence >= self.threshold_at[layer]).reshape(-1).tolist(), logits

    def _start_tokens(self, reqs: list[_Request]) -> None:
        """KV fill for rows that exited early (one product for all), then embed their next tokens."""
        filled = [r for r in reqs if r.fill_from is not None]
        if filled:
            self.runner.fill([r.slot for r in filled], [r.fill_from for r in filled])
        for req in filled:
            req.fill_from = None
        self.runner.embed([r.slot for r in reqs], [r.output.tokens[-1] for r in reqs])
        for req in reqs:
            req.passed_at = None
            req.done_through = -1
            if req.exits is not None:
                req.trace_layer = req.exits.next_layer()

    def _finish_tokens(self, reqs: list[_Request], logits: torch.Tensor, layers: list[int], *, queued: bool) -> None:
        """Pick and emit one token per row; `queued`: the rows already wait in the first buffer."""
        now = time.perf_counter()
        if self.settings.do_sample:
            tokens = [self._pick(row, req) for row, req in zip(logits, reqs)]
        else:
            tokens = logits.float().argmax(dim=-1).tolist()
        last = self.num_layers - 1
        for req, token, layer in zip(reqs, tokens, layers):
            self.stats.decoded_tokens += 1
            self.stats.min_layer_rows += layer + 1
            if req.passed_at is not None and req.passed_at < layer:
                req.output.missed += 1
                self.stats.missed_exits += 1
            if not queued:  # a deferred row's fill_from was set at its exit, and a ride may have advanced it
                req.fill_from = None if layer == last else layer
            self._emit(req, token, layer, now, queued)

    def _emit(self, req: _Request, token: int, layer: int, now: float, queued: bool = False) -> None:
        out = req.output
        out.tokens.append(int(token))
        out.exit_layers.append(layer)
        out.token_times.append(self.stats.wall_s + time.perf_counter() - self._step_start)
        self.stats.tokens += 1
        self.stats.exits_per_layer[layer] = self.stats.exits_per_layer.get(layer, 0) + 1
        if req.callback is not None:
            req.callback(out.request_id, int(token), layer)
        if int(token) in self.eos or len(out.tokens) >= req.max_new_tokens:
            out.finished = True
            self.finished[out.request_id] = out
            del self.requests[req.slot]
            if req.slot in self.buffers[0]:
                self.buffers[0].remove(req.slot)
            self.store.release(req.slot)
            return
        req.token_start = now
        if queued:
            return
        req.segment = 0
        req.steps_waiting = 0
        # keys/values past the exit are filled before the next token starts: until then the slot may ride
        req.done_through = self.num_segments - 1 if req.fill_from is None else self._segment_of(layer)
        self.buffers[0].append(req.slot)

    def _segment_of(self, exit_layer: int) -> int:
        return self.runner.boundaries.index(exit_layer)

    def _pick(self, logits: torch.Tensor, req: _Request) -> int:
        return pick_token(logits, self.settings, self.warpers, req.generator)


def segment_boundaries(
    exit_layers: Sequence[int], thresholds: Sequence[float], policy: str, exit_source: str
) -> list[int]:
    """The exit layers where the engine's segments end: none for `full`, every exit point for a
    trace, else the exit points with a finite threshold (a threshold of +inf is never checked)."""
    if policy == "full":
        return []
    if exit_source == "trace":
        return list(exit_layers)
    return [e for e, t in zip(exit_layers, thresholds) if t != math.inf]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["DrexEngine", "EngineStats", "RequestOutput", "RandomPolicy"]
