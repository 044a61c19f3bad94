"""Each Triton kernel in drex_hf.kernels, run through Triton's CPU interpreter, against its torch reference:
copies bit for bit, arithmetic within 2x the reference's own error against float64, over dtypes, odd
shapes, strided views and empty inputs; plus the dispatcher's choices and fallback, and the launchers'
refusals of bad input.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from drex_hf.errors import KernelInputError
from drex_hf.kernels import (
    decode_attention,
    dispatch,
    gather_rows,
    indexed_decode_attention,
    kv_append,
    kv_fill_project,
    logit_confidence,
    rows,
    scatter_rows,
)
from drex_hf.kernels.append import kv_append_reference
from drex_hf.kernels.confidence import logit_confidence_reference
from drex_hf.kernels.decode_attention import indexed_decode_attention_reference
from drex_hf.kernels.kv_fill import kv_fill_project_reference
from drex_hf.kernels.rows import gather_rows_reference, scatter_rows_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test here runs the Triton kernels (interpreted on CPU), never silently the torch ones."""
    monkeypatch.setenv("DREX_KERNELS", "triton")
    dispatch.reset()
    assert dispatch.backend("cpu") == "triton", (
        "the Triton interpreter is off: these tests would compare torch to torch"
    )
    yield
    dispatch.reset()


# ---------------------------------------------------------------------------------------------- helpers


def run(kernel, *args, **kwargs):
    """Call a public kernel function and check that Triton ran it (no fallback to the reference)."""
    result = kernel(*args, **kwargs)
    assert dispatch.broken() == {}, f"Triton failed and fell back to torch: {dispatch.broken()}"
    return result


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_within_reference_error(kern: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> None:
    """The kernel's error against float64 truth is at most twice the torch reference's own, plus a floor.

    The floor (two float32 epsilons scaled by the largest |truth|, i.e. a couple of fp32 ulps) exists
    because the reference sometimes rounds exactly (a float32 result whose float64 truth happens to be
    representable, or a softmax over one key): then 2 x 0 would demand bit-identity from a kernel that
    accumulates in a different order, which is not a correctness requirement.
    """
    assert kern.shape == ref.shape == truth.shape, (kern.shape, ref.shape, truth.shape)
    assert kern.dtype == ref.dtype, (kern.dtype, ref.dtype)
    if truth.numel() == 0:
        return
    truth = truth.double()
    err_ref = (ref.double() - truth).abs().max().item()
    err_kern = (kern.double() - truth).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * max(1.0, truth.abs().max().item())
    floor += _interpreter_bf16_slack(kern, truth)
    assert err_kern <= 2 * err_ref + floor, (
        f"kernel error {err_kern:.3g} > 2 x reference error {err_ref:.3g} + {floor:.3g}"
    )


def _interpreter_bf16_slack(kern: torch.Tensor, truth: torch.Tensor) -> float:
    """One bfloat16 ulp at the largest |truth| for bf16 results of the CPU interpreter, else 0.

    Triton's interpreter converts float32 to bfloat16 by truncation (`cast_impl` in
    triton/runtime/interpreter.py passes no rounding mode), where compiled kernels round to nearest:
    an interpreted kernel's bf16 output can be off by up to 1 ulp where a rounded one is off by 1/2.
    """
    top = truth.abs().max().item()
    if kern.dtype != torch.bfloat16 or kern.device.type == "cuda" or top == 0:
        return 0.0
    return torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(top))


# Ways a [slots, width] operand can be laid out: (shape of the storage tensor, the view taken of it).
LAYOUTS = {
    "contiguous": (lambda s, w: (s, w), lambda t, w: t),
    "column_slice": (lambda s, w: (s, w + 10), lambda t, w: t[:, 3 : 3 + w]),
    "transposed": (lambda s, w: (w, s), lambda t, w: t.t()),
}


