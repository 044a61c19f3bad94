"""The step executor: runs a `StepPlan` on the device, one upload in, one verdict out (DESIGN.md §10).

It owns the per-slot device state beside the `RowKVCache` — hidden states between segments (an
exited row's stays in its slot until its KV fill has run), exit-head features awaiting the
vocabulary projection, each slot's last token, the previous exit's state for saturation — plus the
rotary tables, and the three programs a step is made of, each a function of its bucket alone:

* `fill`: keys/values of the layers exited rows skipped, one folded matrix product for all of them;
* `segment`: embed the rows' tokens (segment 0) or gather their states, run the segment's decoder
  layers unmodified (attention reads the store in place, KV append writes it), then the exit check
  (or the final norm);
* `project`: exit-head or final features onto the vocabulary, and the token pick.

A program reads its rows from the static plan buffer and writes only into the state, the store and
the static verdict buffer: no `.item()`, no tensors from Python data, no boolean-mask indexing, no
loop over rows. So on CUDA each is captured once as a CUDA graph per bucket (`graphs.py`) and a step
is one pinned upload, a few replays and one read-back after a CUDA event; on the CPU the same
programs run eagerly (there, `static=False` lets them read contiguous rows as views and attend only
up to the longest row, both known on the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from drex_hf import kernels
from drex_hf.arch import build_attention_mask
from drex_hf.errors import UnsupportedArchitectureError
from drex_hf.generation.attention import indexed_attention
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import StepPlan, Verdict, bucket_of
from drex_hf.generation.sampling import RequestSampling, as_seed, pick_rows, pick_tokens
from drex_hf.heads import margin_confidence, max_prob_confidence, saturation_confidence

if TYPE_CHECKING:
    from drex_hf.generation.graphs import GraphCache
    from drex_hf.generation.processors import RowProcessors
    from drex_hf.generation.protocol import EarlyExitModel

# plan buffer columns, each `rows` long: the run section, the fill section, the projection section
RUN = ("slot", "write", "position", "length", "index", "seed")
FILL = ("fill_slot", "fill_position", "fill_first")
PROJECT = ("project_slot", "project_index", "project_seed", "project_length")
COLUMNS = (*RUN, *FILL, *PROJECT)
VERDICT = ("confidence", "token", "projected")  # float32 columns of the verdict buffer
LOGIT_MEASURES = ("max_prob", "margin")


@dataclass
class _Views:
    """A bucket's views of the static buffers (made once per bucket: a step makes none)."""

    plan: dict[str, torch.Tensor]
    positions: torch.Tensor  # [n, 1]
    verdict: dict[str, torch.Tensor]


