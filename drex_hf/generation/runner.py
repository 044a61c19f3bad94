"""The segment runner: executes on tensors what the scheduler decided on indices.

It owns the per-slot state (hidden states, exit hidden states awaiting KV fill, the previous exit's
hidden state for saturation, positions) next to the `RowKVCache`, and offers the pieces a step is
made of: `prefill` (full depth, batched), `fill` (KV fill for exited rows, all skipped layers in one
matrix product), `embed` (start the next token), `run_segment` (gather rows by slot, run the
segment's decoder layers unmodified, return the exit-point hidden states), `check` (confidence at an
exit point), and the heads' and final layer's logits. Segments end at the active exit points.
Row moves, KV writes, KV fill and attention go through `drex_hf.kernels` (Triton on CUDA); with the
Triton kernels on, decode segments attend through indexed decode attention, no gathered cache.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from drex_hf import kernels
from drex_hf.arch import build_attention_mask
from drex_hf.generation.attention import indexed_attention
from drex_hf.generation.kv_store import RowKVCache
from drex_hf.heads import exit_confidence

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


class SegmentRunner:
    def __init__(
        self,
        model: EarlyExitModelForCausalLM,
        store: RowKVCache,
        boundaries: list[int],
        *,
        kv_fill: str = "project",
    ) -> None:
        """`boundaries`: the exit layers where segments end (sorted, a subset of the model's exits)."""
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

        slots, hidden = store.slots, self.arch.hidden_size
        device, dtype = model.heads_device, store.key_store.dtype
        self.device = device
        self.hidden = torch.zeros(slots, hidden, dtype=dtype, device=device)
        self.exit_hidden = torch.zeros_like(self.hidden)
        self.features = torch.zeros_like(self.hidden)  # exited rows' head features awaiting the lm_head
        self.previous = torch.zeros_like(self.hidden) if self.measure == "saturation" else None
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        if kv_fill != "project":
            raise ValueError(f"unknown kv_fill {kv_fill!r}; supported: 'project'")
        self.fill_weights = self.arch.kv_fill_weights()
        self.windows = [self.arch.layer_window(i) for i in range(self.num_layers)]
        self.attention = self.arch.attention_modules()

    # ------------------------------------------------------------------ helpers
    def _index(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _masks(self, layers: range, positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> dict:
        return {
            w: build_attention_mask(positions, kv_len, window=w, dtype=dtype) for w in {self.windows[i] for i in layers}
        }

    def _gather(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return kernels.gather_rows(source, index, check_indices=False)

    def _scatter(self, target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        kernels.scatter_rows(target, index, rows.to(target.dtype), check_indices=False)

    def _layer(
        self, index: int, hidden: torch.Tensor, masks: dict | None, positions: torch.Tensor, rotary: Any
    ) -> torch.Tensor:
        """Decoder layer `index`, unmodified, on the rows bound to the store. Without masks the rows
        are bound `indexed`: the attention reads them through the store's `indexed_rows()`."""
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

    # ------------------------------------------------------------------ prefill
    def prefill(self, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Full-depth pass over the prompts (right-padded, causal); returns each one's last logits."""
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        slots = [slots[i] for i in order]
        prompts = [prompts[i] for i in order]
        lengths = torch.tensor([p.shape[0] for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, : prompt.shape[0]] = prompt
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        hidden = self.arch.embed(ids, positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        self.store.bind(slots, positions)
        masks = self._masks(range(self.num_layers), positions, width, hidden.dtype)
        for index in range(self.num_layers):
            hidden = self._layer(index, hidden, masks, positions, rotary)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        self.positions[self._index(slots)] = lengths - 1
        logits = self.final_logits(last)
        return logits[torch.argsort(torch.tensor(order, device=self.device))]  # back to the callers' order

    # ------------------------------------------------------------------ KV fill
    def fill(self, slots: list[int], exit_layer: int | list[int]) -> None:
        """Keys/values of the layers after each slot's exit layer, at its current position, from its
        exit hidden state: each layer's input norm and k/v projections (`kv_fill="project"`), for
        all rows and all skipped layers in one matrix product (rows that skipped fewer layers get the
        deeper layers only). `exit_layer`: one for all slots, or one per slot."""
        exits = [exit_layer] * len(slots) if isinstance(exit_layer, int) else list(exit_layer)
        if not slots or min(exits) >= self.num_layers - 1:
            return
        layers = range(min(exits) + 1, self.num_layers)
        index = self._index(slots)
        x = self._gather(self.exit_hidden, index)
        positions = self.positions.index_select(0, index)
        rotary = self.arch.position_embeddings(x.unsqueeze(1), positions.unsqueeze(1))
        if self.fill_weights is None or (rotary is not None and not self.arch.rotary_half):
            for layer in layers:
                keys, values = self.arch.kv_projection(layer, x.unsqueeze(1), rotary)
                keys, values = keys.transpose(1, 2), values.transpose(1, 2)
                rows = torch.tensor([i for i, e in enumerate(exits) if e < layer], device=self.device)
                self.store.write(range(layer, layer + 1), index[rows], positions[rows], keys[rows], values[rows])
            return
        weight, bias = self.fill_weights
        kernels.kv_fill_project(
            self.arch.kv_fill_normalize(x),
            weight,
            bias,
            self.store.key_store,
            self.store.value_store,
            index,
            positions,
            torch.tensor(exits, device=self.device) + 1,
            None if rotary is None else (rotary[0][:, 0], rotary[1][:, 0]),
            layers_from=layers.start,
            check_indices=False,
        )

    # ------------------------------------------------------------------ one token's segments
    def embed(self, slots: list[int], tokens: list[int]) -> None:
        """Start each slot's next token: advance its position and write its embedding."""
        index = self._index(slots)
        self.positions[index] += 1
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        emb = self.arch.embed(ids, self.positions.index_select(0, index).unsqueeze(1))[:, 0]
        self._scatter(self.hidden, index, emb)
        if self.previous is not None:
            self._scatter(self.previous, index, emb)

    def run_segment(self, s: int, rows: list[int], riders: list[int] = (), refill: list[int] = ()) -> torch.Tensor:
        """Run segment `s` on `rows` (plus `riders`, whose results are discarded); returns the
        hidden states of `rows`, in their order, after the segment's last layer.

        `refill` (a subset of the riders: rows that exited earlier) enter every layer with their exit
        hidden state, so the keys/values the layer writes for them are exactly their KV fill: a
        ride does the fill of the layers it passes, and no separate product is needed for them."""
        run = sorted([*rows, *riders])
        lo, hi = run[0], run[-1] + 1
        index = self._index(run)
        contiguous = hi - lo == len(run)
        x = self.hidden[lo:hi] if contiguous else self._gather(self.hidden, index)
        positions = (self.positions[lo:hi] if contiguous else self.positions.index_select(0, index)).unsqueeze(1)
        hidden = x.unsqueeze(1)
        rotary = self.arch.position_embeddings(hidden, positions)
        indexed = kernels.backend(self.device) == "triton"
        self.store.bind(run, positions, indexed=indexed)
        layers = self.segments[s]
        masks = None if indexed else self._masks(layers, positions, self.store.kv_len, hidden.dtype)
        mine = None  # where `rows` sit in the run, when the run is not just `rows` in their order
        if run != list(rows):
            where = {slot: i for i, slot in enumerate(run)}
            mine = torch.tensor([where[r] for r in rows], device=self.device)
        if refill:
            at = torch.tensor([where[r] for r in refill], device=self.device)
            exit_states = self._gather(self.exit_hidden, self._index(list(refill))).unsqueeze(1)
        with indexed_attention(self.attention) if indexed else contextlib.nullcontext():
            for index_layer in layers:
                if refill:
                    hidden = hidden.index_copy(0, at, exit_states)
                hidden = self._layer(index_layer, hidden, masks, positions, rotary)
                if index_layer == self.capture[s]:
                    captured = hidden[:, 0] if mine is None else self._gather(hidden[:, 0], mine)
                    self._scatter(self.previous, self._index(rows), captured)
        out = hidden[:, 0]
        return out if mine is None else self._gather(out, mine)

    def check(self, s: int, rows: list[int], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Confidence of each row at segment `s`'s exit point, and the logits if the measure needed them."""
        previous = None
        if self.previous is not None:
            previous = self._gather(self.previous, self._index(rows))
        return exit_confidence(self.measure, self.heads[s], x, previous)

    def head_logits(self, s: int, x: torch.Tensor) -> torch.Tensor:
        return self.heads[s].logits(x)

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.arch.lm_head(self.arch.final_norm(x))

    def keep_features(self, s: int, slots: list[int], x: torch.Tensor) -> None:
        """Store exit head s's features of exited rows; `project` turns them into logits later."""
        self._scatter(self.features, self._index(slots), self.heads[s].features(x))

    def project(self, slots: list[int], final: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the stored features of `slots` — after those of `final` (hidden states after the
        last layer, final-normed here) when given — in one lm_head product."""
        features = self._gather(self.features, self._index(slots))
        if final is not None:
            features = torch.cat([self.arch.final_norm(final), features])
        return self.arch.lm_head(features)

    def keep(self, rows: list[int], x: torch.Tensor, *, exited: bool) -> None:
        """Store the exit-point states: continuing rows' hidden (and previous-exit) states, or exited
        rows' hidden states for their KV fill."""
        if not rows:
            return
        index = self._index(rows)
        if exited:
            self._scatter(self.exit_hidden, index, x)
            return
        self._scatter(self.hidden, index, x)
        if self.previous is not None:
            self._scatter(self.previous, index, x)

    def describe(self) -> dict[str, Any]:
        return {"segments": [[seg.start, seg.stop - 1] for seg in self.segments], "kv_fill": "project"}
