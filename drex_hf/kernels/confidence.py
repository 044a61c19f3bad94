"""Exit confidence from logits without materialising the softmax: max probability and margin.

One pass over each row's logits keeps a running maximum, the rescaled sum of exponentials and the
two largest logits; then `max_prob = 1 / sum(exp(l - top1))` and `margin = (1 - exp(top2 - top1)) *
max_prob`. The torch reference is the softmax those formulas avoid (`drex_hf.heads`' measures).
"""

from __future__ import annotations

import torch

from drex_hf.kernels import _checks, dispatch
from drex_hf.kernels._triton import jit, next_power_of_2, tl


@jit
def _confidence_kernel(logits, max_prob, margin, vocab, stride_row, stride_col, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride_row
    top1 = tl.full([], float("-inf"), tl.float32)
    top2 = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)  # sum of exp(l - top1) over what has been read
    for start in range(0, vocab, BLOCK):
        cols = (start + tl.arange(0, BLOCK)).to(tl.int64)
        x = tl.load(base + cols * stride_col, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        first = tl.max(x, 0)
        at = tl.argmax(x, 0)
        second = tl.max(tl.where(tl.arange(0, BLOCK) == at, float("-inf"), x), 0)
        new_top = tl.maximum(top1, first)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # all -inf so far: exp(-inf - -inf) is nan
        total = total * tl.exp(top1 - shift) + tl.sum(tl.exp(x - shift), 0)
        top2 = tl.maximum(tl.minimum(top1, first), tl.maximum(top2, second))
        top1 = new_top
    best = 1.0 / total
    tl.store(max_prob + row, best)
    tl.store(margin + row, (1.0 - tl.exp(top2 - top1)) * best)


def logit_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max probability, top-1 minus top-2 probability), each float32 `[n]`, for logits `[n, vocab]`."""
    _checks.tensor("logits", logits, 2)
    n, vocab = logits.shape
    if vocab < 2:
        raise _checks.KernelInputError(f"logits need a vocabulary of at least 2 for a margin, got {vocab}")
    if n == 0:
        empty = logits.new_empty(0, dtype=torch.float32)
        return empty, empty.clone()

    def run_triton() -> tuple[torch.Tensor, torch.Tensor]:
        max_prob = torch.empty(n, dtype=torch.float32, device=logits.device)
        margin = torch.empty_like(max_prob)
        block = min(next_power_of_2(vocab), 2048)
        _confidence_kernel[(n,)](logits, max_prob, margin, vocab, *logits.stride(), BLOCK=block)
        return max_prob, margin

    return dispatch.launch("logit_confidence", logits.device, run_triton, lambda: logit_confidence_reference(logits))


def logit_confidence_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[:, 0], top[:, 0] - top[:, 1]