def matrix(layout, slots, width, dtype, seed):
    """A random [slots, width] view in `layout`, and the storage tensor it is a view of."""
    shape, view = LAYOUTS[layout]
    base = randn(shape(slots, width), dtype, seed)
    return base, view(base, width)


# ----------------------------------------------------------------------------------- gather / scatter

ROW_CASES = {  # index, width, layout of the indexed operand, index dtype
    "one_row": ([3], 16, "contiguous", torch.int64),
    "unsorted": ([5, 0, 3, 1], 16, "contiguous", torch.int64),
    "width_37": ([2, 4, 1], 37, "contiguous", torch.int32),
    "column_slice": ([6, 2, 0], 37, "column_slice", torch.int64),
    "transposed": ([1, 6, 3], 20, "transposed", torch.int32),
    "wide_2000": ([0, 4], 2000, "contiguous", torch.int64),  # more than one 1024-wide block per row
}


@dtypes
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_gather_rows_equals_index_select(case, dtype):
    index, width, layout, index_dtype = ROW_CASES[case]
    _, src = matrix(layout, 7, width, dtype, seed=1)
    index = torch.tensor(index, dtype=index_dtype)
    out = run(gather_rows, src, index)
    assert out.is_contiguous() and out.shape == (len(index), width)
    assert torch.equal(out, gather_rows_reference(src, index))


@dtypes
@pytest.mark.parametrize("dst_layout", ["contiguous", "column_slice", "transposed"])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_scatter_rows_equals_index_copy_and_leaves_other_rows(case, dst_layout, dtype):
    index, width, src_layout, index_dtype = ROW_CASES[case]
    index = torch.tensor(index, dtype=index_dtype)
    _, src = matrix(src_layout, len(index), width, dtype, seed=2)
    base, dst = matrix(dst_layout, 7, width, dtype, seed=3)
    expected_base = base.clone()
    # index.long(): the reference's index_copy_ takes int64 only (see test_torch_backend_takes_int32_indices)
    scatter_rows_reference(LAYOUTS[dst_layout][1](expected_base, width), index.long(), src)
    run(scatter_rows, dst, index, src)
    assert torch.equal(base, expected_base)  # the whole storage: rows and columns outside the view too
    assert not torch.equal(base, randn(base.shape, dtype, seed=3))  # the scatter did write


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_and_scatter_of_no_rows(index_dtype):
    src = randn((5, 37), torch.float32, seed=4)
    empty = torch.empty(0, dtype=index_dtype)
    out = run(gather_rows, src, empty)
    assert out.shape == (0, 37) and out.dtype == src.dtype
    before = src.clone()
    run(scatter_rows, src, empty, torch.empty(0, 37))
    assert torch.equal(src, before)


# ------------------------------------------------------------------------------------------ kv_append

APPEND_CASES = {  # slots, positions [n][q], index dtype, transposed positions view
    "one_query": ([4, 0, 2], [[7], [0], [3]], torch.int64, False),
    "three_queries": ([1, 3], [[0, 1, 2], [5, 6, 7]], torch.int64, False),
    "int32_indices": ([2, 4, 0], [[6, 7, 8], [0, 1, 2], [3, 4, 5]], torch.int32, False),
    "one_row": ([3], [[8]], torch.int32, False),
    "strided_positions": ([0, 4], [[2, 3, 4], [6, 7, 8]], torch.int64, True),
}


