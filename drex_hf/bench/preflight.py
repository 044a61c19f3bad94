"""What a synthetic-shape bench will hold in GPU memory, computed before anything is allocated.

`memory_plan` adds up the weights, one engine's key/value store (the bench holds one engine at a
time with `--sequential`, else one per policy side by side), the folded KV-fill weights of engines
that fill, each engine's row state, a graph pool and the logits of the widest step, against a budget
(`drex bench --fit-memory GIB`). Where it does not fit, it shrinks the batch (a long context's
point is the context) and then the context, and says what it changed and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drex_hf.bench.synthetic import SHAPES, Shape

GiB = 2**30
RESERVE = 3 * GiB  # the CUDA context, cuBLAS workspaces, the allocator's fragmentation


def weight_bytes(shape: Shape, itemsize: int) -> int:
    """A Llama of `shape`: embeddings, lm_head (untied), per layer q/o, k/v (GQA), the MLP and norms."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    layer = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * kv + 3 * shape.hidden * shape.mlp + 2 * shape.hidden
    return itemsize * (2 * shape.vocab * shape.hidden + shape.layers * layer + shape.hidden)


def store_bytes(shape: Shape, batch: int, positions: int, itemsize: int) -> int:
    """An engine's key/value store: keys and values, every layer, `batch` slots + the scratch one."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * (batch + 1) * shape.kv_heads * positions * head_dim * itemsize


def engine_bytes(shape: Shape, batch: int, positions: int, itemsize: int, fills: bool) -> int:
    """One engine: its store, its row state (hidden, features, previous per slot, and the small
    per-slot columns), the folded fill weights when it fills, its graph pool and the widest logits."""
    head_dim = shape.hidden // shape.heads
    state = 3 * (batch + 1) * shape.hidden * itemsize + 64 * (batch + 1) * 8
    fill = shape.layers * 2 * shape.kv_heads * head_dim * shape.hidden * itemsize if fills else 0
    activations = batch * (4 * shape.hidden + 2 * shape.mlp) * itemsize * 4  # a few layers' worth, kept by a pool
    logits = batch * shape.vocab * 4 * 3  # float32 logits, their softmax and a copy
    return store_bytes(shape, batch, positions, itemsize) + state + fill + activations + logits


@dataclass
class MemoryPlan:
    batch_sizes: list[int]
    context: int
    need_bytes: int
    budget_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget_bytes


def memory_plan(
    name: str,
    itemsize: int,
    batch_sizes: list[int],
    context: int,
    new_tokens: int,
    engines: int,
    fills: bool,
    budget_gib: float,
    spare_positions: int = 9,
) -> MemoryPlan:
    """The batch sizes and context that fit `budget_gib` with `engines` engines alive at once (the
    largest batch dominates), shrinking the batch in steps of 8 (then the context by halves) where
    they do not; `spare_positions`: a self-speculative engine's extra positions per slot."""
    shape = SHAPES[name]
    budget = int(budget_gib * GiB)
    weights = weight_bytes(shape, itemsize)

    def need(batch: int, ctx: int) -> int:
        positions = ctx + new_tokens + spare_positions
        return weights + RESERVE + engines * engine_bytes(shape, batch, positions, itemsize, fills)

    sizes, ctx, notes = sorted(set(batch_sizes)), context, []
    largest = sizes[-1]
    while need(largest, ctx) > budget and largest > 8:
        largest = max(8, (largest - 1) // 8 * 8)
    while need(largest, ctx) > budget and ctx > 16:
        ctx //= 2
    if largest < sizes[-1]:
        notes.append(
            f"batch {sizes[-1]} needs {need(sizes[-1], context) / GiB:.1f} GiB at context {context} "
            f"(weights {weights / GiB:.1f} GiB + {engines} engine(s)); running batch {largest} instead, which fits "
            f"{budget_gib:g} GiB"
        )
    if ctx < context:
        notes.append(f"context {context} does not fit {budget_gib:g} GiB even at batch {largest}: using {ctx}")
    kept = sorted({min(b, largest) for b in sizes})
    return MemoryPlan(kept, ctx, need(kept[-1], ctx), budget, notes)
