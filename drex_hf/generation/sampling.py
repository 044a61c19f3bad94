"""Token picking without host state: greedy argmax, or a sample from counter-based randomness.

A request's uniform for its token i is a hash of (its seed, i): nothing is carried from one draw to
the next, so the draw is the same whatever the batch, whatever the order steps ran in, on the CPU
and on a GPU, and inside a captured CUDA graph (all of it is integer arithmetic on the device).
Sampling warps the scores as HF's logits warpers do (temperature, top-k, top-p: the same results,
written without host-side scalars so that they can be captured), then inverts the float64
cumulative distribution at the uniform — for all rows at once. The reference decoder draws the same way, so
it stays the oracle. `host_uniform` is the same hash in plain Python, for host-side draws (trace
exits). A seed is an integer in [0, 2**64): the 64 bits the device holds (`check_seed`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drex_hf.errors import GenerationInputError, GenerationTypeError

MASK32 = 0xFFFFFFFF
# A 32-bit integer hash (xorshift-multiply, constants from Wellons' hash prospector, both < 2**31 so
# that every product of a 32-bit value fits in a signed 64-bit integer: no overflow on any device).
_SHIFTS = (15, 12, 15)
_MULTIPLIERS = (0x2C1B3C6D, 0x297A2D39)
_GOLDEN = 0x9E3779B9
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty / frequency_penalty
SAMPLING_FIELDS = ("temperature", "cut", "top_k", "presence_penalty", "frequency_penalty")  # `RequestSampling.row`


def _mix(x: Any) -> Any:
    """The hash on int64 tensors or Python ints holding values in [0, 2**32)."""
    x = x ^ (x >> _SHIFTS[0])
    x = (x * _MULTIPLIERS[0]) & MASK32
    x = x ^ (x >> _SHIFTS[1])
    x = (x * _MULTIPLIERS[1]) & MASK32
    return x ^ (x >> _SHIFTS[2])


def _bits(seed: Any, counter: Any) -> tuple[Any, Any]:
    """Two independent 32-bit words from (seed, counter); works on tensors and on Python ints."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    key = _mix(lo ^ _mix(hi ^ _GOLDEN))
    first = _mix(key ^ _mix((counter & MASK32) ^ _GOLDEN))
    return first, _mix(first ^ key ^ _GOLDEN)


