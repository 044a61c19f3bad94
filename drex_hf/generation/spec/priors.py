"""How far a text draft is worth verifying: calibrated priors per kind of match, and a batch's allocation.

A row's draft from its own text is only as good as the match it came from. On SmolLM2's answers to
48 held-out prompts, the chance that a draft's first j tokens are all full depth's (j = 1, 2, 3, 4):

    match of 3 tokens (longest)   0.70-0.77  0.42-0.52  0.30-0.45  0.23-0.38
    match of 1 token              0.16-0.19  0.08-0.09  0.06       0.04
    the answers' corpus           0.26-0.36  0.06-0.15  0.02-0.07  0.00-0.04

So one k for every row verifies many positions that will be rejected. `DraftPriors` holds, per
class of draft (`ngram{n}`: the row's own text matched its last n tokens; `corpus`: the model's
answers' table), that curve, fitted on the model's own full-depth answers (`fit_draft_priors`, run
by `drex calibrate --draft-priors`, saved beside the heads as `draft_priors.json`).

`allocate` spends a verify pass's positions where they pay: every greedy row with a text draft
offers its draft's positions, each worth its class's curve at that depth (the expected tokens it
adds), and the pass takes the most valuable ones while the expected tokens per unit of the pass's
measured cost (`VerifyCurve`: the pass's time by packed positions) still rise. At batch 1 a second
position is nearly free on the CPU (a product of 2 rows costs what 1 does), so most rows verify
some; at batch 8 every position costs the whole batch's time, so only strong matches are verified.
A row's tokens do not depend on it: greedy rows emit full depth's tokens whatever is verified, and
sampled rows keep their own k (the allocation skips them).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drex_hf.errors import GenerationInputError
from drex_hf.generation.spec.ngram import CorpusIndex, NgramIndex

DRAFT_PRIORS_NAME = "draft_priors.json"
CORPUS = "corpus"
FORMAT = 1


def text_draft(text: NgramIndex, corpus: CorpusIndex | None, k: int) -> tuple[str | None, list[int]]:
    """A row's text draft of up to k tokens and its class: `ngram{n}` from its own text (n: the
    matched suffix), else `corpus` from the answers' table, else (None, [])."""
    n, drafts = text.lookup(k)
    if drafts:
        return f"ngram{n}", drafts
    if corpus is not None:
        drafts = corpus.draft(text.tokens, k)
        if drafts:
            return CORPUS, drafts
    return None, []


@dataclass
class DraftPriors:
    """Per draft class, `curves[cls][j - 1]`: the chance that a draft's first j tokens are all full
    depth's (non-increasing in j). `fitted_on`: what the curves were measured on."""

    curves: dict[str, list[float]]
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_curves(self.curves, "draft_priors")

    def value(self, cls: str | None, depth: int) -> float:
        """The expected tokens a draft's `depth`-th position adds (0 for an unknown class or depth)."""
        curve = self.curves.get(cls or "", ())
        return curve[depth - 1] if 0 < depth <= len(curve) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "curves": self.curves, "fitted_on": self.fitted_on}


def check_curves(curves: object, where: str) -> None:
    """Refuse curves that are not {class: [chances in [0, 1], non-increasing]}, naming the class."""
    if not isinstance(curves, dict) or not curves:
        raise GenerationInputError(f"{where}: curves must be a non-empty mapping of draft class to chances")
    for cls, curve in curves.items():
        if not isinstance(cls, str) or not (cls == CORPUS or (cls.startswith("ngram") and cls[5:].isdigit())):
            raise GenerationInputError(f"{where}: unknown draft class {cls!r} (ngramN or corpus)")
        ok = isinstance(curve, list) and all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 for p in curve
        )
        if not ok or any(b > a + 1e-12 for a, b in zip(curve, curve[1:])):
            raise GenerationInputError(f"{where}: class {cls}'s curve must be non-increasing chances in [0, 1]")


