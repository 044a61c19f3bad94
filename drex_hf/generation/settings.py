"""Decoding settings for `generate()`: HF's arguments, merged and checked once.

`resolve_settings` takes a `GenerationConfig` (the model's own by default) plus explicit keyword
overrides, exactly as HF's `generate` does for the arguments drex_hf supports, and returns a plain
`DecodeSettings`. Unknown arguments are an error naming them, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from drex_hf.errors import GenerationInputError

SUPPORTED_GENERATE_KWARGS = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
)


@dataclass
class DecodeSettings:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def warpers(self) -> list[Any]:
        """HF's own logits warpers, in HF's order (temperature, top-k, top-p)."""
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if not self.do_sample:
            return []
        out: list[Any] = []
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        return out


def resolve_settings(generation_config: Any, prompt_length: int, overrides: dict[str, Any]) -> DecodeSettings:
    """Merge `overrides` into `generation_config` and return checked `DecodeSettings`."""
    unknown = sorted(set(overrides) - set(SUPPORTED_GENERATE_KWARGS))
    if unknown:
        raise GenerationInputError(
            f"generate() got unsupported argument(s) {unknown}; drex_hf supports "
            f"{', '.join(SUPPORTED_GENERATE_KWARGS)}, generation_config, streamer, policy, thresholds, seed"
        )

    def get(name: str, default: Any = None) -> Any:
        # As in HF: an argument given explicitly wins, even None (eos_token_id=None: no stopping).
        if name in overrides:
            value = overrides[name]
        else:
            value = getattr(generation_config, name, None) if generation_config is not None else None
        return default if value is None else value

    max_new = get("max_new_tokens")
    if max_new is None:
        max_length = get("max_length", 20)
        max_new = max_length - prompt_length
        if max_new <= 0:
            raise GenerationInputError(
                f"max_length={max_length} leaves no room after the {prompt_length}-token prompt; set max_new_tokens"
            )
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new!r}")

    eos = get("eos_token_id")
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])) if eos is not None else ()
    pad = get("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0

    do_sample = bool(get("do_sample", False))
    temperature = float(get("temperature", 1.0))
    if do_sample and not temperature > 0:
        raise GenerationInputError(f"temperature must be > 0 when sampling, got {temperature}")
    top_p = get("top_p")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise GenerationInputError(f"top_p must be in (0, 1], got {top_p}")
    top_k = get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise GenerationInputError(f"top_k must be a non-negative integer, got {top_k!r}")
    return DecodeSettings(
        max_new_tokens=int(max_new),
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
    )


def split_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens, from a left-padded batch; clear errors for anything else."""
    if not isinstance(input_ids, torch.Tensor):
        raise GenerationInputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2:
        raise GenerationInputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise GenerationInputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise GenerationInputError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return [row for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise GenerationInputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    prompts = []
    for b, (row, mask) in enumerate(zip(input_ids, attention_mask.bool())):
        n = int(mask.sum())
        if n == 0:
            raise GenerationInputError(f"empty prompt: row {b} of attention_mask has no tokens")
        if not bool(mask[-n:].all()):
            raise GenerationInputError(
                f"row {b} of attention_mask is not left-padded (padding must come first); "
                f"decoder-only generation needs tokenizer.padding_side='left'"
            )
        prompts.append(row[-n:])
    return prompts