class StepExecutor:
    """Device side of the engine. `boundaries`: the exit layers where segments end (sorted, a subset
    of the model's exits); `buckets`: the row counts programs are built for (`plan.row_buckets`);
    `static`: programs whose shapes and reads depend on the bucket and the store's capacity only
    (what a CUDA graph needs; on the CPU the default is off); `do_sample`/`warpers`: the token pick;
    `processors`: HF's logits processors applied before it (`processors.RowProcessors`), which read
    a per-slot token history kept here only then (written as tokens are picked; a pick for a row that
    does not exit writes its token's place provisionally, overwritten by the token it emits before
    any later pick reads that place)."""

    def __init__(
        self,
        model: EarlyExitModel,
        store: RowKVCache,
        boundaries: list[int],
        *,
        buckets: list[int],
        static: bool,
        do_sample: bool = False,
        warpers: list[Any] | None = None,
        processors: RowProcessors | None = None,
        per_request_sampling: bool = False,
    ) -> None:
        self.model, self.arch, self.store = model, model.arch, store
        self.num_layers = self.arch.num_layers
        self.boundaries = list(boundaries)
        starts = [0, *(b + 1 for b in self.boundaries)]
        ends = [*(b + 1 for b in self.boundaries), self.num_layers]
        self.segments = [range(a, b) for a, b in zip(starts, ends)]
        head_of = dict(zip(model.exit_layers, model.heads))
        self.heads = [head_of[b] for b in self.boundaries]
        self.measure = model.exit_config.confidence
        # saturation compares with the hidden state after the previous exit *point*, checked or not:
        # when a segment swallows unchecked exit points, the last of them is captured during the run
        self.capture: list[int | None] = []
        for seg in self.segments[:-1]:
            inside = [e for e in model.exit_layers if seg.start <= e < seg.stop - 1]
            self.capture.append(inside[-1] if inside and self.measure == "saturation" else None)
        self.capture.append(None)
        self.buckets = list(buckets)
        self.static = static
        # per-request sampling: every row carries its seed and draw; its parameters live in its slot
        self.do_sample, self.warpers = do_sample or per_request_sampling, list(warpers or [])
        self.graphs: GraphCache | None = None

        rows = self.buckets[-1]
        self.rows = rows
        device, dtype = model.heads_device, store.key_store.dtype
        self.device = torch.device(device)
        slots, hidden = store.slots + 1, self.arch.hidden_size  # + the scratch slot
        self.hidden = torch.zeros(slots, hidden, dtype=dtype, device=device)
        self.features = torch.zeros_like(self.hidden)  # what the lm_head projects: exit-head or final-normed
        self.previous = torch.zeros_like(self.hidden) if self.measure == "saturation" else None
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # each slot's last token
        # per-request sampling: each slot's `RequestSampling.row()`, written at its prefill (scratch: greedy)
        self.row_sampling = torch.zeros(slots, 3, device=device) if per_request_sampling else None
        self.processors = processors
        self.history = self.prompt_lengths = None
        if processors is not None:  # each slot's prompt + tokens; a token's place is its sequence index
            self.history = torch.zeros(slots, store.max_len + 1, dtype=torch.long, device=device)
            self.prompt_lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.cos, self.sin = self._rotary_tables(dtype)
        self.fill_weights = self.arch.kv_fill_weights()
        self.windows = [self.arch.layer_window(i) for i in range(self.num_layers)]
        self.attention = self.arch.attention_modules()
        # the kernel backend is resolved once, here: on the torch path the programs call the kernels'
        # references directly (a launcher's checks and dispatch cost more than the op on small rows)
        self.triton = kernels.backend(self.device) == "triton"
        self.indexed = static or self.triton
        self._key_index = torch.arange(store.max_len, device=device)
        self._masked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
        self._visible = torch.zeros((), dtype=dtype, device=device)

        pinned = self.device.type == "cuda"
        self.plan = torch.zeros(len(COLUMNS) * rows, dtype=torch.long, device=device)
        self.verdict = torch.zeros(len(VERDICT) * rows, dtype=torch.float32, device=device)
        self.host_plan = torch.zeros(self.plan.shape, dtype=torch.long, pin_memory=pinned)
        self.host_verdict = torch.zeros(self.verdict.shape, dtype=torch.float32, pin_memory=pinned)
        self._plan_np = self.host_plan.numpy()
        self._verdict_np = self.host_verdict.numpy()
        self._done = torch.cuda.Event() if self.device.type == "cuda" else None
        self._uploaded = torch.cuda.Event() if self.device.type == "cuda" else None
        self._in_flight = False
        self._column = {name: i * rows for i, name in enumerate(COLUMNS)}
        # every bucket's views, made here once (a step makes none, and none is made in inference mode)
        self._views = {bucket: self._make_views(bucket) for bucket in self.buckets}
        self.transfers = {"uploads": 0, "reads": 0}

    @property
    def host_buffers(self) -> set[int]:
        """Storage addresses of the host staging buffers (the only tensors a step copies to or from)."""
        return {self.host_plan.untyped_storage().data_ptr(), self.host_verdict.untyped_storage().data_ptr()}

    def _rotary_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos/sin `[max_len, 1, head_dim]` for every position a slot holds, computed once by the
        model's own rotary embedding (a step gathers its rows' lines instead of recomputing them)."""
        rotary = getattr(getattr(self.arch, "backbone", None), "rotary_emb", None)
        if "dynamic" in str(getattr(rotary, "rope_type", "")):
            raise UnsupportedArchitectureError(
                f"rope_type {rotary.rope_type!r} rescales with the sequence seen; drex_hf's engine needs "
                f"position embeddings that depend on the position alone"
            )
        positions = torch.arange(self.store.max_len, device=self.device).unsqueeze(1)
        probe = torch.zeros((), dtype=dtype, device=self.device)
        tables = self.arch.position_embeddings(probe, positions)
        if tables is None:
            return None, None
        return tables[0].contiguous(), tables[1].contiguous()

    # ------------------------------------------------------------------ static buffers
    def _make_views(self, bucket: int) -> _Views:
        rows = self.rows
        plan = {name: self.plan[i * rows : i * rows + bucket] for i, name in enumerate(COLUMNS)}
        verdict = {name: self.verdict[i * rows : i * rows + bucket] for i, name in enumerate(VERDICT)}
        return _Views(plan, plan["position"].view(bucket, 1), verdict)

    def views(self, bucket: int) -> _Views:
        """Views of the plan and verdict buffers for `bucket` rows."""
        return self._views[bucket]

    def _put(self, column: str, values: list[int], pad: int, bucket: int) -> None:
        start = self._column[column]
        n = len(values)
        self._plan_np[start : start + n] = values
        if bucket > n:
            self._plan_np[start + n : start + bucket] = pad

    def write_plan(self, plan: StepPlan, buckets: tuple[int, int, int]) -> None:
        """Spell `plan` into the host staging buffer, padding each section to its bucket with rows
        that read and write the scratch slot only."""
        run, fill, project = buckets
        scratch = self.store.scratch
        if self._in_flight:  # an upload with no read since (a step's read waits for its upload, same stream)
            self._uploaded.synchronize()  # before the pinned buffer it copies from is written again
            self._in_flight = False
        if run:
            self._put("slot", plan.slots, scratch, run)
            self._put("write", plan.writes, scratch, run)
            self._put("position", plan.positions, 0, run)
            at, to = self._column["position"], self._column["length"]
            self._plan_np[to : to + run] = self._plan_np[at : at + run] + 1
            if self.do_sample:  # the draws; greedy picks need none
                self._put("index", plan.token_index, 0, run)
                self._put("seed", plan.seeds, 0, run)
        if fill:
            self._put("fill_slot", plan.fill_slots, scratch, fill)
            self._put("fill_position", plan.fill_positions, 0, fill)
            self._put("fill_first", plan.fill_first, self.num_layers, fill)
        if project:
            self._put("project_slot", plan.project_slots, scratch, project)
            if self.do_sample:
                self._put("project_index", plan.project_index, 0, project)
                self._put("project_seed", plan.project_seeds, 0, project)
            if self.processors is not None:
                self._put("project_length", plan.project_lengths, 0, project)

    def upload(self) -> None:
        """The step's one host-to-device copy: the whole plan buffer."""
        self.plan.copy_(self.host_plan, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
            self._in_flight = True
        self.transfers["uploads"] += 1

    def read(self) -> np.ndarray:
        """The step's one device-to-host copy: the verdict buffer, after the step's work is done."""
        self.host_verdict.copy_(self.verdict, non_blocking=self._done is not None)
        if self._done is not None:
            self._done.record()
            self._done.synchronize()
            self._in_flight = False
        self.transfers["reads"] += 1
        return self._verdict_np

    # ------------------------------------------------------------------ one step
    def execute(self, plan: StepPlan) -> Verdict:
        """Upload `plan`, run its programs (projection before the segment when the segment embeds
        the projected tokens; KV fill; the segment; the final projection), read the verdict."""
        buckets = (
            bucket_of(self.buckets, len(plan.slots)),
            bucket_of(self.buckets, len(plan.fill_slots)),
            bucket_of(self.buckets, len(plan.project_slots)),
        )
        run, fill, project = buckets
        self.write_plan(plan, buckets)
        self.upload()
        if project and plan.project_first:
            self.run_program(("project", project))
        if fill:
            self.run_program(("fill", fill, plan.fill_layers_from))
        if run:
            self.run_program(("segment", plan.segment, run), plan.kv_len, plan.span)
        if project and not plan.project_first:
            self.run_program(("project", project))
        verdict = self.read()
        n, rows = len(plan.slots), self.rows
        checked = bool(run) and plan.segment < len(self.segments) - 1
        logits = checked and self.measure in LOGIT_MEASURES
        return Verdict(  # views of the staging buffer: valid until the next step
            confidence=verdict[:n] if checked else None,
            tokens=verdict[rows : rows + n] if logits else None,
            projected=verdict[2 * rows : 2 * rows + len(plan.project_slots)] if project else None,
        )

    def run_unchecked(self, plan: StepPlan) -> None:
        """The plan's segment without its exit check, then (the final segment) its projection, with
        no read-back: what a segment's layers cost on their own (calibration)."""
        run = bucket_of(self.buckets, len(plan.slots))
        project = bucket_of(self.buckets, len(plan.project_slots))
        self.write_plan(plan, (run, 0, project))
        self.upload()
        self.run_program(("layers", plan.segment, run), plan.kv_len, plan.span)
        if project:
            self.run_program(("project", project))

    def run_program(self, key: tuple, kv_len: int = 0, span: tuple[int, int] | None = None) -> None:
        """Replay `key`'s graph when one was captured, else run the program eagerly."""
        if self.graphs is not None and self.graphs.replay(key):
            return
        self.program(key, kv_len, span)()

    def program(self, key: tuple, kv_len: int = 0, span: tuple[int, int] | None = None) -> Callable[[], None]:
        """The program for `key` as a function of nothing: ("segment", s, bucket), ("layers", s,
        bucket) (the segment without its exit check: the measured oracle's), ("fill", bucket, first
        layer of the product) or ("project", bucket). Static programs attend over the store's whole
        capacity; eager ones over `kv_len`, reading `span` as views."""
        kind, *args = key
        if self.static:
            kv_len, span = self.store.max_len, None
        if kind in ("segment", "layers"):
            s, bucket = args
            return lambda: self.segment(s, bucket, kv_len, span, check=kind == "segment")
        if kind == "fill":
            return lambda: self.fill(*args)
        if kind == "project":
            return lambda: self.project(*args)
        raise ValueError(f"unknown program {key!r}")

    def program_keys(self) -> list[tuple]:
        """Every program a static step can run (what graph capture prepares): each segment at each
        bucket, the projection at each bucket, the KV fill at each bucket from each exit point."""
        keys: list[tuple] = []
        for bucket in self.buckets:
            keys += [("segment", s, bucket) for s in range(len(self.segments))]
            keys.append(("project", bucket))
            if self.boundaries:
                keys += [("fill", bucket, exit_layer + 1) for exit_layer in self.boundaries]
        return keys

    # ------------------------------------------------------------------ programs
    def _gather(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.triton:
            return kernels.gather_rows(source, index, check_indices=False)
        return source.index_select(0, index)

    def _scatter(self, target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        if self.triton:
            kernels.scatter_rows(target, index, rows.to(target.dtype), check_indices=False)
        else:
            target.index_copy_(0, index, rows.to(target.dtype))

    def _masks(self, layers: range, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor]:
        """Additive masks `[n, 1, 1, kv_len]` per sliding window of `layers` (eager attention adds
        them: float, not boolean), from the rows' positions `[n, 1]`."""
        keys = self._key_index[:kv_len]
        out = {}
        for window in {self.windows[i] for i in layers}:
            visible = keys <= positions
            if window is not None:
                visible = visible & (keys > positions - window)
            out[window] = torch.where(visible, self._visible, self._masked).view(len(positions), 1, 1, kv_len)
        return out

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cos is None:
            return None
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def fill(self, bucket: int, layers_from: int) -> None:
        """KV fill: each row's keys/values of layers `fill_first` .. L-1 at its position, from the
        hidden state in its slot (the exit state: the next token has not overwritten it yet)."""
        plan = self.views(bucket).plan
        slots, positions, first = plan["fill_slot"], plan["fill_position"], plan["fill_first"]
        x = self._gather(self.hidden, slots)
        rotary = self._rotary(positions)
        if self.fill_weights is None or (rotary is not None and not self.arch.rotary_half):
            layers = range(layers_from, self.num_layers)
            keys, values = [], []
            for layer in layers:
                k, v = self.arch.kv_projection(layer, x.unsqueeze(1), rotary)
                keys.append(k[:, :, 0])
                values.append(v[:, :, 0])
            self.store.write(layers, slots, positions, torch.stack(keys, 1), torch.stack(values, 1), first)
            return
        weight, bias = self.fill_weights
        fill = kernels.kv_fill_project if self.triton else kernels.kv_fill.kv_fill_project_reference
        extra = {"check_indices": False} if self.triton else {}
        fill(
            self.arch.kv_fill_normalize(x),
            weight,
            bias,
            self.store.key_store,
            self.store.value_store,
            slots,
            positions,
            first,
            None if rotary is None else (rotary[0].view(bucket, -1), rotary[1].view(bucket, -1)),
            layers_from=layers_from,
            **extra,
        )

    def segment(self, s: int, bucket: int, kv_len: int, span: tuple[int, int] | None, check: bool = True) -> None:
        """Segment s on the bucket's rows: its layers, then the exit check into the verdict (the
        final segment: the final norm into `features`). Every row's state goes to its `write` slot
        (riders and padding: the scratch slot), so what is written never depends on the outcome.
        `check=False` leaves the exit check out (timing the layers alone; the measured oracle)."""
        view = self.views(bucket)
        plan, positions = view.plan, view.positions
        slots, write = plan["slot"], plan["write"]
        if s == 0:
            ids = self.tokens.index_select(0, slots).unsqueeze(1)
            x = self.arch.embed(ids, positions)[:, 0]
            if self.previous is not None:  # the first exit's saturation compares with the embedding
                self._scatter(self.previous, write, x)
        elif span is not None:
            x = self.hidden[span[0] : span[1]]
        else:
            x = self._gather(self.hidden, slots)
        rotary = self._rotary(plan["position"])
        self.store.bind(slots, positions, kv_len=kv_len, span=span, lengths=plan["length"], indexed=self.indexed)
        layers = self.segments[s]
        masks = None if self.indexed else self._masks(layers, positions, kv_len)
        hidden = x.unsqueeze(1)
        with indexed_attention(self.attention) if self.indexed else contextlib.nullcontext():
            for index in layers:
                hidden = self._layer(index, hidden, masks, positions, rotary)
                if index == self.capture[s]:
                    self._scatter(self.previous, write, hidden[:, 0])
        out = hidden[:, 0]
        if s == len(self.segments) - 1:
            self._scatter(self.features, write, self.arch.final_norm(out))
            return
        self._scatter(self.hidden, write, out)
        if check:
            self.check(s, view, out)

    def _layer(
        self, index: int, hidden: torch.Tensor, masks: dict | None, positions: torch.Tensor, rotary: Any
    ) -> torch.Tensor:
        """Decoder layer `index`, unmodified, on the rows bound to the store (indexed: the attention
        reads them through the store's `indexed_rows()`)."""
        if masks is None:
            extra = {"drex_rows": self.store.indexed_rows(), "drex_window": self.windows[index]}
            mask = None
        else:
            extra, mask = {}, masks[self.windows[index]]
        return self.arch.run_layer(
            index,
            hidden,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rotary,
            cache=self.store,
            **extra,
        )

    def check(self, s: int, view: _Views, out: torch.Tensor) -> None:
        """The exit check at segment s's end: confidence into the verdict; the exit head's features
        kept for a deferred projection, or — for a confidence that needs the logits — the token they
        give picked now (into the verdict and the slot's last token)."""
        head, plan, verdict = self.heads[s], view.plan, view.verdict
        write = plan["write"]
        if self.measure in LOGIT_MEASURES:
            logits = head.logits(out)
            measure = max_prob_confidence if self.measure == "max_prob" else margin_confidence
            confidence = measure(logits)  # of the exit's own logits: processors pick the token, not the exit
            scores = self._processed(logits, plan["slot"], plan["length"])
            tokens = self._pick(scores, plan["slot"], plan["seed"], plan["index"])
            self._remember(write, plan["length"], tokens)
            self.tokens.index_copy_(0, write, tokens)
            verdict["token"].copy_(tokens)
        else:
            features = head.features(out)
            if self.measure == "classifier":
                confidence = head.classifier(features)
            else:
                confidence = saturation_confidence(out, self._gather(self.previous, plan["slot"]))
                self._scatter(self.previous, write, out)
            self._scatter(self.features, write, features)
        verdict["confidence"].copy_(confidence)

    def project(self, bucket: int) -> None:
        """The vocabulary projection of the rows' features, one product, and their tokens."""
        view = self.views(bucket)
        plan = view.plan
        slots = plan["project_slot"]
        logits = self.arch.lm_head(self._gather(self.features, slots))
        scores = self._processed(logits, slots, plan["project_length"])
        tokens = self._pick(scores, slots, plan["project_seed"], plan["project_index"])
        self._remember(slots, plan["project_length"], tokens)
        self.tokens.index_copy_(0, slots, tokens)
        view.verdict["projected"].copy_(tokens)

    def _pick(
        self, scores: torch.Tensor, slots: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor
    ) -> torch.Tensor:
        """The rows' tokens: with the engine's sampling settings, or each with its slot's own."""
        if self.row_sampling is not None:
            return pick_rows(scores, self.row_sampling.index_select(0, slots), seeds, counters)
        return pick_tokens(scores, self.do_sample, self.warpers, seeds, counters)

    def _processed(self, logits: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rows' scores through HF's logits processors, each row seeing its own `lengths` tokens of
        history (prompt + tokens so far); the float32 logits as they are without processors."""
        scores = logits.float()
        if self.processors is None:
            return scores
        window = self.processors.window(self.history, slots, lengths)
        return self.processors(scores, window, lengths - self.prompt_lengths.index_select(0, slots))

    def _remember(self, slots: torch.Tensor, places: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write picked tokens into the history at their places (when processors read it)."""
        if self.history is not None:
            self.history.index_put_((slots, places), tokens)

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        slots: list[int],
        prompts: list[torch.Tensor],
        seeds: list[int],
        sampling: list[RequestSampling] | None = None,
    ) -> list[int]:
        """Full-depth pass over the prompts (right-padded, causal, batched), writing their keys/values;
        each one's first token is picked (draw 0 of its seed), kept in its slot and returned. With
        per-request sampling, `sampling` gives each prompt's parameters, kept in its slot."""
        if self.row_sampling is not None and (sampling is None or len(sampling) != len(slots)):
            raise ValueError("per-request sampling needs one RequestSampling per prompt")
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        slots = [slots[i] for i in order]
        prompts = [prompts[i] for i in order]
        lengths = [p.shape[0] for p in prompts]
        width = max(lengths)
        host = torch.zeros(len(prompts), width + 3, dtype=torch.long)  # ids | length | slot | seed
        for i, prompt in enumerate(prompts):
            host[i, : lengths[i]] = prompt.cpu()
        host[:, width] = torch.tensor(lengths)
        host[:, width + 1] = torch.tensor(slots)
        host[:, width + 2] = torch.tensor([as_seed(seeds[i]) for i in order])
        device = host.to(self.device)
        ids, length, index, seed = device[:, :width], device[:, width], device[:, width + 1], device[:, width + 2]
        if self.row_sampling is not None:  # each slot's own parameters, by the slot index just uploaded
            rows = torch.tensor([sampling[i].row() for i in order], dtype=torch.float32)
            self.row_sampling.index_copy_(0, index, rows.to(self.device))
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        hidden = self.arch.embed(ids, positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        contiguous = slots[-1] - slots[0] + 1 == len(slots)
        self.store.bind(index, positions, kv_len=width, span=(slots[0], slots[-1] + 1) if contiguous else None)
        masks = {w: build_attention_mask(positions, width, window=w, dtype=hidden.dtype) for w in set(self.windows)}
        for layer in range(self.num_layers):
            hidden = self._layer(layer, hidden, masks, positions, rotary)
        last = hidden[torch.arange(len(prompts), device=self.device), length - 1]
        logits = self.arch.lm_head(self.arch.final_norm(last))
        if self.history is not None:  # the prompts are the histories' start
            self.history[index, :width] = ids
            self.prompt_lengths.index_copy_(0, index, length)
        scores = self._processed(logits, index, length)
        tokens = self._pick(scores, index, seed, torch.zeros_like(seed))
        self._remember(index, length, tokens)
        self.tokens.index_copy_(0, index, tokens)
        picked = tokens.tolist()
        out = [0] * len(order)
        for i, token in zip(order, picked):
            out[i] = token
        return out

    def nbytes(self) -> int:
        """Bytes of the per-slot state kept beside the KV cache (and the rotary tables)."""
        kept = [self.hidden, self.features, self.previous, self.tokens, self.cos, self.sin]
        kept += [self.history, self.row_sampling]  # with logits processors / per-request sampling only
        return sum(t.nbytes for t in kept if t is not None)