def fit_draft_priors(
    pairs: Iterable[tuple[Sequence[int], Sequence[int]]], corpus: CorpusIndex | None, *, k_max: int = 8,
    min_n: int = 1, max_n: int = 3,
) -> DraftPriors:  # fmt: skip
    """The curves measured on (prompt, full depth's answer) pairs: at every answer position, the
    draft a row there would make (`text_draft`) and how many of its tokens the answer continues
    with. Every position counts, not only those a decode starts a round at."""
    rounds: dict[str, int] = {}
    hits: dict[str, list[int]] = {}
    answers = tokens = 0
    for prompt, answer in pairs:
        answer = [int(t) for t in answer]
        text = NgramIndex(prompt, min_n=min_n, max_n=max_n)
        answers, tokens = answers + 1, tokens + len(answer)
        for t, token in enumerate(answer):
            if t:  # a round starts after the answer's first token (the prefill's)
                cls, drafts = text_draft(text, corpus, k_max)
                if cls is not None:
                    rounds[cls] = rounds.get(cls, 0) + 1
                    row = hits.setdefault(cls, [0] * k_max)
                    for j, d in enumerate(drafts):
                        if t + j >= len(answer) or d != answer[t + j]:  # past the answer's end: unknown, a miss
                            break
                        row[j] += 1
            text.append(token)
    curves = {cls: [h / rounds[cls] for h in hits[cls]] for cls in sorted(rounds)}
    fitted = {"answers": answers, "tokens": tokens, "rounds": rounds, "k_max": k_max, "ngram": [min_n, max_n],
              "corpus": corpus is not None}  # fmt: skip
    return DraftPriors(curves, fitted)


def write_draft_priors(path: Any, priors: DraftPriors, **about: Any) -> None:
    """Save as JSON, atomically (a partial file, then a rename)."""
    data = priors.to_dict()
    data["fitted_on"] = {**data["fitted_on"], **about}
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(partial, path)


def read_draft_priors(path: Any) -> DraftPriors:
    """The priors in `path`; a malformed file is refused, naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise GenerationInputError(f"cannot read the draft priors {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GenerationInputError(f"{path}: not a draft priors file of format {FORMAT}")
    check_curves(data.get("curves"), str(path))
    return DraftPriors(data["curves"], data.get("fitted_on", {}))


@dataclass
class VerifyCurve:
    """A verify pass's cost by packed positions (every row's drafts + 1), as measured points
    (positions, ms), linear between them and beyond the last two."""

    points: list[tuple[int, float]]
    source: str = "measured"

    def __post_init__(self) -> None:
        self.points = sorted((int(p), float(ms)) for p, ms in self.points)
        if len(self.points) < 2 or self.points[0][0] < 1 or any(ms <= 0 for _, ms in self.points):
            raise GenerationInputError("a VerifyCurve needs at least two points (positions >= 1, ms > 0)")
        self._xs = [p for p, _ in self.points]

    def cost(self, positions: int) -> float:
        xs, pts = self._xs, self.points
        i = min(max(bisect_left(xs, positions), 1), len(xs) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return max(y0 + (y1 - y0) * (positions - x0) / (x1 - x0), 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "source": self.source}


def allocate(offers: Sequence[tuple[str | None, int]], fixed_positions: int, fixed_rows: int,
             priors: DraftPriors, curve: VerifyCurve) -> list[int]:  # fmt: skip
    """How many of its drafts each offering row verifies: `offers[i]` = (class, drafts it has).
    The pass also carries `fixed_positions` positions of `fixed_rows` other rows (each worth one
    token). Positions are taken most valuable first (ties: shallower first, so a row's are taken in
    order) while expected tokens per cost rise; the best prefix is kept."""
    candidates = sorted(((priors.value(cls, j), -j, i) for i, (cls, n) in enumerate(offers) for j in range(1, n + 1)),
                        reverse=True)  # fmt: skip
    base_positions, tokens = fixed_positions + len(offers), float(fixed_rows + len(offers))
    best_rate, best = tokens / curve.cost(base_positions), 0
    for taken, (value, _, _) in enumerate(candidates, 1):
        if value <= 0.0:
            break
        tokens += value
        rate = tokens / curve.cost(base_positions + taken)
        if rate > best_rate:
            best_rate, best = rate, taken
    k = [0] * len(offers)
    for _, neg_j, i in candidates[:best]:
        k[i] = max(k[i], -neg_j)
    return k


__all__ = [
    "CORPUS",
    "DRAFT_PRIORS_NAME",
    "DraftPriors",
    "VerifyCurve",
    "allocate",
    "fit_draft_priors",
    "read_draft_priors",
    "text_draft",
    "write_draft_priors",
]
