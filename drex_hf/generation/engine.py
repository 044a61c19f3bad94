"""`DrexEngine`: continuous-batching early-exit decoding; the host plans, the device executes.

`add_request()` takes a slot in the `RowKVCache`; `step()` runs either a batched full-depth prefill
of the newly added requests or one decision of the policy, in three named moves:

    decision = policy.pick(view)          # plain Python over row states: which buffer, which rows
    plan = self._plan(decision)           # those rows as slots and positions (+ fills, projections)
    verdict = self.executor.execute(plan) # the device: one upload, its programs, one read-back
    self._apply(plan, verdict)            # tokens emitted, rows moved between buffers, statistics

Row states live here only, as plain Python (waiting for segment s; exited, awaiting KV fill or the
vocabulary projection; finished); the executor never sees a request and the policy never sees a
tensor. Tokens are picked on the device from per-request counter-based draws, so no neighbour and
no scheduling decision changes a request's output. `generate()` is a static batch run through here.
"""

from __future__ import annotations

import collections
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from drex_hf import kernels
from drex_hf.device import device_name
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.exits import ExitDistribution, RequestExits, check_trace_row, next_layers
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import StepPlan, Verdict, bucket_of, row_buckets
from drex_hf.generation.processors import RowProcessors, stop_criterion, stops
from drex_hf.generation.runner import StepExecutor
from drex_hf.generation.sampling import RequestSampling, as_seed
from drex_hf.generation.scheduler import (
    CostModel,
    Decision,
    DrexPolicy,
    Policy,
    RandomPolicy,
    SchedulerView,
    error_summary,
    make_policy,
)
from drex_hf.generation.settings import DecodeSettings
from drex_hf.seeds import check_seed

if TYPE_CHECKING:
    from drex_hf.generation.protocol import EarlyExitModel

TokenCallback = Callable[[int, int, int], None]  # (request id, token, exit layer)
FinishCallback = Callable[["RequestOutput"], None]  # the request's output, once, when it ends
NO_GRAPHS_WITH_PROCESSORS = (
    "graphs=True cannot capture HF's logits processors (repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
    "min_new_tokens): they read each row's token history; use graphs=False"
)


@dataclass
class RequestOutput:
    request_id: int
    prompt_length: int
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    involuntary: int = 0
    missed: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length" or "cancelled"
    # when each token was emitted, in seconds of this engine's own stepping (other engines stepped in
    # between, as benchmarks interleave them, do not count): token latencies without their noise
    token_times: list[float] = field(default_factory=list)
    # with `record_checks`: per token, (exit layer, confidence) of every exit check the engine made for it
    checks: list[list[tuple[int, float]]] = field(default_factory=list)


class TokenRates:
    """Tokens per second of a run's statistics (`tokens`, `decoded_tokens`, `wall_s`, `prefill_s`)."""

    tokens: int
    decoded_tokens: int
    wall_s: float
    prefill_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens decoded after the prefill's, per second of decoding (prefill time excluded)."""
        decode_s = self.wall_s - self.prefill_s
        return self.decoded_tokens / decode_s if decode_s > 0 else 0.0


@dataclass
class EngineStats(TokenRates):
    """What a run did. `layer_rows` counts decoder layers × rows executed for decoded tokens (riders
    included, padding not: that is `padded_layer_rows`); `min_layer_rows` is the sum of the decoded
    tokens' exit depths. `uploads`/`reads` are the executor's host-device copies (one of each per
    step, one read per prefill); `decisions` is filled when the engine records them."""

    policy: str
    cost_source: str
    tokens: int = 0
    decoded_tokens: int = 0
    exits_per_layer: dict[int, int] = field(default_factory=dict)
    involuntary_exits: int = 0
    missed_exits: int = 0
    ride_along_rows: int = 0
    layer_rows: int = 0
    padded_layer_rows: int = 0
    min_layer_rows: int = 0
    wasted_rows: int = 0  # rows started on a next token before their deferred token turned out to end them
    steps: int = 0
    prefill_steps: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    predicted_ms: list[float | None] = field(default_factory=list)
    measured_ms: list[float] = field(default_factory=list)
    step_segments: list[int] = field(default_factory=list)
    kv_cache_bytes: int = 0
    graphs: dict[str, float | int] | None = None
    decisions: list[dict] | None = None

    def prediction_error(self) -> dict[str, float | None]:
        return error_summary(list(self.predicted_ms), list(self.measured_ms))

    def bound(self, window: int | None) -> None:
        """Keep only the last `window` steps in the per-step lists (None: all): a long-running
        engine's statistics stay a fixed size."""
        if window is None:
            return
        self.predicted_ms = collections.deque(self.predicted_ms, maxlen=window)
        self.measured_ms = collections.deque(self.measured_ms, maxlen=window)
        self.step_segments = collections.deque(self.step_segments, maxlen=window)
        if self.decisions is not None:
            self.decisions = collections.deque(self.decisions, maxlen=window)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "policy": self.policy,
            "cost_source": self.cost_source,
            "tokens": self.tokens,
            "decoded_tokens": self.decoded_tokens,
            "exits_per_layer": {str(k): v for k, v in sorted(self.exits_per_layer.items())},
            "involuntary_exits": self.involuntary_exits,
            "missed_exits": self.missed_exits,
            "ride_along_rows": self.ride_along_rows,
            "layer_rows": self.layer_rows,
            "padded_layer_rows": self.padded_layer_rows,
            "min_layer_rows": self.min_layer_rows,
            "wasted_rows": self.wasted_rows,
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prediction_error": self.prediction_error(),
            "kv_cache_bytes": self.kv_cache_bytes,
        }
        if self.graphs is not None:
            out["graphs"] = self.graphs
        if self.decisions is not None:
            out["decisions"] = list(self.decisions)
        return out


