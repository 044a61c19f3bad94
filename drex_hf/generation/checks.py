"""Checks of what a request brings, shared by the engines: its prompt and budget, the special tokens.

Each refuses bad input before any work, naming what is wrong.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from drex_hf.errors import GenerationInputError
from drex_hf.generation.settings import DecodeSettings


def check_request(prompt: Any, max_new_tokens: Any, arch: Any, max_len: int) -> tuple[torch.Tensor, int]:
    """A request's prompt as 1-D int64 token ids and its max_new_tokens, checked before any work: an
    empty prompt, ids outside the vocabulary, a prompt + max_new_tokens longer than a slot of
    `max_len` positions (`arch`: the model's adapter) are refused, naming what is wrong."""
    ids = torch.as_tensor(prompt)
    if ids.dim() != 1:
        raise GenerationInputError(f"a prompt is one sequence of token ids (1-D), got shape {tuple(ids.shape)}")
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise GenerationInputError(f"a prompt holds integer token ids, got dtype {ids.dtype}")
    ids = ids.to(dtype=torch.long)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new = int(max_new_tokens)
    if ids.numel() == 0:
        raise GenerationInputError("empty prompt: a request needs at least one token")
    vocab = arch.input_vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise GenerationInputError(f"the prompt holds token ids outside the model's vocabulary 0..{vocab - 1}")
    if max_new < 1:
        raise GenerationInputError(f"max_new_tokens must be positive, got {max_new}")
    needed = ids.numel() + max_new - 1  # the last token is never fed back
    if needed > max_len:
        why = f"max_len={max_len}"
        if max_len == arch.position_limit:
            why += " (the model's own position limit)"
        raise GenerationInputError(
            f"the prompt has {ids.numel()} tokens; with max_new_tokens={max_new} it needs {needed} cache "
            f"positions but a slot holds {why}"
        )
    return ids, max_new


def check_special_tokens(settings: DecodeSettings, vocab_size: int) -> None:
    """Refuse eos / pad ids the model cannot emit: an eos outside the vocabulary would never end a
    row, a pad outside it would fill the output with ids no tokenizer decodes."""
    named = [("eos_token_id", e) for e in settings.eos_token_ids] + [("pad_token_id", settings.pad_token_id)]
    for name, value in named:
        if not 0 <= value < vocab_size:
            raise GenerationInputError(
                f"{name} {value} is outside the model's vocabulary 0..{vocab_size - 1} (given to generate(), or "
                f"else the model's generation_config holds it): pass {name}= with an id in the vocabulary"
            )
