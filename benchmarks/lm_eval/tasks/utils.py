"""Loaders and metrics for the local-file tasks in this folder (`lm_eval --include_path` reads them).

The documents are JSONL files beside this module (written by `benchmarks/lm_eval/make_tasks.py`), read
with no network and wherever lm_eval is started from; the copy task's ROUGE-L comes from the
`rouge-score` package directly, since `evaluate.load` fetches its metrics from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent
_scorer = None


def _docs(name: str) -> dict[str, datasets.Dataset]:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def next_line_docs(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """folio_next_line's documents: {'test': ...}."""
    return _docs("folio_next_line.jsonl")


def copy_docs(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """folio_copy's documents: {'test': ...}."""
    return _docs("folio_copy.jsonl")


def copy_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the copied line (surrounding whitespace ignored) and its ROUGE-L F1."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"])
    answer, target = results[0].strip(), doc["line"]
    return {"exact_match": float(answer == target), "rougeL": _scorer.score(target, answer)["rougeL"].fmeasure}