@dataclass
class _Request:
    """One request's row state, on the host."""

    output: RequestOutput
    prompt: torch.Tensor
    max_new_tokens: int
    seed: int  # as the device holds it (`sampling.as_seed`)
    exits: RequestExits | None
    callback: TokenCallback | None
    slot: int
    position: int = 0  # where the token being computed writes its keys/values
    draw: int = 0  # the token being computed is this request's token number `draw` (its sampling counter)
    done_through: int = -1  # see SchedulerView
    fill_from: int | None = None  # exit layer whose skipped layers still need KV fill
    trace_layer: int = -1  # this token's exit layer under a trace
    passed_at: int | None = None  # first exit point this token was confident at (batch policies)
    pending_layer: int | None = None  # exited here; its token's vocabulary projection is deferred
    token_start: float = 0.0
    waiting_since: int = 0  # the engine's step count when it last ran or joined a buffer
    checks: list[tuple[int, float]] | None = None  # this token's checks so far (record_checks)
    prompt_tokens: list[int] | None = None  # on the host, for stop strings
    sampling: RequestSampling | None = None  # per-request sampling: this request's own parameters
    on_finish: FinishCallback | None = None

    def last_is_pending(self) -> bool:
        """Whether the deferred token is this request's last: the row only awaits its projection."""
        return self.pending_layer is not None and len(self.output.tokens) + 1 >= self.max_new_tokens


@dataclass
class _Step:
    """One step as planned: the plan the device runs and, in the plan's row order, the requests
    behind it (None for riders), the ones whose tokens it projects, and those it started."""

    decision: Decision | None
    plan: StepPlan
    running: list[_Request | None] = field(default_factory=list)
    projected: list[_Request] = field(default_factory=list)
    final: int = 0  # how many of `projected` (the first ones) are the final segment's own rows


class SlotEngine:
    """What `DrexEngine` and `SpecEngine` share: requests held in the slots of a `RowKVCache`
    (`store`), by slot in `requests`, a queue of requests awaiting their prefill, the finished ones,
    and stepping in which a cancel from a callback waits for the step's end. A subclass defines
    `_step()` (one step; False when there was nothing to do) and `_finish(request, reason)`."""

    store: RowKVCache
    requests: dict[int, Any]
    prefill_queue: list[Any]
    finished: dict[int, Any]
    _stepping: bool
    _cancels: list[int]

    @property
    def has_free_slot(self) -> bool:
        return self.store.free_slots > 0

    @property
    def active(self) -> int:
        return len(self.requests) + len(self.prefill_queue)

    @torch.inference_mode()
    def step(self) -> bool:
        """Run one step (a prefill, or the engine's next decision); False when there was nothing to
        do. A `cancel()` from a token callback during the step takes effect when the step ends."""
        self._stepping = True
        try:
            return self._step()
        finally:
            self._stepping = False
            cancels, self._cancels = self._cancels, []
            for request_id in cancels:
                self.cancel(request_id)

    def _step(self) -> bool:
        raise NotImplementedError

    def _finish(self, req: Any, reason: str) -> None:
        raise NotImplementedError

    def run(self) -> dict[int, Any]:
        """Step until every request has finished; returns the finished requests by id."""
        while self.step():
            pass
        return self.finished

    def cancel(self, request_id: int) -> bool:
        """End a queued or running request now (between steps): its slot is free for the next
        `add_request`, its `on_finish` gets `finish_reason` "cancelled" with the tokens it has. False
        when no such request is queued or running (unknown, or finished already). Called during a
        step (from a callback), it is deferred to the step's end, so the step's rows stay whole."""
        if self._stepping:
            live = any(r.output.request_id == request_id for r in [*self.prefill_queue, *self.requests.values()])
            if live and request_id not in self._cancels:
                self._cancels.append(request_id)
            return live
        for req in [*self.prefill_queue, *self.requests.values()]:
            if req.output.request_id == request_id:
                self._finish(req, "cancelled")
                return True
        return False


