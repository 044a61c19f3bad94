"""Helpers shared by the subcommands: argparse types, pick device/dtype, load a model and tokenizer,
encode prompts, summarise exit layers, progress bars that suit a terminal and a log.

Nothing here imports torch at module level: the parser and its checks run before any model loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drex_hf.config import CONFIDENCE_MEASURES, CONFIG_NAME, HEAD_TYPES, EarlyExitConfig, parse_threshold
from drex_hf.errors import ConfigError, GenerationInputError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from drex_hf.modeling import EarlyExitModelForCausalLM

DTYPES = ("float32", "bfloat16", "float16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, unless the help already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


def quiet_transformers() -> None:
    """Keep the CLI's output to what we print: no per-file progress bars or load chatter from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for an integer >= 0 (0: off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type for a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed_value(text: str) -> int:
    """argparse type for a seed: an integer in [0, 2**64) (`drex_hf.seeds.check_seed`)."""
    from drex_hf.errors import DrexError
    from drex_hf.seeds import check_seed

    try:
        return check_seed(int(text))
    except ValueError as err:
        if isinstance(err, DrexError):
            raise argparse.ArgumentTypeError(str(err)) from None
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """argparse type for '5,11,17' (at least one integer)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def count_list(text: str) -> list[int]:
    """argparse type for batch sizes / row counts such as '1,8,32': positive, each once (a size given
    twice would be run twice and reported twice)."""
    values = int_list(text)
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"counts must be positive integers, got {bad[0]} in {text!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, twice))} given twice in {text!r}: give each once")
    return values


def threshold_value(text: str) -> float:
    """argparse type for a threshold: a number in [0, 1] or inf."""
    try:
        value: object = float(text)
    except ValueError:
        value = text  # "inf" spellings are parsed by the config's own rule
    try:
        return parse_threshold(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-layers",
        type=int_list,
        default=None,
        help="for a plain base model: put new, untrained exit heads after these layers (e.g. 5,11)",
    )
    parser.add_argument(
        "--head", choices=HEAD_TYPES, default=None, help="head type for new heads (default: norm, as EarlyExitConfig)"
    )
    parser.add_argument(
        "--confidence",
        choices=CONFIDENCE_MEASURES,
        default=None,
        help="confidence measure (default: the heads' own, or max_prob for new heads)",
    )
    parser.add_argument(
        "--threshold",
        type=threshold_value,
        default=None,
        help="one threshold for every exit, in [0, 1] or inf (default: the heads' own, 0.9 for new)",
    )
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def pick_device(name: str | None) -> torch.device:
    import torch

    from drex_hf.modeling import check_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, "--device")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(model: str, args: argparse.Namespace) -> EarlyExitModelForCausalLM:
    """A saved exit-heads folder or hub repository, or a base model with new heads (`--exit-layers`)."""
    from drex_hf.hub import is_hub_id
    from drex_hf.modeling import EarlyExitModelForCausalLM

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    given = [name for name in ("exit_layers", "head", "confidence") if getattr(args, name) is not None]
    options = " and ".join("--" + name.replace("_", "-") for name in given)
    options += " apply" if len(given) > 1 else " applies"
    if (Path(model) / CONFIG_NAME).is_file():
        if given:
            raise ConfigError(
                f"{options} to new heads on a base model only; "
                f"{model} is an exit-heads folder, whose heads keep their trained layers, type and measure"
            )
        wrapper = EarlyExitModelForCausalLM.from_pretrained(model, dtype=dtype, device=device)
    elif not Path(model).exists() and is_hub_id(model) and not args.exit_layers:
        # a hub id without --exit-layers: an exit-heads repository (on the hub or in the HF cache)
        if given:
            raise ConfigError(f"{options} to new heads: pass --exit-layers to put them on the base model {model}")
        try:
            wrapper = EarlyExitModelForCausalLM.from_pretrained(model, dtype=dtype, device=device)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(
                f"{model} is not an exit-heads repository here ({err}); if it is a base model, pass --exit-layers "
                f"to put new, untrained heads on it"
            ) from None
    else:
        if not args.exit_layers:
            raise ConfigError(
                f"{model} is not an exit-heads folder (no {CONFIG_NAME}); pass --exit-layers to put new, "
                f"untrained heads on it"
            )
        config = EarlyExitConfig(
            exit_layers=args.exit_layers,
            **({"head": args.head} if args.head else {}),  # one default head type: EarlyExitConfig's
            confidence=args.confidence or "max_prob",
            thresholds=0.9 if args.threshold is None else args.threshold,
        )
        wrapper = EarlyExitModelForCausalLM.from_base(model, config, dtype=dtype, device=device)
    if args.threshold is not None:
        wrapper.exit_config.thresholds = args.threshold
    return wrapper


def tokenizer_for(model: EarlyExitModelForCausalLM) -> Any:
    from drex_hf.hub import load_tokenizer

    source = model.base_source
    if source is None or not source.path:
        raise ConfigError("the base model was passed as an object; its tokenizer cannot be found")
    tokenizer = load_tokenizer(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompts(tokenizer: Any, prompts: list[str], chat: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise prompts into a left-padded batch; `chat`: auto/on/off for the chat template."""
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise GenerationInputError(f"empty prompt: prompt {i + 1} has no text")
    use_chat = chat == "on" or (chat == "auto" and getattr(tokenizer, "chat_template", None))
    if chat == "on" and not getattr(tokenizer, "chat_template", None):
        raise GenerationInputError("--chat on: this tokenizer has no chat template")
    if use_chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def exit_histogram(exit_layers: torch.Tensor, model: EarlyExitModelForCausalLM) -> str:
    """'layer 5: 3, layer 11: 0, full depth (29): 40' over the real (non-padding) tokens."""
    counts = Counter(int(x) for x in exit_layers.flatten().tolist() if x >= 0)
    parts = [f"layer {e}: {counts.get(e, 0)}" for e in model.exit_layers]
    last = model.num_layers - 1
    parts.append(f"full depth ({last}): {counts.get(last, 0)}")
    return ", ".join(parts)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar on a terminal; when stderr is a log (not a terminal) one line per stage instead of
    carriage-return updates; nothing when `enabled` is False (`--no-progress`)."""
    from tqdm.auto import tqdm

    if not enabled or total == 0:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit)
    return StageLine(total, desc, unit)


class StageLine:
    """The part of tqdm's interface the CLI uses, printing one line to stderr when the stage is done
    (or, if it stops early, when it is closed)."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.started, self.postfix, self.done = time.perf_counter(), "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.total:
            self.close()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.done or not self.n:
            return
        self.done = True
        postfix = f", {self.postfix}" if self.postfix else ""
        seconds = time.perf_counter() - self.started
        print(f"{self.desc}: {self.n:g}/{self.total} {self.unit}s in {seconds:.1f} s{postfix}", file=sys.stderr)

    def __enter__(self) -> StageLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
