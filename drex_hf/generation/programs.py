"""The device side of a step, as functions of the row state and static buffers (DESIGN.md §10).

`RowState` holds everything a row is, on the device: its pending token, position, draw counter,
seed, budget, liveness, the epoch that tags its tickets, where its last token left and which layers
still owe it keys/values, its trace exits, and the queues — one per segment, one of deferred
projections, one of KV fills — that say where it waits. `Programs` are the pieces a step is made
of: take rows from a queue, start their tokens, run a segment's layers, check the exit, route each
row to its next queue, project, fill, and report the queues' counts into the verdict. None reads the
device on the host, makes a tensor from host data, indexes with a boolean mask or loops over rows,
so each composition the runner builds can be captured once per bucket (CUDA graphs; on the CPU, the
replay recorder) — except where an eager CPU program (`static=False`) looks at its rows in CPU
memory to read contiguous rows as views and attend only up to the longest row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from drex_hf import kernels
from drex_hf.generation.attention import indexed_attention
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.generation.plan import EMITTED, EOS, FINISHED, INVOLUNTARY, MISSED, VALID
from drex_hf.generation.sampling import uniforms
from drex_hf.heads import margin_confidence, max_prob_confidence, saturation_confidence

LOGIT_MEASURES = ("max_prob", "margin")


@dataclass
class Rows:
    """Rows a program runs on: `slots [b]` (padding and stale tickets point at the scratch slot),
    their `tickets`, which are `valid`, and `positions [b]`."""

    slots: torch.Tensor
    tickets: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


class RowState:
    """Per-slot device state (slot `scratch` = the store's extra slot included) and the queues.

    A queue is a ring of `capacity` tickets (`ticket = slot + slots_total · epoch`) with a head and a
    count, plus one dump column that masked appends write to. Queues: one per segment, then deferred
    projections (`project_queue`), then KV fills (`fill_queue`)."""

    def __init__(self, slots: int, hidden: int, num_layers: int, segments: int, dtype: Any, device: Any) -> None:
        total = slots + 1
        long = dict(dtype=torch.long, device=device)
        self.total, self.scratch, self.num_layers = total, slots, num_layers
        self.tokens = torch.zeros(total, **long)
        self.position = torch.zeros(total, **long)
        self.draw = torch.zeros(total, **long)
        self.seed = torch.zeros(total, **long)
        self.max_new = torch.ones(total, **long)
        self.alive = torch.zeros(total, dtype=torch.bool, device=device)
        self.epoch = torch.zeros(total, **long)
        self.exit_layer = torch.full((total,), num_layers - 1, **long)  # where a deferred token left
        self.fill_from = torch.full((total,), num_layers - 1, **long)  # exit layer whose later layers owe K/V
        self.passed_at = torch.full((total,), num_layers, **long)  # first exit point confident at (L: none)
        self.trace_layer = torch.full((total,), num_layers - 1, **long)
        self.trace_seed = torch.zeros(total, **long)
        self.replayed = torch.zeros(total, dtype=torch.bool, device=device)  # trace exits replayed, not drawn
        self.replay: torch.Tensor | None = None  # [total, width] exit layers by token number, -1: none
        self.join_step = torch.zeros(total, **long)
        self.token_step = torch.zeros(total, **long)
        self.hidden = torch.zeros(total, hidden, dtype=dtype, device=device)
        self.features = torch.zeros_like(self.hidden)  # what the lm_head projects: exit-head or final-normed
        self.previous: torch.Tensor | None = None  # saturation: the previous exit point's state
        self.queues = segments + 2
        self.project_queue, self.fill_queue = segments, segments + 1
        self.capacity = 2 * total
        self.queue = torch.zeros(self.queues, self.capacity + 1, **long)
        self.head = torch.zeros(self.queues, **long)
        self.count = torch.zeros(self.queues, **long)
        self.step = torch.zeros((), **long)  # the step number, as uploaded with the plan

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor here (what a captured program may read and write besides the model's)."""
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


class Programs:
    """The pieces of a step over one model, its store and its row state; see the module docstring.
    `boundaries`: exit layers where segments end; `thresholds` (float64, per boundary); `rule`:
    own | all | majority (with `quorum`) | none; `trace`: exits come from the trace, not the heads."""

    def __init__(
        self,
        model: Any,
        store: RowKVCache,
        state: RowState,
        boundaries: list[int],
        *,
        thresholds: list[float],
        rule: str,
        quorum: float,
        trace: bool,
        static: bool,
        eos: tuple[int, ...],
        picker: Any,
        fill_weights: Any,
        track_token_age: bool,
    ) -> None:
        self.model, self.arch, self.store, self.state = model, model.arch, store, state
        self.num_layers = self.arch.num_layers
        self.boundaries = list(boundaries)
        starts = [0, *(b + 1 for b in self.boundaries)]
        ends = [*(b + 1 for b in self.boundaries), self.num_layers]
        self.segments = [range(a, b) for a, b in zip(starts, ends)]
        head_of = dict(zip(model.exit_layers, model.heads))
        self.heads = [head_of[b] for b in self.boundaries]
        self.measure = model.exit_config.confidence
        self.logits_check = self.measure in LOGIT_MEASURES
        # saturation compares with the hidden state after the previous exit *point*, checked or not:
        # when a segment swallows unchecked exit points, the last of them is captured during the run
        self.capture: list[int | None] = []
        for seg in self.segments[:-1]:
            inside = [e for e in model.exit_layers if seg.start <= e < seg.stop - 1]
            self.capture.append(inside[-1] if inside and self.measure == "saturation" else None)
        self.capture.append(None)
        device = state.tokens.device
        self.device = device
        self.thresholds = torch.tensor(thresholds or [0.0], dtype=torch.float64, device=device)
        self.rule, self.quorum, self.trace, self.static = rule, float(quorum), trace, static
        self.eos = torch.tensor(list(eos) or [-1], dtype=torch.long, device=device)
        self.picker = picker
        self.fill_weights = fill_weights
        self.track_token_age = track_token_age
        self.cos, self.sin = self._rotary_tables(state.hidden.dtype)
        self.windows = [self.arch.layer_window(i) for i in range(self.num_layers)]
        self.attention = self.arch.attention_modules()
        self.triton = kernels.backend(device) == "triton"
        self.indexed = static or self.triton
        self._key_index = torch.arange(store.max_len, device=device)
        self._masked = torch.tensor(torch.finfo(state.hidden.dtype).min, dtype=state.hidden.dtype, device=device)
        self._visible = torch.zeros((), dtype=state.hidden.dtype, device=device)
        self._ranges: dict[int, torch.Tensor] = {}
        self._ring = torch.arange(state.capacity, device=device)
        self.cumulative = self.points = None  # trace: the exit distribution (set by the runner)
        self.fill_choice: dict[int, str] = {}  # rows -> "torch" | "triton", where measured

    def arange(self, n: int) -> torch.Tensor:
        """A cached `arange(n)` (made outside any captured program, once per size)."""
        if n not in self._ranges:
            self._ranges[n] = torch.arange(n, device=self.device)
        return self._ranges[n]

    def _rotary_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos/sin `[max_len, 1, head_dim]` for every position a slot holds, by the model's own rotary
        embedding, once (a step gathers its rows' lines instead of recomputing them)."""
        from drex_hf.errors import UnsupportedArchitectureError

        rotary = getattr(getattr(self.arch, "backbone", None), "rotary_emb", None)
        if "dynamic" in str(getattr(rotary, "rope_type", "")):
            raise UnsupportedArchitectureError(
                f"rope_type {rotary.rope_type!r} rescales with the sequence seen; drex_hf's engine needs "
                f"position embeddings that depend on the position alone"
            )
        positions = torch.arange(self.store.max_len, device=self.device).unsqueeze(1)
        tables = self.arch.position_embeddings(torch.zeros((), dtype=dtype, device=self.device), positions)
        if tables is None:
            return None, None
        return tables[0].contiguous(), tables[1].contiguous()

    # ------------------------------------------------------------------ queues
    def take(self, queue: int, bucket: int) -> Rows:
        """The first min(count, bucket) tickets of `queue`, removed from it; a ticket whose slot has
        another epoch or is no longer alive (stale) is a padding row."""
        st = self.state
        idx = self.arange(bucket)
        head, count = st.head[queue], st.count[queue]
        n = torch.clamp(count, max=bucket)
        tickets = st.queue[queue].index_select(0, (head + idx) % st.capacity)
        slots = tickets % st.total
        valid = (idx < n) & (st.epoch.index_select(0, slots) == tickets // st.total) & st.alive.index_select(0, slots)
        slots = torch.where(valid, slots, st.scratch)
        st.head[queue] = (head + n) % st.capacity
        st.count[queue] = count - n
        if not self.static:  # eager: in slot order, so that rows that are a run of slots are read as views
            slots, order = torch.sort(slots)
            tickets, valid = tickets.index_select(0, order), valid.index_select(0, order)
        return Rows(slots, tickets, valid, st.position.index_select(0, slots))

    def append(self, queue: int, tickets: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the masked tickets, in order, to the back of `queue` (the rest go to its dump column)."""
        st = self.state
        rank = torch.cumsum(mask.long(), 0) - 1
        at = (st.head[queue] + st.count[queue] + rank) % st.capacity
        st.queue[queue].index_copy_(0, torch.where(mask, at, st.capacity), tickets)
        st.count[queue] += mask.sum()

    def joined(self, slots: torch.Tensor, mask: torch.Tensor) -> None:
        """Stamp the masked rows with this step: they joined a queue now (the stalled rule's clock)."""
        st = self.state
        st.join_step.index_copy_(0, slots, torch.where(mask, st.step, st.join_step.index_select(0, slots)))

    def kill(self, slots: torch.Tensor) -> None:
        """The host ended these rows' requests: their tickets go stale wherever they wait, and every
        queue is compacted to its live tickets, in order (so no queue ever holds more stale tickets
        than a bucket can clear: every pending projection and fill stays within one bucket)."""
        self.state.alive.index_fill_(0, slots, False)
        self.purge()

    def purge(self) -> None:
        """Drop the stale tickets from every queue (each keeps its live ones in order, from the ring's
        start). Eager: it runs with a kill, which is rare."""
        st = self.state
        cap, ring = st.capacity, self._ring
        at = (st.head.unsqueeze(1) + ring) % cap  # [queues, capacity]
        tickets = st.queue[:, :cap].gather(1, at)
        slots = tickets % st.total
        valid = (ring < st.count.unsqueeze(1)) & (st.epoch[slots] == tickets // st.total) & st.alive[slots]
        rank = torch.where(valid, torch.cumsum(valid.long(), 1) - 1, cap)
        kept = torch.zeros_like(st.queue)
        kept.scatter_(1, rank, tickets)
        st.queue.copy_(kept)
        st.head.zero_()
        st.count.copy_(valid.sum(1))

    # ------------------------------------------------------------------ tokens
    def start_tokens(self, rows: Rows) -> None:
        """The rows' next tokens start: one position on, the next draw, no exit passed yet, the step
        stamped, and (a trace) each token's exit layer: replayed, or drawn from (trace seed, draw)."""
        st, slots, valid = self.state, rows.slots, rows.valid
        zero = torch.zeros_like(slots)
        rows.positions = torch.where(valid, rows.positions + 1, zero)
        st.position.index_copy_(0, slots, rows.positions)
        draw = torch.where(valid, st.draw.index_select(0, slots) + 1, zero)
        st.draw.index_copy_(0, slots, draw)
        st.passed_at.index_fill_(0, slots, self.num_layers)
        st.token_step.index_copy_(0, slots, st.step.expand_as(slots))
        if self.trace:
            st.trace_layer.index_copy_(0, slots, self._trace_layers(slots, draw))

    def _trace_layers(self, slots: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
        """Token `draw`'s exit layer: the replayed one (-1 or past the replay: full depth), else the
        counter-based draw (trace seed, draw) inverted on the exit distribution."""
        st, last = self.state, self.num_layers - 1
        out = torch.full_like(slots, last)
        if self.cumulative is not None:
            u = uniforms(st.trace_seed.index_select(0, slots), draw)
            at = torch.searchsorted(self.cumulative, u * self.cumulative[-1], right=True)
            out = self.points.index_select(0, at.clamp(max=self.points.shape[0] - 1))
        if st.replay is not None:
            width = st.replay.shape[1]
            layer = st.replay.index_select(0, slots).gather(1, draw.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
            layer = torch.where((layer >= 0) & (draw < width), layer, last)
            out = torch.where(st.replayed.index_select(0, slots), layer, out)
        return out

    def pick(self, logits: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rows' tokens from their logits: processors (each row's own history), then the pick with
        each row's (seed, draw)."""
        st = self.state
        return self.picker(logits, slots, st.seed.index_select(0, slots), st.draw.index_select(0, slots), lengths)

    def finished(self, rows: Rows, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the masked rows whose tokens are now final: which end their request (an eos id, or the
        last token it may have), and which tokens are eos."""
        st = self.state
        eos = torch.isin(tokens, self.eos)
        last = st.draw.index_select(0, rows.slots) + 1 >= st.max_new.index_select(0, rows.slots)
        return mask & (eos | last), eos

    # ------------------------------------------------------------------ layers
    def run_layers(
        self, s: int, rows: Rows, x: torch.Tensor | None, kv_len: int, stand_in: tuple[int, Any] | None = None
    ) -> torch.Tensor:
        """Segment s's decoder layers, unmodified, on the rows (one query each at their positions) from
        `x` (None: the hidden states in their slots), attending through the store (indexed, in place)
        or over `kv_len` positions (eager CPU programs: up to the longest row). `stand_in` (index,
        module): run only that module, in layer `index`'s place and cache (a draft layer), instead."""
        slots, positions = rows.slots, rows.positions
        span = None
        if not self.static:
            kv_len, span = self._eager_view(rows)
        pos = positions.unsqueeze(1)
        rotary = self.rotary(positions)
        if x is None:
            x = self.state.hidden[span[0] : span[1]] if span is not None else self.gather(self.state.hidden, slots)
        self.store.bind(slots, pos, kv_len=kv_len, span=span, lengths=positions + 1, indexed=self.indexed)
        layers = self.segments[s] if stand_in is None else [stand_in[0]]
        module = None if stand_in is None else stand_in[1]
        masks = None if self.indexed else self._masks(layers, pos, kv_len)
        hidden = x.unsqueeze(1)
        with indexed_attention(self.attention) if self.indexed else contextlib.nullcontext():
            for index in layers:
                hidden = self._layer(index, hidden, masks, pos, rotary, module)
                if module is None and index == self.capture[s]:
                    self.scatter(self.state.previous, slots, hidden[:, 0])
        return hidden[:, 0]

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables' lines at `positions [n]`: `[n, 1, head_dim]` each (None: no rotary)."""
        if self.cos is None:
            return None
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def _eager_view(self, rows: Rows) -> tuple[int, tuple[int, int] | None]:
        """Eager CPU programs look at their rows (CPU memory, no transfer): attend up to the longest,
        and read a contiguous run of live slots as views."""
        slots = rows.slots.tolist()
        kv_len = max(rows.positions.tolist()) + 1
        lo = slots[0]
        if slots == list(range(lo, lo + len(slots))) and lo + len(slots) <= self.state.scratch:
            return kv_len, (lo, lo + len(slots))
        return kv_len, None

    def _layer(
        self, index: int, hidden: torch.Tensor, masks: dict | None, pos: torch.Tensor, rotary: Any, module: Any = None
    ) -> Any:
        if masks is None:
            extra = {"drex_rows": self.store.indexed_rows(), "drex_window": self.windows[index]}
            mask = None
        else:
            extra, mask = {}, masks[self.windows[index]]
        return self.arch.run_layer(
            index, hidden, attention_mask=mask, position_ids=pos, position_embeddings=rotary, cache=self.store,
            module=module, **extra,
        )  # fmt: skip

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

    def gather(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.triton:
            return kernels.gather_rows(source, index, check_indices=False)
        return source.index_select(0, index)

    def scatter(self, target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        if self.triton:
            kernels.scatter_rows(target, index, rows.to(target.dtype), check_indices=False)
        else:
            target.index_copy_(0, index, rows.to(target.dtype))

    def embed(self, rows: Rows) -> torch.Tensor:
        """The rows' pending tokens embedded at their positions (saturation: kept as the state before
        the first exit point)."""
        st = self.state
        ids = st.tokens.index_select(0, rows.slots).unsqueeze(1)
        x = self.arch.embed(ids, rows.positions.unsqueeze(1))[:, 0]
        if st.previous is not None:
            self.scatter(st.previous, rows.slots, x)
        return x

    # ------------------------------------------------------------------ the exit check
    def check(self, s: int, rows: Rows, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segment s's exit check: each row's confidence (float32) and, for a confidence made from
        the logits, the token they give (else the exit head's features wait in the slot)."""
        head, st, slots = self.heads[s], self.state, rows.slots
        if self.logits_check:
            logits = head.logits(out)
            measure = max_prob_confidence if self.measure == "max_prob" else margin_confidence
            confidence = measure(logits)  # of the exit's own logits: processors pick the token, not the exit
            return confidence.float(), self.pick(logits, slots, rows.positions + 1)
        features = head.features(out)
        if self.measure == "classifier":
            confidence = head.classifier(features)
        else:
            confidence = saturation_confidence(out, self.gather(st.previous, slots))
            self.scatter(st.previous, slots, out)
        self.scatter(st.features, slots, features)
        return confidence.float(), None

    def leave(self, s: int, rows: Rows, confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(leave, own): which valid rows leave at segment s's exit point by the policy's rule, and
        which are confident there themselves (a trace: whose token's exit layer is this one). The
        threshold compare is in float64, as the reference decoder's."""
        st, valid, layer = self.state, rows.valid, self.boundaries[s]
        if self.trace:
            own = st.trace_layer.index_select(0, rows.slots) <= layer
        else:
            own = confidence.double() >= self.thresholds[s]
        own = own & valid
        if self.rule == "own":
            out = own
        elif self.rule == "all":
            out = valid & (own | ~valid).all()
        else:  # majority
            out = valid & (own.sum().double() >= self.quorum * valid.sum().double())
        passed = st.passed_at.index_select(0, rows.slots)
        st.passed_at.index_copy_(0, rows.slots, torch.where(own & (passed > layer), layer, passed))
        return out, own

    def route_exit(self, s: int, rows: Rows, confidence: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """After segment s's check: leaving rows take their token (or await its projection), owe the
        later layers their keys/values, and go on to their next token (unless it ended them); the
        others wait for segment s + 1. Returns the verdict rows."""
        st, slots, valid, layer = self.state, rows.slots, rows.valid, self.boundaries[s]
        leave, own = self.leave(s, rows, confidence)
        st.fill_from.index_copy_(0, slots, torch.where(leave, layer, st.fill_from.index_select(0, slots)))
        stay = valid & ~leave
        self.append(s + 1, rows.tickets, stay)
        if tokens is not None:
            done, eos = self.finished(rows, tokens, leave)
            st.tokens.index_copy_(0, slots, tokens)
            st.alive.index_copy_(0, slots, st.alive.index_select(0, slots) & ~done)
            onward = leave & ~done
            emitted, token = leave, tokens
        else:
            last = st.draw.index_select(0, slots) + 1 >= st.max_new.index_select(0, slots)
            st.exit_layer.index_copy_(0, slots, torch.where(leave, layer, st.exit_layer.index_select(0, slots)))
            self.append(st.project_queue, rows.tickets, leave)
            none = torch.zeros_like(valid)  # deferred tokens are emitted when they are projected
            onward, done, eos, emitted, token = leave & ~last, none, none, none, torch.full_like(slots, -1)
        self.append(0, rows.tickets, onward)
        self.append(st.fill_queue, rows.tickets, onward)
        self.joined(slots, stay | onward)
        missed = emitted & (st.passed_at.index_select(0, slots) < layer)
        flags = self._flags(valid, emitted, done, eos, leave & ~own, missed)
        layers = torch.where(emitted, layer, -1)
        return self._verdict_rows(rows.tickets, token, layers, flags, confidence)

    def route_final(self, rows: Rows, out: torch.Tensor) -> torch.Tensor:
        """After the last segment: the rows' final-normed states wait in their slots for the step's
        projection, which projects them with every deferred token waiting, in one vocabulary product
        (on a CPU, or a GPU at moderate batch, one pass over the lm_head's weights instead of two)."""
        st, slots, valid = self.state, rows.slots, rows.valid
        self.scatter(st.features, slots, self.arch.final_norm(out))
        st.exit_layer.index_fill_(0, slots, self.num_layers - 1)
        self.append(st.project_queue, rows.tickets, valid)
        none = torch.zeros_like(valid)
        flags = self._flags(valid, none, none, none, none, none)
        zero = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)
        minus = torch.full_like(slots, -1)
        return self._verdict_rows(rows.tickets, minus, minus, flags, zero)

    @staticmethod
    def _flags(*masks: torch.Tensor) -> torch.Tensor:
        valid, emitted, done, eos, involuntary, missed = (m.long() for m in masks)
        return (
            valid * VALID
            + emitted * EMITTED
            + done * FINISHED
            + (eos & emitted) * EOS
            + (involuntary * INVOLUNTARY)
            + missed * MISSED
        )

    @staticmethod
    def _verdict_rows(tickets: Any, tokens: Any, layers: Any, flags: Any, confidence: Any) -> torch.Tensor:
        """`[b, 5]` float64 rows in `plan.ROW_FIELDS` order (exact for every integer a row holds)."""
        return torch.stack([tickets.double(), tokens.double(), layers.double(), flags.double(), confidence.double()], 1)

    # ------------------------------------------------------------------ projections and fills
    def project(self, rows: Rows) -> torch.Tensor:
        """Waiting tokens — the last segment's rows and deferred exits: their features onto the
        vocabulary, one product, and their tokens picked (each with its own draw). A row that ran the
        last segment goes on to its next token unless this one ended it (an exited row went on when it
        left). Returns the verdict rows."""
        st, slots, valid = self.state, rows.slots, rows.valid
        logits = self.arch.project(self.gather(st.features, slots))
        tokens = self.pick(logits, slots, rows.positions + 1)
        done, eos = self.finished(rows, tokens, valid)
        st.tokens.index_copy_(0, slots, tokens)
        st.alive.index_copy_(0, slots, st.alive.index_select(0, slots) & ~done)
        layer = st.exit_layer.index_select(0, slots)
        onward = valid & ~done & (layer == self.num_layers - 1)
        self.append(0, rows.tickets, onward)
        self.joined(slots, onward)
        missed = valid & (st.passed_at.index_select(0, slots) < layer)
        flags = self._flags(valid, valid, done, eos, torch.zeros_like(valid), missed)
        zero = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)
        return self._verdict_rows(rows.tickets, tokens, torch.where(valid, layer, -1), flags, zero)

    def fill(self, rows: Rows, layers_from: int) -> None:
        """KV fill: each row's keys/values of the layers after its exit, at the position its exited
        token took, from the exit hidden state still in its slot — one folded product for all rows
        (or layer by layer where the norms cannot be folded)."""
        st, slots, positions = self.state, rows.slots, rows.positions
        first = torch.where(rows.valid, st.fill_from.index_select(0, slots) + 1, self.num_layers)
        x = self.gather(st.hidden, slots)
        rotary = self.rotary(positions)
        weights = self.fill_weights() if self.fill_weights is not None else None
        if weights is None or (rotary is not None and not self.arch.rotary_half):
            self._fill_by_layer(x, slots, positions, first, layers_from, rotary)
            return
        weight, bias = weights
        n = slots.shape[0]
        flat = None if rotary is None else (rotary[0].view(n, -1), rotary[1].view(n, -1))
        fill = (
            kernels.kv_fill_project if self.fill_backend(n) == "triton" else kernels.kv_fill.kv_fill_project_reference
        )
        extra = {"check_indices": False} if fill is kernels.kv_fill_project else {}
        fill(self.arch.kv_fill_normalize(x), weight, bias, self.store.key_store, self.store.value_store, slots,
             positions, first, flat, layers_from=layers_from, **extra)  # fmt: skip

    def fill_backend(self, rows: int) -> str:
        """Which KV fill runs at this many rows: the one measured faster there (`fill_choice`, set by
        the runner's start-up timing on a GPU), else Triton where the kernels are Triton's."""
        choice = self.fill_choice.get(rows)
        return choice if choice is not None else ("triton" if self.triton else "torch")

    def _fill_by_layer(self, x: Any, slots: Any, positions: Any, first: Any, layers_from: int, rotary: Any) -> None:
        layers = range(layers_from, self.num_layers)
        keys, values = [], []
        for layer in layers:
            k, v = self.arch.kv_projection(layer, x.unsqueeze(1), rotary)
            keys.append(k[:, :, 0])
            values.append(v[:, :, 0])
        self.store.write(layers, slots, positions, torch.stack(keys, 1), torch.stack(values, 1), first)
