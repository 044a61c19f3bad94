"""Indexed decode attention: one query per row, keys/values read in place from the slot store.

Row i attends to positions `[start_i, lengths[i])` of slot `slots[i]` (start 0, or `lengths - window`
with a sliding window); query head h reads kv head `h // (q_heads // kv_heads)` (GQA). Long contexts
are split over several programs (split-K, "flash decoding") whose partial softmax sums a second
kernel merges. The torch reference is what the engine does without it: gather the rows' keys/values
(a copy of the cache) and run SDPA with a length mask.
"""

from __future__ import annotations

import torch

from drex_hf.kernels import _checks, _triton, dispatch
from drex_hf.kernels._triton import jit, next_power_of_2, tl

BLOCK_N = 64  # keys per inner step
MIN_SPLIT = 256  # no split shorter than this: below it the merge costs more than the parallelism buys


@jit(do_not_specialize=("split_len",))
def _decode_split_kernel(
    query,
    key_cache,
    value_cache,
    slots,
    lengths,
    out,
    part_acc,
    part_max,
    part_sum,
    scale,
    window,
    split_len,
    group,
    head_dim,
    q_stride_row,
    q_stride_head,
    q_stride_dim,
    k_stride_slot,
    k_stride_head,
    k_stride_pos,
    k_stride_dim,
    v_stride_slot,
    v_stride_head,
    v_stride_pos,
    v_stride_dim,
    o_stride_row,
    o_stride_head,
    o_stride_dim,
    HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: stores can pass 2**31 elements
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    q_heads = group * tl.num_programs(1)
    slot = tl.load(slots + row).to(tl.int64)
    length = tl.load(lengths + row).to(tl.int32)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(length - window, 0)
    lo = tl.maximum(start, split * split_len)
    hi = tl.minimum(length, (split + 1) * split_len)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * group + g
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(
        query + row * q_stride_row + heads[:, None] * q_stride_head + d[None, :] * q_stride_dim,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale

    k_base = key_cache + slot * k_stride_slot + kv_head * k_stride_head
    v_base = value_cache + slot * v_stride_slot + kv_head * v_stride_head
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for first in range(lo, hi, BLOCK_N):
        pos = (first + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = pos < hi
        k = tl.load(  # [BLOCK_D, BLOCK_N]: keys transposed by their addresses
            k_base + pos[None, :] * k_stride_pos + d[:, None] * k_stride_dim,
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        scores = tl.dot(q, k, input_precision=PRECISION)
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        alpha = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + pos[:, None] * v_stride_pos + d[None, :] * v_stride_dim,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        running_max = new_max

    mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:  # one split: normalise and write the output here
        result = acc / running_sum[:, None]
        o = out + row * o_stride_row + heads[:, None] * o_stride_head + d[None, :] * o_stride_dim
        tl.store(o, result.to(out.dtype.element_ty), mask=mask)
    else:  # partials [rows, q_heads, splits, (head_dim)], contiguous
        at = (row * q_heads + heads) * splits + split
        tl.store(part_acc + at[:, None] * head_dim + d[None, :], acc, mask=mask)
        tl.store(part_max + at, running_max, mask=g_mask)
        tl.store(part_sum + at, running_sum, mask=g_mask)


@jit(do_not_specialize=("splits",))
def _decode_merge_kernel(
    part_acc,
    part_max,
    part_sum,
    out,
    splits,
    head_dim,
    o_stride_row,
    o_stride_head,
    o_stride_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    q_heads = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    s_mask = s < splits
    at = (row * q_heads + head) * splits + s
    maxima = tl.load(part_max + at, mask=s_mask, other=float("-inf"))
    sums = tl.load(part_sum + at, mask=s_mask, other=0.0)
    top = tl.max(maxima, 0)
    weights = tl.where(maxima > float("-inf"), tl.exp(maxima - top), 0.0)  # empty splits weigh nothing
    acc = tl.load(part_acc + at[:, None] * head_dim + d[None, :], mask=s_mask[:, None] & (d[None, :] < head_dim))
    result = tl.sum(acc * weights[:, None], 0) / tl.sum(sums * weights, 0)
    o = out + row * o_stride_row + head * o_stride_head + d * o_stride_dim
    tl.store(o, result.to(out.dtype.element_ty), mask=d < head_dim)


def _splits(rows: int, kv_heads: int, max_length: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, none shorter than MIN_SPLIT keys."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1  # the interpreter runs programs one after another: splitting only adds work
    wanted = -(-target // max(1, rows * kv_heads))
    return max(1, min(wanted, -(-max_length // MIN_SPLIT)))


def indexed_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    max_length: int | None = None,
    splits: int | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Attention output `[n, q_heads, head_dim]` for `query [n, q_heads, head_dim]` over the caches
    `[slots, kv_heads, max_len, head_dim]`, row i reading slot `slots[i]`'s first `lengths[i]` positions
    (the last `window` of them with a sliding window). `max_length` (≥ every length) saves a device
    sync when the caller knows it; `splits` forces the split-K factor (default: chosen for the device)."""
    _checks.tensor("query", query, 3)
    device = query.device
    _checks.tensor("key_cache", key_cache, 4, (query.dtype,), device)
    _checks.tensor("value_cache", value_cache, 4, (query.dtype,), device)
    _checks.shape("value_cache", value_cache, tuple(key_cache.shape))
    _checks.tensor("slots", slots, 1, _checks.INDEX, device)
    _checks.tensor("lengths", lengths, 1, _checks.INDEX, device)
    n, q_heads, head_dim = query.shape
    _, kv_heads, capacity, cache_dim = key_cache.shape
    if cache_dim != head_dim:
        raise _checks.KernelInputError(f"query head_dim {head_dim} != cache head_dim {cache_dim}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise _checks.KernelInputError(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    _checks.shape("slots", slots, (n,))
    _checks.shape("lengths", lengths, (n,))
    if window is not None and window < 1:
        raise _checks.KernelInputError(f"window must be >= 1 or None, got {window}")
    if splits is not None and splits < 1:
        raise _checks.KernelInputError(f"splits must be >= 1 or None, got {splits}")
    if max_length is not None and not 1 <= max_length <= capacity:
        raise _checks.KernelInputError(f"max_length {max_length} is outside [1, {capacity}]")
    if check_indices:
        _checks.in_range("slots", slots, 0, key_cache.shape[0])
        _checks.in_range("lengths", lengths, 1, (max_length or capacity) + 1)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if n == 0:
        return query.new_empty(query.shape)
    if max_length is None:
        max_length = int(lengths.max())

    def run_triton() -> torch.Tensor:
        rows, lens = slots.contiguous(), lengths.contiguous()  # read densely by the kernel
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        group = q_heads // kv_heads
        count = splits or _splits(n, kv_heads, max_length, device)
        split_len = -(-max_length // count)
        split_len = -(-split_len // BLOCK_N) * BLOCK_N
        count = -(-max_length // split_len)
        direct = count == 1
        if direct:
            part_acc = part_max = part_sum = out  # unused
        else:
            part_acc = torch.empty((n, q_heads, count, head_dim), dtype=torch.float32, device=device)
            part_max = torch.empty((n, q_heads, count), dtype=torch.float32, device=device)
            part_sum = torch.empty_like(part_max)
        exact = query.dtype == torch.float32 or _triton.INTERPRET
        block_d = max(16, next_power_of_2(head_dim))
        _decode_split_kernel[(n, kv_heads, count)](
            query,
            key_cache,
            value_cache,
            rows,
            lens,
            out,
            part_acc,
            part_max,
            part_sum,
            scale,
            window or 0,
            split_len,
            group,
            head_dim,
            *query.stride(),
            *key_cache.stride(),
            *value_cache.stride(),
            *out.stride(),
            HAS_WINDOW=window is not None,
            DIRECT=direct,
            PRECISION="ieee" if exact else "tf32",  # tf32 holds fp16/bf16 inputs exactly
            BLOCK_G=max(16, next_power_of_2(group)),
            BLOCK_N=BLOCK_N,
            BLOCK_D=block_d,
        )
        if not direct:
            _decode_merge_kernel[(n, q_heads)](
                part_acc,
                part_max,
                part_sum,
                out,
                count,
                head_dim,
                *out.stride(),
                BLOCK_S=next_power_of_2(count),
                BLOCK_D=block_d,
            )
        return out

    return dispatch.launch(
        "indexed_decode_attention",
        device,
        run_triton,
        lambda: indexed_decode_attention_reference(
            query, key_cache, value_cache, slots, lengths, scale=scale, window=window, max_length=max_length
        ),
    )


def indexed_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Gather the rows' keys/values up to the longest row, mask by length (and window), run SDPA."""
    length = int(lengths.max()) if max_length is None else max_length
    keys = key_cache[:, :, :length].index_select(0, slots)
    values = value_cache[:, :, :length].index_select(0, slots)
    pos = torch.arange(length, device=query.device)
    visible = pos < lengths.unsqueeze(1)
    if window is not None:
        visible &= pos >= lengths.unsqueeze(1) - window
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.nn.functional.scaled_dot_product_attention(
        query.unsqueeze(2),
        keys,
        values,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=keys.shape[1] != query.shape[1],
    )
    return out.squeeze(2)


def decode_bytes(rows: int, q_heads: int, kv_heads: int, head_dim: int, context: int, itemsize: int) -> int:
    """Bytes a perfect kernel moves: every row's keys and values once, its query in and output out."""
    return itemsize * rows * (2 * kv_heads * context * head_dim + 2 * q_heads * head_dim)
