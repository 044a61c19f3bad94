"""Drafts from a request's own text: prompt lookup, as an incremental n-gram index per row.

A row's text (prompt, then every token it emitted) is indexed by its n-grams, n in
`min_n..max_n`, each mapped to the position just after its latest occurrence. A draft is what
followed the latest earlier occurrence of the row's longest matching suffix (longest n first),
up to k tokens. The index grows by `max_n - min_n + 1` dictionary writes per token, so drafting
costs the host a few microseconds per row per round and the device nothing. Verification is
unchanged, so what a row emits does not depend on its drafts (greedy: full depth's tokens;
sampling: the standard acceptance rule with the draft as a one-point proposal).

HF's `prompt_lookup_num_tokens` (one request at a time) and vLLM's `ngram` method draft the same
way; this one runs per row inside the batched engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from drex_hf.errors import GenerationInputError

MAX_NGRAM = 3  # the longest suffix matched first (HF's prompt lookup matches up to 2 by default)
MIN_NGRAM = 1


class NgramIndex:
    """One row's text and its n-gram index; `draft(k)` proposes up to k tokens."""

    __slots__ = ("tokens", "min_n", "max_n", "_after")

    def __init__(self, tokens: Iterable[int] = (), *, min_n: int = MIN_NGRAM, max_n: int = MAX_NGRAM) -> None:
        check_ngram_sizes(min_n, max_n)
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add one token. The n-grams ending at the previous last token are indexed now, so a lookup
        of the current suffix never finds the suffix itself."""
        text, end = self.tokens, len(self.tokens)
        for n in range(self.min_n, min(self.max_n, end) + 1):
            self._after[tuple(text[end - n : end])] = end
        text.append(int(token))

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        `min_n..max_n` tokens that occurred before; [] when none did (or k < 1)."""
        text, end = self.tokens, len(self.tokens)
        if k < 1:
            return []
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._after.get(tuple(text[end - n :]))
            if start is not None:
                return text[start : start + k]
        return []


def check_ngram_sizes(min_n: object, max_n: object) -> None:
    """Refuse n-gram sizes that are not integers with 1 <= min_n <= max_n, naming them."""
    for name, value in (("ngram_min", min_n), ("ngram_max", max_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenerationInputError(f"{name} must be an integer >= 1, got {value!r}")
    if min_n > max_n:  # type: ignore[operator]
        raise GenerationInputError(f"ngram_min ({min_n}) must not exceed ngram_max ({max_n})")


__all__ = ["MAX_NGRAM", "MIN_NGRAM", "NgramIndex", "check_ngram_sizes"]
