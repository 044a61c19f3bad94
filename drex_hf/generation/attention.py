"""Indexed decode attention inside the model's own attention modules.

With the Triton kernels on, a decode segment's layers attend through `indexed_decode_attention`:
the store's `update()` appends the new keys/values in place and hands back the whole layer store,
and the attention function registered here reads each row's slot up to its length — no gathered
copy of the cache. It is registered with transformers' `AttentionInterface` and switched on only
for the segment (`indexed_attention`), so the model's own `attn_implementation` is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from drex_hf.kernels import indexed_decode_attention

NAME = "drex_indexed"
_registered = False


@dataclass(frozen=True)
class IndexedRows:
    """What the attention function needs besides q/k/v: each row's slot, length, and the longest."""

    slots: torch.Tensor
    lengths: torch.Tensor
    max_length: int


def _indexed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    drex_rows: IndexedRows | None = None,
    drex_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query `[n, heads, 1, d]`; key/value: the layer's whole store `[slots, kv_heads, max_len, d]`."""
    if drex_rows is None or query.shape[2] != 1:
        raise RuntimeError(
            f"attn_implementation {NAME!r} serves drex_hf's decode segments only (one query per row, "
            f"rows bound by the engine); got {query.shape[2]} queries, rows bound: {drex_rows is not None}"
        )
    if dropout:
        raise RuntimeError(f"{NAME!r} is for inference: dropout must be 0, got {dropout}")
    out = indexed_decode_attention(
        query[:, :, 0],
        key,
        value,
        drex_rows.slots,
        drex_rows.lengths,
        scale=scaling,
        window=drex_window,
        max_length=drex_rows.max_length,
        check_indices=False,
    )
    return out.unsqueeze(1), None  # [n, 1, heads, d], the layout the attention modules reshape


def _configs(modules: list[nn.Module]) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in modules:
        seen.setdefault(id(module.config), module.config)
    return list(seen.values())


@contextmanager
def indexed_attention(attention_modules: list[nn.Module]) -> Iterator[None]:
    """Route these attention modules through `_indexed_attention` for the duration of the block."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _indexed_attention)
        _registered = True
    configs = _configs(attention_modules)
    previous = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
