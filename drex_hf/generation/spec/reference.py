"""The reference self-speculative decoder: one request at a time, plain torch, obviously right.

The exit head at `draft_exit` drafts up to k tokens (layers 0..draft_exit run for the drafted
positions, so their keys/values there are exact); one verify pass runs the drafted positions through
the remaining layers (the last draft through all of them); the longest prefix on which the draft
agrees with full depth is kept, plus one token from full depth, and the rejected positions' keys/values
are dropped by shortening the request's cache. Greedy output equals full depth's token for token.
The batched engine path (`policy="self_spec"`, issue 19) is to be tested against it.

Sampling follows the standard speculative rule: a draft x drawn from the draft head's (warped)
distribution q is accepted with probability min(1, p(x)/q(x)), p being full depth's (warped)
distribution; on rejection the token is drawn from norm(max(0, p - q)); a token that is not drafted
(the one after an all-accepted draft, or when the draft window is empty) is drawn from p. Every
uniform is counter based (`sampling.uniforms`): keyed by the request's seed and a counter made of the
token's index i in the request's output and a fixed sub-stream (`spec_counter`):

* `FULL` (counter i): a draw from p, or from the residual after a rejection; it is exactly the draw
  the full-depth reference decoder makes for token i, so token 0 (from the prefill) and any
  undrafted token given the same prefix are what full-depth sampling gives;
* `DRAFT` (i + 2**30): the draft head's draw for token i;
* `ACCEPT` (i + 2**31): the acceptance test of the draft for token i.

Token i is fixed in the verify round that drafts it or takes it from full depth, and it is a function
of its prefix and of the uniforms of index i only (a discarded draft after a rejection used a uniform
of a later index, which is drawn afresh — same value, new context — when that index is drafted again;
nothing that decided the prefix saw it). So given its prefix each token is distributed as full
depth's, the output does not depend on the batch or on the order of work, and a seed reproduces it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.reference import ReferenceDecoder, RequestKV
from drex_hf.generation.sampling import host_uniform
from drex_hf.generation.settings import DecodeSettings

if TYPE_CHECKING:
    from drex_hf.generation.protocol import EarlyExitModel

# sub-streams of a request's counter-based uniforms (see the module docstring)
FULL, DRAFT, ACCEPT = 0, 1, 2
_STREAM_SHIFT = 30  # token indices stay below 2**30; `uniforms` reads a counter's low 32 bits


def spec_counter(index: int, stream: int) -> int:
    """The counter of token `index`'s uniform in sub-stream `stream` (FULL, DRAFT or ACCEPT)."""
    if not 0 <= index < 2**_STREAM_SHIFT:
        raise GenerationInputError(f"token index must be in [0, 2**{_STREAM_SHIFT}), got {index}")
    return index + (stream << _STREAM_SHIFT)


