"""Tokens to text as they arrive: incremental detokenisation and OpenAI stop sequences.

The route feeds each token the engine thread relays into a `TextStream` and sends what `push`
returns; a stop sequence ends the text before it (OpenAI's semantics), so up to its length - 1
characters are held back until they can no longer start one.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class TextStream:
    """The decoded text of one request's tokens, released in pieces that never change later."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (all tokens)
        self.sent = 0  # characters of `text` released
        self.stopped = False  # a stop sequence was found; nothing more is released
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        """Add a token; returns the newly released text ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.text = text
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == REPLACEMENT:  # an incomplete character: wait for more
            end -= 1
        return self._release(end)

    def finish(self) -> str:
        """The rest of the text once the request has ended (nothing after a stop sequence)."""
        if self.stopped:
            return ""
        return self._release(len(self.text))

    def _stop_at(self) -> int | None:
        """Where the earliest stop sequence in the unreleased text starts."""
        if not self.stop:
            return None
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece


class ByteTokenizer:
    """A tokenizer for synthetic models: token i < 256 is byte i (UTF-8), larger ids decode to nothing."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")
