"""Head drafts on a frequency-ranked subset of the vocabulary (FR-Spec's idea, issue 26).

A draft head's logits cost a product with the whole lm_head: on SmolLM2-135M, 49,152 rows, about 8
of its 30 layers. A `SubsetHead` projects onto the `ids` only (the tokens the model writes most
often, ranked on its own answers) and leaves every other token at -inf, so the draft, its
confidence and (sampling) its distribution live on the subset. Verification and every emitted token
still use the full vocabulary, so the output is unchanged: a draft outside what full depth would
write is rejected as any other wrong draft is, and sampling's acceptance rule holds for a proposal
with any support.

`rank_vocabulary` / `coverage_table` / `subset_for_coverage` pick the size: the smallest prefix of
the ranking (ranked on the first part of the answers) that covers a target share of the tokens,
with its coverage measured on the answers it was not ranked on. The ids are saved beside the heads
as `draft_vocab.safetensors` (one int64 tensor `ids`, in rank order, and the measurements as
metadata).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from drex_hf.errors import GenerationInputError, GenerationTypeError

DRAFT_VOCAB_NAME = "draft_vocab.safetensors"


def check_draft_vocab(ids: object, vocab_size: int) -> torch.Tensor:
    """`ids` as a 1-D int64 tensor of distinct token ids in [0, vocab_size); refused, naming what is wrong."""
    if not isinstance(ids, torch.Tensor):
        raise GenerationTypeError(f"draft_vocab must be a 1-D tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GenerationInputError(
            f"draft_vocab must be a non-empty 1-D integer tensor of token ids, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise GenerationInputError(f"draft_vocab holds token ids outside [0, {vocab_size}): {low}..{high}")
    if torch.unique(ids).numel() != ids.numel():
        raise GenerationInputError("draft_vocab holds a token id more than once")
    return ids


class SubsetHead:
    """`head`'s logits on `ids` only, the rest of the vocabulary at -inf (same shape as the full logits)."""

    def __init__(self, head: Any, ids: torch.Tensor, vocab_size: int) -> None:
        lm_head = head.lm_head
        weight = getattr(lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != vocab_size:
            raise GenerationTypeError(
                f"a draft vocabulary needs an lm_head with a [vocab, hidden] weight, got {type(lm_head).__name__}"
            )
        ids = check_draft_vocab(ids, vocab_size).to(weight.device)
        self.head, self.vocab_size = head, vocab_size
        self.ids = ids
        self.weight = weight.detach().index_select(0, ids).contiguous()
        bias = getattr(lm_head, "bias", None)
        self.bias = bias.detach().index_select(0, ids).contiguous() if isinstance(bias, torch.Tensor) else None

    def tensors(self) -> list[torch.Tensor]:
        """What its logits read besides the head's parameters (a captured program's static inputs)."""
        return [t for t in (self.ids, self.weight, self.bias) if t is not None]

    def __len__(self) -> int:
        return self.ids.numel()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = F.linear(self.head.features(hidden), self.weight, self.bias).float()
        full = torch.full((*sub.shape[:-1], self.vocab_size), float("-inf"), dtype=sub.dtype, device=sub.device)
        return full.index_copy_(-1, self.ids, sub)


# ---------------------------------------------------------------- choosing the subset
def rank_vocabulary(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The token ids of `sequences`, most frequent first (ties: the smaller id first)."""
    return _ranked(Counter(int(t) for seq in sequences for t in seq))


def _ranked(counts: Counter) -> list[int]:
    return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def coverage(ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> float:
    """The share of the tokens of `sequences` that are in `ids`."""
    chosen, total, hit = set(ids), 0, 0
    for seq in sequences:
        total += len(seq)
        hit += sum(int(t) in chosen for t in seq)
    return hit / total if total else 0.0


def subset_for_coverage(sequences: Sequence[Sequence[int]], target: float, held_out: float = 0.25) -> dict[str, Any]:
    """Rank the first (1 - `held_out`) of `sequences`; the smallest prefix covering `target` of them.

    Returns `ids` (rank order), `size`, `coverage_fit` and `coverage_held_out` (on the last
    `held_out` of the sequences, which the ranking never saw), and a `table` of coverage by size."""
    if isinstance(target, bool) or not isinstance(target, float | int) or not 0.0 < target <= 1.0:
        raise GenerationInputError(f"the draft vocabulary's coverage must be in (0, 1], got {target!r}")
    split = max(1, round(len(sequences) * (1.0 - held_out)))
    fit, check = list(sequences[:split]), list(sequences[split:])
    counts = Counter(int(t) for seq in fit for t in seq)
    ranked = _ranked(counts)
    if not ranked:
        raise GenerationInputError("choosing a draft vocabulary needs answers with tokens, got none")
    total = sum(counts.values())
    running, size = 0, len(ranked)
    for i, token in enumerate(ranked):
        running += counts[token]
        if running >= target * total - 1e-9:
            size = i + 1
            break
    ids = ranked[:size]
    sizes = sorted({s for s in (64, 256, 1024, 2048, 4096, 8192, size, len(ranked)) if s <= len(ranked)})
    table = [{"size": s, "coverage_fit": coverage(ranked[:s], fit),
              "coverage_held_out": coverage(ranked[:s], check) if check else None} for s in sizes]  # fmt: skip
    return {"ids": ids, "size": size, "target": float(target), "coverage_fit": coverage(ids, fit),
            "coverage_held_out": coverage(ids, check) if check else None, "ranked_on": len(fit),
            "checked_on": len(check), "table": table}  # fmt: skip


def write_draft_vocab(path: Any, chosen: dict[str, Any]) -> None:
    """Save `chosen["ids"]` (and its measurements as metadata) atomically."""
    from safetensors.torch import save_file

    meta = {key: value for key, value in chosen.items() if key != "ids"}
    partial = f"{path}.partial"
    save_file({"ids": torch.tensor(chosen["ids"], dtype=torch.int64)}, partial, metadata={"drex": json.dumps(meta)})
    os.replace(partial, path)


def read_draft_vocab(path: Any, vocab_size: int) -> torch.Tensor:
    """The ids in `path`, checked against `vocab_size`; a malformed file is refused, naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path))["ids"]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise GenerationInputError(f"cannot read the draft vocabulary {path}: {err}") from None
    try:
        return check_draft_vocab(ids, vocab_size)
    except (GenerationInputError, GenerationTypeError) as err:
        raise GenerationInputError(f"the draft vocabulary {path} is malformed: {err}") from None


__all__ = [
    "DRAFT_VOCAB_NAME",
    "SubsetHead",
    "check_draft_vocab",
    "coverage",
    "rank_vocabulary",
    "read_draft_vocab",
    "subset_for_coverage",
    "write_draft_vocab",
]
