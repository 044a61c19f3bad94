"""HF's logits processors and stop strings in the engine, each row seeing only its own tokens.

`RowProcessors` applies transformers' own processors (repetition penalty, no-repeat n-gram, bad
words, min new tokens) to a bucket of rows at once, on the device: the executor keeps every slot's
token history (prompt + emitted tokens) and hands each row's window right-aligned at its own length,
the positions before its first token holding an id outside the vocabulary that no processor
matches or penalises. So a row's processed scores equal what the processor gives that row alone —
what the reference decoder computes with `DecodeSettings.logits_processors` — whatever its
neighbours. Stop strings are HF's `StopStringCriteria`, checked on the host after each emitted token.
"""

from __future__ import annotations

from typing import Any

import torch

from drex_hf.errors import GenerationInputError
from drex_hf.generation.settings import DecodeSettings


class RowProcessors:
    """The processors `settings` asks for, applied per row of a batch; `vocab_size`: the lm_head's
    output size (scores' width). See the module docstring."""

    def __init__(self, settings: DecodeSettings, vocab_size: int, device: torch.device | str = "cpu") -> None:
        from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

        check_bad_words(settings, vocab_size)
        # the reference decoder's processors, in HF's order, built in one place (`DecodeSettings`):
        # the ones that read the tokens see a window of each row's history; min_new_tokens decides on
        # the number of tokens generated, which differs between rows: HF's processor (told the prompt
        # is empty) gives the held-back scores, each row takes them while its own count is short
        processors = list(settings.logits_processors(0, device))
        self.windowed: list[Any] = [p for p in processors if not isinstance(p, MinNewTokensLengthLogitsProcessor)]
        self.hold_back = next((p for p in processors if isinstance(p, MinNewTokensLengthLogitsProcessor)), None)
        self.min_new = settings.min_new_tokens if self.hold_back is not None else 0
        self.outside = vocab_size  # the id of positions before a row's first token: in no vocabulary

    def window(self, history: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's tokens `history[slot, :length]`, right-aligned in `[n, width]`, the positions
        before them holding `outside` (no host data: the width is the history's)."""
        rows = history.index_select(0, slots)
        width = rows.shape[1]
        at = lengths.unsqueeze(1) - width + torch.arange(width, device=rows.device)
        return torch.where(at >= 0, rows.gather(1, at.clamp(min=0)), self.outside)

    def __call__(self, scores: torch.Tensor, window: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Processed float32 `scores [n, vocab]` for rows with token windows `window [n, width]` (see
        `window`) that have generated `generated [n]` tokens so far."""
        for processor in self.windowed:
            scores = processor(window, scores)
        if self.hold_back is not None:
            held = self.hold_back(window[:, :0], scores)
            scores = torch.where((generated < self.min_new).unsqueeze(1), held, scores)
        return scores


def check_bad_words(settings: DecodeSettings, vocab_size: int) -> None:
    """Refuse bad_words_ids outside the model's vocabulary (HF would fail in the middle of decoding),
    and a list that bans nothing: HF drops a lone eos id from it (min_new_tokens holds eos back)."""
    words = settings.bad_words_ids
    if words and all(len(w) == 1 and w[0] in settings.eos_token_ids for w in words):
        raise GenerationInputError(
            f"bad_words_ids={[list(w) for w in words]} only names end-of-sequence ids, which HF never bans; "
            f"use min_new_tokens to hold eos back"
        )
    for word in words:
        if max(word) >= vocab_size:
            raise GenerationInputError(
                f"bad_words_ids holds token id {max(word)} (in {list(word)}), outside the model's vocabulary "
                f"0..{vocab_size - 1}"
            )


def stop_criterion(settings: DecodeSettings, tokenizer: Any) -> Any:
    """HF's `StopStringCriteria` for `settings.stop_strings` (None when there are none); like HF's
    `generate`, it needs the tokenizer (`generate(..., tokenizer=tokenizer)`)."""
    if not settings.stop_strings:
        return None
    if tokenizer is None:
        raise GenerationInputError(
            f"stop_strings={list(settings.stop_strings)!r} needs the model's tokenizer to match text: pass "
            f"generate(..., tokenizer=tokenizer)"
        )
    from transformers import PreTrainedTokenizerBase
    from transformers.generation.stopping_criteria import StopStringCriteria

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise GenerationInputError(
            f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}"
        )
    try:
        return StopStringCriteria(tokenizer=tokenizer, stop_strings=list(settings.stop_strings))
    except ValueError as err:  # its vocabulary scan failed (it probes the tokenizer with a sample text)
        raise GenerationInputError(
            f"stop_strings cannot be matched with this tokenizer ({type(tokenizer).__name__}): transformers' "
            f"StopStringCriteria failed: {err}"
        ) from None


def stops(criterion: Any, tokens: list[int]) -> bool:
    """Whether `criterion` (a `StopStringCriteria`) ends a row whose tokens (prompt + generated) are
    `tokens`: a stop string ends at its last token. Only the tail it can match is passed."""
    tail = tokens[-criterion.maximum_token_len :]
    return bool(criterion(torch.tensor([tail], dtype=torch.long), None)[0])
