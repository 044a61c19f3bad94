"""`drex bench`'s table, JSON and plots. Self-speculative rows get a section and a plot of their own
(`render_spec`, `spec_plot`): their columns (acceptance, tokens per round, draft and verify layers)
are not the early-exit policies' (exits per layer, involuntary and missed exits)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from drex_hf.bench.run import BatchResult, is_spec, speedup
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


def _exit_policies(r: BatchResult) -> dict[str, dict]:
    """The early-exit policies' rows (full depth among them): the main table's."""
    return {name: s for name, s in r.policies.items() if not is_spec(name)}


def _spec_rows(r: BatchResult) -> dict[str, dict]:
    return {name: s for name, s in r.policies.items() if is_spec(name)}


def best_spec(r: BatchResult) -> dict | None:
    """The batch's fastest self_spec row (by decode tokens/s), its speed-up over full depth (None
    without full) and whether it beats full depth; None without self_spec rows."""
    rows = _spec_rows(r)
    if not rows:
        return None
    name = max(rows, key=lambda n: rows[n]["decode_tokens_per_s"])
    ratio = rows[name].get("speedup_vs_full")
    return {
        "best": name,
        "decode_tokens_per_s": rows[name]["decode_tokens_per_s"],
        "speedup_vs_full": ratio,
        "pays": None if ratio is None else ratio > 1.0,
    }


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
        spec = best_spec(r)
        if spec is not None:
            entry["self_spec"] = spec
        if r.hf_peers is not None:
            entry["hf_peers"] = r.hf_peers
        if r.hf_static is not None:
            entry["hf_generate_static"] = r.hf_static
            if full and r.hf_static.get("decode_tokens_per_s"):
                entry["full_vs_hf_static"] = full["decode_tokens_per_s"] / r.hf_static["decode_tokens_per_s"]
        out.append(entry)
    return out


PEER_LABELS = {"hf_prompt_lookup": "HF prompt lookup (10 tokens)", "hf_assistant_early_exit": "HF assistant_early_exit"}


def _peer_lines(r: BatchResult) -> list[str]:
    """HF's lossless peers' rows: tokens/s and × full, or HF's refusal (they take one request at a time)."""
    lines = []
    full = r.policies.get("full")
    for name, peer in (r.hf_peers or {}).items():
        label = PEER_LABELS.get(name, name)
        if "refused" in peer:
            lines.append(f"| {r.batch} | {label}: HF refuses batch {r.batch} ({peer['refused']}) | – |" + " |" * 14)
            continue
        tps = peer["decode_tokens_per_s"]
        ratio = tps / full["decode_tokens_per_s"] if full else None
        lines.append(f"| {r.batch} | {label} | {tps:.1f} | {_num(ratio, '.2f')} |" + " |" * 13)
    return lines


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
        for name, s in _exit_policies(r).items():
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
        lines += _peer_lines(r)
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
        "Row state: the runner's per-slot tensors besides the KV cache. Decode peak: the most bytes decoding "
        "allocated above what was live when it began (a separate, untimed run of a few tokens). Measured "
        "oracle: the same rounds with each segment run on just the rows that reach it and one vocabulary "
        "projection per token, timed against full depth in alternation (drex_hf/bench/measure.py). GPU busy: the "
        "GPU's kernel time over decode wall time under torch.profiler (CUDA, --gpu-busy).",
    ]
    if any(_spec_rows(r) for r in results):
        lines += ["", *render_spec(results, num_layers)]
    return "\n".join(lines) + "\n"


