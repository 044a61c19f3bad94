"""Kernel benchmark: each Triton kernel against its torch path, on the same inputs, in one process.

    python benchmarks/kernels.py --out runs/bench-kernels          # on a GPU: batch 1-256, context 128-8192
    python benchmarks/kernels.py --smoke --out runs/bench-kernels  # CPU: tiny shapes through Triton's interpreter

Shapes are a real model's (`--model llama-7b`: hidden 4096, 32 heads / 32 kv heads, head_dim 128,
vocab 32000; `llama3-8b`: 8 kv heads, vocab 128256), random values, bf16 by default. The torch path
is what the engine runs without the kernels — including the gathered copy of the cache before SDPA.
Rows are a scattered subset of the slots, as after a regrouping. Per case: median time of each path
(`triton.testing.do_bench` on CUDA), the speed-up, the bytes a perfect kernel would move ÷ time, and
that as a share of the card's copy bandwidth (a 1 GiB device-to-device copy timed here). KV fill of
10 skipped layers is also set against one decoder layer (q=1, 2k context, the engine's torch path) at
the same rows. Every case also checks that both paths agree. Writes kernels.json and kernels.md.
`--smoke` checks the script and the kernels on CPU; its times say nothing about kernel speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:  # Triton reads this when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from drex_hf import kernels
from drex_hf.kernels import dispatch

MODELS = {
    "llama-7b": dict(hidden=4096, q_heads=32, kv_heads=32, head_dim=128, vocab=32000, mlp=11008),
    "llama3-8b": dict(hidden=4096, q_heads=32, kv_heads=8, head_dim=128, vocab=128256, mlp=14336),
    "smoke": dict(hidden=48, q_heads=4, kv_heads=2, head_dim=12, vocab=300, mlp=64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FILL_LAYERS = 10
LAYER_CONTEXT = 2048


@dataclass
class Setup:
    """What every case needs: the model's shapes, dtype, device, a seeded generator and a timer."""

    shape: dict
    dtype: torch.dtype
    device: torch.device
    gen: torch.Generator
    measure: Callable[[Callable[[], object]], float]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    previous = os.environ.get(dispatch.ENV)
    os.environ[dispatch.ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(dispatch.ENV)
        else:
            os.environ[dispatch.ENV] = previous


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: do_bench on CUDA, a few perf_counter runs elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)

    return cpu


def copy_bandwidth(device: torch.device, measure: Callable) -> float:
    """GB/s of a plain device-to-device copy (bytes read + written), the ceiling for copy kernels."""
    size = 1 << (30 if device.type == "cuda" else 24)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / measure(lambda: dst.copy_(src)) / 1e6


