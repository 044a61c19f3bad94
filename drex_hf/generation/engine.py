"""`DrexEngine`: continuous-batching early-exit decoding; the host plans, the device executes.

The rows live on the device (their state and the queue each waits in: `programs.RowState`). The
host keeps requests (`state.Requests`) and a mirror of the queues' counts (`plan.Book`), and a step
reads top to bottom:

    verdict = runner.read()               # wait for the step in flight: counts, emitted tokens
    decision = policy.pick(view)          # plain Python over counts: which buffer, how many rows
    plan = build_plan(decision, book)     # programs to run: projections, fills, the segment
    runner.launch(plan)                   # one upload, the programs (graphs where captured)
    apply(verdict)                        # emit, callbacks, statistics — while the device runs

so the device never waits on per-row bookkeeping: between reading a verdict and launching the next
step the host looks at counts only. Tokens are picked on the device from per-request counter-based
draws, so no neighbour and no scheduling decision changes a request's output. `generate()` runs a
static batch through here (`api.py`).
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from drex_hf import kernels
from drex_hf.device import device_name
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.checks import check_request, check_special_tokens
from drex_hf.generation.exits import ExitDistribution, check_trace_row
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import EOS, FINISHED, INVOLUNTARY, MISSED, VALID, Book, build_plan, row_buckets
from drex_hf.generation.processors import RowProcessors, stop_criterion, stops
from drex_hf.generation.protocol import EarlyExitModel
from drex_hf.generation.runner import Options, Runner
from drex_hf.generation.sampling import RequestSampling, as_seed
from drex_hf.generation.scheduler import CostModel, Decision, Policy, SchedulerView, error_summary
from drex_hf.generation.scheduler import make_policy as _make_policy
from drex_hf.generation.settings import DecodeSettings
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

NO_GRAPHS_WITH_PROCESSORS = (
    "graphs=True cannot capture HF's logits processors (repetition_penalty, no_repeat_ngram_size, bad_words_ids, "
    "min_new_tokens): they read each row's token history; use graphs=False"
)


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
    """What a run did. `layer_rows` counts decoder layers × live rows executed for decoded tokens;
    padding and stale tickets are `padded_layer_rows`; `min_layer_rows` is the sum of the decoded
    tokens' exit depths. `wasted_rows`: verdict rows of requests the host had already ended (a stop
    string, a cancel) while the device went on. `host_gap_s`: host time between reading a verdict and
    launching the next step (what the device waits on); `decisions` is filled when recorded."""

    policy: str
    cost_source: str
    tokens: int = 0
    decoded_tokens: int = 0
    exits_per_layer: dict[int, int] = field(default_factory=dict)
    involuntary_exits: int = 0
    missed_exits: int = 0
    layer_rows: int = 0
    padded_layer_rows: int = 0
    min_layer_rows: int = 0
    wasted_rows: int = 0
    steps: int = 0
    prefill_steps: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    host_gap_s: float = 0.0
    host_gaps: int = 0
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
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("graphs", "decisions")}
        for name in ("predicted_ms", "measured_ms", "step_segments"):
            del out[name]
        out["exits_per_layer"] = {str(k): v for k, v in sorted(self.exits_per_layer.items())}
        out |= {"tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}
        out["prediction_error"] = self.prediction_error()
        if self.graphs is not None:
            out["graphs"] = self.graphs
        if self.decisions is not None:
            out["decisions"] = list(self.decisions)
        return out


class SlotEngine:
    """What `DrexEngine` and `SpecEngine` share: requests in the slots of a `RowKVCache` (`store`),
    kept in `requests` (a `state.Requests`), the finished ones, and stepping in which a cancel from
    a callback waits for the step's end. A subclass defines `_step()` (one step; False when there was
    nothing to do) and `_end(request, reason)` (the request is over)."""

    store: RowKVCache
    requests: Requests
    finished: dict[int, Any]
    keep_finished: bool
    _stepping: bool
    _cancels: list[int]

    @property
    def has_free_slot(self) -> bool:
        return self.store.free_slots > 0

    @property
    def active(self) -> int:
        return len(self.requests)

    @property
    def prefill_queue(self) -> list[Request]:
        return self.requests.queued

    def step(self) -> bool:
        """Run one step (a prefill, or the engine's next decision); False when there was nothing to
        do. A `cancel()` from a token callback during the step takes effect when the step ends. It
        runs under `torch.inference_mode` (entered here unless the caller, e.g. `run()`, has)."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.step()
        self._stepping = True
        try:
            with use_products(self.runner.products):  # the CPU's measured product kernels (`drex_hf.products`)
                return self._step()
        finally:
            self._stepping = False
            if self._cancels:
                cancels, self._cancels = self._cancels, []
                for request_id in cancels:
                    self.cancel(request_id)

    def _step(self) -> bool:
        raise NotImplementedError

    def _end(self, request: Request, reason: str) -> None:
        raise NotImplementedError

    @torch.inference_mode()
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
        request = self.requests.find(request_id)
        if request is None:
            return False
        if self._stepping:
            if request_id not in self._cancels:
                self._cancels.append(request_id)
            return True
        self._end(request, "cancelled")
        return True

    def release(self) -> None:
        """Drop the captured graphs (their memory pool goes once nothing else holds it)."""
        self.runner.graphs.release()

    def _check_sampling(self, sampling: RequestSampling | None) -> RequestSampling | None:
        """A request's `sampling=`, checked; the engine's settings as a request's when it brings none
        (an engine with `per_request_sampling`), else None."""
        if sampling is not None and not self.per_request_sampling:
            raise GenerationInputError("sampling= per request needs an engine built with per_request_sampling=True")
        if sampling is not None and not isinstance(sampling, RequestSampling):
            raise GenerationTypeError(f"sampling must be a RequestSampling, got {type(sampling).__name__}")
        return self._default_sampling if self.per_request_sampling and sampling is None else sampling

    def _picked_logprob(self, request: Request, index: int) -> TokenLogprob:
        """The `TokenLogprob` the picker kept for the request's token at sequence `index` (on a GPU,
        one small read per token of a request that asked for logprobs)."""
        row = self.runner.picker.logprobs[request.slot, index].tolist()
        return TokenLogprob.from_row(row, request.logprobs)

    @staticmethod
    def _tell(request: Request, token: int, layer: int, entry: TokenLogprob | None) -> None:
        """An emitted token to its request: its logprob kept (a request that asked) and its callback,
        which gets the `TokenLogprob` as a fourth argument when there is one."""
        out = request.output
        if entry is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append(entry)
        if request.callback is None:
            return
        if entry is not None:
            request.callback(out.request_id, token, layer, entry)
        else:
            request.callback(out.request_id, token, layer)

    def _finished(self, request: Request, reason: str) -> bool:
        """The request's bookkeeping when it ends (False if it had already)."""
        if not self.requests.finish(request, reason):
            return False
        if self.keep_finished:
            self.finished[request.output.request_id] = request.output
        if request.on_finish is not None:
            request.on_finish(request.output)
        return True


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
        model: an early-exit model (`EarlyExitModelForCausalLM`).
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
        defer_projection: with a confidence that needs no logits (`classifier`, `saturation`), exited
            rows' head features wait in their slots and are projected to the vocabulary together when
            their next tokens start (same tokens, fewer lm_head calls); off, every exit's tokens are
            projected in a step of their own right after it.
        graphs: capture the programs as CUDA graphs (default: on for CUDA), or a recorder object
            (`recorder.ReplayRecorder`: CUDA-graph semantics on the CPU, for tests).
        lazy_capture: capture each program the first time a step needs it, instead of every
            program at start-up (only the buckets steps use; the first steps pay the capture).
        static_shapes: programs whose shapes depend on their row bucket and the store's capacity only
            (default: on for CUDA and with graphs; on the CPU off: eager programs look at their rows).
        buckets: the row counts programs run at (default: `plan.row_buckets`).
        record_decisions / record_checks: keep every step's decision in `stats.decisions`, every
            token's exit checks (layer, confidence) in `RequestOutput.checks`.
        progress: the graph capture's progress bar (default: shown on a terminal).
        tokenizer: the tokenizer `settings.stop_strings` are matched with (HF's `StopStringCriteria`).
        per_request_sampling: each request brings its own `RequestSampling` (temperature 0 greedy).
        keep_finished: keep finished requests in `finished` (a server takes them from `on_finish`).
        stats_window: keep only the last this many steps' per-step statistics (None: all).

    HF's logits processors in `settings` run before every token pick, each row seeing only its own
    prompt and tokens (graphs off: they read a per-slot history); the exit confidence stays the
    head's own. A stop string ends its row after the token that completes it, checked on the host.
    """

    def __init__(self, model: EarlyExitModel, *, max_batch: int, max_len: int, policy: str | Policy = "drex",
                 settings: DecodeSettings | None = None, thresholds: Sequence[float] | None = None,
                 exit_source: str = "heads", exit_distribution: ExitDistribution | None = None,
                 cost_model: CostModel | str | None = None, sla_tpot_ms: float | None = None, quorum: float = 0.5,
                 defer_projection: bool = True, graphs: Any = None, lazy_capture: bool = False,
                 static_shapes: bool | None = None, buckets: Sequence[int] | None = None,
                 record_decisions: bool = False, record_checks: bool = False, progress: bool | None = None,
                 tokenizer: Any = None, per_request_sampling: bool = False, keep_finished: bool = True,
                 stats_window: int | None = None, logprobs: int | None = None,
                 sla_per_request: bool = False) -> None:  # fmt: skip
        settings = settings or DecodeSettings(max_new_tokens=32)
        check_engine_arguments(model, max_batch, max_len, exit_source, sla_tpot_ms, cost_model, policy, stats_window)
        self.model, self.arch, self.settings = model, model.arch, settings
        check_special_tokens(settings, self.arch.vocab_size)
        self.eos, self.stop = set(settings.eos_token_ids), stop_criterion(settings, tokenizer)
        self.exit_source, self.distribution = exit_source, _distribution(exit_distribution, exit_source, model)
        self.thresholds = list(thresholds) if thresholds is not None else model.exit_config.threshold_list()
        if len(self.thresholds) != model.exit_config.num_exits:
            raise GenerationInputError(
                f"{len(self.thresholds)} thresholds for {model.exit_config.num_exits} exit points"
            )
        self.num_layers = self.arch.num_layers
        self.policy_name = policy if isinstance(policy, str) else policy.name
        self.threshold_at = dict(zip(model.exit_layers, self.thresholds))
        self.per_request_sampling, self.keep_finished = per_request_sampling, keep_finished
        self.defer_projection, self.record_checks, self.stats_window = defer_projection, record_checks, stats_window
        self.sla_tpot_ms, self.sla_per_request = sla_tpot_ms, sla_per_request
        self.logprobs = check_logprobs_capacity(logprobs)
        if sla_per_request and self.policy_name != "drex":
            raise GenerationInputError(f"sla_per_request applies to policy 'drex', not {self.policy_name!r}")
        self._forcing = (policy.exit_rule if isinstance(policy, Policy) else policy) in ("majority", "batch_majority")
        graphs, static = _graph_mode(settings, graphs, static_shapes, torch.device(model.heads_device))
        limit = self.arch.position_limit
        self.store = RowKVCache.for_model(model, max_batch, min(max_len, limit) if limit is not None else max_len)
        self.buckets = _buckets(buckets, max_batch, static)
        self._build_runner(policy, static, graphs, lazy_capture, quorum)
        self.segments, self.num_segments = self.runner.segments, len(self.runner.segments)
        self.graph_report = None
        if graphs is not None and not lazy_capture:
            self.capture_graphs(progress)
        elif graphs is not None:  # captured as steps need them: the report grows as they are
            self.graph_report = self.runner.graphs.report
        self._build_policy(policy, cost_model, sla_tpot_ms, quorum)
        self.requests = Requests(self.store.allocate, self.store.release)
        self.finished: dict[int, RequestOutput] = {}
        self._stepping, self._cancels, self._kills = False, [], []
        self.book = Book([0] * self.num_segments, joined=[-1] * self.num_segments,
                         token_started=[-1] * self.num_segments)  # fmt: skip
        self.step_count, self._last_read = 0, None
        self._flight: tuple[float, Decision | None, Any] | None = None  # the step in flight: launched, decision, plan
        self._started: dict[int, float] = {}  # step -> when it was launched (the SLA's clock)
        self._default_sampling = RequestSampling.from_settings(settings)
        self.stats = self._new_stats(record_decisions)
        self._step_start, self._read_at = time.perf_counter(), None
        self._overheads = self.cost is not None and bool(self.cost.fill_ms or self.cost.project_ms)
        self._overheads_memo: dict[tuple, float] = {}
        self._scheduler_view = SchedulerView(
            [0] * self.num_segments,
            [0] * self.num_segments,
            buckets=self.buckets if len(self.buckets) < self.buckets[-1] else None,
        )

    # ------------------------------------------------------------------ set-up
    def _build_runner(self, policy: str | Policy, static: bool, graphs: Any, lazy: bool, quorum: float) -> None:
        settings = self.settings
        boundaries = segment_boundaries(self.model.exit_layers, self.thresholds, self.policy_name, self.exit_source)
        rule = (
            policy.exit_rule if isinstance(policy, Policy) else _make_policy(policy, 1, None, quorum=quorum).exit_rule
        )
        processors = RowProcessors(settings, self.arch.vocab_size, self.model.heads_device) if (
            settings.has_logits_processors) else None  # fmt: skip
        options = Options(
            boundaries=boundaries, thresholds=[self.threshold_at[b] for b in boundaries], buckets=self.buckets,
            static=static, rule=rule, quorum=quorum, trace=self.exit_source == "trace",
            distribution=self.distribution.probabilities if self.distribution is not None else None,
            do_sample=settings.do_sample, warpers=tuple(settings.warpers()), per_request=self.per_request_sampling,
            processors=processors, eos=tuple(settings.eos_token_ids),
            track_token_age=self.sla_tpot_ms is not None or self.sla_per_request, fills=bool(boundaries),
            logprobs=self.logprobs,
        )  # fmt: skip
        self.runner = Runner(self.model, self.store, options, graphs=graphs, lazy=lazy)
        self.fill_choice = self.runner.choose_fill()  # the faster KV fill per bucket, where Triton runs

    def _build_policy(self, policy: str | Policy, given: Any, sla_tpot_ms: float | None, quorum: float) -> None:
        if isinstance(policy, Policy):
            if policy.num_segments != self.num_segments:
                raise GenerationInputError(
                    f"the policy was built for {policy.num_segments} segments; this engine has {self.num_segments}"
                )
            self.cost, self.policy = policy.cost, policy
            return
        self.cost = self._cost_model(given, policy)
        self.policy = _make_policy(policy, self.num_segments, self.cost, sla_tpot_ms=sla_tpot_ms, quorum=quorum)

    def _new_stats(self, record_decisions: bool) -> EngineStats:
        stats = EngineStats(self.policy_name, self.cost.source if self.cost else "none")
        stats.graphs = self.graph_report
        stats.decisions = [] if record_decisions else None
        stats.kv_cache_bytes = self.store.nbytes()
        stats.bound(self.stats_window)
        return stats

    def capture_graphs(self, progress: bool | None = None) -> dict[str, float | int]:
        """Capture every program now (warm-up first, largest bucket first), with a progress bar;
        returns the number of graphs, the seconds warm-up and capture took and the pool's bytes."""
        if self.settings.has_logits_processors:
            raise GenerationInputError(NO_GRAPHS_WITH_PROCESSORS)
        if not self.runner.graphs.captures:
            raise GenerationInputError("this engine runs its programs eagerly (graphs=False): nothing to capture")
        self.graph_report = self.runner.capture(progress)
        if hasattr(self, "stats"):
            self.stats.graphs = self.graph_report
        return self.graph_report

    @torch.no_grad()
    def _cost_model(self, given: CostModel | str | None, policy: str) -> CostModel | None:
        if isinstance(given, CostModel):
            if len(given.a_ms) != self.num_segments:
                raise GenerationInputError(
                    f"the cost model has constants for {len(given.a_ms)} segments; this engine runs "
                    f"{self.num_segments} ({self.describe()['segments']})"
                )
            return given
        if given is not None:
            return CostModel.from_file(given, device_name(self.model.heads_device), self.describe()["segments"])
        if policy != "drex":
            return None
        from drex_hf.generation.profile import measure_cost_model

        return measure_cost_model(self.runner)

    def describe(self) -> dict[str, Any]:
        return {"segments": [[seg.start, seg.stop - 1] for seg in self.segments], "kv_fill": "project"}

    @property
    def boundaries(self) -> list[int]:
        return self.runner.boundaries

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: torch.Tensor | Sequence[int], *, max_new_tokens: int | None = None,
                    seed: int | None = None, trace: Sequence[int] | None = None,
                    callback: TokenCallback | None = None, on_finish: FinishCallback | None = None,
                    sampling: RequestSampling | None = None, logprobs: int | None = None,
                    sla_tpot_ms: float | None = None) -> int:  # fmt: skip
        """Queue a prompt (1-D token ids) for decoding; returns its request id. Errors, before any work:
        an empty prompt, ids outside the vocabulary, a prompt + max_new_tokens longer than a slot,
        or no free slot (`EngineFullError`). `callback(request id, token, exit layer)` runs for each
        token, `on_finish(output)` once when the request ends; `sampling`: its own sampling parameters
        (an engine built with `per_request_sampling`; default the settings'). `logprobs`: keep each
        token's `TokenLogprob` with this many top tokens (in `output.logprobs`, and as the callback's
        fourth argument; an engine built with `logprobs` at least this). `sla_tpot_ms`: its own time
        per output token target, which the scheduler keeps with every other running request's (an
        engine built with `sla_per_request`)."""
        sampling = self._check_sampling(sampling)
        logprobs = check_request_logprobs(logprobs, self.logprobs)
        if sla_tpot_ms is not None:
            if not self.sla_per_request:
                raise GenerationInputError("sla_tpot_ms per request needs an engine built with sla_per_request=True")
            if isinstance(sla_tpot_ms, bool) or not isinstance(sla_tpot_ms, (int, float)) or not sla_tpot_ms > 0:
                raise GenerationInputError(f"sla_tpot_ms must be a positive number, got {sla_tpot_ms!r}")
        seed = None if seed is None else check_seed(seed)
        default = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids, max_new = check_request(prompt, default, self.arch, self.store.max_len)
        if trace is not None:
            if self.exit_source != "trace":
                raise GenerationInputError("a per-request trace needs an engine built with exit_source='trace'")
            check_trace_row(trace, self.model.exit_layers, self.num_layers, "the trace")
        elif self.exit_source == "trace" and self.distribution is None:
            raise GenerationInputError("exit_source='trace' needs a trace per request or an exit_distribution")
        samples = self.settings.do_sample if sampling is None else not sampling.greedy

        def make(rid: int, slot: int, epoch: int) -> Request:
            drawn = seed if seed is not None else (int(torch.randint(0, 2**62, (1,))) if samples else 0)
            trace_seed = (self.distribution.seed if self.distribution else 0) + (rid if seed is None else int(seed))
            return Request(RequestOutput(rid, int(ids.numel())), ids, max_new, as_seed(drawn), slot, epoch,
                           callback, on_finish, sampling, None if trace is None else tuple(int(v) for v in trace),
                           as_seed(trace_seed), ids.tolist() if self.stop is not None else None,
                           logprobs=logprobs, sla_tpot_ms=sla_tpot_ms)  # fmt: skip

        return self.requests.admit(make).output.request_id

    # ------------------------------------------------------------------ a step
    def _step(self) -> bool:
        start = self._step_start = time.perf_counter()
        verdict = self.runner.read() if self.runner.in_flight else None
        self._read_at = time.perf_counter() if verdict is not None else None
        flight = self._flight
        if verdict is not None:
            if flight[2] is None:  # waiting for a prefill is prefill time
                self.stats.prefill_s += self._read_at - start
            self._mirror(verdict)
        launched = self._launch_next()
        if verdict is not None:
            self._apply(verdict, flight)
        self.stats.wall_s += time.perf_counter() - start
        return launched or verdict is not None

    def _launch_next(self) -> bool:
        """Pick, plan and launch the next step (the queued prompts' prefill first); False when there
        is nothing to run."""
        self.step_count += 1
        step, kills = self.step_count, (tuple(self._kills) if self._kills else ())
        if self.requests.queued:
            self._kills = []
            batch = self.requests.take_queued()
            self._gap()
            start = time.perf_counter()
            self.runner.prefill(step, batch, kills)
            self.stats.prefill_s += time.perf_counter() - start  # (on the CPU the whole pass runs here)
            self._launched(step, None, None)
            return True
        decision = self._decide()
        if decision is None and not self.book.projections:
            self.step_count -= 1
            return False
        self._kills = []
        rows = None if decision is None else (decision.segment, decision.rows)
        plan = build_plan(step, rows, self.book, self.buckets, first_projects=self.defer_projection,
                          last=self.num_segments - 1, kills=kills)  # fmt: skip
        self._gap()
        self.runner.launch(plan)
        self._launched(step, decision, plan)
        return True

    def _gap(self) -> None:
        """Count the host time between the last verdict's read and this launch: what the device waits on."""
        if self._read_at is not None:
            self.stats.host_gaps += 1
            self.stats.host_gap_s += time.perf_counter() - self._read_at

    def _launched(self, step: int, decision: Decision | None, plan: Any) -> None:
        now = time.perf_counter()
        self._flight = (now, decision, plan)
        if self.sla_tpot_ms is not None or self.sla_per_request:
            self._started[step] = now
            oldest = min((t for t in self.book.token_started if t >= 0), default=step)
            for old in [t for t in self._started if t < oldest]:
                del self._started[old]

    def _decide(self) -> Decision | None:
        """The policy's decision on the waiting buffers (None: none waits, or only projections are
        due: `defer_projection` off)."""
        if not self.defer_projection and self.book.projections:
            return None
        if not any(self.book.counts):
            return None
        decision = self.policy.pick(self._view())
        self._check_decision(decision)
        return decision

    def _view(self) -> SchedulerView:
        """The scheduler's view of the book (one object, refreshed each step)."""
        book, step, view = self.book, self.step_count, self._scheduler_view
        view.counts = book.counts
        view.waited = [step - j if j >= 0 else 0 for j in book.joined]
        if self.sla_per_request:  # the tightest target of the engine's and every running request's
            targets = [r.sla_tpot_ms for r in self.requests.by_slot.values() if r.sla_tpot_ms is not None]
            target = min([*targets, *([self.sla_tpot_ms] if self.sla_tpot_ms is not None else [])], default=None)
            self.policy.sla_tpot_ms = target
        if self.sla_tpot_ms is not None or self.sla_per_request:
            now = time.perf_counter()
            view.token_age_ms = [(now - self._started[t]) * 1e3 if t in self._started else 0.0
                                 for t in book.token_started]  # fmt: skip
        if self.cost is not None and self.cost.context_ms:
            view.context = self._context()
        return view

    def _context(self) -> int:
        """Cached positions of the longest running request (a bound: the host's tokens so far + 2)."""
        return max(
            (r.output.prompt_length + len(r.output.tokens) + 2 for r in self.requests.by_slot.values()), default=1
        )

    def _check_decision(self, d: Decision) -> None:
        """Refuse an illegal decision (a bug in a policy) before it reaches the device."""
        count = self.book.counts[d.segment] if 0 <= d.segment < self.num_segments else 0
        if not count or not 1 <= d.rows <= count or (d.rows < count and d.rows not in self.buckets):
            raise RuntimeError(
                f"policy {self.policy_name} chose {d.rows} rows of segment {d.segment}, where {count} wait "
                f"(a count below the buffer's must be a row bucket: {self.buckets})"
            )

    def _mirror(self, verdict: Any) -> None:
        """The book after the verdict's step: what the next decision sees."""
        counts, book, segments = verdict.counts, self.book, self.num_segments
        book.counts = counts[:segments]
        book.projections, book.fills = counts[segments], counts[segments + 1]
        book.fill_from, book.joined, book.token_started = verdict.fill_from, verdict.joined, verdict.token_started

    # ------------------------------------------------------------------ apply a verdict
    def _apply(self, verdict: Any, flight: tuple) -> None:
        """Emit the verdict's tokens (their requests' callbacks, ends and stop strings) and count."""
        launched, decision, plan = flight
        block, (run, projected) = verdict.block, verdict.emitted
        if plan is None:  # a prefill: each request's first token
            self._emit_rows(block[:run], decoded=False)
            self.stats.prefill_steps += 1
            self._last_read = time.perf_counter()
            return
        if projected:  # the deferred tokens first: the segment's checks belong to the rows' next tokens
            self._emit_rows(block[verdict.bucket : verdict.bucket + projected], decoded=True)
        if self.record_checks and verdict.segment is not None and verdict.segment < self.num_segments - 1:
            self._record_checks(verdict)
        if self._forcing:
            self._count_involuntary(block[: verdict.bucket])
        if run:
            self._emit_rows(block[:run], decoded=True)
        self._account(verdict, decision, plan, launched)

    def _emit_rows(self, block: np.ndarray, decoded: bool) -> None:
        """Emitted verdict rows' tokens to their requests (a row of a request that has ended is dropped:
        `wasted_rows`), and their statistics."""
        stats, total, by_slot = self.stats, self.runner.state.total, self.requests.by_slot
        clock = stats.wall_s + time.perf_counter() - self._step_start
        slow = self.record_checks or self.stop is not None
        counts: dict[int, int] = {}
        emitted = depth = 0
        for ticket, token, layer, flag in block[:, :4].astype(np.int64).tolist():
            request = by_slot.get(ticket % total)
            if request is None or request.epoch != ticket // total:
                stats.wasted_rows += 1
                continue
            out = request.output
            out.tokens.append(token)
            out.exit_layers.append(layer)
            out.token_times.append(clock)
            counts[layer] = counts.get(layer, 0) + 1
            emitted += 1
            depth += layer
            if flag & (MISSED | FINISHED) or slow or request.callback is not None or request.logprobs is not None:
                if flag & MISSED:
                    stats.missed_exits += decoded
                self._emit_rest(request, token, layer, flag)
        stats.tokens += emitted
        for layer, count in counts.items():
            stats.exits_per_layer[layer] = stats.exits_per_layer.get(layer, 0) + count
        if decoded:
            stats.decoded_tokens += emitted
            stats.min_layer_rows += depth + emitted

    def _emit_rest(self, request: Request, token: int, layer: int, flag: int) -> None:
        """What an emitted token does besides being appended: a missed exit counted, its checks kept,
        the request's callback, its end (by the device's verdict, or a stop string on the host)."""
        out = request.output
        if flag & MISSED:
            out.missed += 1
        if self.record_checks:
            out.checks.append(request.checks or [])
            request.checks = None
        entry = None
        if request.logprobs is not None:
            entry = self._picked_logprob(request, out.prompt_length + len(out.tokens) - 1)
        self._tell(request, token, layer, entry)
        if flag & FINISHED:
            self._finished(request, "stop" if flag & EOS else "length")
        elif self.stop is not None and stops(self.stop, request.prompt_tokens + out.tokens):
            self._end(request, "stop")

    def _count_involuntary(self, block: np.ndarray) -> None:
        forced = np.flatnonzero(block[:, 3].astype(np.int64) & INVOLUNTARY)
        total = self.runner.state.total
        for ticket in block[forced, 0].astype(np.int64).tolist():
            request = self.requests.owner(ticket % total, ticket // total)
            if request is not None:
                request.output.involuntary += 1
                self.stats.involuntary_exits += 1

    def _record_checks(self, verdict: Any) -> None:
        block, layer, total = verdict.block, self.boundaries[verdict.segment], self.runner.state.total
        for ticket, flag, confidence in block[: verdict.bucket][:, [0, 3, 4]].tolist():
            request = self.requests.owner(int(ticket) % total, int(ticket) // total)
            if int(flag) & VALID and request is not None:
                request.checks = [*(request.checks or []), (layer, float(np.float32(confidence)))]

    def _end(self, request: Request, reason: str) -> None:
        """The host ends a running request (a stop string, a cancel): the device drops its row at the
        next launch; its slot is free now (its tickets' epoch tells a later occupant's apart)."""
        if request.phase is Phase.RUNNING:
            self._kills.append(request.slot)
        self._finished(request, reason)

    # ------------------------------------------------------------------ statistics
    def _account(self, verdict: Any, decision: Decision | None, plan: Any, launched: float) -> None:
        now = time.perf_counter()
        last = self._last_read
        measured = (now - (launched if last is None or last < launched else last)) * 1e3
        self._last_read = now
        stats = self.stats
        stats.steps += 1
        s = verdict.segment
        if s is not None:
            depth = len(self.segments[s])
            stats.layer_rows += depth * verdict.ran
            stats.padded_layer_rows += depth * (plan.bucket - verdict.ran)
        predicted = None
        if decision is not None and decision.predicted_ms is not None:
            predicted = decision.predicted_ms + (self._overhead_ms(plan) if self._overheads else 0.0)
        elif decision is None and self.cost is not None:  # a step of deferred projections only
            predicted = self._overhead_ms(plan)
        stats.predicted_ms.append(predicted)
        stats.measured_ms.append(measured)
        stats.step_segments.append(-1 if s is None else s)
        if stats.decisions is not None:
            stats.decisions.append({
                "step": verdict.step, "segment": s, "rows": verdict.ran, "bucket": plan.bucket, "fills": plan.fill,
                "projections": plan.project, "waiting": list(self.book.counts), "predicted_ms": predicted,
                "measured_ms": measured, "reason": decision.reason if decision is not None else "deferred projections",
            })  # fmt: skip

    def _overhead_ms(self, plan: Any) -> float:
        """Predicted work of a step besides its segment: KV fill and deferred projections (worked out
        once per kind of step: the cost model does not change)."""
        if self.cost is None:
            return 0.0
        key = (plan.segment, plan.bucket, plan.fill, plan.fill_from, plan.project)
        ms = self._overheads_memo.get(key)
        if ms is None:
            fill_from = plan.fill_from - 1
            first = self.boundaries.index(fill_from) if plan.fill and fill_from in self.boundaries else None
            own = plan.bucket if plan.segment == self.num_segments - 1 else 0  # the last segment's table has them
            if len(self._overheads_memo) > 4096:
                self._overheads_memo.clear()
            ms = self._overheads_memo[key] = self.cost.overhead_ms(first, plan.fill, max(plan.project - own, 0))
        return ms

    def reset_stats(self) -> None:
        """Start counting afresh (and forget finished requests; request ids start from 0 again, so a
        trace's per-request draws are those of a new engine), keeping the store, the captured graphs
        and the cost model: benchmarks and `generate()` reuse one engine for many runs."""
        if len(self.requests):
            raise RuntimeError("reset_stats() while requests are running")
        while self.step():  # a step still in flight (stale tickets only): finish it first
            pass
        self.stats = self._new_stats(self.stats.decisions is not None)
        self.finished = {}
        self.requests.next_id = 0
        self._last_read = None


MAX_LOGPROBS = 20  # the most top tokens an engine keeps per token (OpenAI's chat top_logprobs limit)


def check_logprobs_capacity(logprobs: Any) -> int | None:
    """An engine's `logprobs`: None, or how many top tokens it keeps per token (0..MAX_LOGPROBS)."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
        raise GenerationInputError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
    return logprobs


def check_request_logprobs(logprobs: Any, capacity: int | None) -> int | None:
    """A request's `logprobs` against its engine's capacity (`check_logprobs_capacity`)."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        raise GenerationInputError(f"logprobs must be None or an integer >= 0, got {logprobs!r}")
    if capacity is None:
        raise GenerationInputError("logprobs per request needs an engine built with logprobs=K (K >= the request's)")
    if logprobs > capacity:
        raise GenerationInputError(f"logprobs {logprobs} is more than this engine keeps ({capacity})")
    return logprobs


def check_engine_arguments(
    model: EarlyExitModel, max_batch: Any, max_len: Any, exit_source: str, sla_tpot_ms: Any, cost_model: Any,
    policy: Any, stats_window: Any,
) -> None:  # fmt: skip
    """Refuse an engine's bad arguments before anything is allocated, naming them."""
    model.arch.check_attention_implementation()
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise GenerationInputError(f"max_batch must be a positive integer, got {max_batch!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
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
    if stats_window is not None and (isinstance(stats_window, bool) or not isinstance(stats_window, int)
                                     or stats_window < 1):  # fmt: skip
        raise GenerationInputError(f"stats_window must be a positive integer or None, got {stats_window!r}")


def _distribution(given: ExitDistribution | None, exit_source: str, model: EarlyExitModel) -> Any:
    if given is not None:
        if exit_source != "trace":
            raise GenerationInputError("exit_distribution applies to exit_source='trace'")
        given.check(model.exit_config.num_exits)
    return given


def _graph_mode(settings: DecodeSettings, graphs: Any, static: bool | None, device: torch.device) -> tuple[Any, bool]:
    """(graphs: None | True | a recorder, static shapes) from the engine's arguments."""
    if settings.has_logits_processors:
        if graphs:
            raise GenerationInputError(NO_GRAPHS_WITH_PROCESSORS)
        graphs = False
    if graphs is None:
        graphs = device.type == "cuda"
    if graphs is True and device.type != "cuda":
        raise GenerationInputError(f"graphs=True captures CUDA graphs: the model is on {device}, not a CUDA device")
    recorder = graphs if graphs not in (True, False) else None
    static = (bool(graphs) or device.type == "cuda") if static is None else static
    if graphs and not static:
        raise GenerationInputError("graphs need static_shapes (a graph replays fixed shapes)")
    return (True if graphs is True else recorder), static


def _buckets(given: Sequence[int] | None, max_batch: int, static: bool) -> list[int]:
    if given is None:
        return row_buckets(max_batch, static)
    buckets = sorted({int(b) for b in given})
    if not buckets or buckets[0] < 1 or buckets[-1] < max_batch:
        raise GenerationInputError(
            f"buckets must be positive row counts, the largest at least max_batch={max_batch}; got {list(given)}"
        )
    return buckets


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


__all__ = ["DrexEngine", "EngineStats", "RequestOutput", "SlotEngine", "step_in_turn"]