def render_spec(results: Sequence[BatchResult], num_layers: int) -> list[str]:
    """The "Self-speculative rows" section: a row per self_spec row per batch (the batch's fastest
    marked), then per batch whether self_spec pays against full depth."""
    lines = [
        "## Self-speculative rows",
        "",
        "| batch | policy | decode tok/s | × full | accepted of drafted / per draft | drafts per round | "
        "tokens per round | layers per token (draft + verify) | agree w/ full | ROUGE-L | layer ceiling × full | "
        "TPOT p50 / p99 ms | KV MiB |",
        "|" + " --- |" * 13,
    ]
    verdicts = []
    for r in results:
        best = best_spec(r)
        if best is None:
            continue
        for name, s in _spec_rows(r).items():
            tpot = s["tpot_ms"]
            label = f"**{name}** (best)" if name == best["best"] else name
            lines.append(
                f"| {r.batch} | {label} | {s['decode_tokens_per_s']:.1f} | {_num(s.get('speedup_vs_full'), '.2f')} | "
                f"{s['acceptance_rate']:.1%} / {s['per_draft_acceptance']:.1%} | {s['mean_draft_tokens']:.2f} | "
                f"{s['tokens_per_round']:.2f} | {s['layers_per_token']:.2f} ({s['draft_layers_per_token']:.2f} + "
                f"{s['verify_layers_per_token']:.2f}) | {_num(s.get('agreement_with_full'), '.1%')} | "
                f"{_num(s.get('rouge_l_vs_full'), '.3f')} | {_num(s.get('layer_ceiling'), '.2f')} | "
                f"{_num(tpot['p50'], '.1f')} / {_num(tpot['p99'], '.1f')} | {s['kv_cache_bytes'] / 2**20:.1f} |"
            )
        ratio = best["speedup_vs_full"]
        if ratio is None:
            verdicts.append(f"Batch {r.batch}: fastest self_spec row {best['best']} (full depth not run: no ratio).")
        elif best["pays"]:
            verdicts.append(f"Batch {r.batch}: self_spec pays: {best['best']} at {ratio:.2f}x full depth.")
        else:
            verdicts.append(
                f"Batch {r.batch}: self_spec does not pay here: best {ratio:.2f}x full depth ({best['best']})."
            )
    return [
        *lines,
        "",
        *verdicts,
        "",
        "self_spec@EXIT/K: K drafts per round (adaptive: chosen per row and round) from the exit head after layer "
        "EXIT, verified at full depth; /aP: trace mode, each draft accepted with probability P (the tokens then "
        "mean nothing, only speed). Accepted of drafted: as SpecStats counts it; per draft: accepted over the "
        "drafts the verify pass judged (up to each round's first rejection), the acceptance the ceiling assumes. "
        f"Layers per token: layer evaluations per decoded token (full depth: {num_layers}), split into the draft "
        "steps' (EXIT + 1 per draft) and the verify passes'. Layer ceiling: spec_speedup_ceiling(L, EXIT, per-draft "
        "acceptance, K; adaptive: the mean drafts per round), what a device where a position costs its layers "
        "could gain at most. Agreement and ROUGE-L are measured against full depth's tokens of the same run.",
    ]


def plots(results: Sequence[BatchResult], num_layers: int, exit_points: Sequence[int], out: Path) -> list[Path]:
    """speed.png (decode tokens/s per policy and batch, with HF generate and the oracle) and
    exits.png (where tokens left, per policy, at the largest batch); [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = spec_plot(results, out)
    policies = list(_exit_policies(results[0]))
    if not policies:
        return written
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


def _k_order(k: int | str) -> tuple[int, int]:
    return (1, 0) if k == "adaptive" else (0, int(k))


def spec_plot(results: Sequence[BatchResult], out: Path) -> list[Path]:
    """self_spec.png: decode tokens/s against k, a line per draft exit (and acceptance), a panel per
    batch size with full depth's tokens/s as a dashed line; [] without self_spec rows or matplotlib."""
    plt = pyplot()
    rows = [_spec_rows(r) for r in results]
    if plt is None or not any(rows):
        return []
    ks = sorted({s["draft_tokens"] for batch in rows for s in batch.values()}, key=_k_order)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), squeeze=False)
    for ax, r, batch in zip(axes[0], results, rows):
        lines: dict[str, list[tuple[int, float]]] = {}
        for s in batch.values():
            acceptance = s["acceptance_setting"]
            where = {"ngram": "own text", "mixed": f"own text, else exit {s['draft_exit']}"}
            label = where.get(s.get("draft_source", "head"), f"exit {s['draft_exit']}")
            label += "" if acceptance is None else f", a={acceptance:g}"
            lines.setdefault(label, []).append((ks.index(s["draft_tokens"]), s["decode_tokens_per_s"]))
        for label, points in lines.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        if "full" in r.policies:
            ax.axhline(r.policies["full"]["decode_tokens_per_s"], color="black", linestyle="--", linewidth=0.8,
                       label="full depth")  # fmt: skip
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set(xlabel="drafts per round k", ylabel="decode tokens/s", title=f"batch {r.batch}")
        ax.legend(fontsize=7)
    fig.suptitle("self_spec: decode throughput by k and draft exit")
    fig.tight_layout()
    fig.savefig(out / "self_spec.png", dpi=90)
    plt.close(fig)
    return [out / "self_spec.png"]
