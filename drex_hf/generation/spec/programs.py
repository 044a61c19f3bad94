"""The device side of self-speculation: draft and verify, bucketed and capture-safe, on the runner.

A `SpecPrograms` adds two programs to a `Runner` (whose segments are the draft exit's: layers
0..e, then e+1..L-1) and keeps what a round needs beside its row state: each slot's exit states of
the round's inputs, and (sampling) the drafts' warped distributions. Each step's rows come in one
upload of plan columns (slots, positions, draft offsets or counts, counters, seeds, the drafts) and
leave in one read:

    ("draft", b)    each row's last input through layers 0..e at its next position (and, with a
                    draft layer, through it as layer e+1); the draft head's token (DRAFT draw) and
                    confidence; the token becomes the row's next input
    ("verify", b, q, fresh)  the last input's shallow pass, then every row's q positions (the most
                    drafts a row of the step made, + 1) through layers e+1..L-1 at once; each draft's
                    acceptance and full depth's tokens; the row's next pending token into its slot.
                    `fresh`: some row's drafts came from its own text (`spec.ngram`), not from draft
                    steps, so every row's q inputs (its last emitted token, then its drafts) run
                    through all the layers; such a row's proposal is a point, not a distribution

Rows padded to the bucket point at the scratch slot. Nothing here reads the device on the host
(eager CPU programs look at their rows in CPU memory to attend up to the longest), so on CUDA both
are captured like drex's programs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from drex_hf.arch import build_attention_mask
from drex_hf.generation.programs import Rows
from drex_hf.generation.runner import Runner, logprob_rows
from drex_hf.generation.sampling import pick_rows, pick_tokens, uniforms, warp_rows
from drex_hf.generation.spec.reference import ACCEPT, FULL

TRACE_STREAM = 3  # a trace's acceptance coin: a sub-stream of the request's trace seed
COLUMNS = ("slot", "position", "count", "index", "seed", "trace_seed", "last", "ngram")
NGRAM = COLUMNS.index("ngram")


class SpecPrograms:
    """Draft and verify on `runner`; `k_max`: the most drafts a round makes; `acceptance`: a trace's
    (None: the heads decide); the engine's sampling `settings`; `draft_confidence`: a draft below it is
    not proposed, so it does not become the row's next input (the host stops the row's drafting)."""

    def __init__(
        self, runner: Runner, head: Any, k_max: int, acceptance: float | None, settings: Any,
        draft_confidence: float | None = None, draft_layer: Any = None,
    ) -> None:  # fmt: skip
        self.runner, self.head, self.k_max = runner, head, k_max
        # a `DraftLayer` (drex_hf.draft_layer): run after layers 0..e, as layer e+1, before `head`
        self.draft_layer = draft_layer
        # each slot's own sampling parameters (`RequestSampling.row()`, set at its prefill), or None
        self.row_params = runner.picker.row_sampling
        self.top = runner.options.logprobs  # keep each emitted token's logprobs (None: no)
        self.draft_confidence = draft_confidence if acceptance is None else None
        self.arch, self.state, self.programs = runner.arch, runner.state, runner.programs
        self.acceptance = acceptance
        self.do_sample, self.warpers = settings.do_sample, list(settings.warpers())
        device, dtype, total, rows = runner.device, runner.state.hidden.dtype, runner.state.total, runner.rows
        self.device, self.q = device, k_max + 1
        self.states = torch.zeros(total, k_max + 1, self.arch.hidden_size, dtype=dtype, device=device)
        self.draft_probs = None
        if self.do_sample or self.row_params is not None:
            self.draft_probs = torch.zeros(total, k_max, self.arch.vocab_size, dtype=torch.float64, device=device)
        width = len(COLUMNS) + k_max
        pinned = device.type == "cuda"
        self.plan = torch.zeros(width, rows, dtype=torch.long, device=device)
        self.host_plan = torch.zeros(width, rows, dtype=torch.long, pin_memory=pinned)
        self.out = torch.zeros(rows, 2 * k_max + 1, dtype=torch.float64, device=device)
        self.host_out = torch.zeros(self.out.shape, dtype=torch.float64, pin_memory=pinned)
        self._plan_np, self._out_np = self.host_plan.numpy(), self.host_out.numpy()
        self.logprobs = self.host_logprobs = self.last_logprobs = None
        if self.top is not None:  # per row and verified position: the emitted token's logprob row
            self.logprobs = torch.zeros(rows, self.q, 1 + 2 * self.top, dtype=torch.float32, device=device)
            self.host_logprobs = torch.zeros(self.logprobs.shape, dtype=torch.float32, pin_memory=pinned)
        self._done = None
        if pinned:
            with torch.cuda.device(device):
                self._done = torch.cuda.Event()
        self._offsets = torch.arange(self.q, device=device)
        runner.extend({"draft": self._draft, "verify": self._verify}, self.tensors)

    def tensors(self) -> list[torch.Tensor]:
        head = list(self.head.tensors()) if hasattr(self.head, "tensors") else []  # a draft vocabulary's
        kept = (self.states, self.draft_probs, self.plan, self.out, self._offsets, self.logprobs)
        return [t for t in kept if t is not None] + head

    # ------------------------------------------------------------------ a step
    def run(self, kind: str, columns: list[list[int]], drafts: list[list[int]] | None = None) -> np.ndarray:
        """Upload the step's columns (`COLUMNS` order, one value per row; `drafts`: each row's, padded
        to the longest), run `kind` at the rows' bucket, and return its verdict rows (a view until the
        next step): a draft's token and confidence; a verify's acceptance per draft (`k_max` columns)
        then full depth's tokens (from column `k_max`)."""
        n = len(columns[0])
        bucket = self.runner.bucket(n)
        plan = self._plan_np
        for i, column in enumerate(columns):
            plan[i, :n] = column
            plan[i, n:bucket] = self.state.scratch if i == 0 else 0
        key: tuple = (kind, bucket)
        if drafts is not None:
            width = len(drafts[0])
            if width:
                plan[len(COLUMNS) : len(COLUMNS) + width, :n] = np.asarray(drafts, dtype=np.int64).reshape(n, width).T
                plan[len(COLUMNS) : len(COLUMNS) + width, n:bucket] = 0
            key = (kind, bucket, width + 1, bool(plan[NGRAM, :n].any()))
        self.plan[:, :bucket].copy_(self.host_plan[:, :bucket], non_blocking=True)
        self.runner.transfers["uploads"] += 1
        self.runner.graphs.run(key)
        self.host_out[:bucket].copy_(self.out[:bucket], non_blocking=self._done is not None)
        if self.logprobs is not None and kind == "verify":
            self.host_logprobs[:bucket].copy_(self.logprobs[:bucket], non_blocking=self._done is not None)
            self.last_logprobs = self.host_logprobs.numpy()[:n]
        if self._done is not None:
            self._done.record(torch.cuda.current_stream(self.device))
            self._done.synchronize()
        self.runner.transfers["reads"] += 1
        return self._out_np[:n]

    def _rows(self, bucket: int, positions: torch.Tensor) -> Rows:
        slots = self.plan[0, :bucket]
        valid = slots != self.state.scratch
        return Rows(slots, slots, valid, positions)

    # ------------------------------------------------------------------ programs
    def shallow(self, bucket: int, slots: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor) -> Any:
        """Each row's next input (`tokens[slot]`) at `positions` through layers 0..e (keys/values
        written there); its exit state into `states[slot, offset]`."""
        rows = self._rows(bucket, positions)
        out = self.programs.run_layers(0, rows, self.programs.embed(rows), self.runner.store.max_len)
        self.states.index_put_((slots, offsets), out)
        return out

    def _draft(self, bucket: int) -> None:
        plan = self.plan[:, :bucket]
        slots, positions, offsets, counters, seeds = plan[0], plan[1], plan[2], plan[3], plan[4]
        state = self.shallow(bucket, slots, positions + offsets, offsets)
        if self.draft_layer is not None:  # one more layer, in layer e+1's place and cache (its keys and values)
            rows = self._rows(bucket, positions + offsets)
            stand_in = (self.draft_layer.index, self.draft_layer.layer)
            out = self.programs.run_layers(0, rows, state, self.runner.store.max_len, stand_in=stand_in)
            state = self.draft_layer.mix(state, out)
        logits = self.head.logits(state).float()
        confidence = torch.softmax(logits, dim=-1).amax(dim=-1)
        params = self.row_params.index_select(0, slots) if self.row_params is not None else None
        if params is not None:
            tokens = pick_rows(logits, params, seeds, counters, self.runner.picker.skip)
        else:
            tokens = pick_tokens(logits, self.do_sample, self.warpers, seeds, counters)
        if self.draft_probs is not None:
            self.draft_probs.index_put_((slots, offsets.clamp(max=self.k_max - 1)), self._warped(logits, params))
        if self.draft_confidence is not None:  # a draft not proposed leaves the row's last input as it was
            kept = confidence.double() >= self.draft_confidence
            tokens = torch.where(kept, tokens, self.state.tokens.index_select(0, slots))
        self.state.tokens.index_copy_(0, slots, tokens)
        self.out[:bucket, 0].copy_(tokens)
        self.out[:bucket, 1].copy_(confidence)

    def _verify(self, bucket: int, q: int, fresh: bool = False) -> None:
        plan = self.plan[:, :bucket]
        slots, positions, lengths, index, seeds, trace_seeds, last, ngram = plan[: len(COLUMNS)]
        k = q - 1
        drafts = plan[len(COLUMNS) : len(COLUMNS) + k].T  # [b, k]
        offsets = self._offsets[:q]
        grid = positions.unsqueeze(1) + offsets  # [b, q]
        if fresh:  # every input through every layer: the last emitted token, then the drafts
            inputs = torch.cat([last.unsqueeze(1), drafts], dim=1)
            layers, hidden = range(self.arch.num_layers), self.arch.embed(inputs, grid)
        else:
            self.shallow(bucket, slots, positions + lengths, lengths)
            layers, hidden = self.programs.segments[1], self.states.index_select(0, slots)[:, :q]
        if self.runner.options.static:  # fixed shapes (capture): every row's q positions, padding included
            logits = self.logits(self.layers(layers, slots, grid, hidden))  # [b, q, vocab]
        else:  # eager: only the rows' real positions (drafts + 1 each), packed into one column
            real = (offsets.unsqueeze(0) <= lengths.unsqueeze(1)) & (slots != self.state.scratch).unsqueeze(1)
            rows, where, inputs = slots.unsqueeze(1).expand_as(grid)[real], grid[real], hidden[real]
            packed = self.logits(self.layers(layers, rows, where.unsqueeze(1), inputs.unsqueeze(1)))
            logits = packed.new_zeros(*grid.shape, packed.shape[-1])
            logits[real] = packed[:, 0]  # padding positions read zeros, and no row keeps what they say
        accepted, tokens = self._accept(logits, slots, drafts, lengths, index, seeds, ngram.bool())
        if self.acceptance is not None:  # a trace: the replayed coin instead of the comparison
            counters = index.unsqueeze(1) + offsets[:k] + (TRACE_STREAM << 30)
            accepted = uniforms(trace_seeds.unsqueeze(1).expand_as(counters), counters) < self.acceptance
        valid = offsets[:k].unsqueeze(0) < lengths.unsqueeze(1)
        kept = torch.cumprod((accepted & valid).long(), dim=1).sum(dim=1, keepdim=True)
        self.state.tokens.index_copy_(0, slots, tokens.gather(1, kept).squeeze(1))
        self.out[:bucket, :k].copy_(accepted)
        self.out[:bucket, self.k_max : self.k_max + q].copy_(tokens)
        if self.logprobs is not None:  # each position's emitted token: an accepted draft, then full depth's
            emitted = torch.where(offsets.unsqueeze(0) < kept, torch.cat([drafts, tokens[:, k:]], dim=1), tokens)
            chosen = logprob_rows(logits.reshape(-1, logits.shape[-1]), emitted.reshape(-1), self.top)
            self.logprobs[:bucket, :q].copy_(chosen.view(bucket, q, -1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.arch.project(self.arch.final_norm(hidden)).float()

    def layers(self, layers: range, slots: torch.Tensor, grid: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`layers` on every row's positions `grid [b, q]` at once (explicit causal masks over the
        store's capacity, or — eager CPU programs — up to the furthest query)."""
        store, programs = self.runner.store, self.programs
        kv_len = store.max_len if self.runner.options.static else int(grid.max()) + 1
        store.bind(slots, grid, kv_len=kv_len)
        windows = {programs.windows[i] for i in layers}
        masks = {w: build_attention_mask(grid, kv_len, window=w, dtype=hidden.dtype) for w in windows}
        rotary = None
        if programs.cos is not None:
            flat, shape = grid.reshape(-1), (*grid.shape, -1)
            rotary = (programs.cos.index_select(0, flat).view(shape), programs.sin.index_select(0, flat).view(shape))
        for index in layers:
            hidden = self.arch.run_layer(index, hidden, attention_mask=masks[programs.windows[index]],
                                         position_ids=grid, position_embeddings=rotary, cache=store)  # fmt: skip
        return hidden

    # ------------------------------------------------------------------ acceptance
    def _softmax(self, logits: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """The float64 softmax of `logits [n, vocab]` through the warpers, or each row's own
        (`params [n, 5]`, `sampling.warp_rows`) — what `sample_rows` inverts."""
        scores = logits.float()
        if params is not None:
            scores = warp_rows(scores, params, self.runner.picker.skip)[0]
        else:
            for warper in self.warpers:
                scores = warper(scores)
        return torch.softmax(scores, dim=-1).double()

    def _warped(self, logits: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        probs = self._softmax(logits, params)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _accept(
        self, logits: Any, slots: Any, drafts: Any, lengths: Any, index: Any, seeds: Any, from_text: Any
    ) -> tuple[Any, Any]:
        """Per row and drafted position j: whether draft j is accepted `[b, k_max]`, and full depth's
        token at each position `[b, q]` — on a rejection at j its correction, at j = the row's draft
        count the token after an all-accepted round. Greedy: full depth's argmax; sampling: the
        speculative test (ACCEPT draw), the residual max(0, p - q) (FULL draw) after a rejection, p
        itself (FULL draw) after the last draft. A `from_text` row's drafts were proposed with
        probability one (its own text's): accepted with probability p, residual p without the draft."""
        params = self.row_params.index_select(0, slots) if self.row_params is not None else None
        if not self.do_sample and (params is None or (self.runner.picker.skip and bool((params[:, 0] == 0).all()))):
            return self._greedy(logits, drafts)  # (every row greedy: an eager CPU engine reads that for free)
        accepted, tokens = self._sampled(logits, slots, drafts, lengths, index, seeds, from_text, params)
        if params is None:
            return accepted, tokens
        greedy = (params[:, 0] == 0).unsqueeze(1)  # each row its own: greedy rows take full depth's argmax
        accepted_greedy, tokens_greedy = self._greedy(logits, drafts)
        return torch.where(greedy, accepted_greedy, accepted), torch.where(greedy, tokens_greedy, tokens)

    @staticmethod
    def _greedy(logits: Any, drafts: Any) -> tuple[Any, Any]:
        tokens = logits.argmax(dim=-1)
        k = logits.shape[1] - 1
        return (tokens[:, :k] == drafts) if k else tokens[:, :0].bool(), tokens

    def _sampled(
        self, logits: Any, slots: Any, drafts: Any, lengths: Any, index: Any, seeds: Any, from_text: Any, params: Any
    ) -> tuple[Any, Any]:
        """`_accept` for sampled rows (the engine's warpers, or each row's own `params`)."""
        n, q, vocab = logits.shape
        k = q - 1
        flat = None if params is None else params.repeat_interleave(q, dim=0)
        softmax = self._softmax(logits.reshape(n * q, vocab), flat).view(n, q, vocab)
        p = softmax / softmax.sum(dim=-1, keepdim=True)
        counters = index.unsqueeze(1) + self._offsets[:q]
        row_seeds = seeds.unsqueeze(1).expand(n, q)
        u_full = uniforms(row_seeds, counters + (FULL << 30))
        cdf = softmax.cumsum(dim=-1)  # the bonus draw from p, exactly as full-depth sampling draws
        total = cdf[..., -1:]
        point = torch.minimum(u_full.unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(())))
        plain = torch.searchsorted(cdf, point, right=True).squeeze(-1)
        if not k:
            return plain[:, :0].bool(), plain
        qd = self.draft_probs.index_select(0, slots)[:, :k]
        one_hot = torch.zeros_like(qd).scatter_(-1, drafts.unsqueeze(-1), 1.0)
        qd = torch.where(from_text.view(n, 1, 1), one_hot, qd)
        pd = p[:, :k]
        picked = drafts.unsqueeze(-1)
        u_accept = uniforms(row_seeds[:, :k], counters[:, :k] + (ACCEPT << 30))
        accepted = u_accept * qd.gather(-1, picked).squeeze(-1) < pd.gather(-1, picked).squeeze(-1)
        residual = (pd - qd).clamp(min=0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, pd)
        rcdf = (residual / residual.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
        rpoint = torch.minimum(u_full[:, :k].unsqueeze(-1), rcdf[..., -1:] * (1 - 2**-52))
        corrected = torch.searchsorted(rcdf, rpoint, right=True).squeeze(-1)
        at_end = self._offsets[:k].unsqueeze(0) >= lengths.unsqueeze(1)  # past the row's drafts: plain p
        return accepted, torch.cat([torch.where(at_end, plain[:, :k], corrected), plain[:, k:]], dim=1)