@dtypes
@pytest.mark.parametrize("head_dim", [6, 8])
@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_kv_append_writes_what_the_reference_writes_and_nothing_else(case, head_dim, dtype):
    slots, positions, index_dtype, strided = APPEND_CASES[case]
    layers, n_slots, heads, max_len = 3, 5, 2, 9
    slots = torch.tensor(slots, dtype=index_dtype)
    positions = torch.tensor(positions, dtype=index_dtype)
    if strided:
        positions = positions.t().contiguous().t()
        assert not positions.is_contiguous()
    n, queries = positions.shape
    key_store = randn((layers, n_slots, heads, max_len, head_dim), dtype, seed=5)
    value_store = randn((layers, n_slots, heads, max_len, head_dim), dtype, seed=6)
    # As transformers hands them over: [n, q, heads, d] transposed to [n, heads, q, d].
    keys = randn((n, queries, heads, head_dim), dtype, seed=7).transpose(1, 2)
    values = randn((n, queries, heads, head_dim), dtype, seed=8).transpose(1, 2)
    expected_keys, expected_values = key_store.clone(), value_store.clone()
    kv_append_reference(expected_keys[1], expected_values[2], slots, positions, keys, values)
    run(kv_append, key_store[1], value_store[2], slots, positions, keys, values)
    assert torch.equal(key_store, expected_keys)
    assert torch.equal(value_store, expected_values)
    assert not torch.equal(key_store, randn(key_store.shape, dtype, seed=5))  # it did write


def test_kv_append_of_no_rows_changes_nothing():
    cache = randn((5, 2, 9, 6), torch.float32, seed=9)
    before = cache.clone()
    nothing = torch.empty(0, 2, 1, 6)
    run(
        kv_append, cache, cache, torch.empty(0, dtype=torch.long), torch.empty(0, 1, dtype=torch.long), nothing, nothing
    )
    assert torch.equal(cache, before)


# --------------------------------------------------------------------------- indexed decode attention


