"""Decoding settings for `generate()`: HF's arguments, merged and checked once.

`merge_generation_config` builds the config HF's `generate` would use (the user's, the model's,
HF's defaults, keyword overrides) and refuses options drex_hf does not implement;
`settings_from_config` turns it into a plain, checked `DecodeSettings`; `split_prompts` checks the
batch. Nothing unsupported is silently ignored.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from drex_hf.errors import GenerationInputError, GenerationTypeError

SUPPORTED_GENERATE_KWARGS = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "bad_words_ids",
    "stop_strings",
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
    # HF's logits processors and stop strings (`drex_hf.generation.processors`): each row's own tokens
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()

    def warpers(self) -> list[Any]:
        """The logits warpers in HF's order (temperature, top-k, top-p), with HF's semantics
        (`drex_hf.generation.sampling`); none for greedy decoding."""
        from drex_hf.generation.sampling import Temperature, TopK, TopP

        if not self.do_sample:
            return []
        out: list[Any] = []
        if self.temperature != 1.0:
            out.append(Temperature(self.temperature))
        if self.top_k:
            out.append(TopK(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopP(self.top_p))
        return out

    @property
    def has_logits_processors(self) -> bool:
        """Whether a token's scores go through HF's logits processors before the pick (they need the
        row's token history); stop strings are a host-side stopping criterion and need none."""
        return (
            self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size > 0
            or bool(self.bad_words_ids)
            or (self.min_new_tokens > 0 and bool(self.eos_token_ids))
        )

    def logits_processors(self, prompt_length: int, device: torch.device | str = "cpu") -> Any:
        """HF's own logits processors, in the order HF's `generate` builds them, for ONE unpadded row
        whose prompt has `prompt_length` tokens (called with that row's prompt + generated tokens):
        what the reference decoder applies. The engine applies the same processors to a batch of
        rows, each seeing only its own tokens (`processors.RowProcessors`)."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            NoBadWordsLogitsProcessor,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )

        out = LogitsProcessorList()
        eos = list(self.eos_token_ids) or None
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size > 0:
            out.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.bad_words_ids:
            out.append(NoBadWordsLogitsProcessor([list(w) for w in self.bad_words_ids], eos))
        if self.min_new_tokens > 0 and eos is not None:  # as HF: without an eos id there is nothing to hold back
            out.append(MinNewTokensLengthLogitsProcessor(prompt_length, self.min_new_tokens, eos, device))
        return out


# Decoding options drex_hf does not implement: a generation config that sets one of them to
# anything but its default (or None) is refused rather than silently ignored.
UNSUPPORTED_AT_DEFAULT = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "encoder_repetition_penalty": 1.0,
    "diversity_penalty": 0.0,
    "min_length": 0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "watermarking_config": None,
    "max_time": None,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "remove_invalid_values": False,
}


def merge_generation_config(base_model: Any, generation_config: Any, overrides: dict[str, Any]) -> Any:
    """The generation config HF's `generate` would use: `generation_config` (or a fresh one), unset
    fields from the model's own, then HF's global defaults, then `overrides`. Refuses arguments
    and config fields that drex_hf does not implement, naming them."""
    unknown = sorted(set(overrides) - set(SUPPORTED_GENERATE_KWARGS))
    if unknown:
        raise GenerationInputError(
            f"generate() got unsupported argument(s) {unknown}; drex_hf supports "
            f"{', '.join(SUPPORTED_GENERATE_KWARGS)}, generation_config, streamer, tokenizer, policy, thresholds, seed"
        )
    _check_kwarg_types(overrides)
    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise GenerationInputError(
            f"generation_config must be a transformers.GenerationConfig, got {type(generation_config).__name__}"
        )
    try:
        merged, _ = base_model._prepare_generation_config(generation_config, **overrides)
    except (ValueError, TypeError) as err:  # HF's own validation of the values
        raise GenerationInputError(f"invalid generation settings: {' '.join(str(err).split())}") from None
    for name, default in UNSUPPORTED_AT_DEFAULT.items():
        value = getattr(merged, name, None)
        if value is not None and value != default:
            raise GenerationInputError(
                f"the generation config sets {name}={value!r}, which drex_hf's early-exit decoding does not "
                f"implement; unset it (supported: {', '.join(SUPPORTED_GENERATE_KWARGS)})"
            )
    return merged


def settings_from_config(config: Any, prompt_length: int) -> DecodeSettings:
    """Checked `DecodeSettings` from a merged generation config (see `merge_generation_config`)."""
    max_new = config.max_new_tokens
    if max_new is None:
        max_length = _integer(config.max_length, "max_length")
        max_new = max_length - prompt_length
        if max_new <= 0:
            raise GenerationInputError(
                f"max_length={max_length} leaves no room after the {prompt_length}-token prompt; set max_new_tokens"
            )
    max_new = _integer(max_new, "max_new_tokens")
    if max_new < 1:
        raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new}")

    eos = config.eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    eos_list = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    eos_ids = tuple(_integer(e, "eos_token_id") for e in eos_list)
    pad = config.pad_token_id
    pad = _integer(pad, "pad_token_id") if pad is not None else (eos_ids[0] if eos_ids else 0)

    do_sample = bool(config.do_sample)
    temperature = _number(config.temperature if config.temperature is not None else 1.0, "temperature")
    if do_sample and not temperature > 0:
        raise GenerationInputError(f"temperature must be > 0 when sampling, got {temperature}")
    top_p = None if config.top_p is None else _number(config.top_p, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationInputError(f"top_p must be in (0, 1], got {top_p}")
    top_k = None if config.top_k is None else _integer(config.top_k, "top_k")
    if top_k is not None and top_k < 0:
        raise GenerationInputError(f"top_k must be a non-negative integer, got {top_k}")
    return DecodeSettings(
        max_new_tokens=max_new,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        **processor_settings(config),
    )


def processor_settings(config: Any) -> dict[str, Any]:
    """The logits-processor and stop-string fields of a merged generation config, checked (HF leaves
    them unchecked until a processor is built mid-generation)."""
    penalty = config.repetition_penalty
    penalty = 1.0 if penalty is None else _number(penalty, "repetition_penalty")
    if not penalty > 0 or penalty == float("inf"):
        raise GenerationInputError(f"repetition_penalty must be a positive number (1.0: off), got {penalty}")
    ngram = config.no_repeat_ngram_size
    ngram = 0 if ngram is None else _integer(ngram, "no_repeat_ngram_size")
    if ngram < 0:
        raise GenerationInputError(f"no_repeat_ngram_size must be a non-negative integer (0: off), got {ngram}")
    min_new = config.min_new_tokens
    min_new = 0 if min_new is None else _integer(min_new, "min_new_tokens")
    if min_new < 0:
        raise GenerationInputError(f"min_new_tokens must be a non-negative integer, got {min_new}")
    return dict(
        repetition_penalty=penalty,
        no_repeat_ngram_size=ngram,
        min_new_tokens=min_new,
        bad_words_ids=_bad_words(config.bad_words_ids),
        stop_strings=_stop_strings(config.stop_strings),
    )


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    shape = "bad_words_ids must be a list of token-id lists, e.g. [[5], [7, 8]]"
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise GenerationInputError(f"{shape}; got {value!r}")
    out = []
    for word in value:
        if isinstance(word, torch.Tensor):
            word = word.tolist()
        if not isinstance(word, (list, tuple)) or not word:
            raise GenerationInputError(f"{shape}; got the entry {word!r}")
        ids = tuple(_integer(t, "a bad_words_ids token") for t in word)
        if min(ids) < 0:
            raise GenerationInputError(f"bad_words_ids holds the negative token id {min(ids)} in {list(ids)}")
        out.append(ids)
    return tuple(out)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not strings:
        raise GenerationInputError(f"stop_strings must be a string or a list of strings, got {value!r}")
    for text in strings:
        if not isinstance(text, str) or not text:
            raise GenerationInputError(f"stop_strings must be non-empty strings, got {text!r}")
    return tuple(strings)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenerationTypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationTypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_kwarg_types(overrides: dict[str, Any]) -> None:
    """Types of `generate()`'s keyword arguments, checked before HF validates the values (its
    message for `max_new_tokens="4"` names neither the argument nor the value)."""
    for name, value in overrides.items():
        if value is None:
            continue
        if name in ("max_new_tokens", "max_length", "top_k", "pad_token_id"):
            _integer(value, name)
        elif name in ("temperature", "top_p"):
            _number(value, name)
        elif name == "eos_token_id":
            ids = value.tolist() if isinstance(value, torch.Tensor) else value
            ids = ids if isinstance(ids, (list, tuple)) else [ids]
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
                raise GenerationTypeError(f"{name} must be an integer or a list of integers, got {value!r}")


def check_token_batch(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[torch.Tensor, Any]:
    """Check token ids (and a mask of the same shape); return them as 2-D tensors, ids as `long`."""
    if not isinstance(input_ids, torch.Tensor):
        raise GenerationInputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise GenerationInputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dim() != 2:
        raise GenerationInputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise GenerationInputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise GenerationInputError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise GenerationInputError(
            f"input_ids holds token id {bad}, outside the model's vocabulary 0..{vocab_size - 1}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise GenerationInputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    return input_ids, attention_mask


def infer_attention_mask(input_ids: torch.Tensor, settings: DecodeSettings, given: Any) -> Any:
    """HF's rule when no mask is given: positions holding `pad_token_id` are padding, unless the pad
    id is also an end-of-sequence id (then it cannot be told apart from text)."""
    pad = settings.pad_token_id
    if given is not None or pad in settings.eos_token_ids or not bool((input_ids == pad).any()):
        return given
    return (input_ids != pad).long()


def split_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Each row's real tokens from a batch `check_token_batch` accepted; refuses anything not left-padded."""
    if attention_mask is None:
        return None, list(input_ids)
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
    return attention_mask.long(), prompts


def left_padded(
    prompts: list[torch.Tensor], pad: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts as one left-padded batch (as HF generation wants): `(input_ids, attention_mask)`."""
    width = max(p.shape[0] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[0] :] = p
        mask[b, width - p.shape[0] :] = 1
    return ids.to(device), mask.to(device)


def check_positions(arch: Any, token_counts: list[int], max_new_tokens: int | None = None) -> None:
    """Refuse rows that need more positions than learned position embeddings have (GPT-2; `arch`: the
    model's adapter): a row of n tokens needs n, or n + max_new_tokens - 1 when generating (the last
    new token is never fed back). Rotary models have no hard limit."""
    limit = arch.position_limit
    if limit is None:
        return
    for b, count in enumerate(token_counts):
        needed = count if max_new_tokens is None else count + max_new_tokens - 1
        if needed > limit:
            if max_new_tokens is None:
                raise GenerationInputError(f"prompt {b} has {count} tokens but the model has {limit} positions")
            raise GenerationInputError(
                f"prompt {b} has {count} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{needed} positions but the model has {limit}"
            )
