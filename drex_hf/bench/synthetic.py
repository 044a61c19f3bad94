"""Random-weight models of named real shapes, for trace-driven speed runs (DESIGN.md §2 `trace`).

Their outputs mean nothing; only speed does: exits come from a stated distribution or a trace, and
the exit check is the cheap `classifier` so that no vocabulary projection decides anything. The
weights are drawn on the target device in the target dtype, so a 7B shape is ready in seconds on a
GPU (on the CPU it takes minutes and 13.5 GB of memory in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from drex_hf.errors import ConfigError

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's sizes and where its three exits sit (after layers L/4-1, L/2-1, 3L/4-1)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    @property
    def exits(self) -> list[int]:
        return [self.layers // 4 - 1, self.layers // 2 - 1, 3 * self.layers // 4 - 1]


SHAPES: dict[str, Shape] = {
    # for tests: seconds on one CPU core
    "tiny": Shape(layers=4, hidden=64, heads=4, kv_heads=2, mlp=128, vocab=256),
    # the engine issue's moderate model: what a 2-core CPU runs in minutes
    "moderate": Shape(layers=16, hidden=1024, heads=16, kv_heads=4, mlp=2816, vocab=32000),
    # Llama-3.2-1B
    "llama-1b": Shape(layers=16, hidden=2048, heads=32, kv_heads=8, mlp=8192, vocab=128256),
    # Llama-2-7B
    "llama-7b": Shape(layers=32, hidden=4096, heads=32, kv_heads=32, mlp=11008, vocab=32000),
    # Llama-3-8B (GQA, large vocabulary)
    "llama3-8b": Shape(layers=32, hidden=4096, heads=32, kv_heads=8, mlp=14336, vocab=128256),
}


def synthetic_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    exits: list[int] | None = None,
    max_positions: int = 4096,
) -> EarlyExitModelForCausalLM:
    """A random-weight Llama of shape `name` with untrained `norm` heads and the `classifier` check."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from drex_hf import EarlyExitConfig
    from drex_hf.modeling import EarlyExitModelForCausalLM

    if name not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {name!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    heads = EarlyExitConfig(exit_layers=exits or shape.exits, head="norm", confidence="classifier", thresholds=0.5)
    return EarlyExitModelForCausalLM.from_base(base, heads).eval()