class GridSpy:
    """Stands in for a @triton.jit kernel and records the grids it is launched with."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


DECODE_CASES = {  # q_heads, kv_heads, head_dim, slots, lengths, window, splits (forced), splits run
    "gqa_head_dim_12": (4, 2, 12, [3, 0, 1], [1, 190, 37], None, None, 1),
    "mha_window": (2, 2, 16, [1, 2], [190, 3], 5, None, 1),
    "group_3_split_3": (6, 2, 12, [0, 3, 2], [190, 1, 130], None, 3, 3),
    "split_3_window": (4, 2, 16, [2, 0, 1], [1, 190, 100], 5, 3, 3),
    "split_2": (4, 2, 12, [1, 3], [200, 64], None, 3, 2),  # ceil(200 / 3) rounds up to 128 keys: 2 splits
    "one_row": (4, 2, 16, [2], [57], None, None, 1),
}


@dtypes
@pytest.mark.parametrize("strided_query", [False, True], ids=["contiguous_query", "strided_query"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_indexed_decode_attention_within_reference_error(case, strided_query, dtype, monkeypatch):
    q_heads, kv_heads, head_dim, slots, lengths, window, splits, expected_splits = DECODE_CASES[case]
    n, capacity = len(slots), 200
    # Random values everywhere, past each row's length too: reading beyond it changes the result.
    key_cache = randn((4, kv_heads, capacity, head_dim), dtype, seed=10)
    value_cache = randn((4, kv_heads, capacity, head_dim), dtype, seed=11)
    if strided_query:
        query = randn((n, head_dim, q_heads), dtype, seed=12).transpose(1, 2)
        assert not query.is_contiguous()
    else:
        query = randn((n, q_heads, head_dim), dtype, seed=12)
    slots = torch.tensor(slots, dtype=torch.int32 if strided_query else torch.int64)
    lengths = torch.tensor(lengths, dtype=torch.int64 if strided_query else torch.int32)
    spy = GridSpy(decode_attention._decode_split_kernel)
    monkeypatch.setattr(decode_attention, "_decode_split_kernel", spy)

    out = run(indexed_decode_attention, query, key_cache, value_cache, slots, lengths, window=window, splits=splits)
    assert [grid[2] for grid in spy.grids] == [expected_splits]  # split-K really split (or not)
    ref = indexed_decode_attention_reference(query, key_cache, value_cache, slots, lengths, window=window)
    truth = indexed_decode_attention_reference(
        query.double(), key_cache.double(), value_cache.double(), slots, lengths, window=window
    )
    assert_within_reference_error(out, ref, truth)


@dtypes
def test_indexed_decode_attention_with_max_length_and_scale(dtype):
    key_cache = randn((3, 2, 150, 16), dtype, seed=13)
    value_cache = randn((3, 2, 150, 16), dtype, seed=14)
    query = randn((2, 4, 16), dtype, seed=15)
    slots, lengths = torch.tensor([2, 0]), torch.tensor([120, 9])
    kwargs = dict(scale=0.3, max_length=150)
    out = run(indexed_decode_attention, query, key_cache, value_cache, slots, lengths, splits=2, **kwargs)
    ref = indexed_decode_attention_reference(query, key_cache, value_cache, slots, lengths, **kwargs)
    truth = indexed_decode_attention_reference(
        query.double(), key_cache.double(), value_cache.double(), slots, lengths, **kwargs
    )
    assert_within_reference_error(out, ref, truth)


def test_indexed_decode_attention_of_no_rows():
    cache = randn((3, 2, 20, 12), torch.float32, seed=16)
    none = torch.empty(0, dtype=torch.long)
    out = run(indexed_decode_attention, torch.empty(0, 4, 12), cache, cache, none, none)
    assert out.shape == (0, 4, 12) and out.dtype == torch.float32


# ------------------------------------------------------------------------------------- kv_fill_project

FILL_CASES = {  # head_dim, bias, rotary, slots, positions, first_layer, layers_from, strided hidden
    "bias_rotary_first_layers_1_2_3": (8, True, True, [4, 0, 2], [8, 0, 3], [1, 2, 3], 1, False),
    "head_dim_6_plain": (6, False, False, [1, 3, 0, 4], [2, 7, 0, 5], [0, 2, 1, 3], 0, False),
    "one_row_rotary": (8, False, True, [2], [4], [0], 0, False),
    "strided_hidden_head_dim_6": (6, True, True, [3, 1], [1, 6], [2, 1], 1, True),
}


def _fill_inputs(case, dtype):
    head_dim, has_bias, has_rotary, slots, positions, first_layer, layers_from, strided = FILL_CASES[case]
    layers, n_slots, kv_heads, max_len, width, n = 3, 5, 2, 9, 20, len(slots)
    if strided:
        hidden = randn((width, n), dtype, seed=17).t()
        assert not hidden.is_contiguous()
    else:
        hidden = randn((n, width), dtype, seed=17)
    weight = randn((layers, 2 * kv_heads * head_dim, width), dtype, seed=18) / width**0.5
    bias = randn((layers, 2 * kv_heads * head_dim), dtype, seed=19) if has_bias else None
    rotary = (randn((n, head_dim), dtype, seed=20), randn((n, head_dim), dtype, seed=21)) if has_rotary else None
    stores = [randn((layers, n_slots, kv_heads, max_len, head_dim), dtype, seed=s) for s in (22, 23)]
    index = [torch.tensor(values) for values in (slots, positions, first_layer)]
    return hidden, weight, bias, rotary, stores, index, layers_from


@dtypes
@pytest.mark.parametrize("case", list(FILL_CASES))
def test_kv_fill_project_within_reference_error_and_writes_only_owed_layers(case, dtype):
    hidden, weight, bias, rotary, (key_store, value_store), index, layers_from = _fill_inputs(case, dtype)
    slots, positions, first_layer = index
    initial = key_store.clone(), value_store.clone()
    ref = key_store.clone(), value_store.clone()
    kv_fill_project_reference(hidden, weight, bias, *ref, *index, rotary, layers_from=layers_from)
    as64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    rotary64 = None if rotary is None else tuple(part.double() for part in rotary)
    truth = initial[0].double(), initial[1].double()
    kv_fill_project_reference(*as64, *truth, *index, rotary64, layers_from=layers_from)

    run(kv_fill_project, hidden, weight, bias, key_store, value_store, *index, rotary, layers_from=layers_from)
    written = torch.zeros(key_store.shape, dtype=torch.bool)
    for slot, position, first in zip(slots.tolist(), positions.tolist(), first_layer.tolist()):
        written[first:, slot, :, position] = True
    assert written.any()
    for kern, reference, exact, before in zip((key_store, value_store), ref, truth, initial):
        assert torch.equal(kern[~written], before[~written])  # no other layer, slot or position touched
        assert_within_reference_error(kern, reference, exact)


def test_kv_fill_project_of_no_rows_changes_nothing():
    store = randn((3, 5, 2, 9, 8), torch.float32, seed=24)
    before = store.clone()
    none = torch.empty(0, dtype=torch.long)
    weight = randn((3, 32, 20), torch.float32, seed=25)
    run(kv_fill_project, torch.empty(0, 20), weight, None, store, store, none, none, none, None, layers_from=0)
    assert torch.equal(store, before)


# ------------------------------------------------------------------------------------ logit_confidence


def _confidence_logits(case, dtype):
    """Logits for a case, and the rows whose top two logits are equal."""
    ties = []
    if case == "vocab_301":
        logits = randn((4, 301), dtype, seed=26) * 3
    elif case == "vocab_5000":  # above the 2048-wide block: several blocks per row
        logits = randn((3, 5000), dtype, seed=27) * 3
    elif case == "tie_in_one_block":
        logits = randn((3, 301), dtype, seed=28)
        logits[0, 10] = logits[0, 200] = 5.0
        ties = [0]
    elif case == "tie_across_blocks":
        logits = randn((2, 5000), dtype, seed=29)
        logits[1, 10] = logits[1, 4000] = 6.0
        ties = [1]
    elif case == "minus_inf_entries":
        logits = randn((3, 301), dtype, seed=30) * 3
        logits[:, ::3] = float("-inf")
        logits[2, 4:] = float("-inf")  # only four finite logits
    elif case == "first_block_minus_inf":  # a whole 2048-wide block masked before any finite logit
        logits = randn((2, 5000), dtype, seed=31) * 3
        logits[:, :2048] = float("-inf")
    elif case == "one_row":
        logits = randn((1, 301), dtype, seed=32)
    elif case == "column_slice":
        logits = randn((3, 320), dtype, seed=33)[:, 7:308]
    elif case == "transposed":
        logits = randn((301, 3), dtype, seed=34).t()
    else:
        raise ValueError(case)
    return logits, ties


CONFIDENCE_CASES = [
    "vocab_301",
    "vocab_5000",
    "tie_in_one_block",
    "tie_across_blocks",
    "minus_inf_entries",
    "first_block_minus_inf",
    "one_row",
    "column_slice",
    "transposed",
]


@dtypes
@pytest.mark.parametrize("case", CONFIDENCE_CASES)
def test_logit_confidence_within_reference_error(case, dtype):
    logits, ties = _confidence_logits(case, dtype)
    max_prob, margin = run(logit_confidence, logits)
    assert max_prob.dtype == margin.dtype == torch.float32
    ref_prob, ref_margin = logit_confidence_reference(logits)
    top = torch.softmax(logits.double(), dim=-1).topk(2, dim=-1).values  # float64 truth
    assert_within_reference_error(max_prob, ref_prob, top[:, 0])
    assert_within_reference_error(margin, ref_margin, top[:, 0] - top[:, 1])
    for row in ties:  # equal top logits: exactly no margin, from both
        assert margin[row].item() == 0.0 and ref_margin[row].item() == 0.0


def test_logit_confidence_of_no_rows():
    max_prob, margin = run(logit_confidence, torch.empty(0, 301, dtype=torch.bfloat16))
    assert max_prob.shape == margin.shape == (0,) and max_prob.dtype == margin.dtype == torch.float32


# ------------------------------------------------------------------------------------------ dispatcher


def test_drex_kernels_torch_runs_the_references_even_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("DREX_KERNELS", "torch")
    assert dispatch.backend("cpu") == "torch"
    monkeypatch.setattr(rows, "_launch", _boom)  # must not be reached
    src, index = randn((6, 9), torch.float32, seed=35), torch.tensor([4, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(gather_rows(src, index), src[index])
    assert dispatch.broken() == {}


def test_a_bad_drex_kernels_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("DREX_KERNELS", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        dispatch.backend("cpu")
    with pytest.raises(ValueError, match="bogus"):
        gather_rows(randn((6, 9), torch.float32, seed=36), torch.tensor([0]))


def test_torch_backend_takes_int32_indices(monkeypatch):
    """The launchers accept int32 and int64 indices; the torch path (CPU's default) must too."""
    monkeypatch.setenv("DREX_KERNELS", "torch")
    results = {}
    for index_dtype in (torch.int32, torch.int64):
        index = torch.tensor([4, 0, 2], dtype=index_dtype)
        src = randn((6, 9), torch.float32, seed=38)
        gathered = gather_rows(src, index)
        scatter_rows(src, index, torch.ones(3, 9))
        cache = randn((5, 2, 9, 6), torch.float32, seed=39)
        kv_append(cache, cache, index, index.view(3, 1) + 1, torch.ones(3, 2, 1, 6), torch.ones(3, 2, 1, 6))
        attended = indexed_decode_attention(randn((3, 4, 6), torch.float32, seed=40), cache, cache, index, index + 1)
        store = randn((3, 5, 2, 9, 6), torch.float32, seed=41)
        weight = randn((3, 24, 20), torch.float32, seed=42)
        hidden = randn((3, 20), torch.float32, seed=43)
        kv_fill_project(hidden, weight, None, store, store, index, index, index.clamp(max=3), None, layers_from=0)
        results[index_dtype] = (gathered, src, cache, attended, store)
    for int32, int64 in zip(results[torch.int32], results[torch.int64]):
        assert torch.equal(int32, int64)


def test_unset_drex_kernels_means_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("DREX_KERNELS", raising=False)
    assert dispatch.backend("cpu") == "torch"


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_a_kernel_that_fails_to_launch_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(rows, "_launch", _boom)
    src = randn((6, 9), torch.float16, seed=37)
    index = torch.tensor([5, 2, 0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = gather_rows(src, index)
        second = gather_rows(src, index.flip(0))
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "gather_rows" in str(runtime[0].message) and "boom" in str(runtime[0].message)
    assert torch.equal(first, gather_rows_reference(src, index))
    assert torch.equal(second, gather_rows_reference(src, index.flip(0)))
    assert dispatch.broken() == {"gather_rows": "RuntimeError: boom"}


# ----------------------------------------------------------------------------------------- bad inputs
# Each case is a valid call with one argument spoiled: the refusal must name that argument.


def _f32(*shape):
    return torch.zeros(shape)


def _idx(*values):
    return torch.tensor(values, dtype=torch.long)


def _gather(**spoil):
    args = dict(src=_f32(6, 4), index=_idx(1, 3)) | spoil
    return gather_rows(args["src"], args["index"])


def _scatter(**spoil):
    args = dict(dst=_f32(6, 4), index=_idx(1, 3), src=_f32(2, 4)) | spoil
    return scatter_rows(args["dst"], args["index"], args["src"])


def _append(**spoil):
    cache = (5, 2, 9, 6)
    args = dict(
        key_cache=_f32(*cache),
        value_cache=_f32(*cache),
        slots=_idx(1, 3),
        positions=_idx(0, 4).view(2, 1),
        keys=_f32(2, 2, 1, 6),
        values=_f32(2, 2, 1, 6),
    )
    args |= spoil
    return kv_append(*args.values())


def _decode(**spoil):
    args = dict(
        query=_f32(2, 4, 8),
        key_cache=_f32(3, 2, 9, 8),
        value_cache=_f32(3, 2, 9, 8),
        slots=_idx(0, 2),
        lengths=_idx(3, 9),
    )
    args |= spoil
    return indexed_decode_attention(*args.values())


def _fill(layers_from=0, **spoil):
    store = (3, 5, 2, 9, 8)
    args = dict(
        hidden=_f32(2, 20),
        weight=_f32(3, 32, 20),
        bias=None,
        key_store=_f32(*store),
        value_store=_f32(*store),
        slots=_idx(1, 3),
        positions=_idx(0, 8),
        first_layer=_idx(1, 3),
        rotary=None,
    )
    args |= spoil
    return kv_fill_project(*args.values(), layers_from=layers_from)


BAD_INPUTS = {
    "gather_src_ndim": (lambda: _gather(src=_f32(6)), r"src must have 2 dimensions"),
    "gather_index_ndim": (lambda: _gather(index=_idx(1, 3).view(2, 1)), r"index must have 1 dimensions"),
    "gather_index_dtype": (lambda: _gather(index=torch.tensor([0.0])), r"index has dtype"),
    "gather_slot_99": (lambda: _gather(index=_idx(1, 99)), r"index holds values outside.*99"),
    "scatter_src_fp16_into_fp32": (
        lambda: _scatter(src=torch.zeros(2, 4, dtype=torch.float16)),
        r"src has dtype torch.float16",
    ),
    "scatter_src_shape": (lambda: _scatter(src=_f32(2, 5)), r"src has shape"),
    "scatter_slot_99": (lambda: _scatter(index=_idx(99, 1)), r"index holds values outside.*99"),
    "scatter_duplicates": (lambda: _scatter(index=_idx(2, 2)), r"index repeats a row"),
    "append_keys_ndim": (lambda: _append(keys=_f32(2, 2, 6)), r"keys must have 4 dimensions"),
    "append_value_cache_dtype": (
        lambda: _append(value_cache=torch.zeros(5, 2, 9, 6, dtype=torch.bfloat16)),
        r"value_cache has dtype",
    ),
    "append_values_shape": (lambda: _append(values=_f32(2, 2, 2, 6)), r"values has shape"),
    "append_slot_99": (lambda: _append(slots=_idx(99, 1)), r"slots holds values outside.*99"),
    "append_duplicate_slots": (lambda: _append(slots=_idx(1, 1)), r"slots repeats a row"),
    "append_position_max_len": (
        lambda: _append(positions=_idx(0, 9).view(2, 1)),
        r"positions holds values outside.*9",
    ),
    "decode_query_ndim": (lambda: _decode(query=_f32(2, 4, 1, 8)), r"query must have 3 dimensions"),
    "decode_key_cache_dtype": (
        lambda: _decode(key_cache=torch.zeros(3, 2, 9, 8, dtype=torch.float16)),
        r"key_cache has dtype",
    ),
    "decode_slot_99": (lambda: _decode(slots=_idx(0, 99)), r"slots holds values outside.*99"),
    "decode_length_0": (lambda: _decode(lengths=_idx(3, 0)), r"lengths holds values outside.*0"),
    "decode_length_past_capacity": (lambda: _decode(lengths=_idx(3, 10)), r"lengths holds values outside.*10"),
    "decode_heads_not_multiple": (
        lambda: _decode(query=_f32(2, 3, 8)),
        r"3 query heads are not a multiple of 2 kv heads",
    ),
    "fill_hidden_ndim": (lambda: _fill(hidden=_f32(20)), r"hidden must have 2 dimensions"),
    "fill_value_store_dtype": (
        lambda: _fill(value_store=torch.zeros(3, 5, 2, 9, 8, dtype=torch.float16)),
        r"value_store has dtype",
    ),
    "fill_weight_shape": (lambda: _fill(weight=_f32(3, 30, 20)), r"weight has shape"),
    "fill_odd_head_dim": (
        lambda: _fill(weight=_f32(3, 20, 20), key_store=_f32(3, 5, 2, 9, 5), value_store=_f32(3, 5, 2, 9, 5)),
        r"head_dim must be even",
    ),
    "fill_slot_99": (lambda: _fill(slots=_idx(1, 99)), r"slots holds values outside.*99"),
    "fill_duplicate_slots": (lambda: _fill(slots=_idx(1, 1)), r"slots repeats a row"),
    "fill_position_max_len": (lambda: _fill(positions=_idx(0, 9)), r"positions holds values outside.*9"),
    "fill_first_layer_below_layers_from": (
        lambda: _fill(layers_from=2, first_layer=_idx(2, 1)),
        r"first_layer holds values outside.*1",
    ),
    "confidence_ndim": (lambda: logit_confidence(_f32(301)), r"logits must have 2 dimensions"),
    "confidence_dtype": (lambda: logit_confidence(torch.zeros(2, 301, dtype=torch.int64)), r"logits has dtype"),
    "confidence_vocab_1": (lambda: logit_confidence(_f32(2, 1)), r"logits need a vocabulary of at least 2"),
}


def test_the_unspoiled_calls_are_accepted():
    """The bad-input cases below spoil these calls one argument each: unspoiled, they run."""
    assert _gather().shape == (2, 4)
    _scatter()
    _append()
    assert _decode().shape == (2, 4, 8)
    _fill()
    assert dispatch.broken() == {}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_naming_the_argument(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(KernelInputError, match=message):
        call()
    assert dispatch.broken() == {}  # refused before dispatch, not a Triton failure


def _strided(values):
    """An int64 index vector as a non-contiguous view (every second element of a wider tensor), as a
    column of a row-major table is: the kernels read index vectors densely and must not see strides."""
    wide = torch.zeros(2 * len(values), dtype=torch.long)
    wide[::2] = torch.tensor(values)
    view = wide[::2]
    assert not view.is_contiguous()
    return view


def test_every_kernel_takes_non_contiguous_index_vectors():
    src = randn((7, 24), torch.float32, seed=40)
    index = _strided([5, 0, 3])
    assert torch.equal(run(gather_rows, src, index), src[[5, 0, 3]])
    dst = src.clone()
    run(scatter_rows, dst, index, src[:3].clone())
    expected = src.clone()
    expected[[5, 0, 3]] = src[:3]
    assert torch.equal(dst, expected)

    keys, values = randn((6, 2, 10, 8), torch.float32, 41), randn((6, 2, 10, 8), torch.float32, 42)
    new_k, new_v = randn((3, 2, 1, 8), torch.float32, 43), randn((3, 2, 1, 8), torch.float32, 44)
    positions = torch.tensor([[4], [1], [7]])
    want = keys.clone(), values.clone()
    kv_append_reference(*want, torch.tensor([5, 0, 3]), positions, new_k, new_v)
    run(kv_append, keys, values, index, positions, new_k, new_v)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1])

    query = randn((3, 4, 8), torch.float32, 45)
    lengths = _strided([8, 2, 10])
    got = run(indexed_decode_attention, query, keys, values, index, lengths)
    ref = indexed_decode_attention_reference(query, keys, values, torch.tensor([5, 0, 3]), torch.tensor([8, 2, 10]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    store_k, store_v = randn((3, 6, 2, 9, 8), torch.float32, 46), randn((3, 6, 2, 9, 8), torch.float32, 47)
    hidden, weight = randn((3, 16), torch.float32, 48), randn((3, 2 * 2 * 8, 16), torch.float32, 49) / 4
    dense = [torch.tensor(v) for v in ([5, 0, 3], [2, 8, 4], [1, 2, 1])]
    want = store_k.clone(), store_v.clone()
    kv_fill_project_reference(hidden, weight, None, *want, *dense, None, layers_from=1)
    run(kv_fill_project, hidden, weight, None, store_k, store_v, index, _strided([2, 8, 4]), _strided([1, 2, 1]), None,
        layers_from=1)  # fmt: skip
    torch.testing.assert_close(store_k, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store_v, want[1], rtol=1e-5, atol=1e-5)