def step_in_turn(engines: Iterable[SlotEngine]) -> None:
    """Step every engine once in turn until none has work: each times only its own steps, so when
    engines are compared the machine's drift falls on all of them alike."""
    engines = list(engines)
    busy = True
    while busy:
        busy = False
        for engine in engines:
            busy |= engine.step()


class DrexEngine(SlotEngine):
    """Continuous batching with per-token early exit. See the module docstring.

    Args:
        model: an `EarlyExitModel`.
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
            final-segment step or when the row's next token starts (same tokens, fewer lm_head
            calls); off, every exit's tokens are projected in a step of their own right after it.
        graphs: capture every program as a CUDA graph at start-up (default: on for CUDA).
        static_shapes: programs whose shapes depend on their row bucket and the store's capacity only
            (default: on for CUDA and with graphs; on the CPU off: eager programs may attend only up
            to the longest row and read contiguous rows as views).
        buckets: the row counts programs run at (default: `plan.row_buckets`).
        record_decisions: keep every step's decision (segment, rows, riders, bucket, predicted and
            measured ms, the policy's reason) in `stats.decisions`.
        record_checks: keep each token's exit checks — (exit layer, confidence) as the verdict brought
            them back — in `RequestOutput.checks`.
        progress: the graph capture's progress bar (default: shown on a terminal).
        tokenizer: the tokenizer `settings.stop_strings` are matched with (HF's `StopStringCriteria`).
        per_request_sampling: each request brings its own sampling parameters
            (`add_request(sampling=RequestSampling(...))`, temperature 0 greedy), kept in its slot
            and applied per row on the device (`sampling.pick_rows`); default: the settings' own.
        keep_finished: keep finished requests in `finished` (what `run()` returns); a server turns
            it off and takes each request from its `on_finish` callback, so nothing accumulates.
        stats_window: keep only the last this many steps' predicted / measured times, segments
            and decisions in `stats` (counters stay whole); default: all of them.

    HF's logits processors in `settings` (repetition penalty, no-repeat n-gram, bad words, min new
    tokens) run before every token pick, each row seeing only its own prompt and tokens; their
    programs read a per-slot token history and are not captured (graphs=True is refused with them,
    and graphs default to off). The exit confidence is the exit's own, unprocessed: processors decide
    which token a row takes, never where it exits. A stop string ends its row after the token that
    completes it (the token is kept), checked on the host.
    """

    def __init__(
        self,
        model: EarlyExitModel,
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
        graphs: bool | None = None,
        static_shapes: bool | None = None,
        buckets: Sequence[int] | None = None,
        record_decisions: bool = False,
        record_checks: bool = False,
        progress: bool | None = None,
        tokenizer: Any = None,
        per_request_sampling: bool = False,
        keep_finished: bool = True,
        stats_window: int | None = None,
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
        if cost_model is not None and not isinstance(cost_model, (CostModel, str, os.PathLike)):
            raise GenerationTypeError(
                f"cost_model must be a CostModel or the path of a calibration file, got "
                f"{type(cost_model).__name__} {cost_model!r}"
            )
        kernels.dispatch.requested()  # a bad DREX_KERNELS fails here, before any work
        if sla_tpot_ms is not None and policy != "drex":
            raise GenerationInputError(f"sla_tpot_ms applies to policy 'drex', not {policy!r}")
        if exit_source == "trace" and policy == "full":
            raise GenerationInputError("policy 'full' never exits: a trace does not apply to it")
        device = torch.device(model.heads_device)
        settings = settings or DecodeSettings(max_new_tokens=32)
        processors = None
        if settings.has_logits_processors:
            processors = RowProcessors(settings, model.arch.vocab_size, device)
            if graphs:
                raise GenerationInputError(NO_GRAPHS_WITH_PROCESSORS)
            graphs = False
        self.stop = stop_criterion(settings, tokenizer)
        if graphs is None:
            graphs = device.type == "cuda"
        if graphs and device.type != "cuda":
            raise GenerationInputError(f"graphs=True captures CUDA graphs: the model is on {device}, not a CUDA device")
        static = (graphs or device.type == "cuda") if static_shapes is None else static_shapes
        if graphs and not static:
            raise GenerationInputError("graphs=True needs static_shapes (a graph replays fixed shapes)")
        self.model, self.arch = model, model.arch
        self.settings = settings
        check_special_tokens(self.settings, self.arch.vocab_size)
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
        self.buckets = self._buckets(buckets, max_batch, static)
        self.executor = StepExecutor(
            model,
            self.store,
            boundaries,
            buckets=self.buckets,
            static=static,
            do_sample=self.settings.do_sample,
            warpers=self.settings.warpers(),
            processors=processors,
            per_request_sampling=per_request_sampling,
        )
        self.per_request_sampling = per_request_sampling
        st = self.settings
        self._default_sampling = RequestSampling(
            temperature=st.temperature if st.do_sample else 0.0, top_p=st.top_p or 1.0, top_k=st.top_k or 0
        )
        self.keep_finished = keep_finished
        if stats_window is not None and (isinstance(stats_window, bool) or not isinstance(stats_window, int)
                                         or stats_window < 1):  # fmt: skip
            raise GenerationInputError(f"stats_window must be a positive integer or None, got {stats_window!r}")
        self.stats_window = stats_window
        self.segments = self.executor.segments
        self.num_segments = len(self.segments)
        self.graph_report = None
        if graphs:
            from drex_hf.generation.graphs import GraphCache

            self.capture_graphs(GraphCache(device), progress)
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
        if isinstance(self.policy, DrexPolicy) and self.graph_report is not None:
            self.policy.ride = False  # see capture_graphs
        self.buffers: list[list[int]] = [[] for _ in range(self.num_segments)]
        self.requests: dict[int, _Request] = {}  # running, by slot
        self.prefill_queue: list[_Request] = []
        self.finished: dict[int, RequestOutput] = {}
        self.next_id = 0
        self._project_next: list[_Request] = []  # defer_projection off: exits awaiting their own step
        self._stepping = False  # inside step(): a cancel waits for its end
        self._cancels: list[int] = []
        self.stats = EngineStats(self.policy_name, self.cost.source if self.cost else "none")
        self.stats.graphs = self.graph_report
        self.stats.decisions = [] if record_decisions else None
        self.stats.bound(stats_window)
        self.record_checks = record_checks
        self._step_start = time.perf_counter()
        self.stats.kv_cache_bytes = self.store.nbytes()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _buckets(given: Sequence[int] | None, max_batch: int, static: bool) -> list[int]:
        if given is None:
            return row_buckets(max_batch, static)
        buckets = sorted({int(b) for b in given})
        if not buckets or buckets[0] < 1 or buckets[-1] < max_batch:
            raise GenerationInputError(
                f"buckets must be positive row counts, the largest at least max_batch={max_batch}; got {list(given)}"
            )
        return buckets

    def capture_graphs(self, cache: Any, progress: bool | None = None) -> dict[str, float | int]:
        """Capture every program of the executor into `cache` (a `graphs.GraphCache`: CUDA graphs,
        warm-up first, largest bucket first), with a progress bar; from then on steps replay them.
        Riders are switched off: their programs are not captured (a graph reads rows in place through
        indexed attention, so a contiguous batch is worth nothing there)."""
        from tqdm.auto import tqdm

        executor = self.executor
        if not executor.static:
            raise GenerationInputError("graphs need static_shapes (a graph replays fixed shapes)")
        if executor.processors is not None:
            raise GenerationInputError(NO_GRAPHS_WITH_PROCESSORS)
        keys = executor.program_keys()
        executor.write_plan(StepPlan(segment=None), (executor.rows,) * 3)  # every row at the scratch slot
        executor.upload()
        bar = tqdm(total=len(keys), desc="capturing CUDA graphs", disable=None if progress is None else not progress)
        with torch.no_grad(), bar:
            report = cache.capture(keys, executor.program, _key_bucket, bar.update)
        executor.graphs = cache
        self.graph_report = report
        if hasattr(self, "stats"):
            self.stats.graphs = report
        if isinstance(getattr(self, "policy", None), DrexPolicy):
            self.policy.ride = False
        return report

    @torch.no_grad()
    def _cost_model(self, given: CostModel | str | None, policy: str) -> CostModel | None:
        if isinstance(given, CostModel):
            if len(given.a_ms) != self.num_segments:
                raise GenerationInputError(
                    f"the cost model has constants for {len(given.a_ms)} segments; this engine runs "
                    f"{self.num_segments} ({self.describe()['segments']})"
                )
            return given
        segments = self.describe()["segments"]
        if given is not None:
            return CostModel.from_file(given, device_name(self.model.heads_device), segments)
        if policy != "drex":
            return None
        from drex_hf.generation.profile import measure_cost_model

        return measure_cost_model(self.executor)

    def describe(self) -> dict[str, Any]:
        return {"segments": [[seg.start, seg.stop - 1] for seg in self.segments], "kv_fill": "project"}

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: torch.Tensor | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        trace: Sequence[int] | None = None,
        callback: TokenCallback | None = None,
        on_finish: FinishCallback | None = None,
        sampling: RequestSampling | None = None,
    ) -> int:
        """Queue a prompt (1-D token ids) for decoding; returns its request id. Errors, before any work:
        an empty prompt, ids outside the vocabulary, a prompt + max_new_tokens longer than a slot,
        or no free slot (`EngineFullError`). `callback(request id, token, exit layer)` runs for each
        token, `on_finish(output)` once when the request ends; `sampling`: its own sampling parameters
        (an engine built with `per_request_sampling`; default the settings')."""
        if sampling is not None and not self.per_request_sampling:
            raise GenerationInputError("sampling= per request needs an engine built with per_request_sampling=True")
        if sampling is not None and not isinstance(sampling, RequestSampling):
            raise GenerationTypeError(f"sampling must be a RequestSampling, got {type(sampling).__name__}")
        if self.per_request_sampling and sampling is None:
            sampling = self._default_sampling
        seed = None if seed is None else check_seed(seed)
        default = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids, max_new = check_request(prompt, default, self.arch, self.store.max_len)
        if trace is not None:
            if self.exit_source != "trace":
                raise GenerationInputError("a per-request trace needs an engine built with exit_source='trace'")
            check_trace_row(trace, self.model.exit_layers, self.num_layers, "the trace")
        elif self.exit_source == "trace" and self.distribution is None:
            raise GenerationInputError("exit_source='trace' needs a trace per request or an exit_distribution")
        slot = self.store.allocate()
        rid = self.next_id
        self.next_id += 1
        exits = None
        if self.exit_source == "trace":
            dist = None
            if self.distribution is not None and trace is None:
                dist = (self.distribution.probabilities, self.distribution.seed + (rid if seed is None else int(seed)))
            exits = RequestExits(self.model.exit_layers, self.num_layers, trace, dist)
        samples = self.settings.do_sample if sampling is None else not sampling.greedy
        if seed is None:  # sampling without a seed: drawn from torch's global RNG (torch.manual_seed repeats it)
            seed = int(torch.randint(0, 2**62, (1,))) if samples else 0
        out = RequestOutput(rid, int(ids.numel()))
        req = _Request(out, ids, max_new, as_seed(seed), exits, callback, slot, sampling=sampling, on_finish=on_finish)
        if self.stop is not None:
            req.prompt_tokens = ids.tolist()
        self.prefill_queue.append(req)
        return rid

    # ------------------------------------------------------------------ stepping
    def _step(self) -> bool:
        if self.prefill_queue:
            self._prefill()
            return True
        if not self.requests:
            return False
        start = self._step_start = time.perf_counter()
        if self._project_next:
            step = self._plan_projections()
        else:
            decision = self.policy.pick(self._view(start))
            self._check_decision(decision)
            step = self._plan(decision)
        verdict = self.executor.execute(step.plan)
        self._apply(step, verdict)
        self._account(step, start)
        return True

    def reset_stats(self) -> None:
        """Start counting afresh (and forget finished requests), keeping the store, the captured
        graphs and the cost model: benchmarks reuse one engine for their warm-up and their runs."""
        if self.requests or self.prefill_queue:
            raise RuntimeError("reset_stats() while requests are running")
        keep = self.stats
        self.stats = EngineStats(keep.policy, keep.cost_source, kv_cache_bytes=keep.kv_cache_bytes, graphs=keep.graphs)
        self.stats.decisions = [] if keep.decisions is not None else None
        self.stats.bound(self.stats_window)
        self.finished = {}

    # ------------------------------------------------------------------ prefill
    def _prefill(self) -> None:
        """One batched full-depth pass over the queued prompts; each gets its first token."""
        start = self._step_start = time.perf_counter()
        batch, self.prefill_queue = self.prefill_queue, []
        sampling = [r.sampling for r in batch] if self.per_request_sampling else None
        tokens = self.executor.prefill(
            [r.slot for r in batch], [r.prompt for r in batch], [r.seed for r in batch], sampling
        )
        now = time.perf_counter()
        for req, token in zip(batch, tokens):
            self.requests[req.slot] = req
            req.position = req.output.prompt_length - 1
            req.token_start = now
            self._emit(req, token, self.num_layers - 1, now)
        self.stats.prefill_steps += 1
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.wall_s += time.perf_counter() - start

    # ------------------------------------------------------------------ plan
    def _view(self, now: float) -> SchedulerView:
        """What the policy sees: the buffers (read-only), and per slot — read on demand, most policies
        look at few — its done-through segment, its token's age and the steps it has waited."""
        requests, steps = self.requests, self.stats.steps
        context = max((req.position for req in requests.values()), default=0) + 2
        return SchedulerView(
            self.buffers,
            _PerSlot(requests, lambda r: (now - r.token_start) * 1e3, self.store.slots, 0.0),
            _PerSlot(requests, lambda r: steps - r.waiting_since, self.store.slots, 0),
            _PerSlot(requests, lambda r: r.done_through, self.store.slots, -1),
            context,
            self.buckets,
        )

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

    def _plan(self, d: Decision) -> _Step:
        """The decision as a plan: segment 0 first projects the chosen rows' deferred tokens (their
        next tokens embed them), fills the keys/values their last tokens skipped and starts their next
        tokens; the final segment projects its rows together with every deferred token waiting."""
        s = d.segment
        chosen = set(d.rows)
        self.buffers[s] = [slot for slot in self.buffers[s] if slot not in chosen]
        rows = [self.requests[slot] for slot in d.rows]
        step = _Step(d, StepPlan(segment=s))
        if s == 0:
            self._plan_project(step, [r for r in rows if r.pending_layer is not None], first=True)
            rows = [r for r in rows if not r.last_is_pending()]
            self._plan_fill(step, [r for r in rows if r.fill_from is not None])
            self._start_tokens(rows)
        self._plan_run(step, rows, self._riders(d))
        if s == self.num_segments - 1:
            waiting = [self.requests[slot] for slot in self.buffers[0]]
            step.final = len(rows)
            self._plan_project(step, rows + [r for r in waiting if r.pending_layer is not None], first=False)
        return step

    def _plan_projections(self) -> _Step:
        """A step that only projects the tokens of rows that just exited (defer_projection off)."""
        rows, self._project_next = self._project_next, []
        step = _Step(None, StepPlan(segment=None))
        self._plan_project(step, [r for r in rows if r.slot in self.requests and r.pending_layer is not None], False)
        return step

    def _plan_project(self, step: _Step, rows: list[_Request], first: bool) -> None:
        plan = step.plan
        plan.project_slots = [r.slot for r in rows]
        plan.project_index = [r.draw for r in rows]
        plan.project_seeds = [r.seed for r in rows]
        plan.project_first = first
        plan.project_lengths = [r.position + 1 for r in rows]  # the token picked is at sequence index position + 1
        step.projected = rows

    def _plan_fill(self, step: _Step, rows: list[_Request]) -> None:
        """KV fill, before the rows' next tokens start: the layers after each one's exit, at the
        position its exited token took."""
        if not rows:
            return
        plan = step.plan
        plan.fill_slots = [r.slot for r in rows]
        plan.fill_positions = [r.position for r in rows]
        plan.fill_first = [r.fill_from + 1 for r in rows]
        plan.fill_layers_from = min(plan.fill_first)
        for req in rows:
            req.fill_from = None

    def _start_tokens(self, rows: list[_Request]) -> None:
        """The rows' next tokens start: one position on, the next draw, and (a trace) their exits."""
        for req in rows:
            req.position += 1
            req.draw += 1
            req.passed_at = None
            req.done_through = -1
        traced = [r for r in rows if r.exits is not None]
        for req, layer in zip(traced, next_layers([r.exits for r in traced]) if traced else []):
            req.trace_layer = layer

    def _riders(self, d: Decision) -> list[tuple[int, int]]:
        """(slot, position) of each rider. A ride's keys/values are never kept: whatever it writes at
        a rider's position is rewritten before that row's next token reads it (by the KV fill of an
        exited row, by a waiting row's own run of the segment), so a skipped layer's keys/values
        have one way of being computed, the folded product."""
        return [(slot, getattr(self.requests.get(slot), "position", 0)) for slot in d.riders]

    def _plan_run(self, step: _Step, rows: list[_Request], riders: list[tuple[int, int]]) -> None:
        """The segment's rows, then its riders (which write their state to the scratch slot); in slot
        order when they are one contiguous run of slots and the programs are eager (read as views)."""
        if not rows:
            return
        running: list[_Request | None] = [*rows, *([None] * len(riders))]
        slots = [r.slot for r in rows] + [slot for slot, _ in riders]
        lo, hi = min(slots), max(slots) + 1
        span = (lo, hi) if hi - lo == len(slots) and not self.executor.static else None
        if span is not None and riders:
            order = sorted(range(len(slots)), key=slots.__getitem__)
            slots, running = [slots[i] for i in order], [running[i] for i in order]
        elif span is not None:
            rows = sorted(rows, key=lambda r: r.slot)
            slots, running = [r.slot for r in rows], rows
        at = dict(riders)
        plan = step.plan
        plan.slots = slots
        plan.writes = [slot if r is not None else self.store.scratch for slot, r in zip(slots, running)]
        plan.positions = [r.position if r is not None else at[slot] for slot, r in zip(slots, running)]
        plan.riders = [int(r is None) for r in running]
        if self.executor.do_sample:  # each row's draw for a token its exit's logits pick
            plan.token_index = [r.draw if r is not None else 0 for r in running]
            plan.seeds = [r.seed if r is not None else 0 for r in running]
        plan.kv_len = max(plan.positions) + 1
        plan.span = span
        step.running = running

    # ------------------------------------------------------------------ apply the verdict
    def _apply(self, step: _Step, verdict: Verdict) -> None:
        """Emit the projected tokens, then apply the exit check to the segment's rows."""
        if step.projected:
            self._emit_projected(step, verdict.projected.tolist())
        s = step.plan.segment
        if s is None or s == self.num_segments - 1 or not step.running:
            return
        rows = [(i, r) for i, r in enumerate(step.running) if r is not None]
        live = [(i, r) for i, r in rows if self.requests.get(r.slot) is r]  # a deferred token may have ended one
        self.stats.wasted_rows += len(rows) - len(live)
        layer = self.boundaries[s]
        confidence = verdict.confidence.tolist()
        if self.exit_source == "trace":
            own = [r.trace_layer <= layer for _, r in live]
        else:  # compared in float64, as the reference decoder does
            threshold = self.threshold_at[layer]
            own = [confidence[i] >= threshold for i, _ in live]
        rule = step.decision.exit_rule
        if rule == "own":
            leave = own
        elif rule == "all":
            leave = [all(own)] * len(own)
        elif rule == "majority":
            leave = [sum(own) >= step.decision.quorum * len(own)] * len(own)
        else:
            raise RuntimeError(f"unknown exit rule {rule!r}")
        tokens = verdict.tokens.tolist() if verdict.tokens is not None else None
        if self.record_checks:
            for i, req in live:
                req.checks = [*(req.checks or []), (layer, confidence[i])]
        since, stay = self.stats.steps + 1, self.buffers[s + 1]  # this step counts as run
        for (i, req), mine, goes in zip(live, own, leave):
            if mine and req.passed_at is None:
                req.passed_at = layer
            if goes and not mine:
                req.output.involuntary += 1
                self.stats.involuntary_exits += 1
            req.waiting_since = since
            if goes:
                self._exit(req, s, layer, None if tokens is None else tokens[i])
            else:
                req.done_through = s
                stay.append(req.slot)

    def _exit(self, req: _Request, s: int, layer: int, token: int | None) -> None:
        """A row leaving at exit point s: its token now when the check picked it from the exit's
        logits, else its exit-head features wait in its slot for a deferred projection."""
        if token is not None:
            self._finish_token(req, token, layer, queued=False)
            return
        req.pending_layer = layer
        req.fill_from = layer
        req.done_through = s
        self.buffers[0].append(req.slot)
        if not self.defer_projection:
            self._project_next.append(req)

    def _emit_projected(self, step: _Step, tokens: list[int]) -> None:
        for i, (req, token) in enumerate(zip(step.projected, tokens)):
            if self.requests.get(req.slot) is not req:
                continue
            if i < step.final:
                self._finish_token(req, token, self.num_layers - 1, queued=False)
            else:
                layer, req.pending_layer = req.pending_layer, None
                self._finish_token(req, token, layer, queued=True)

    def _finish_token(self, req: _Request, token: int, layer: int, *, queued: bool) -> None:
        """Account and emit one token; `queued`: the row already waits in the first buffer."""
        self.stats.decoded_tokens += 1
        self.stats.min_layer_rows += layer + 1
        if req.passed_at is not None and req.passed_at < layer:
            req.output.missed += 1
            self.stats.missed_exits += 1
        if not queued:  # a deferred row's fill_from was set at its exit
            req.fill_from = None if layer == self.num_layers - 1 else layer
        self._emit(req, token, layer, time.perf_counter(), queued)

    def _emit(self, req: _Request, token: int, layer: int, now: float, queued: bool = False) -> None:
        out = req.output
        out.tokens.append(int(token))
        out.exit_layers.append(layer)
        if self.record_checks:
            out.checks.append(req.checks or [])
            req.checks = None
        out.token_times.append(self.stats.wall_s + time.perf_counter() - self._step_start)
        self.stats.tokens += 1
        self.stats.exits_per_layer[layer] = self.stats.exits_per_layer.get(layer, 0) + 1
        if req.callback is not None:
            req.callback(out.request_id, int(token), layer)
        if int(token) in self.eos or self._stopped(req):
            self._finish(req, "stop")
            return
        if len(out.tokens) >= req.max_new_tokens:
            self._finish(req, "length")
            return
        req.token_start = now
        if queued:
            return
        req.waiting_since = self.stats.steps + 1
        # keys/values past the exit are filled before the next token starts: until then the slot may ride
        req.done_through = self.num_segments - 1 if req.fill_from is None else self.boundaries.index(layer)
        self.buffers[0].append(req.slot)

    def _finish(self, req: _Request, reason: str) -> None:
        """The request ends: its slot is free for the next one, its output goes to its `on_finish`."""
        out = req.output
        out.finished, out.finish_reason = True, reason
        if self.keep_finished:
            self.finished[out.request_id] = out
        if self.requests.get(req.slot) is req:
            del self.requests[req.slot]
        else:  # cancelled before its prefill
            self.prefill_queue.remove(req)
        for buffer in self.buffers:
            if req.slot in buffer:
                buffer.remove(req.slot)
        self._project_next = [r for r in self._project_next if r is not req]
        self.store.release(req.slot)
        if req.on_finish is not None:
            req.on_finish(out)

    def _stopped(self, req: _Request) -> bool:
        """Whether a stop string ends at the request's last token (HF's `StopStringCriteria` on its
        prompt + tokens: a string spanning the prompt's end counts, as in HF)."""
        return self.stop is not None and stops(self.stop, req.prompt_tokens + req.output.tokens)

    # ------------------------------------------------------------------ statistics
    @property
    def boundaries(self) -> list[int]:
        return self.executor.boundaries

    def _account(self, step: _Step, start: float) -> None:
        elapsed = time.perf_counter() - start
        plan, d = step.plan, step.decision
        self.stats.wall_s += elapsed
        self.stats.steps += 1
        n, riders = len(plan.slots), sum(plan.riders)
        bucket = bucket_of(self.buckets, n)
        if plan.segment is not None and n:
            depth = len(self.segments[plan.segment])
            self.stats.layer_rows += depth * n
            self.stats.padded_layer_rows += depth * (bucket - n)
            self.stats.ride_along_rows += riders
        predicted = None
        if d is not None and d.predicted_ms is not None:
            predicted = d.predicted_ms + self._overhead_ms(step)
        self.stats.predicted_ms.append(predicted)
        self.stats.measured_ms.append(elapsed * 1e3)
        self.stats.step_segments.append(-1 if plan.segment is None else plan.segment)
        if self.stats.decisions is not None:
            self.stats.decisions.append(
                {
                    "step": self.stats.steps,
                    "segment": plan.segment,
                    "rows": n - riders,
                    "riders": riders,
                    "bucket": bucket,
                    "fills": len(plan.fill_slots),
                    "projections": len(plan.project_slots),
                    "waiting": [len(b) for b in self.buffers],
                    "predicted_ms": predicted,
                    "measured_ms": elapsed * 1e3,
                    "reason": d.reason if d is not None else "deferred projections",
                }
            )

    def _overhead_ms(self, step: _Step) -> float:
        """Predicted work of this step besides its segment: the KV fill of the tokens it starts (one
        product from the shallowest exit point among them) and the vocabulary projections it makes
        beside the final segment's own rows."""
        if self.cost is None:
            return 0.0
        plan = step.plan
        first = None
        if plan.fill_slots:
            first = self.boundaries.index(plan.fill_layers_from - 1)
        return self.cost.overhead_ms(first, len(plan.fill_slots), len(plan.project_slots) - step.final)