@dataclass
class SpecOutput:
    """One request's result. `tokens[0]` comes from the prefill; then each verify round r drafted
    `drafted[r]` tokens, accepted `accepted[r]` of them, emitted `accepted[r] + 1` tokens (fewer when
    the request ended inside the round: eos or max_new_tokens) and ran `layers[r]` layer evaluations
    (one layer on one position)."""

    tokens: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0.0 when nothing was drafted)."""
        total = sum(self.drafted)
        return sum(self.accepted) / total if total else 0.0

    @property
    def layers_per_token(self) -> float:
        """Layer evaluations per decoded token (tokens after the prefill's); full depth runs L."""
        decoded = len(self.tokens) - 1
        return sum(self.layers) / decoded if decoded else 0.0


def truncate(kv: RequestKV, length: int) -> None:
    """Keep the first `length` positions of every layer of `kv` (drops rejected drafts)."""
    for index, keys in enumerate(kv.keys):
        if keys is not None:
            kv.keys[index] = keys[..., :length, :]
            kv.values[index] = kv.values[index][..., :length, :]


class SelfSpecDecoder(ReferenceDecoder):
    """Decodes one request by self-speculation; see the module docstring."""

    def __init__(
        self,
        model: EarlyExitModel,
        settings: DecodeSettings,
        draft_exit: int,
        draft_tokens: int,
        draft_confidence: float | None = None,
        choose_k: Callable[[SpecOutput], int] | None = None,
    ) -> None:
        check_spec_arguments(model, settings, draft_exit, draft_tokens)
        super().__init__(model, settings, [float("inf")] * len(model.exit_layers))
        self.draft_exit = draft_exit
        self.head = model.heads[model.exit_layers.index(draft_exit)]
        self.k = draft_tokens
        self.draft_confidence = draft_confidence  # stop at a draft the head is less sure of (not proposed)
        self.choose_k = choose_k  # each round's k from the request's output so far (adaptive drafting)

    # ------------------------------------------------------------------ draws
    def warped(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped probabilities (float64, summing to 1) of `logits [vocab]`."""
        scores = logits.reshape(1, -1).float()
        for warper in self.warpers:
            scores = warper(scores)
        probs = torch.softmax(scores, dim=-1).double()[0]
        return probs / probs.sum()

    def draw(self, logits: torch.Tensor, seed: int, index: int, stream: int) -> int:
        """The reference decoder's pick on `logits [vocab]` with the uniform of (seed, token index,
        stream) (no processors: `check_spec_arguments` refuses them)."""
        return self.pick(logits, seed, spec_counter(index, stream))

    def verify_token(
        self, draft: int, draft_logits: torch.Tensor, full_logits: torch.Tensor, seed: int, index: int
    ) -> tuple[bool, int]:
        """(accepted?, token) for the draft of token `index`: greedy, whether full depth's argmax is it;
        sampling, the speculative acceptance test and on rejection a draw from the residual."""
        if not self.settings.do_sample:
            token = int(full_logits.float().argmax())
            return token == draft, token
        p, q = self.warped(full_logits), self.warped(draft_logits)
        if host_uniform(seed, spec_counter(index, ACCEPT)) * float(q[draft]) < float(p[draft]):
            return True, draft
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: a rejection has probability 0; never divide by 0
            residual = p
        cdf = (residual / residual.sum()).cumsum(0)
        point = min(host_uniform(seed, spec_counter(index, FULL)), float(cdf[-1]) * (1 - 2**-52))
        return False, int(torch.searchsorted(cdf, torch.tensor([point], dtype=cdf.dtype), right=True)[0])

    # ------------------------------------------------------------------ one round
    def draft(
        self, token: int, position: int, room: int, kv: RequestKV, seed: int, index: int, k: int
    ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor], int]:
        """Draft up to min(k, room) tokens after `token` (at `position`, the request's token `index`),
        stopping before a draft whose head confidence is below `draft_confidence`. Returns (drafts,
        their draft logits, the exit hidden states of the inputs run, layers run): one state more than
        drafts after a confidence stop (the unproposed draft's input has run)."""
        drafts: list[int] = []
        logits: list[torch.Tensor] = []
        states: list[torch.Tensor] = []
        eos = set(self.settings.eos_token_ids)
        current = token
        while len(drafts) < min(k, room) and current not in eos:
            hidden = self.exit_state(current, position + len(drafts), kv)
            states.append(hidden)
            draft_logits = self.head.logits(hidden)[0, -1]
            current = self.draw(draft_logits, seed, index + len(drafts), DRAFT)
            if self.draft_confidence is not None:
                confidence = float(torch.softmax(draft_logits.float(), dim=-1).max())
                if confidence < self.draft_confidence:
                    break
            logits.append(draft_logits)
            drafts.append(current)
        return drafts, logits, states, len(states) * (self.draft_exit + 1)

    def exit_state(self, token: int, position: int, kv: RequestKV) -> torch.Tensor:
        """`token` at `position` through layers 0..draft_exit (appending their K/V): `[1, 1, hidden]`."""
        device = self.model.heads_device
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[position]], device=device)
        hidden = self.arch.embed(ids, positions)
        rotary = self.arch.position_embeddings(hidden, positions)
        return self.run_layers(hidden, range(self.draft_exit + 1), positions, rotary, kv)

    def deep_logits(self, states: list[torch.Tensor], position: int, kv: RequestKV) -> torch.Tensor:
        """The verify pass: positions position.. (their exit states `states`) through the remaining
        layers at once; full depth's logits `[len(states), vocab]`."""
        hidden = torch.cat(states, dim=1)
        positions = torch.arange(position, position + hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.arch.position_embeddings(hidden, positions)
        hidden = self.run_layers(hidden, range(self.draft_exit + 1, self.num_layers), positions, rotary, kv)
        return self.final_logits(hidden)[0]

    # ------------------------------------------------------------------ one request
    def decode_spec(self, prompt: torch.Tensor, seed: int = 0) -> SpecOutput:
        kv = RequestKV(self.num_layers)
        out = SpecOutput()
        self.processors, self.seen = None, prompt.tolist()
        out.tokens.append(self.draw(self.prefill(prompt, kv)[0], seed, 0, FULL))
        eos = set(self.settings.eos_token_ids)
        budget = self.settings.max_new_tokens
        while out.tokens[-1] not in eos and len(out.tokens) < budget:
            index = len(out.tokens)  # the number of the first token this round decides
            position = prompt.shape[0] + index - 1  # of the pending token, whose K/V is not yet stored
            room = budget - index - 1  # drafts beyond it could not be emitted with their bonus token
            k = self.k if self.choose_k is None else self.choose_k(out)
            drafts, draft_logits, states, layers = self.draft(out.tokens[-1], position, room, kv, seed, index, k)
            if len(states) == len(drafts):  # the last input (the last draft, or the pending token) has run no layer
                last = drafts[-1] if drafts else out.tokens[-1]
                states.append(self.exit_state(last, position + len(drafts), kv))
                layers += self.draft_exit + 1
            full = self.deep_logits(states, position, kv)
            layers += len(states) * (self.num_layers - 1 - self.draft_exit)
            accepted = 0
            for j, draft in enumerate(drafts):
                ok, token = self.verify_token(draft, draft_logits[j], full[j], seed, index + j)
                out.tokens.append(token)
                if not ok:
                    break
                accepted += 1
                if token in eos:
                    break
            else:  # every draft accepted (or none made): one more token from full depth
                out.tokens.append(self.draw(full[len(drafts)], seed, index + len(drafts), FULL))
            out.drafted.append(len(drafts))
            out.accepted.append(accepted)
            out.layers.append(layers)
            truncate(kv, prompt.shape[0] + len(out.tokens) - 1)  # rejected positions' K/V go
        return out


def check_spec_arguments(model: EarlyExitModel, settings: DecodeSettings, draft_exit: int, draft_tokens: int) -> None:
    """Refuse what the self-speculative decoder does not take, naming the argument."""
    for name, value in (("draft_exit", draft_exit), ("draft_tokens", draft_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise GenerationTypeError(f"{name} must be an integer, got {value!r}")
    if draft_exit not in model.exit_layers:
        raise GenerationInputError(
            f"draft_exit must be one of the model's exit layers {model.exit_layers}, got {draft_exit}"
        )
    if draft_tokens < 1:
        raise GenerationInputError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if settings.has_logits_processors or settings.stop_strings:
        raise GenerationInputError(
            "self-speculative decoding does not take logits processors or stop strings yet "
            "(repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, stop_strings)"
        )


@torch.no_grad()
def generate_self_spec(
    model: EarlyExitModel,
    prompts: list[torch.Tensor],
    settings: DecodeSettings,
    draft_exit: int,
    draft_tokens: int,
    seeds: list[int] | None = None,
    draft_confidence: float | None = None,
    choose_k: Callable[[SpecOutput], int] | None = None,
) -> list[SpecOutput]:
    """Decode each prompt (1-D token tensor) alone by self-speculation: drafts of up to `draft_tokens`
    tokens from the exit head after layer `draft_exit`, verified at full depth; `seeds` give each
    request its own draws (default 0)."""
    if seeds is not None and len(seeds) != len(prompts):
        raise GenerationInputError(f"seeds must give one seed per prompt ({len(prompts)}), got {len(seeds)}")
    decoder = SelfSpecDecoder(model, settings, draft_exit, draft_tokens, draft_confidence, choose_k)
    return [decoder.decode_spec(prompt, int(seeds[i]) if seeds is not None else 0) for i, prompt in enumerate(prompts)]
