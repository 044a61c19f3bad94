"""Drafts from a request's own text: prompt lookup, as an incremental n-gram index per row.

A row's text (prompt, then every token it emitted) is indexed by its n-grams, n in
`min_n..max_n`, each mapped to the position just after its latest occurrence. A draft is what
followed the latest earlier occurrence of the row's longest matching suffix (longest n first),
up to k tokens. The index grows by `max_n - min_n + 1` dictionary writes per token, so drafting
costs the host a few microseconds per row per round and the device nothing. Verification is
unchanged, so what a row emits does not depend on its drafts (greedy: full depth's tokens;
sampling: the standard acceptance rule with the draft as a one-point proposal).

HF's `prompt_lookup_num_tokens` (one request at a time) and vLLM's `ngram` method draft the same
way; this one runs per row inside the batched engine. A row whose text has no match can draft from
`CorpusIndex`, an n-gram table of the model's own answers shipped with its heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
        return self.lookup(k)[1]

    def lookup(self, k: int) -> tuple[int, list[int]]:
        """`draft(k)` and the length of the suffix it matched (0 with no draft)."""
        text, end = self.tokens, len(self.tokens)
        if k < 1:
            return 0, []
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._after.get(tuple(text[end - n :]))
            if start is not None:
                return n, text[start : start + k]
        return 0, []


class CorpusIndex:
    """An n-gram table of the model's own answers (`draft_corpus.safetensors` in a heads folder):
    for each context of `min_n..max_n` tokens, its most frequent next token. `draft(text, k)` extends
    the text greedily, longest context first, while the next token was seen at least `min_count`
    times after that context: drafts for a row whose own text has no match. It is fixed, so a row's
    drafts (and, sampling, its tokens) still depend on its own text only."""

    def __init__(
        self, sequences: Iterable[Iterable[int]], *, min_n: int = 1, max_n: int = MAX_NGRAM, min_count: int = 2
    ) -> None:
        check_ngram_sizes(min_n, max_n)
        self.min_n, self.max_n, self.min_count = min_n, max_n, min_count
        counts: dict[tuple[int, ...], dict[int, int]] = {}
        self.tokens = 0
        for sequence in sequences:
            seq = [int(t) for t in sequence]
            self.tokens += len(seq)
            for n in range(min_n, max_n + 1):
                for end in range(n, len(seq)):
                    after = counts.setdefault(tuple(seq[end - n : end]), {})
                    after[seq[end]] = after.get(seq[end], 0) + 1
        self._next = {}
        for context, after in counts.items():
            token, count = max(after.items(), key=lambda item: (item[1], -item[0]))
            if count >= min_count:
                self._next[context] = token

    def __len__(self) -> int:
        return len(self._next)

    def draft(self, text: list[int], k: int) -> list[int]:
        out: list[int] = []
        tail = list(text[-self.max_n :])
        for _ in range(k):
            token = None
            for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
                token = self._next.get(tuple(tail[len(tail) - n :]))
                if token is not None:
                    break
            if token is None:
                break
            out.append(token)
            tail = (tail + [token])[-self.max_n :]
        return out


DRAFT_CORPUS_NAME = "draft_corpus.safetensors"  # beside the heads: the model's own answers, token ids


def write_draft_corpus(path: Any, sequences: list[list[int]]) -> None:
    """Save answers as two int32 tensors (`tokens`, all of them end to end, and `lengths`), atomically."""
    import os

    import torch
    from safetensors.torch import save_file

    flat = [int(t) for seq in sequences for t in seq]
    tensors = {"tokens": torch.tensor(flat, dtype=torch.int32),
               "lengths": torch.tensor([len(seq) for seq in sequences], dtype=torch.int32)}  # fmt: skip
    partial = f"{path}.partial"
    save_file(tensors, partial)
    os.replace(partial, path)


def read_draft_corpus(path: Any) -> CorpusIndex:
    """A `CorpusIndex` of the answers in `path`; a malformed file is refused, naming it."""
    return CorpusIndex(read_corpus_answers(path))


def read_corpus_answers(path: Any) -> list[list[int]]:
    """The answers saved in `path` (`write_draft_corpus`); a malformed file is refused, naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        tokens, lengths = tensors["tokens"].tolist(), tensors["lengths"].tolist()
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise GenerationInputError(f"cannot read the draft corpus {path}: {err}") from None
    if sum(lengths) != len(tokens) or any(n < 0 for n in lengths):
        raise GenerationInputError(f"the draft corpus {path} is malformed: its lengths do not add up to its tokens")
    sequences, start = [], 0
    for n in lengths:
        sequences.append(tokens[start : start + n])
        start += n
    return sequences


def check_ngram_sizes(min_n: object, max_n: object) -> None:
    """Refuse n-gram sizes that are not integers with 1 <= min_n <= max_n, naming them."""
    for name, value in (("ngram_min", min_n), ("ngram_max", max_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenerationInputError(f"{name} must be an integer >= 1, got {value!r}")
    if min_n > max_n:  # type: ignore[operator]
        raise GenerationInputError(f"ngram_min ({min_n}) must not exceed ngram_max ({max_n})")


__all__ = [
    "DRAFT_CORPUS_NAME",
    "MAX_NGRAM",
    "MIN_NGRAM",
    "CorpusIndex",
    "NgramIndex",
    "check_ngram_sizes",
    "read_corpus_answers",
    "read_draft_corpus",
    "write_draft_corpus",
]