def as_seed(seed: int) -> int:
    """An integer seed as the signed 64-bit value the device holds (its low 64 bits: derived seeds
    such as an exit distribution's seed + request id may pass 2**64 and wrap)."""
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in [0, 1) per row, 53 random bits, from int64 `seeds` and `counters`."""
    first, second = _bits(seeds, counters)
    return ((first >> 5) * 2**26 + (second >> 6)).double() * 2.0**-53


def host_uniform(seed: int, counter: int) -> float:
    """The uniform `uniforms` gives for (seed, counter), computed in plain Python."""
    first, second = _bits(as_seed(seed), int(counter))
    return ((first >> 5) * 2**26 + (second >> 6)) * 2.0**-53


def host_uniforms(seeds: list[int], counters: list[int]) -> np.ndarray:
    """`host_uniform` for many (seed, counter) pairs at once, on the host (numpy int64 arithmetic)."""
    first, second = _bits(np.array([as_seed(s) for s in seeds], dtype=np.int64), np.array(counters, dtype=np.int64))
    return ((first >> 5) * 2**26 + (second >> 6)).astype(np.float64) * 2.0**-53


def sample_rows(scores: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One token per row of warped `scores [n, vocab]` (float32, -inf where excluded), drawn by
    inverting each row's cumulative distribution at its uniform: the first token whose cumulative
    probability exceeds it, so a token of probability 0 is never drawn."""
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    point = torch.minimum(uniforms(seeds, counters).unsqueeze(1) * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


class Temperature:
    """HF's `TemperatureLogitsWarper`: scores / temperature."""

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """HF's `TopKLogitsWarper`: scores below the k-th largest of their row become -inf."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        self.top_k = max(int(top_k), min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1:]
        return scores.masked_fill(scores < kth, -math.inf)


class TopP:
    """HF's `TopPLogitsWarper`: the smallest set of most likely tokens whose probability reaches
    top_p is kept (at least `min_tokens_to_keep`), the rest become -inf. HF marks the kept tail by
    assigning a Python 0 into the mask (a tensor made from host data); here a comparison does it."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        self.top_p = float(top_p)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        vocab = scores.shape[-1]
        tail = torch.arange(vocab, device=scores.device) >= vocab - self.min_tokens_to_keep
        remove_sorted = (cumulative <= (1 - self.top_p)) & ~tail
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return scores.masked_fill(remove, -math.inf)


def pick_tokens(
    logits: torch.Tensor,
    do_sample: bool,
    warpers: list[Any],
    seeds: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens `[n]` (int64, on the logits' device) for `logits [n, vocab]`: greedy argmax, or a sample
    through the warpers (`DecodeSettings.warpers()`) with each row's (seed, token index) draw."""
    scores = logits.float()
    if not do_sample:
        return scores.argmax(dim=-1)
    for warper in warpers:
        scores = warper(scores)
    return sample_rows(scores, seeds, counters)


@dataclass(frozen=True)
class RequestSampling:
    """One request's own sampling parameters, for an engine built with `per_request_sampling=True`
    (a server, where each request names its own): `temperature` 0 is greedy (as OpenAI's API), else
    HF's warpers in HF's order — temperature, top-k (0: off), top-p (1.0: off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise GenerationTypeError(f"{name} must be a number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise GenerationTypeError(f"top_k must be an integer, got {self.top_k!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationInputError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 2**24:
            raise GenerationInputError(f"top_k must be in [0, 2**24) (0: off), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise GenerationInputError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")

    @classmethod
    def from_settings(cls, settings: Any) -> RequestSampling:
        """What engine-wide `DecodeSettings` ask for, as one request's parameters (greedy unless they sample)."""
        return cls(temperature=settings.temperature if settings.do_sample else 0.0, top_p=settings.top_p or 1.0,
                   top_k=settings.top_k or 0)  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def row(self) -> list[float]:
        """The row the picker reads (`SAMPLING_FIELDS`): temperature, 1 - top_p (computed in double,
        as HF's TopP compares with it), top_k — float32 on the device (exact for these values) — then
        the presence and frequency penalties."""
        return [float(self.temperature), 1.0 - float(self.top_p), float(self.top_k),
                float(self.presence_penalty), float(self.frequency_penalty)]  # fmt: skip


def penalise_rows(scores: torch.Tensor, params: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, per row: `scores [n, vocab] - frequency * count -
    presence * (count > 0)`, where `counts [n, vocab]` are how often each token occurs among the
    row's generated tokens (not its prompt), on the logits before temperature, as OpenAI documents
    them. A row with both penalties 0 keeps its scores bit for bit."""
    presence, frequency = params[:, 3:4].float(), params[:, 4:5].float()
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def warp_rows(scores: torch.Tensor, params: torch.Tensor, skip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(warped float32 scores, greedy `[n]`) for `scores [n, vocab]` with each row's own parameters
    `params [n, 5]` (`RequestSampling.row()`): temperature, top-k and top-p as `Temperature`, `TopK`
    and `TopP` warp, with a per-row value where those take one scalar (a greedy row, temperature 0,
    is scaled by 1; its warped scores are not meant to be drawn from). `skip`: leave out a warp no row
    asks for (top-k 0 masks nothing; top-p 1.0 masks only tokens of probability 0, which no draw can
    pick) — it reads the parameters on the host, so only where that is free (an eager CPU engine)."""
    scores = scores.float()
    temperature, cut, top_k = params[:, :3].float().unbind(1)
    greedy = temperature == 0
    scaled = scores / temperature.masked_fill(greedy, 1.0).unsqueeze(1)
    vocab = scores.shape[-1]
    if not skip or bool((top_k > 0).any()):
        k = top_k.long().masked_fill(top_k <= 0, vocab).clamp(max=vocab)
        kth = torch.sort(scaled, dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if skip and not bool((cut > 0).any()):
        return scaled, greedy
    sorted_logits, sorted_indices = torch.sort(scaled, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    tail = torch.arange(vocab, device=scores.device) >= vocab - 1
    remove_sorted = (cumulative <= cut.unsqueeze(1)) & ~tail
    return scaled.masked_fill(remove_sorted.scatter(1, sorted_indices, remove_sorted), -math.inf), greedy


def pick_rows(
    scores: torch.Tensor, params: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, skip: bool = False
) -> torch.Tensor:
    """`pick_tokens` with each row's own parameters `params [n, 5]` (`RequestSampling.row()`): a
    greedy row (temperature 0) takes its argmax; the others are warped by `warp_rows`, then drawn by
    `sample_rows`. With a row's top-k off and top-p 1.0 the warps change nothing a draw can see
    (top-p 1.0 removes only tokens of probability 0), so a row draws what the engine-wide warpers
    give it (tested on the CPU, where a float32 division by a scalar and by a tensor agree bit for
    bit). `skip`: as `warp_rows`'s, and no draw at all when every row is greedy."""
    scores = scores.float()
    if skip and bool((params[:, 0] == 0).all()):
        return scores.argmax(dim=-1)
    scaled, greedy = warp_rows(scores, params, skip)
    return torch.where(greedy, scores.argmax(dim=-1), sample_rows(scaled, seeds, counters))
