"""Row gather/scatter by slot index: the rebatching step that regroups a buffer's rows.

`gather_rows(src, index)` returns `src[index]` as a new contiguous tensor; `scatter_rows(dst,
index, src)` writes `dst[index] = src` in place. One Triton kernel serves both (an indexed row copy,
any float dtype, any strides); the torch reference is `index_select` / `index_copy_`.
"""

from __future__ import annotations

import torch

from drex_hf.kernels import _checks, dispatch
from drex_hf.kernels._triton import jit, next_power_of_2, tl


@jit
def _copy_rows_kernel(
    src,
    src_index,
    dst,
    dst_index,
    width,
    src_row_stride,
    src_col_stride,
    dst_row_stride,
    dst_col_stride,
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: stores can pass 2**31 elements
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src_row = row
    dst_row = row
    if SRC_INDEXED:
        src_row = tl.load(src_index + row).to(tl.int64)
    if DST_INDEXED:
        dst_row = tl.load(dst_index + row).to(tl.int64)
    values = tl.load(src + src_row * src_row_stride + cols * src_col_stride, mask=mask)
    tl.store(dst + dst_row * dst_row_stride + cols * dst_col_stride, values, mask=mask)


def _launch(src: torch.Tensor, src_index, dst: torch.Tensor, dst_index, rows: int) -> None:
    # the kernel reads index vectors densely (a no-op when they already are)
    src_index = None if src_index is None else src_index.contiguous()
    dst_index = None if dst_index is None else dst_index.contiguous()
    width = src.shape[1]
    block = min(next_power_of_2(width), 1024)
    grid = (rows, -(-width // block))
    _copy_rows_kernel[grid](
        src,
        src_index if src_index is not None else src,
        dst,
        dst_index if dst_index is not None else dst,
        width,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        SRC_INDEXED=src_index is not None,
        DST_INDEXED=dst_index is not None,
        BLOCK=block,
    )


def gather_rows(src: torch.Tensor, index: torch.Tensor, *, check_indices: bool = True) -> torch.Tensor:
    """`src[index]` for `src [slots, width]` and `index [n]`: a new contiguous `[n, width]` tensor."""
    _checks.tensor("src", src, 2)
    _checks.tensor("index", index, 1, _checks.INDEX, src.device)
    if check_indices:
        _checks.in_range("index", index, 0, src.shape[0])
    out = torch.empty((index.shape[0], src.shape[1]), dtype=src.dtype, device=src.device)
    if index.shape[0] == 0 or src.shape[1] == 0:
        return out
    return dispatch.launch(
        "gather_rows",
        src.device,
        lambda: (_launch(src, index, out, None, index.shape[0]), out)[1],
        lambda: gather_rows_reference(src, index),
    )


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, check_indices: bool = True) -> None:
    """`dst[index] = src` in place, for `dst [slots, width]`, distinct `index [n]`, `src [n, width]`."""
    _checks.tensor("dst", dst, 2)
    _checks.tensor("index", index, 1, _checks.INDEX, dst.device)
    _checks.tensor("src", src, 2, (dst.dtype,), dst.device)
    _checks.shape("src", src, (index.shape[0], dst.shape[1]))
    if check_indices:
        _checks.in_range("index", index, 0, dst.shape[0])
        _checks.distinct("index", index)
    if index.shape[0] == 0 or dst.shape[1] == 0:
        return
    dispatch.launch(
        "scatter_rows",
        dst.device,
        lambda: _launch(src, None, dst, index, index.shape[0]),
        lambda: scatter_rows_reference(dst, index, src),
    )


def gather_rows_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return src.index_select(0, index)


def scatter_rows_reference(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    dst.index_copy_(0, index.long(), src)  # index_copy_ takes int64 only
