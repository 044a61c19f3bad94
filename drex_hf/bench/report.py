"""`drex bench`'s table, JSON and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from drex_hf.bench.run import BatchResult, speedup
from drex_hf.plotting import pyplot


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _share(r: BatchResult, oracle_tokens_per_s: float) -> float:
    """drex's speed-up over full depth (the median within-repeat ratio) ÷ the oracle's: within one
    run's ratios, so that repeats on a drifting machine do not mix one run's drex with another's full."""
    oracle = oracle_tokens_per_s / r.policies["full"]["decode_tokens_per_s"]
    return speedup(r.policies, "drex", "full") / oracle


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.3g}"


def to_json(results: Sequence[BatchResult], num_layers: int) -> list[dict]:
    out = []
    for r in results:
        oracle = r.oracle_tokens_per_s(num_layers)
        entry = {"batch": r.batch, "policies": r.policies, "hf_generate": r.hf, "oracle_tokens_per_s": oracle}
        full = r.policies.get("full")
        if oracle:
            entry["drex_share_of_oracle"] = _share(r, oracle)
        measured = r.measured_oracle_tokens_per_s()
        if measured:
            entry["measured_oracle"] = r.measured_oracle | {"tokens_per_s": measured}
            entry["drex_share_of_measured_oracle"] = _share(r, measured)
        if full and r.hf:
            entry["full_vs_hf_generate"] = full["decode_tokens_per_s"] / r.hf["decode_tokens_per_s"]
        if r.hf_static is not None:
            entry["hf_generate_static"] = r.hf_static
            if full and r.hf_static.get("decode_tokens_per_s"):
                entry["full_vs_hf_static"] = full["decode_tokens_per_s"] / r.hf_static["decode_tokens_per_s"]
        out.append(entry)
    return out


def render(results: Sequence[BatchResult], num_layers: int, exit_points: Sequence[int], machine: str) -> str:
    """One markdown table: a row per policy per batch, then HF generate and the oracle."""
    layers = [*exit_points, num_layers - 1]
    head = (
        "| batch | policy | decode tok/s | × full | × batch_all | × HF generate | TPOT p50 / p99 ms | mean layers | "
        f"exits at {' / '.join(str(x) for x in layers)} | involuntary | missed | agree w/ full | ROUGE-L | KV MiB | "
        "row state MiB | decode peak MiB | GPU busy |"
    )
    lines = [f"Machine: {machine}.", "", head, "|" + " --- |" * 17]
    for r in results:
        hf = r.hf["decode_tokens_per_s"] if r.hf else None
        for name, s in r.policies.items():
            tpot = s["tpot_ms"]
            per_layer = [s["exits_per_layer"].get(str(x), 0) for x in layers]
            vs_full, vs_all = speedup(r.policies, name, "full"), speedup(r.policies, name, "batch_all")
            lines.append(
                f"| {r.batch} | {name} | {s['decode_tokens_per_s']:.1f} | "
                f"{_num(vs_full, '.2f')} | {_num(vs_all, '.2f')} | "
                f"{_num(None if hf is None else s['decode_tokens_per_s'] / hf, '.2f')} | "
                f"{_num(tpot['p50'], '.1f')} / {_num(tpot['p99'], '.1f')} | {s['mean_layers']:.2f} | "
                f"{' / '.join(str(v) for v in per_layer)} | {s['involuntary_exits']} | {s['missed_exits']} | "
                f"{_num(s.get('agreement_with_full'), '.1%')} | {_num(s.get('rouge_l_vs_full'), '.3f')} | "
                f"{s['kv_cache_bytes'] / 2**20:.1f} | {_mib(s.get('row_state_bytes'))} | "
                f"{_mib(s.get('peak_decode_bytes'))} | {_num((s.get('gpu_busy') or {}).get('busy'), '.0%')} |"
            )
        if hf is not None:
            lines.append(f"| {r.batch} | HF generate (full depth) | {hf:.1f} |" + " |" * 14)
        if r.hf_static is not None:
            static = r.hf_static.get("decode_tokens_per_s")
            label = "HF generate, static cache" + (" + its torch.compile" if r.hf_static.get("compiled") else "")
            if static is None:
                lines.append(f"| {r.batch} | {label}: failed ({r.hf_static.get('error')}) | – |" + " |" * 14)
            else:
                full_ratio = r.policies["full"]["decode_tokens_per_s"] / static if "full" in r.policies else None
                lines.append(
                    f"| {r.batch} | {label} (full ÷ it: {_num(full_ratio, '.2f')}) | {static:.1f} |" + " |" * 14
                )
        oracles = [
            (f"*oracle* (full × {num_layers} ÷ drex mean layers)", r.oracle_tokens_per_s(num_layers)),
            ("*measured oracle* (drex's exits at no exit cost, this machine)", r.measured_oracle_tokens_per_s()),
        ]
        for label, value in oracles:
            if value is not None:
                share = _share(r, value)
                lines.append(
                    f"| {r.batch} | {label}: drex at {share:.0%} | {value:.1f} | "
                    f"{value / r.policies['full']['decode_tokens_per_s']:.2f} |" + " |" * 13
                )
    lines += [
        "",
        "× columns: median over repeats of the ratio within each repeat (all policies ran interleaved). "
        "Row state: the executor's per-slot tensors besides the KV cache. Decode peak: the most bytes decoding "
        "allocated above what was live when it began (a separate, untimed run of a few tokens). Measured "
        "oracle: the same rounds with each segment run on just the rows that reach it and one vocabulary "
        "projection per token, timed against full depth in alternation (drex_hf/bench/measure.py). GPU busy: the "
        "GPU's kernel time over decode wall time under torch.profiler (CUDA, --gpu-busy).",
    ]
    return "\n".join(lines) + "\n"


