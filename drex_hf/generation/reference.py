"""The reference early-exit decoder: one request at a time, plain torch, obviously right.

Prefill runs the prompt at full depth. Each later token runs segment by segment; at each exit
point the head's confidence is compared with that exit's threshold, and the first exit that passes
emits the token. The skipped layers' keys/values are then filled by projection (each skipped
layer's input norm and k/v projections applied to the exit hidden state, rotary at the token's
position), so later tokens attend to a complete cache. Sampled tokens come from the same
counter-based draw as the engine's (the request's seed and the token's number). HF's logits
processors (`DecodeSettings.logits_processors`) are applied to every token's scores before the pick
exactly as HF's `generate` applies them to a batch of one — the request's own prompt and tokens —
while the exit check reads the unprocessed confidence; HF's `StopStringCriteria` ends the request
after the token that completes a stop string. The rebatching engine is tested against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from drex_hf.arch import build_attention_mask
from drex_hf.generation.processors import stop_criterion
from drex_hf.generation.sampling import as_seed, pick_tokens
from drex_hf.generation.settings import DecodeSettings
from drex_hf.heads import exit_confidence

if TYPE_CHECKING:
    from drex_hf.generation.protocol import EarlyExitModel


class RequestKV:
    """Keys/values of one request: a growing `[1, kv_heads, length, head_dim]` pair per layer.

    It is what transformers' attention modules call `cache.update(...)` on, so decoder layers run
    unmodified; `append` is the same write for keys/values made by KV fill.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = keys if old_k is None else torch.cat([old_k, keys], dim=-2)
        self.values[layer] = values if old_v is None else torch.cat([old_v, values], dim=-2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.append(layer_idx, key_states, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer: int) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else int(keys.shape[-2])


@dataclass
class RequestResult:
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    # per token: (exit layer, confidence) for every exit point checked, in order
    checks: list[list[tuple[int, float]]] = field(default_factory=list)


class ReferenceDecoder:
    """Decodes one request with per-token early exit; see the module docstring."""

    def __init__(
        self,
        model: EarlyExitModel,
        settings: DecodeSettings,
        thresholds: list[float],
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.arch = model.arch
        self.settings = settings
        self.thresholds = thresholds
        self.warpers = settings.warpers()
        self.num_layers = self.arch.num_layers
        self.stop = stop_criterion(settings, tokenizer)
        self.processors: Any = None  # the request's, while it decodes (`decode`)
        self.seen: list[int] = []  # the request's prompt + tokens so far, what the processors see

    # ------------------------------------------------------------------ pieces
    def run_layers(
        self, hidden: torch.Tensor, layers: range, positions: torch.Tensor, rotary: Any, kv: RequestKV
    ) -> torch.Tensor:
        """Run `layers` on the tokens at `positions` ([1, q]), appending their K/V to `kv`."""
        for index in layers:
            kv_length = kv.length(index) + positions.shape[1]
            mask = build_attention_mask(positions, kv_length, window=self.arch.layer_window(index), dtype=hidden.dtype)
            hidden = self.arch.run_layer(
                index,
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rotary,
                cache=kv,
            )
        return hidden

    def fill_skipped(self, hidden: torch.Tensor, first_skipped: int, rotary: Any, kv: RequestKV) -> None:
        """KV fill by projection for layers first_skipped .. L-1 from the exit hidden state."""
        for index in range(first_skipped, self.num_layers):
            keys, values = self.arch.kv_projection(index, hidden, rotary)
            kv.append(index, keys, values)

    def pick(self, logits: torch.Tensor, seed: int, index: int) -> int:
        """Greedy argmax, or a sample through HF's warpers with this request's draw number `index`."""
        device = logits.device
        seeds = torch.tensor([as_seed(seed)], device=device)
        counters = torch.tensor([index], device=device)
        scores = logits.reshape(1, -1).float()
        if self.processors:
            scores = self.processors(torch.tensor([self.seen], device=device), scores)
        return int(pick_tokens(scores, self.settings.do_sample, self.warpers, seeds, counters)[0])

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.arch.lm_head(self.arch.final_norm(hidden))

    # ------------------------------------------------------------------ one token
    def prefill(self, prompt: torch.Tensor, kv: RequestKV) -> torch.Tensor:
        """Full-depth pass over the prompt; returns the last position's final logits."""
        positions = torch.arange(prompt.shape[0], device=prompt.device).unsqueeze(0)
        hidden = self.arch.embed(prompt.unsqueeze(0), positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        hidden = self.run_layers(hidden, range(self.num_layers), positions, rotary, kv)
        return self.final_logits(hidden[:, -1])

    def decode_token(
        self, token: int, position: int, kv: RequestKV, seed: int, index: int
    ) -> tuple[int, int, list[tuple[int, float]]]:
        """One decode step, the request's token number `index`: returns (next token, layer it left
        at, the exit checks made)."""
        device = self.model.heads_device
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[position]], device=device)
        hidden = self.arch.embed(ids, positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        previous = hidden
        start = 0
        checks: list[tuple[int, float]] = []
        measure = self.model.exit_config.confidence
        for head, layer, threshold in zip(self.model.heads, self.model.exit_layers, self.thresholds):
            hidden = self.run_layers(hidden, range(start, layer + 1), positions, rotary, kv)
            start = layer + 1
            if threshold != math.inf:
                confidence, logits = exit_confidence(measure, head, hidden, previous)
                value = float(confidence.reshape(()))
                checks.append((layer, value))
                if value >= threshold:
                    if logits is None:
                        logits = head.logits(hidden)
                    self.fill_skipped(hidden, start, rotary, kv)
                    return self.pick(logits[:, -1], seed, index), layer, checks
            previous = hidden
        hidden = self.run_layers(hidden, range(start, self.num_layers), positions, rotary, kv)
        return self.pick(self.final_logits(hidden[:, -1]), seed, index), self.num_layers - 1, checks

    # ------------------------------------------------------------------ one request
    def decode(self, prompt: torch.Tensor, seed: int = 0, streamer: Any = None) -> RequestResult:
        kv = RequestKV(self.num_layers)
        result = RequestResult()
        self.processors = self.settings.logits_processors(prompt.shape[0], prompt.device)
        self.seen = prompt.tolist()
        if streamer is not None:
            streamer.put(prompt.unsqueeze(0).cpu())
        token = self.pick(self.prefill(prompt, kv), seed, 0)
        layer, checks = self.num_layers - 1, []
        eos = set(self.settings.eos_token_ids)
        while True:
            result.tokens.append(token)
            result.exit_layers.append(layer)
            result.checks.append(checks)
            self.seen.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos or len(result.tokens) >= self.settings.max_new_tokens:
                break
            if self.stop is not None and bool(self.stop(torch.tensor([self.seen]), None)[0]):
                break
            position = prompt.shape[0] + len(result.tokens) - 1
            token, layer, checks = self.decode_token(token, position, kv, seed, len(result.tokens))
        if streamer is not None:
            streamer.end()
        return result


@torch.no_grad()
def generate_reference(
    model: EarlyExitModel,
    prompts: list[torch.Tensor],
    settings: DecodeSettings,
    thresholds: list[float],
    seeds: list[int] | None = None,
    streamer: Any = None,
    tokenizer: Any = None,
) -> list[RequestResult]:
    """Decode each prompt alone with the reference decoder; `seeds` give each its own draws;
    `tokenizer`: for `settings.stop_strings`."""
    decoder = ReferenceDecoder(model, settings, thresholds, tokenizer)
    return [
        decoder.decode(prompt, int(seeds[i]) if seeds is not None else 0, streamer) for i, prompt in enumerate(prompts)
    ]