def scattered(rows: int, slots: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(slots, generator=gen)[:rows].sort().values.to(device)


def compare(name: str, run: Callable[[], object], check: Callable[[], float], measure: Callable, moved: int) -> dict:
    """Time `run` under each backend, and the largest difference between their results."""
    out = {"kernel": name, "bytes": moved}
    for path in ("triton", "torch"):
        with backend(path):
            out[f"{path}_ms"] = measure(run)
    with backend("triton"):
        out["max_abs_diff"] = check()
    out["speedup"] = out["torch_ms"] / out["triton_ms"]
    out["triton_gbps"] = moved / out["triton_ms"] / 1e6
    out["torch_gbps"] = moved / out["torch_ms"] / 1e6
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def bench_rows(s: Setup, rows: int) -> list[dict]:
    shape, dtype, device, gen, measure = s.shape, s.dtype, s.device, s.gen, s.measure
    slots, width = rows + rows // 2 + 1, shape["hidden"]
    src = torch.randn(slots, width, dtype=dtype, device=device)
    index = scattered(rows, slots, device, gen)
    part = torch.randn(rows, width, dtype=dtype, device=device)
    moved = 2 * rows * width * src.element_size()
    gather = compare(
        "gather_rows",
        lambda: kernels.gather_rows(src, index, check_indices=False),
        lambda: diff(kernels.gather_rows(src, index), src.index_select(0, index)),
        measure,
        moved,
    )
    dst = src.clone()

    def scatter_check() -> float:
        a, b = src.clone(), src.clone()
        kernels.scatter_rows(a, index, part)
        b.index_copy_(0, index, part)
        return diff(a, b)

    scatter = compare(
        "scatter_rows",
        lambda: kernels.scatter_rows(dst, index, part, check_indices=False),
        scatter_check,
        measure,
        moved,
    )
    return [dict(case, rows=rows) for case in (gather, scatter)]


def bench_append(s: Setup, rows: int, context: int) -> dict:
    shape, dtype, device, gen, measure = s.shape, s.dtype, s.device, s.gen, s.measure
    slots, heads, dim = rows + rows // 2 + 1, shape["kv_heads"], shape["head_dim"]
    cache_k = torch.randn(slots, heads, context, dim, dtype=dtype, device=device)
    cache_v = torch.randn_like(cache_k)
    index = scattered(rows, slots, device, gen)
    positions = torch.randint(0, context, (rows, 1), generator=gen).to(device)
    keys = torch.randn(rows, 1, heads, dim, dtype=dtype, device=device).transpose(1, 2)  # as attention hands them
    values = torch.randn_like(keys)

    def check() -> float:
        a = (cache_k.clone(), cache_v.clone())
        b = (cache_k.clone(), cache_v.clone())
        kernels.kv_append(*a, index, positions, keys, values)
        kernels.append.kv_append_reference(*b, index, positions, keys, values)
        return max(diff(a[0], b[0]), diff(a[1], b[1]))

    moved = 2 * 2 * rows * heads * dim * cache_k.element_size()
    run = lambda: kernels.kv_append(cache_k, cache_v, index, positions, keys, values, check_indices=False)  # noqa: E731
    return dict(compare("kv_append", run, check, measure, moved), rows=rows, context=context)


def bench_attention(s: Setup, rows: int, context: int) -> dict:
    shape, dtype, device, gen, measure = s.shape, s.dtype, s.device, s.gen, s.measure
    slots, kv, dim, q_heads = rows + rows // 2 + 1, shape["kv_heads"], shape["head_dim"], shape["q_heads"]
    cache_k = torch.randn(slots, kv, context, dim, dtype=dtype, device=device)
    cache_v = torch.randn_like(cache_k)
    index = scattered(rows, slots, device, gen)
    lengths = torch.full((rows,), context, device=device)
    query = torch.randn(rows, q_heads, dim, dtype=dtype, device=device)
    args = (query, cache_k, cache_v, index, lengths)

    def run() -> torch.Tensor:
        return kernels.indexed_decode_attention(*args, max_length=context, check_indices=False)

    def check() -> float:
        reference = kernels.decode_attention.indexed_decode_attention_reference(*args, max_length=context)
        return diff(run(), reference)

    moved = kernels.decode_attention.decode_bytes(rows, q_heads, kv, dim, context, cache_k.element_size())
    return dict(compare("indexed_decode_attention", run, check, measure, moved), rows=rows, context=context)


def bench_fill(s: Setup, rows: int) -> dict:
    shape, dtype, device, gen, measure = s.shape, s.dtype, s.device, s.gen, s.measure
    kv, dim, hidden = shape["kv_heads"], shape["head_dim"], shape["hidden"]
    slots, max_len = rows + rows // 2 + 1, 128
    store_k = torch.zeros(FILL_LAYERS, slots, kv, max_len, dim, dtype=dtype, device=device)
    store_v = torch.zeros_like(store_k)
    weight = torch.randn(FILL_LAYERS, 2 * kv * dim, hidden, dtype=dtype, device=device) * hidden**-0.5
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    index = scattered(rows, slots, device, gen)
    positions = torch.randint(0, max_len, (rows,), generator=gen).to(device)
    first = torch.zeros(rows, dtype=torch.long, device=device)
    angle = torch.rand(rows, dim // 2, generator=gen).to(device) * 6.28
    rotary = (torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype))
    args = (x, weight, None, store_k, store_v, index, positions, first, rotary)

    def check() -> float:
        store_k.zero_(), store_v.zero_()
        kernels.kv_fill_project(*args, layers_from=0)
        got = (store_k.clone(), store_v.clone())
        store_k.zero_(), store_v.zero_()
        kernels.kv_fill.kv_fill_project_reference(*args, layers_from=0)
        return max(diff(got[0], store_k), diff(got[1], store_v))

    moved = weight.numel() * weight.element_size() + x.numel() * x.element_size()
    moved += 2 * FILL_LAYERS * rows * kv * dim * store_k.element_size()
    run = lambda: kernels.kv_fill_project(*args, layers_from=0, check_indices=False)  # noqa: E731
    out = dict(compare(f"kv_fill_project ({FILL_LAYERS} layers)", run, check, measure, moved), rows=rows)
    out["one_layer_ms"] = decoder_layer_ms(rows, shape, dtype, device, measure)
    out["fill_vs_layer"] = out["triton_ms"] / out["one_layer_ms"]
    return out


def decoder_layer_ms(rows: int, shape: dict, dtype: torch.dtype, device: torch.device, measure: Callable) -> float:
    """One Llama decoder layer of these shapes at decode (q=1, LAYER_CONTEXT cached positions, rows in
    a contiguous run of slots), driven as the engine's torch path drives it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from drex_hf.arch import build_attention_mask, get_adapter
    from drex_hf.generation.kv_store import RowKVCache

    context = LAYER_CONTEXT if device.type == "cuda" else 64
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=1,
        num_attention_heads=shape["q_heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    arch = get_adapter(model)
    store = RowKVCache(
        num_layers=1,
        slots=rows,
        kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_len=context,
        dtype=dtype,
        device=device,
    )
    positions = torch.full((rows, 1), context - 1, device=device)
    hidden = torch.randn(rows, 1, shape["hidden"], dtype=dtype, device=device)
    rotary = arch.position_embeddings(hidden, positions)
    mask = build_attention_mask(positions, context, dtype=dtype)

    slots = torch.arange(rows, device=device)

    def run() -> torch.Tensor:
        store.bind(slots, positions, kv_len=context, span=(0, rows))
        return arch.run_layer(
            0, hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary, cache=store
        )

    with backend("torch"), torch.no_grad():
        return measure(run)


def bench_confidence(s: Setup, rows: int) -> dict:
    shape, dtype, device, gen, measure = s.shape, s.dtype, s.device, s.gen, s.measure
    logits = (torch.randn(rows, shape["vocab"], generator=gen) * 4).to(dtype).to(device)

    def check() -> float:
        got = kernels.logit_confidence(logits)
        want = kernels.confidence.logit_confidence_reference(logits)
        return max(diff(got[0], want[0]), diff(got[1], want[1]))

    moved = logits.numel() * logits.element_size()
    return dict(compare("logit_confidence", lambda: kernels.logit_confidence(logits), check, measure, moved), rows=rows)


def render(result: dict) -> str:
    lines = [
        f"Kernels on {result['device']} ({result['model']} shapes, {result['dtype']}); copy bandwidth "
        f"{result['copy_gbps']:.0f} GB/s. torch {result['torch']}, triton {result['triton']}.",
        "",
        *(
            ["**Triton interpreter on CPU: these times check the script, they say nothing about kernel speed.**", ""]
            if result["interpreter"]
            else []
        ),
        "| kernel | rows | context | triton ms | torch ms | speed-up | triton GB/s | % of copy | max diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in result["cases"]:
        share = 100 * c["triton_gbps"] / result["copy_gbps"]
        lines.append(
            f"| {c['kernel']} | {c['rows']} | {c.get('context', '')} | {c['triton_ms']:.4f} | {c['torch_ms']:.4f} "
            f"| {c['speedup']:.2f} | {c['triton_gbps']:.0f} | {share:.0f} % | {c['max_abs_diff']:.2e} |"
        )
    fills = [c for c in result["cases"] if "one_layer_ms" in c]
    if fills:
        lines += ["", f"| rows | KV fill, {FILL_LAYERS} layers (ms) | one decoder layer (ms) | fill ÷ layer |"]
        lines.append("| --- | --- | --- | --- |")
        lines += [
            f"| {c['rows']} | {c['triton_ms']:.4f} | {c['one_layer_ms']:.4f} | {c['fill_vs_layer']:.2f} |"
            for c in fills
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[m for m in MODELS if m != "smoke"], default="llama-7b")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--rows", default="1,8,64,256", help="batch sizes (default: %(default)s)")
    parser.add_argument("--contexts", default="128,2048,8192", help="cached positions (default: %(default)s)")
    parser.add_argument("--memory-fraction", type=float, default=0.6, help="skip cases whose caches need more")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-kernels"))
    args = parser.parse_args(argv)

    if args.smoke:
        device, shape, dtype = torch.device("cpu"), MODELS["smoke"], torch.float32
        rows_list, contexts = [1, 3], [40, 130]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on CPU (kernel speed needs a GPU)")
        device, shape, dtype = torch.device("cuda"), MODELS[args.model], DTYPES[args.dtype]
        rows_list = [int(r) for r in args.rows.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")]
    with backend("triton"):
        if dispatch.backend(device) != "triton":
            parser.error("Triton kernels cannot run here (see the warning above)")
    measure = timer(device)
    setup = Setup(shape, dtype, device, torch.Generator().manual_seed(0), measure)
    budget = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 1 << 30) * (
        args.memory_fraction
    )
    item = torch.empty((), dtype=dtype).element_size()
    import triton

    cases: list[dict] = []
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "model": "smoke" if args.smoke else args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": bool(args.smoke),
        "copy_gbps": copy_bandwidth(device, measure),
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for rows in rows_list:
            cases += bench_rows(setup, rows)
            cases.append(bench_confidence(setup, rows))
            cases.append(bench_fill(setup, rows))
            for context in contexts:
                cache = 2 * (rows + rows // 2 + 1) * shape["kv_heads"] * context * shape["head_dim"] * item
                if 3 * cache > budget:  # the caches, the torch path's gathered copy and clones for the checks
                    print(f"skip rows {rows} context {context}: {3 * cache / 2**30:.1f} GiB", file=sys.stderr)
                    continue
                cases.append(bench_append(setup, rows, context))
                cases.append(bench_attention(setup, rows, context))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            # written after every batch size: a run cut short keeps what it measured
            (args.out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"rows {rows}: done", file=sys.stderr)
    table = render(result)
    (args.out / "kernels.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
