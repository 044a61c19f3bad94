"""Thresholds certified on whole generated answers (CALM's *textual consistency*): Learn-then-Test
over prompts, not tokens.

Per test prompt, drex's greedy answer under a candidate threshold vector is scored against the
full-depth greedy answer (`rouge_l`: ROUGE-L F1 of the two token-id sequences; `exact`: 1 when the ids
are identical), the loss being 1 − score in [0, 1]. Candidates come from the learn prompts' token
observations (`thresholds.candidates`), ordered by their exit rate there, no exits first; each is
tested against H0: mean loss ≥ 1 − target with a p-value valid for the mean of [0, 1] losses
(Hoeffding-Bentkus; binomial for 0/1 losses), in that order, stopping at the first not rejected — so
answers are only generated up to the first failure. The loosest rejected candidate's expected score
on new prompts from the same source is ≥ target with probability ≥ 1 − delta.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from drex_hf.calibration.thresholds import (
    BOUNDS,
    LEVELS,
    CalibrationDataError,
    Observations,
    agreement_counts,
    candidates,
    risk_p_value,
    tokens_needed,
)
from drex_hf.calibration_file import SEQUENCE_METRICS
from drex_hf.config import thresholds_to_json

METRICS = SEQUENCE_METRICS  # rouge_l, exact
# the bound each metric gets unless one is named: exact's losses are 0/1 (the binomial tail is exact),
# rouge_l's lie anywhere in [0, 1]
DEFAULT_BOUNDS = {"rouge_l": "hoeffding_bentkus", "exact": "binomial"}


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two id sequences (O(len(a) · len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(answer: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 between two token-id sequences (what `rouge-score` computes on words, here on the
    model's own tokens, so no text tokenizer drops punctuation or case); two empty answers score 1."""
    if not answer and not reference:
        return 1.0
    lcs = lcs_length(answer, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(answer), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, answer: Sequence[int], reference: Sequence[int]) -> float:
    """One answer's score in [0, 1] against the full-depth answer."""
    if metric == "rouge_l":
        return rouge_l(answer, reference)
    if metric == "exact":
        return float(list(answer) == list(reference))
    raise CalibrationDataError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def check_options(metric: str, target: float, delta: float, bound: str | None = None) -> str:
    """Refuse a metric, target, delta or bound the test cannot use; returns the bound to use."""
    if metric not in METRICS:
        raise CalibrationDataError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise CalibrationDataError(f"the target mean {metric} must be in (0, 1), got {target!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise CalibrationDataError(f"delta must be in (0, 1), got {delta!r}")
    bound = bound or DEFAULT_BOUNDS[metric]
    if bound not in BOUNDS:
        raise CalibrationDataError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    if bound == "binomial" and metric != "exact":
        raise CalibrationDataError(
            f"the binomial bound needs 0/1 losses; {metric} scores lie anywhere in [0, 1]: use hoeffding_bentkus "
            "(the default) or hoeffding"
        )
    return bound


def check_enough_prompts(test_prompts: int, metric: str, target: float, delta: float, bound: str, total: int) -> None:
    """Refuse, before anything is generated, too few test prompts for even perfect answers to pass."""
    needed = tokens_needed(target, delta, bound)
    if test_prompts < needed:
        learn_share = 1 - test_prompts / total if total else 0.5
        raise CalibrationDataError(
            f"{test_prompts} test prompts (of {total}) can never show a mean {metric} >= {target} with probability "
            f">= {1 - delta:.2f} ({bound} bound): even if every answer matched full depth, at least {needed} test "
            f"prompts are needed, about {math.ceil(needed / (1 - learn_share))} prompts in all; draw more prompts"
        )


def ordered_candidates(
    learn: Observations, enabled: list[bool] | None = None, levels: tuple[float, ...] = LEVELS
) -> list[tuple[list[float], float]]:
    """(thresholds, share of learn tokens that exit) from the learn prompts' token-level fits at
    `levels`, exits not `enabled` held at +inf, duplicates dropped, ordered by that share (no exits
    first: the ladder only loosens, so the order is the ladder's)."""
    out: list[tuple[list[float], float]] = []
    for thresholds in candidates(learn, levels):
        if enabled is not None:
            thresholds = [t if on else math.inf for t, on in zip(thresholds, enabled)]
        if any(thresholds == seen for seen, _ in out):
            continue
        _, n, counts = agreement_counts(learn, thresholds)
        out.append((thresholds, sum(counts) / n if n else 0.0))
    return sorted(out, key=lambda c: c[1])  # stable: ties keep the ladder's order


# thresholds -> (answers, exits): each answer's token ids and the exit index each token left at
# (len(thresholds) = full depth)
Answers = Callable[[list[float]], tuple[list[list[int]], list[list[int]]]]


@dataclass
class SequenceResult:
    thresholds: list[float]
    metric: str
    target: float
    delta: float
    bound: str
    learn_prompts: int
    test_prompts: int
    mean_score: float
    p_value: float
    exit_fractions: list[float]  # per exit: share of the generated test tokens that left there
    test_tokens: int  # tokens drex generated on the test prompts under `thresholds`
    tested: list[dict] = field(default_factory=list)

    @property
    def exits_anything(self) -> bool:
        return any(math.isfinite(t) for t in self.thresholds)

    def to_dict(self) -> dict:
        return {
            "kind": "sequence",
            "metric": self.metric,
            "target": self.target,
            "delta": self.delta,
            "bound": self.bound,
            "thresholds": thresholds_to_json(self.thresholds),
            "learn_prompts": self.learn_prompts,
            "prompts": self.test_prompts,
            "mean_score": self.mean_score,
            "p_value": self.p_value,
            "exit_fractions": self.exit_fractions,
            "exiting": sum(self.exit_fractions),
            "test_tokens": self.test_tokens,
            "tested": [dict(c, thresholds=thresholds_to_json(c["thresholds"])) for c in self.tested],
        }


def certify(
    ordered: list[tuple[list[float], float]],
    answers_for: Answers,
    references: list[list[int]],
    metric: str,
    target: float,
    delta: float,
    *,
    bound: str | None = None,
    learn_prompts: int = 0,
) -> SequenceResult:
    """Fixed-sequence test of `ordered` candidates (see the module docstring) on the test prompts whose
    full-depth answers are `references`; `answers_for` generates drex's answers for one candidate and
    is called only for candidates with an exit, in order, until the first one that fails."""
    bound = check_options(metric, target, delta, bound)
    n = len(references)
    check_enough_prompts(n, metric, target, delta, bound, n + learn_prompts)
    if not ordered or any(math.isfinite(t) for t in ordered[0][0]):
        raise CalibrationDataError("the candidates must start with the no-exit one (every threshold +inf)")
    exits = len(ordered[0][0])
    full_tokens = sum(len(r) for r in references)
    tested: list[dict] = []
    chosen = (ordered[0][0], 1.0, 0.0, [0.0] * exits, full_tokens)
    for thresholds, learn_rate in ordered:
        if not any(math.isfinite(t) for t in thresholds):  # full depth: the reference itself
            entry = {"mean_score": 1.0, "p_value": 0.0, "exit_fractions": [0.0] * exits, "tokens": full_tokens}
            tested.append({"thresholds": thresholds, "learn_exit_rate": learn_rate, **entry, "rejected": True})
            continue
        answers, taken = answers_for(thresholds)
        if len(answers) != n or len(taken) != n:
            raise CalibrationDataError(f"{len(answers)} answers for {n} test prompts")
        scores = [score(metric, a, r) for a, r in zip(answers, references)]
        mean = sum(scores) / n
        p = risk_p_value(1 - mean, n, 1 - target, bound)
        tokens = sum(len(t) for t in taken)
        counts = torch.bincount(torch.tensor([j for t in taken for j in t], dtype=torch.long), minlength=exits + 1)
        fractions = [int(c) / tokens if tokens else 0.0 for c in counts[:exits]]
        rejected = p <= delta
        tested.append(
            {
                "thresholds": thresholds,
                "learn_exit_rate": learn_rate,
                "mean_score": mean,
                "p_value": p,
                "exit_fractions": fractions,
                "tokens": tokens,
                "identical": sum(list(a) == list(r) for a, r in zip(answers, references)),
                "rejected": rejected,
            }
        )
        if not rejected:
            break
        chosen = (thresholds, mean, p, fractions, tokens)
    thresholds, mean, p, fractions, tokens = chosen
    return SequenceResult(
        thresholds=thresholds,
        metric=metric,
        target=target,
        delta=delta,
        bound=bound,
        learn_prompts=learn_prompts,
        test_prompts=n,
        mean_score=mean,
        p_value=p,
        exit_fractions=fractions,
        test_tokens=tokens,
        tested=tested,
    )
