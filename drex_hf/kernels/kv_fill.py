"""KV fill by projection: the keys/values of every layer an exited row skipped, in one product.

An exited row still owes the deeper layers its keys/values at its position. Each layer's input-norm
scale is folded into its k/v weights once at load (`ArchAdapter.kv_fill_weights`: `[L, 2 * kv_heads
* head_dim, H]`, keys' rows then values'), so one matrix product of the rows' normalised exit hidden
states with the stacked weights of all skipped layers gives every key and value; rotary (rotate-half
convention, as Llama/Qwen2/Mistral) is applied to the keys and each row's results are scattered
into the store at its slot and position, for the layers from its `first_layer` on.
"""

from __future__ import annotations

import torch

from drex_hf.kernels import _checks, _triton, dispatch
from drex_hf.kernels._triton import jit, next_power_of_2, tl


@jit(do_not_specialize=("rows", "layers_from"))
def _kv_fill_kernel(
    hidden,
    weight,
    bias,
    cos,
    sin,
    key_store,
    value_store,
    slots,
    positions,
    first_layer,
    rows,
    width,
    kv_heads,
    head_dim,
    layers_from,
    h_stride_row,
    h_stride_col,
    w_stride_layer,
    w_stride_out,
    w_stride_in,
    b_stride_layer,
    b_stride_out,
    r_stride_row,
    r_stride_dim,
    k_stride_layer,
    k_stride_slot,
    k_stride_head,
    k_stride_pos,
    k_stride_dim,
    v_stride_layer,
    v_stride_slot,
    v_stride_head,
    v_stride_pos,
    v_stride_dim,
    HAS_BIAS: tl.constexpr,
    ROTARY: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)  # 64-bit offsets: stores can pass 2**31 elements
    column = tl.program_id(1).to(tl.int64)  # one (layer, key-or-value, kv head) per program
    layer = layers_from + column // (2 * kv_heads)
    is_value = (column // kv_heads) % 2
    head = column % kv_heads
    half = head_dim // 2

    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < rows
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)
    j_mask = j < half
    out_row = is_value * kv_heads * head_dim + head * head_dim  # first weight row of this head
    w_base = weight + layer * w_stride_layer + out_row * w_stride_out
    acc_lo = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = k < width
        x = tl.load(
            hidden + m[:, None] * h_stride_row + k[None, :] * h_stride_col,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w_mask = k_mask[:, None] & j_mask[None, :]
        w_lo = tl.load(w_base + j[None, :] * w_stride_out + k[:, None] * w_stride_in, mask=w_mask, other=0.0)
        w_hi = tl.load(w_base + (j[None, :] + half) * w_stride_out + k[:, None] * w_stride_in, mask=w_mask, other=0.0)
        acc_lo += tl.dot(x, w_lo.to(tl.float32), input_precision=PRECISION)
        acc_hi += tl.dot(x, w_hi.to(tl.float32), input_precision=PRECISION)
    if HAS_BIAS:
        b_base = bias + layer * b_stride_layer + out_row * b_stride_out
        acc_lo += tl.load(b_base + j * b_stride_out, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(b_base + (j + half) * b_stride_out, mask=j_mask, other=0.0).to(tl.float32)[None, :]

    mask = m_mask[:, None] & j_mask[None, :]
    slot = tl.load(slots + m, mask=m_mask, other=0).to(tl.int64)
    position = tl.load(positions + m, mask=m_mask, other=0).to(tl.int64)
    owes = tl.load(first_layer + m, mask=m_mask, other=0) <= layer  # this row skipped this layer
    mask = mask & owes[:, None]
    if is_value == 0:
        if ROTARY:  # rotate-half: (lo, hi) -> (lo * cos - hi * sin, hi * cos + lo * sin)
            r_lo = m[:, None] * r_stride_row + j[None, :] * r_stride_dim
            r_hi = m[:, None] * r_stride_row + (j[None, :] + half) * r_stride_dim
            cos_lo = tl.load(cos + r_lo, mask=mask, other=0.0).to(tl.float32)
            cos_hi = tl.load(cos + r_hi, mask=mask, other=0.0).to(tl.float32)
            sin_lo = tl.load(sin + r_lo, mask=mask, other=0.0).to(tl.float32)
            sin_hi = tl.load(sin + r_hi, mask=mask, other=0.0).to(tl.float32)
            rotated_lo = acc_lo * cos_lo - acc_hi * sin_lo
            acc_hi = acc_hi * cos_hi + acc_lo * sin_hi
            acc_lo = rotated_lo
        at = key_store + layer * k_stride_layer + slot[:, None] * k_stride_slot + head * k_stride_head
        at += position[:, None] * k_stride_pos
        tl.store(at + j[None, :] * k_stride_dim, acc_lo.to(key_store.dtype.element_ty), mask=mask)
        tl.store(at + (j[None, :] + half) * k_stride_dim, acc_hi.to(key_store.dtype.element_ty), mask=mask)
    else:
        at = value_store + layer * v_stride_layer + slot[:, None] * v_stride_slot + head * v_stride_head
        at += position[:, None] * v_stride_pos
        tl.store(at + j[None, :] * v_stride_dim, acc_lo.to(value_store.dtype.element_ty), mask=mask)
        tl.store(at + (j[None, :] + half) * v_stride_dim, acc_hi.to(value_store.dtype.element_ty), mask=mask)


def kv_fill_project(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    first_layer: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    layers_from: int,
    check_indices: bool = True,
) -> None:
    """Write the keys/values of layers `first_layer[i]..L-1` for rows i at `slots[i]`, `positions[i]`.

    hidden `[n, H]`: the rows' exit hidden states after the input norm's shared part (no scale);
    weight `[L, 2 * kv_heads * head_dim, H]` and bias `[L, 2 * kv_heads * head_dim]` (or None) from
    `kv_fill_weights`; stores `[L, slots, kv_heads, max_len, head_dim]`; rotary `(cos, sin)`, each
    `[n, head_dim]`, or None; `layers_from` ≤ every `first_layer` (the deepest product needed)."""
    _checks.tensor("hidden", hidden, 2)
    device = hidden.device
    _checks.tensor("weight", weight, 3, device=device)
    _checks.tensor("key_store", key_store, 5, device=device)
    _checks.tensor("value_store", value_store, 5, (key_store.dtype,), device)
    _checks.shape("value_store", value_store, tuple(key_store.shape))
    for name, index in (("slots", slots), ("positions", positions), ("first_layer", first_layer)):
        _checks.tensor(name, index, 1, _checks.INDEX, device)
        _checks.shape(name, index, (hidden.shape[0],))
    n, width = hidden.shape
    layers, _, kv_heads, max_len, head_dim = key_store.shape
    _checks.shape("weight", weight, (layers, 2 * kv_heads * head_dim, width))
    if bias is not None:
        _checks.tensor("bias", bias, 2, device=device)
        _checks.shape("bias", bias, (layers, 2 * kv_heads * head_dim))
    if rotary is not None:
        for name, part in zip(("cos", "sin"), rotary):
            _checks.tensor(name, part, 2, device=device)
            _checks.shape(name, part, (n, head_dim))
    if head_dim % 2:
        raise _checks.KernelInputError(f"head_dim must be even for KV fill, got {head_dim}")
    if not 0 <= layers_from < layers:
        raise _checks.KernelInputError(f"layers_from {layers_from} is outside [0, {layers})")
    if check_indices:
        _checks.in_range("slots", slots, 0, key_store.shape[1])
        _checks.distinct("slots", slots)
        _checks.in_range("positions", positions, 0, max_len)
        _checks.in_range("first_layer", first_layer, layers_from, layers + 1)
    if n == 0:
        return

    def run_triton() -> None:
        cos, sin = rotary if rotary is not None else (hidden, hidden)  # unused without rotary
        rows, at, first = slots.contiguous(), positions.contiguous(), first_layer.contiguous()  # read densely
        exact = hidden.dtype == torch.float32 or _triton.INTERPRET
        # weights are re-read once per block of rows; one block size for every row count, so that a
        # decode never compiles a new variant mid-run (the wasted rows of a small block cost no bandwidth)
        block_m = 64
        grid = (-(-n // block_m), (layers - layers_from) * 2 * kv_heads)
        _kv_fill_kernel[grid](
            hidden,
            weight,
            bias if bias is not None else weight,
            cos,
            sin,
            key_store,
            value_store,
            rows,
            at,
            first,
            n,
            width,
            kv_heads,
            head_dim,
            layers_from,
            *hidden.stride(),
            *weight.stride(),
            *(bias.stride() if bias is not None else (0, 0)),
            *cos.stride(),
            *key_store.stride(),
            *value_store.stride(),
            HAS_BIAS=bias is not None,
            ROTARY=rotary is not None,
            PRECISION="ieee" if exact else "tf32",
            BLOCK_M=block_m,
            BLOCK_K=64 if width >= 64 else max(16, next_power_of_2(width)),
            BLOCK_HALF=max(16, next_power_of_2(head_dim // 2)),
        )

    dispatch.launch(
        "kv_fill_project",
        device,
        run_triton,
        lambda: kv_fill_project_reference(
            hidden, weight, bias, key_store, value_store, slots, positions, first_layer, rotary, layers_from=layers_from
        ),
    )


def kv_fill_project_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    first_layer: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    layers_from: int,
) -> None:
    """One `linear` over the stacked weights of layers `layers_from..`, rotary, then one indexed read
    and write of those layers at the rows' slots and positions that keeps each row's new keys/values
    from its first layer on (what it did not skip is written back unchanged). Nothing here reads
    the device's data on the host, so it is safe inside a captured program."""
    n, width = hidden.shape
    layers, _, kv_heads, _, head_dim = key_store.shape
    w = weight[layers_from:].reshape(-1, width)
    b = None if bias is None else bias[layers_from:].reshape(-1)
    kv = torch.nn.functional.linear(hidden, w.to(hidden.dtype), None if b is None else b.to(hidden.dtype))
    kv = kv.view(n, layers - layers_from, 2, kv_heads, head_dim)
    keys, values = kv[:, :, 0], kv[:, :, 1]
    if rotary is not None:
        cos, sin = (part.to(keys.dtype).view(n, 1, 1, head_dim) for part in rotary)
        lo, hi = keys[..., : head_dim // 2], keys[..., head_dim // 2 :]
        keys = keys * cos + torch.cat([-hi, lo], dim=-1) * sin
    depth = torch.arange(layers_from, layers, device=hidden.device)
    keep = (depth >= first_layer.unsqueeze(1)).view(n, layers - layers_from, 1, 1)
    block = slice(layers_from, layers)
    for store, new in ((key_store, keys), (value_store, values)):
        old = store[block, slots, :, positions]  # [n, layers, kv_heads, head_dim]
        store[block, slots, :, positions] = torch.where(keep, new.to(store.dtype), old)
