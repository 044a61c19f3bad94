"""The runner: slot tensors, staging, `launch(plan)` and `read() -> Verdict`, and the prefill.

It owns the device side of an engine: the `RowState` beside the `RowKVCache`, the `Programs` over
them, a `GraphRunner` that runs each program by key (a captured graph where there is one), and the
host staging buffers — a small pinned plan buffer (the step number and the slots to kill: the step's
one upload) and two pinned verdict buffers, used in turn, so the host can read one step's verdict
while the next step's copy is in flight (the step's one read). A step's programs, by key:

    ("project", p)        the p deferred tokens waiting: onto the vocabulary, picked
    ("fill", f, first)    KV fill of the f exited rows waiting, layers first.. in one product
    ("segment", s, b)     up to b rows of segment s's queue: layers, exit check, routing
    ("report",)           every queue's count (and oldest waits) into the verdict header

The prefill is eager (its shapes are the prompts'). `probe` runs pieces on chosen rows, for timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drex_hf.arch import build_attention_mask
from drex_hf.generation.graphs import CudaRecorder, GraphRunner
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import EMITTED, ROW_FIELDS, StepPlan, Verdict, bucket_of
from drex_hf.generation.programs import Programs, Rows, RowState
from drex_hf.generation.sampling import SAMPLING_FIELDS, penalise_rows, pick_rows, pick_tokens
from drex_hf.products import install_products

FIELDS = len(ROW_FIELDS)


@dataclass
class Options:
    """How an engine's programs decide: `boundaries` (exit layers where segments end), their
    `thresholds`, the exit `rule` (own | all | majority | none) and `quorum`; `trace`: exits from a
    trace (`distribution`: probabilities per exit point then full depth, or None: replayed only);
    `static`: shapes and reads depend on the bucket and the store's capacity only (graphs);
    sampling: `do_sample`/`warpers`, or `per_request` parameters per slot (with OpenAI's presence and
    frequency penalties); `processors`: HF's logits processors (`processors.RowProcessors`); `eos`;
    `track_token_age` (the SLA's clock); `logprobs`: keep each picked token's log-probability and the
    top this many (None: none are kept; see `Picker`)."""

    boundaries: list[int]
    thresholds: list[float]
    buckets: list[int]
    static: bool
    rule: str = "own"
    quorum: float = 0.5
    trace: bool = False
    distribution: tuple[float, ...] | None = None
    do_sample: bool = False
    warpers: tuple[Any, ...] = ()
    per_request: bool = False
    processors: Any = None
    eos: tuple[int, ...] = ()
    track_token_age: bool = False
    fills: bool = True
    logprobs: int | None = None


def _bucket_of_key(key: tuple) -> int:
    """The row bucket of a program key (graphs are captured largest first)."""
    return key[2] if key[0] == "segment" else (key[1] if len(key) > 1 else 0)


class Picker:
    """Tokens from logits: HF's logits processors on each row's own history (when asked for), then
    greedy, the engine's sampling, or each slot's own parameters (penalties first, on the counts of
    the row's generated tokens); picked tokens enter the history.

    With `options.logprobs` (K), each pick also keeps, at `logprobs[slot, sequence index]`, the
    picked token's log-probability under the logits it was picked from — the exit head's for an
    exited token, full depth's otherwise — before processors, penalties and sampling warps (the
    model's own distribution, what OpenAI's and vLLM's logprobs report), then the top K
    log-probabilities and their token ids (`state.TokenLogprob.from_row` reads a row)."""

    def __init__(self, options: Options, slots: int, max_len: int, vocab: int, device: torch.device) -> None:
        self.options, self.vocab = options, vocab
        # an eager CPU engine reads the rows' parameters for free: warps and penalties no row asks for are skipped
        self.skip = not options.static and torch.device(device).type == "cpu"
        width = len(SAMPLING_FIELDS)
        self.row_sampling = torch.zeros(slots, width, device=device) if options.per_request else None
        self.history = self.prompt_lengths = None
        if options.processors is not None or options.per_request:  # each slot's prompt + tokens, by sequence index
            self.history = torch.zeros(slots, max_len + 1, dtype=torch.long, device=device)
            self.prompt_lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.logprobs = None
        if options.logprobs is not None:
            top = options.logprobs
            self.logprobs = torch.zeros(slots, max_len + 1, 1 + 2 * top, dtype=torch.float32, device=device)

    def __call__(
        self, logits: torch.Tensor, slots: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        scores = logits.float()
        if self.options.processors is not None:
            processors = self.options.processors
            window = processors.window(self.history, slots, lengths)
            scores = processors(scores, window, lengths - self.prompt_lengths.index_select(0, slots))
        if self.row_sampling is not None:
            params = self.row_sampling.index_select(0, slots)
            if not self.skip or bool(params[:, 3:5].any()):
                scores = penalise_rows(scores, params, self._generated_counts(slots, lengths))
            tokens = pick_rows(scores, params, seeds, draws, self.skip)
        else:
            tokens = pick_tokens(scores, self.options.do_sample, list(self.options.warpers), seeds, draws)
        if self.history is not None:
            self.history.index_put_((slots, lengths), tokens)
        if self.logprobs is not None:
            self.logprobs.index_put_((slots, lengths), logprob_rows(logits, tokens, self.options.logprobs))
        return tokens

    def _generated_counts(self, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`[n, vocab]` float32: how often each token occurs among each row's generated tokens (its
        history from its prompt's length up to `lengths`, exclusive)."""
        rows = self.history.index_select(0, slots)
        at = torch.arange(rows.shape[1], device=rows.device).unsqueeze(0)
        start = self.prompt_lengths.index_select(0, slots).unsqueeze(1)
        mine = (at >= start) & (at < lengths.unsqueeze(1))
        ids = torch.where(mine, rows, self.vocab)  # outside the vocabulary: the dropped column
        counts = torch.zeros(rows.shape[0], self.vocab + 1, dtype=torch.float32, device=rows.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
        return counts[:, : self.vocab]

    def tensors(self) -> list[torch.Tensor]:
        kept = (self.row_sampling, self.history, self.prompt_lengths, self.logprobs)
        return [t for t in kept if t is not None]


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """`[n, 1 + 2 top]` float32: the log-probability of `tokens` under `logits [n, vocab]` (a float32
    log-softmax), then the `top` largest log-probabilities and their token ids (exact in float32 for
    ids below 2**24)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.long().unsqueeze(1))
    if not top:
        return chosen
    best = torch.topk(logprobs, top, dim=-1)
    return torch.cat([chosen, best.values, best.indices.float()], dim=1)


class Runner:
    """The device side of an engine; see the module docstring. `graphs`: None (eager), True (CUDA
    graphs) or a recorder (`recorder.ReplayRecorder` on the CPU); `lazy`: capture each program the
    first time a step runs it instead of all of them up front (`capture`)."""

    def __init__(self, model: Any, store: RowKVCache, options: Options, graphs: Any = None, lazy: bool = False) -> None:
        self.model, self.arch, self.store, self.options = model, model.arch, store, options
        self.device = torch.device(model.heads_device)
        # the CPU's product kernels and row counts, measured on this model's weights (`drex_hf.products`)
        self.products = install_products(self.arch) if self.device.type == "cpu" else None
        self.num_layers = self.arch.num_layers
        self.buckets = list(options.buckets)
        self.rows = rows = self.buckets[-1]
        dtype = store.key_store.dtype
        self.state = st = RowState(store.slots, self.arch.hidden_size, self.num_layers,
                                   len(options.boundaries) + 1, dtype, self.device)  # fmt: skip
        if model.exit_config.confidence == "saturation":
            st.previous = torch.zeros_like(st.hidden)
        if options.trace:
            st.replay = torch.full((st.total, store.max_len + 1), -1, dtype=torch.long, device=self.device)
        self.picker = Picker(options, st.total, store.max_len, self.arch.vocab_size, self.device)
        self._fill_weights: tuple | None = None
        self.programs = Programs(
            model, store, st, options.boundaries, thresholds=options.thresholds, rule=options.rule,
            quorum=options.quorum, trace=options.trace, static=options.static, eos=options.eos, picker=self.picker,
            fill_weights=self.fill_weights if options.fills else None, track_token_age=options.track_token_age,
        )  # fmt: skip
        if options.distribution is not None:
            import itertools

            cumulative = list(itertools.accumulate(options.distribution))
            self.programs.cumulative = torch.tensor(cumulative, dtype=torch.float64, device=self.device)
            self.programs.points = torch.tensor([*model.exit_layers, self.num_layers - 1], device=self.device)
        self.segments = self.programs.segments
        self.boundaries = list(options.boundaries)
        self._staging(rows)
        recorder = CudaRecorder(self.device) if graphs is True else (graphs or None)
        self.graphs = GraphRunner(self._build, recorder, lazy=lazy)
        if recorder is not None and options.fills:
            self.fill_weights()  # a captured fill reads them: they exist before any recording
        self.transfers = {"uploads": 0, "reads": 0}
        self._extensions: dict[str, Any] = {}
        self._extension_tensors: list[Any] = []

    # ------------------------------------------------------------------ buffers
    def _staging(self, rows: int) -> None:
        st, pinned = self.state, self.device.type == "cuda"
        segments = len(self.options.boundaries) + 1
        self.plan = torch.zeros(2 + rows, dtype=torch.long, device=self.device)  # step | kills | kill slots
        self.host_plan = torch.zeros(self.plan.shape, dtype=torch.long, pin_memory=pinned)
        self._plan_np = self.host_plan.numpy()
        st.step = self.plan[0]
        q = st.queues
        self.layout = {"counts": (0, q), "fill_from": (q, q + 1), "joined": (q + 1, q + 1 + segments),
                       "token_started": (q + 1 + segments, q + 1 + 2 * segments),
                       "ran": (q + 1 + 2 * segments, q + 2 + 2 * segments),
                       "emitted": (q + 2 + 2 * segments, q + 4 + 2 * segments)}  # fmt: skip
        header = q + 4 + 2 * segments
        self.verdict = torch.zeros(header + 2 * rows * FIELDS, dtype=torch.float64, device=self.device)
        self.header = {name: self.verdict[a:b] for name, (a, b) in self.layout.items()}
        self.row_block = self.verdict[header:].view(2 * rows, FIELDS)
        self._header = header
        self.host_verdicts = [torch.zeros(self.verdict.shape, dtype=torch.float64, pin_memory=pinned) for _ in range(2)]
        self._verdict_np = [v.numpy() for v in self.host_verdicts]
        self._turn = 0
        self._done = self._uploaded = None
        if pinned:
            with torch.cuda.device(self.device):
                self._done = [torch.cuda.Event(), torch.cuda.Event()]
                self._uploaded = torch.cuda.Event()
        self._pending: tuple[int, int, int | None, int, int] | None = None

    @property
    def host_buffers(self) -> set[int]:
        """Storage addresses of the host staging buffers (the only tensors a step copies to or from)."""
        return {t.untyped_storage().data_ptr() for t in (self.host_plan, *self.host_verdicts)}

    def static_tensors(self) -> list[torch.Tensor]:
        """What captured programs may read and write besides intermediates: the row state, the store,
        the staging buffers on the device, the model's parameters and buffers, the tables."""
        out = [*self.state.tensors(), *self.picker.tensors(), self.plan, self.verdict]
        out += [self.store.key_store, self.store.value_store, *self.store.tensors()]
        out += [*self.model.parameters(), *self.model.buffers()]
        out += [t for t in vars(self.programs).values() if isinstance(t, torch.Tensor)]
        out += list(self.programs._ranges.values())
        for tensors in self._extension_tensors:
            out += list(tensors())
        if self._fill_weights is not None:
            out += [t for t in self._fill_weights if t is not None]
        return out

    def fill_weights(self) -> tuple | None:
        """The folded KV-fill weights, built at the first fill, in the model's dtype (layer by layer:
        no fp32 copy of every layer at once)."""
        if self._fill_weights is None:
            self._fill_weights = self.arch.kv_fill_weights() or (None,)
        return None if self._fill_weights == (None,) else self._fill_weights

    # ------------------------------------------------------------------ programs
    def _build(self, key: tuple) -> Any:
        kind, *args = key
        if kind == "segment":
            return lambda: self._segment(*args)
        if kind == "project":
            return lambda: self._project(*args)
        if kind == "fill":
            return lambda: self._fill(*args)
        if kind == "report":
            return self._report
        if kind in self._extensions:
            return lambda: self._extensions[kind](*args)
        raise ValueError(f"unknown program {key!r}")

    def extend(self, programs: dict[str, Any], tensors: Any) -> None:
        """More programs by kind (`programs[kind](*key[1:])`, e.g. self-speculation's draft and verify)
        and a function giving the tensors they keep (static for capture)."""
        self._extensions.update(programs)
        self._extension_tensors.append(tensors)

    def bucket(self, n: int) -> int:
        """The row bucket a step of n rows runs at."""
        return bucket_of(self.buckets, n)

    def program_keys(self) -> list[tuple]:
        """Every program a step can run (what up-front capture prepares)."""
        keys: list[tuple] = [("report",)]
        for bucket in self.buckets:
            keys += [("segment", s, bucket) for s in range(len(self.segments))]
            keys.append(("project", bucket))
            if self.boundaries and self.options.fills:
                keys += [("fill", bucket, exit_layer + 1) for exit_layer in self.boundaries]
        return keys

    def capture(self, progress: bool | None = None) -> dict[str, float | int]:
        """Capture every program up front, largest bucket first (the queues are empty: the programs
        take no rows, so warm-up and capture write only the scratch slot)."""
        self.programs.arange(self.state.capacity)
        for bucket in self.buckets:
            self.programs.arange(bucket)
        with torch.inference_mode():  # as the steps that replay them run
            return self.graphs.capture(self.program_keys(), _bucket_of_key, progress)

    def _segment(self, s: int, bucket: int) -> None:
        p, st = self.programs, self.state
        rows = p.take(s, bucket)
        if s == 0:
            p.start_tokens(rows)
        out = p.run_layers(s, rows, p.embed(rows) if s == 0 else None, self.store.max_len)
        if s < len(self.segments) - 1:
            p.scatter(st.hidden, rows.slots, out)
            confidence, tokens = p.check(s, rows, out)
            verdict = p.route_exit(s, rows, confidence, tokens)
        else:
            verdict = p.route_final(rows, out)
        self._write_rows(0, verdict, 0)
        self.header["ran"].copy_(rows.valid.sum())

    def _project(self, bucket: int) -> None:
        rows = self.programs.take(self.state.project_queue, bucket)
        self._write_rows(self.rows, self.programs.project(rows), 1)

    def _write_rows(self, offset: int, rows: torch.Tensor, section: int) -> None:
        """Verdict rows into their section, the emitted ones first (in order), and how many there are:
        the host reads only those, with no search."""
        emitted = (rows[:, 3].long() & EMITTED) != 0
        order = torch.argsort((~emitted).to(torch.int16), stable=True)
        self.row_block[offset : offset + rows.shape[0]].copy_(rows.index_select(0, order))
        self.header["emitted"][section].copy_(emitted.sum())

    def _fill(self, bucket: int, layers_from: int) -> None:
        self.programs.fill(self.programs.take(self.state.fill_queue, bucket), layers_from)

    def _report(self) -> None:
        """The verdict header: every queue's count, the shallowest first layer among the pending
        fills, and per segment queue the step its head entry joined and its oldest token started."""
        p, st, h = self.programs, self.state, self.header
        h["counts"].copy_(st.count)
        ring, cap, segments = p._ring, st.capacity, len(self.segments)
        fill = st.fill_queue
        tickets = st.queue[fill].index_select(0, (st.head[fill] + ring) % cap)
        slots = tickets % st.total
        valid = (ring < st.count[fill]) & (st.epoch.index_select(0, slots) == tickets // st.total)
        valid = valid & st.alive.index_select(0, slots)
        first = torch.where(valid, st.fill_from.index_select(0, slots) + 1, self.num_layers)
        h["fill_from"].copy_(first.min())
        waiting = st.count[:segments] > 0
        heads = st.queue[:segments].gather(1, st.head[:segments].unsqueeze(1)).squeeze(1) % st.total
        h["joined"].copy_(torch.where(waiting, st.join_step.index_select(0, heads), -1))
        if self.options.track_token_age:
            at = (st.head[:segments].unsqueeze(1) + ring) % cap
            tickets = st.queue[:segments].gather(1, at)
            slots = tickets % st.total
            valid = (
                (ring < st.count[:segments].unsqueeze(1)) & (st.epoch[slots] == tickets // st.total) & st.alive[slots]
            )
            oldest = torch.where(valid, st.token_step[slots], torch.iinfo(torch.long).max).amin(1)
            h["token_started"].copy_(torch.where(waiting, oldest, -1))

    # ------------------------------------------------------------------ a step
    def launch(self, plan: StepPlan) -> None:
        """Upload the plan (step number, kills), run its programs, and start the verdict's copy back."""
        self._upload(plan.step, plan.kills)
        if plan.kills:
            self.programs.kill(self.plan[2 : 2 + len(plan.kills)])
        if plan.project and plan.project_first:
            self.graphs.run(("project", plan.project))
        if plan.fill:
            self.graphs.run(("fill", plan.fill, plan.fill_from))
        if plan.segment is not None:
            self.graphs.run(("segment", plan.segment, plan.bucket))
        if plan.project and not plan.project_first:
            self.graphs.run(("project", plan.project))
        self.graphs.run(("report",))
        self._download(plan.step, plan.segment, plan.bucket, plan.project)

    def _upload(self, step: int, kills: tuple[int, ...] = ()) -> None:
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the pinned buffer's last copy is done before it is rewritten
        k = len(kills)
        self._plan_np[0], self._plan_np[1] = step, k
        if k:
            self._plan_np[2 : 2 + k] = kills
        self.plan[: 2 + k].copy_(self.host_plan[: 2 + k], non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record(torch.cuda.current_stream(self.device))
        self.transfers["uploads"] += 1

    def _download(self, step: int, segment: int | None, bucket: int, project: int) -> None:
        self._turn ^= 1
        self.host_verdicts[self._turn].copy_(self.verdict, non_blocking=self._done is not None)
        if self._done is not None:
            self._done[self._turn].record(torch.cuda.current_stream(self.device))
        self._pending = (step, self._turn, segment, bucket, project)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def read(self) -> Verdict:
        """Wait for the step in flight and parse its verdict (the rows are a view, valid until the next
        read)."""
        step, turn, segment, bucket, project = self._pending
        self._pending = None
        if self._done is not None:
            self._done[turn].synchronize()
        self.transfers["reads"] += 1
        buf = self._verdict_np[turn]
        head = buf[: self._header].astype(np.int64).tolist()
        lay = self.layout
        block = buf[self._header :].reshape(2 * self.rows, FIELDS)
        rows = np.concatenate([block[:bucket], block[self.rows : self.rows + project]]) if project else block[:bucket]
        q, segments = self.state.queues, len(self.segments)
        return Verdict(
            step, segment, bucket, project, head[:q], head[q], head[q + 1 : q + 1 + segments],
            head[q + 1 + segments : q + 1 + 2 * segments], head[lay["ran"][0]] if segment is not None else 0,
            (head[lay["emitted"][0]] if bucket else 0, head[lay["emitted"][0] + 1] if project else 0), rows,
        )  # fmt: skip

    # ------------------------------------------------------------------ prefill
    def prefill(self, step: int, requests: list[Any], kills: tuple[int, ...] = (), enqueue: bool = True) -> None:
        """Launch the full-depth pass over the requests' prompts (right-padded, causal, batched): their
        keys/values, first tokens (draw 0 of each seed), row state, and tickets into the first queue;
        `read()` gives the verdict (one row per request, in slot order). `kills` go first; without
        `enqueue` the rows join no queue (self-speculation plans its rows on the host). One upload:
        the prompts, each request's columns and the step's own (its number, its kills)."""
        requests = sorted(requests, key=lambda r: r.slot)
        ids, columns, replay = self._prefill_upload(step, kills, requests)
        if kills:
            self.programs.kill(self.plan[2 : 2 + len(kills)])
        length, slots, seeds, epochs, budget, trace_seeds, replayed = columns.unbind(1)
        st = self.state
        if self.picker.row_sampling is not None:
            rows = torch.tensor([r.sampling.row() for r in requests], dtype=torch.float32)
            self.picker.row_sampling.index_copy_(0, slots, rows.to(self.device))
        if replay is not None:
            st.replay.index_copy_(0, slots, replay)
        tokens = self._prefill_tokens(ids, length, slots, seeds)
        st.tokens.index_copy_(0, slots, tokens)
        for name, value in (("position", length - 1), ("draw", torch.zeros_like(slots)), ("seed", seeds),
                            ("epoch", epochs), ("max_new", budget), ("trace_seed", trace_seeds)):  # fmt: skip
            getattr(st, name).index_copy_(0, slots, value)
        st.replayed.index_copy_(0, slots, replayed.bool())
        st.passed_at.index_fill_(0, slots, self.num_layers)
        st.fill_from.index_fill_(0, slots, self.num_layers - 1)
        tickets = slots + st.total * epochs
        valid = torch.ones_like(slots, dtype=torch.bool)
        rows = Rows(slots, tickets, valid, length - 1)
        done, eos = self.programs.finished(rows, tokens, valid)
        st.alive.index_copy_(0, slots, ~done)
        if enqueue:
            self.programs.append(0, tickets, ~done)
            self.programs.joined(slots, ~done)
        flags = self.programs._flags(valid, valid, done, eos, torch.zeros_like(valid), torch.zeros_like(valid))
        layers = torch.full_like(slots, self.num_layers - 1)
        zero = torch.zeros(slots.shape, dtype=torch.float32, device=self.device)
        self._write_rows(0, self.programs._verdict_rows(tickets, tokens, layers, flags, zero), 0)
        self._report()
        self._download(step, None, len(requests), 0)

    def _prefill_upload(
        self, step: int, kills: tuple[int, ...], requests: list[Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The prompts and each request's columns, after a first line holding the step's plan (its
        number, its kills), in one host tensor and one copy."""
        lengths = [int(r.prompt.shape[0]) for r in requests]
        width, n = max(lengths), len(requests)
        replays = self.state.replay is not None and any(r.trace is not None for r in requests)
        extra = self.store.max_len + 1 if replays else 0
        host = torch.zeros(n + 1, max(width + 7 + extra, 2 + len(kills)), dtype=torch.long)
        host[0, :2] = torch.tensor([step, len(kills)])
        host[0, 2 : 2 + len(kills)] = torch.tensor(kills, dtype=torch.long)
        for i, r in enumerate(requests, start=1):
            host[i, : lengths[i - 1]] = r.prompt.cpu()
            host[i, width : width + 7] = torch.tensor(
                [lengths[i - 1], r.slot, r.seed, r.epoch, r.max_new_tokens, r.trace_seed, int(r.trace is not None)]
            )
            if replays:
                row = list(r.trace or ())[:extra]
                host[i, width + 7 :] = -1
                host[i, width + 7 : width + 7 + len(row)] = torch.tensor(row, dtype=torch.long)
        device = host.to(self.device)
        self.plan[: 2 + len(kills)].copy_(device[0, : 2 + len(kills)])
        self.transfers["uploads"] += 1
        body = device[1:]
        return body[:, :width], body[:, width : width + 7], body[:, width + 7 : width + 7 + extra] if replays else None

    def _prefill_tokens(self, ids: torch.Tensor, length: torch.Tensor, slots: torch.Tensor, seeds: torch.Tensor) -> Any:
        n, width = ids.shape
        positions = torch.arange(width, device=self.device).expand(n, width)
        hidden = self.arch.embed(ids, positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        self.store.bind(slots, positions, kv_len=width)
        windows = {self.arch.layer_window(i) for i in range(self.num_layers)}
        masks = {w: build_attention_mask(positions, width, window=w, dtype=hidden.dtype) for w in windows}
        for layer in range(self.num_layers):
            window = self.arch.layer_window(layer)
            hidden = self.arch.run_layer(layer, hidden, attention_mask=masks[window], position_ids=positions,
                                         position_embeddings=rotary, cache=self.store)  # fmt: skip
        last = hidden[torch.arange(n, device=self.device), length - 1]
        logits = self.arch.project(self.arch.final_norm(last))
        picker = self.picker
        if picker.history is not None:  # the prompts are the histories' start
            picker.history[slots, :width] = ids
            picker.prompt_lengths.index_copy_(0, slots, length)
        return picker(logits, slots, seeds, torch.zeros_like(seeds), length)

    # ------------------------------------------------------------------ timing and tests
    @torch.no_grad()
    def stage(self, queue: int, slots: list[int], position: int) -> None:
        """Put `slots` (empty ones: no request holds them) in `queue` as live rows whose tokens run at
        `position`, with budgets that never end them: what a step of timing runs on. `clear()` after."""
        st = self.state
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        st.alive.index_fill_(0, index, True)
        st.epoch.index_fill_(0, index, 0)
        st.position.index_fill_(0, index, position - 1 if queue == 0 else position)
        st.draw.index_fill_(0, index, 0)
        st.max_new.index_fill_(0, index, 2**40)
        st.passed_at.index_fill_(0, index, self.num_layers)
        self.programs.append(queue, index, torch.ones_like(index, dtype=torch.bool))

    @torch.no_grad()
    def probe(self, kind: str, index: int, slots: list[int], position: int) -> Any:
        """A piece of a step on chosen (empty) slots, for timing, as a function of nothing: "layers"
        (segment `index`'s layers alone; the last with the final norm, the lm_head and the pick),
        "check" (exit point `index`'s check on the hidden states in the slots), "fill" (the KV fill
        after exit point `index`) or "project" (deferred projections of the slots' features). The
        rows' tokens run at `position`; nothing here changes a queue."""
        p, st = self.programs, self.state
        index_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        st.alive.index_fill_(0, index_t, True)
        st.position.index_fill_(0, index_t, position)
        st.max_new.index_fill_(0, index_t, 2**40)
        st.fill_from.index_fill_(0, index_t, self.boundaries[index] if kind == "fill" else self.num_layers - 1)
        rows = Rows(index_t, index_t, torch.ones_like(index_t, dtype=torch.bool), st.position.index_select(0, index_t))
        if kind == "layers":
            last = index == len(self.segments) - 1

            def layers() -> None:
                out = p.run_layers(index, rows, p.embed(rows) if index == 0 else None, self.store.max_len)
                if last:
                    p.pick(self.arch.project(self.arch.final_norm(out)), rows.slots, rows.positions + 1)

            return layers
        if kind == "check":
            x = st.hidden.index_select(0, index_t)
            return lambda: p.check(index, rows, x)
        if kind == "fill":
            return lambda: p.fill(rows, self.boundaries[index] + 1)
        if kind == "project":
            return lambda: p.project(rows)
        raise ValueError(f"unknown probe {kind!r}")

    @torch.no_grad()
    def choose_fill(self, repeats: int = 3, timer: Any = None) -> dict[int, str]:
        """On a GPU whose kernels are Triton's: time the KV fill at every bucket both ways — the fused
        Triton kernel and the plain matrix product with an indexed write (the torch reference) — on
        empty slots, from the shallowest exit point, and keep the faster per bucket
        (`programs.fill_choice`; on the H200 the Triton fill ran at 0.62x the product's speed at 256
        rows). Before any capture: a graph keeps the fill it was recorded with. `timer(fn, repeats,
        device) -> ms` (default `device.time_ms`; given, it also runs off CUDA: tests). Returns the choice."""
        from drex_hf.device import time_ms

        programs = self.programs
        if timer is None and self.device.type != "cuda":
            return {}
        if not programs.triton or not self.options.fills or self.fill_weights() is None:
            return {}
        timer = timer or time_ms
        position = min(16, self.store.max_len - 1)
        for bucket in self.buckets:
            probe = self.probe("fill", 0, list(range(bucket)), position)
            times = {}
            for backend in ("triton", "torch"):
                programs.fill_choice[bucket] = backend
                times[backend] = timer(probe, repeats, self.device)
            programs.fill_choice[bucket] = min(times, key=times.get)
            self.clear()
        return dict(programs.fill_choice)

    @torch.no_grad()
    def clear(self) -> None:
        """Every queue empty and every slot free of rows (after timing on staged rows)."""
        st = self.state
        st.head.zero_()
        st.count.zero_()
        st.alive.zero_()

    def nbytes(self) -> int:
        """Bytes of the per-slot state kept beside the KV cache (and the rotary tables)."""
        tables = [t for t in (self.programs.cos, self.programs.sin) if t is not None]
        return self.state.nbytes() + sum(t.nbytes for t in [*self.picker.tensors(), *tables])