class _PerSlot:
    """A read-only per-slot field of the running requests, computed when read (`default` for a slot
    that holds none): indexable by slot, iterable over all slots, and `.get()` like a dict."""

    def __init__(self, requests: dict[int, _Request], read: Callable[[_Request], Any], slots: int, default: Any):
        self.requests, self.read, self.slots, self.default = requests, read, slots, default

    def __getitem__(self, slot: int) -> Any:
        req = self.requests.get(slot)
        return self.default if req is None else self.read(req)

    def get(self, slot: int, default: Any = None) -> Any:
        req = self.requests.get(slot)
        return (self.default if default is None else default) if req is None else self.read(req)

    def __len__(self) -> int:
        return self.slots

    def __iter__(self) -> Any:
        return (self[slot] for slot in range(self.slots))


def _key_bucket(key: tuple) -> int:
    """The row bucket of an executor program key (graphs are captured largest first)."""
    return key[2] if key[0] in ("segment", "layers") else key[1]


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


def check_request(prompt: Any, max_new_tokens: Any, arch: Any, max_len: int) -> tuple[torch.Tensor, int]:
    """A request's prompt as 1-D int64 token ids and its max_new_tokens, checked before any work: an
    empty prompt, ids outside the vocabulary, a prompt + max_new_tokens longer than a slot of
    `max_len` positions (`arch`: the model's adapter) are refused, naming what is wrong."""
    ids = torch.as_tensor(prompt)
    if ids.dim() != 1:
        raise GenerationInputError(f"a prompt is one sequence of token ids (1-D), got shape {tuple(ids.shape)}")
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise GenerationInputError(f"a prompt holds integer token ids, got dtype {ids.dtype}")
    ids = ids.to(dtype=torch.long)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new = int(max_new_tokens)
    if ids.numel() == 0:
        raise GenerationInputError("empty prompt: a request needs at least one token")
    vocab = arch.input_vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise GenerationInputError(f"the prompt holds token ids outside the model's vocabulary 0..{vocab - 1}")
    if max_new < 1:
        raise GenerationInputError(f"max_new_tokens must be positive, got {max_new}")
    needed = ids.numel() + max_new - 1  # the last token is never fed back
    if needed > max_len:
        why = f"max_len={max_len}"
        if max_len == arch.position_limit:
            why += " (the model's own position limit)"
        raise GenerationInputError(
            f"the prompt has {ids.numel()} tokens; with max_new_tokens={max_new} it needs {needed} cache "
            f"positions but a slot holds {why}"
        )
    return ids, max_new


def check_special_tokens(settings: DecodeSettings, vocab_size: int) -> None:
    """Refuse eos / pad ids the model cannot emit: an eos outside the vocabulary would never end a
    row, a pad outside it would fill the output with ids no tokenizer decodes."""
    named = [("eos_token_id", e) for e in settings.eos_token_ids] + [("pad_token_id", settings.pad_token_id)]
    for name, value in named:
        if not 0 <= value < vocab_size:
            raise GenerationInputError(
                f"{name} {value} is outside the model's vocabulary 0..{vocab_size - 1} (given to generate(), or "
                f"else the model's generation_config holds it): pass {name}= with an id in the vocabulary"
            )


__all__ = ["DrexEngine", "EngineStats", "RequestOutput", "RandomPolicy"]