def plots(results: Sequence[BatchResult], num_layers: int, exit_points: Sequence[int], out: Path) -> list[Path]:
    """speed.png (decode tokens/s per policy and batch, with HF generate and the oracle) and
    exits.png (where tokens left, per policy, at the largest batch); [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    policies = list(results[0].policies)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / (len(policies) + 3)
    for i, name in enumerate([*policies, "HF generate", "oracle", "measured oracle"]):
        values = []
        for r in results:
            if name == "HF generate":
                values.append(r.hf["decode_tokens_per_s"] if r.hf else 0.0)
            elif name == "oracle":
                values.append(r.oracle_tokens_per_s(num_layers) or 0.0)
            elif name == "measured oracle":
                values.append(r.measured_oracle_tokens_per_s() or 0.0)
            else:
                values.append(r.policies[name]["decode_tokens_per_s"])
        bases = [r.policies["full"]["decode_tokens_per_s"] if "full" in r.policies else 1.0 for r in results]
        values = [v / base for v, base in zip(values, bases)]
        ax.bar([b + i * width for b in range(len(results))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks([b + width * (len(policies) + 2) / 2 for b in range(len(results))], [str(r.batch) for r in results])
    ax.set(
        xlabel="batch size", ylabel="decode tokens/s ÷ full depth's", title="Decode throughput relative to full depth"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=90)
    plt.close(fig)
    written.append(out / "speed.png")

    last = results[-1]
    layers = [*exit_points, num_layers - 1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(policies)
    for i, name in enumerate(policies):
        counts = [last.policies[name]["exits_per_layer"].get(str(x), 0) for x in layers]
        total = max(sum(counts), 1)
        ax.bar([j + i * width for j in range(len(layers))], [c / total for c in counts], width, label=name)
    ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(layers))], [str(x) for x in layers])
    ax.set(xlabel="exit layer", ylabel="share of tokens", title=f"Where tokens left (batch {last.batch})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exits.png", dpi=90)
    plt.close(fig)
    written.append(out / "exits.png")
    return written
