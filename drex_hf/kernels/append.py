"""KV append: each row's new keys/values written at its own slot and positions in the store.

`key_cache`/`value_cache` are one layer's `[slots, kv_heads, max_len, head_dim]` (views of the
engine's `RowKVCache` block); row i's `keys[i, :, j]` goes to `key_cache[slots[i], :, positions[i, j]]`.
Rows sit at different positions, which is why this is not a slice assignment. The torch reference is
the advanced-indexing assignment the store used before this kernel.
"""

from __future__ import annotations

import torch

from drex_hf.kernels import _checks, dispatch
from drex_hf.kernels._triton import jit, next_power_of_2, tl


@jit(do_not_specialize=("queries",))
def _kv_append_kernel(
    keys,
    values,
    key_cache,
    value_cache,
    slots,
    positions,
    queries,
    heads,
    head_dim,
    new_stride_row,
    new_stride_head,
    new_stride_query,
    new_stride_dim,
    val_stride_row,
    val_stride_head,
    val_stride_query,
    val_stride_dim,
    cache_stride_slot,
    cache_stride_head,
    cache_stride_pos,
    cache_stride_dim,
    vcache_stride_slot,
    vcache_stride_head,
    vcache_stride_pos,
    vcache_stride_dim,
    pos_stride_row,
    pos_stride_query,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: stores can pass 2**31 elements
    row = pid // queries
    query = pid % queries
    slot = tl.load(slots + row).to(tl.int64)
    position = tl.load(positions + row * pos_stride_row + query * pos_stride_query).to(tl.int64)
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (h[:, None] < heads) & (d[None, :] < head_dim)
    source = row * new_stride_row + query * new_stride_query
    k = tl.load(keys + source + h[:, None] * new_stride_head + d[None, :] * new_stride_dim, mask=mask)
    source_v = row * val_stride_row + query * val_stride_query
    v = tl.load(values + source_v + h[:, None] * val_stride_head + d[None, :] * val_stride_dim, mask=mask)
    target = slot * cache_stride_slot + position * cache_stride_pos
    offsets = target + h[:, None] * cache_stride_head + d[None, :] * cache_stride_dim
    tl.store(key_cache + offsets, k.to(key_cache.dtype.element_ty), mask=mask)
    target_v = slot * vcache_stride_slot + position * vcache_stride_pos
    offsets_v = target_v + h[:, None] * vcache_stride_head + d[None, :] * vcache_stride_dim
    tl.store(value_cache + offsets_v, v.to(value_cache.dtype.element_ty), mask=mask)


def kv_append(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Write `keys`/`values [n, kv_heads, q, head_dim]` at `positions [n, q]` of `slots [n]`, in place."""
    _checks.tensor("key_cache", key_cache, 4)
    device = key_cache.device
    _checks.tensor("value_cache", value_cache, 4, (key_cache.dtype,), device)
    _checks.shape("value_cache", value_cache, tuple(key_cache.shape))
    _checks.tensor("slots", slots, 1, _checks.INDEX, device)
    _checks.tensor("positions", positions, 2, _checks.INDEX, device)
    _checks.tensor("keys", keys, 4, device=device)
    _checks.tensor("values", values, 4, device=device)
    n, queries = positions.shape
    _, heads, max_len, head_dim = key_cache.shape
    if slots.shape[0] != n:
        raise _checks.KernelInputError(f"slots has {slots.shape[0]} rows but positions has {n}")
    _checks.shape("keys", keys, (n, heads, queries, head_dim))
    _checks.shape("values", values, (n, heads, queries, head_dim))
    if check_indices:
        _checks.in_range("slots", slots, 0, key_cache.shape[0])
        _checks.distinct("slots", slots)
        _checks.in_range("positions", positions, 0, max_len)
    if n == 0 or queries == 0:
        return

    def run_triton() -> None:
        rows = slots.contiguous()  # the kernel reads index vectors densely (a no-op when they already are)
        block_d = next_power_of_2(head_dim)
        block_h = min(next_power_of_2(heads), max(1, 4096 // block_d))
        grid = (n * queries, -(-heads // block_h))
        _kv_append_kernel[grid](
            keys,
            values,
            key_cache,
            value_cache,
            rows,
            positions,
            queries,
            heads,
            head_dim,
            *keys.stride(),
            *values.stride(),
            *key_cache.stride(),
            *value_cache.stride(),
            *positions.stride(),
            BLOCK_H=block_h,
            BLOCK_D=block_d,
        )

    dispatch.launch(
        "kv_append",
        device,
        run_triton,
        lambda: kv_append_reference(key_cache, value_cache, slots, positions, keys, values),
    )


def kv_append_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    # slots [n, 1] and positions [n, q] index dims 0 and 2: the indexed block is [n, q, kv_heads, head_dim]
    key_cache[slots.unsqueeze(1), :, positions] = keys.transpose(1, 2).to(key_cache.dtype)
    value_cache[slots.unsqueeze(1), :, positions] = values.transpose(1, 2).to(value_cache.dtype)
