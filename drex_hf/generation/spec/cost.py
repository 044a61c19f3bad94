"""What a self-speculative round costs, and how many drafts a row should make.

`SpecCost` prices a round (k drafts, one verify pass over k + 1 positions) against a full-depth step,
in milliseconds measured at start-up or in layer evaluations; `adaptive_k` picks a row's next k from
its own per-draft acceptance; `spec_speedup_ceiling` is the layer-count ceiling benches report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class SpecCost:
    """The cost of a round, per row, in milliseconds (or any unit: only ratios matter): a draft step
    costs `draft` per drafted token; a verify pass costs `verify_fixed` + `verify_per_position` per
    verified position (k drafts verify k + 1 positions). `full`: one full-depth decode step, what a
    round must beat per token. `source`: `layers` (counted in layer evaluations: the CPU, where a
    position costs its layers) or the file / measurement the constants came from."""

    draft: float
    verify_fixed: float
    verify_per_position: float
    full: float
    source: str = "layers"
    draft_fixed: float = 0.0  # what a round pays once it drafts at all (a CPU verify of 2 positions: padded rows)

    @classmethod
    def from_layers(cls, num_layers: int, draft_exit: int) -> SpecCost:
        """Costs counted in layer evaluations: a draft runs layers 0..draft_exit, a verify the rest per
        position plus one shallow pass; a full step runs every layer."""
        shallow, deep = draft_exit + 1, num_layers - 1 - draft_exit
        return cls(draft=shallow, verify_fixed=shallow, verify_per_position=deep, full=num_layers)

    def round_cost(self, k: int) -> float:
        drafting = self.draft_fixed if k else 0.0
        return k * self.draft + self.verify_fixed + (k + 1) * self.verify_per_position + drafting

    def best_k(self, acceptance: float, max_k: int) -> int:
        """The draft length in 0..max_k with the most expected tokens per cost when each draft is
        accepted with probability `acceptance` (independently): a round yields
        (1 - a^(k+1)) / (1 - a) tokens."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-9)
        rates = [((1 - a ** (k + 1)) / (1 - a)) / self.round_cost(k) for k in range(max_k + 1)]
        return max(range(max_k + 1), key=lambda k: (rates[k], -k))

    def speedup(self, acceptance: float, k: int) -> float:
        """Predicted tokens per cost against full depth's, at acceptance `acceptance` and k drafts."""
        a = min(max(acceptance, 0.0), 1.0 - 1e-9)
        return ((1 - a ** (k + 1)) / (1 - a)) / self.round_cost(k) * self.full

    def to_dict(self) -> dict[str, Any]:
        return {
            "draft": self.draft,
            "verify_fixed": self.verify_fixed,
            "verify_per_position": self.verify_per_position,
            "full": self.full,
            "source": self.source,
            "draft_fixed": self.draft_fixed,
        }


def judged_drafts(drafted: int, accepted: int) -> int:
    """Drafts a round's verify pass judged: the accepted ones and the first rejection; the drafts
    after it are dropped unjudged."""
    return min(accepted + 1, drafted)


def adaptive_k(
    cost: SpecCost, drafted: Sequence[int], accepted: Sequence[int], prior_acceptance: float, k_max: int
) -> int:
    """Adaptive drafting's k for a row's next round: `cost.best_k` under the row's per-draft
    acceptance so far — accepted drafts over judged ones (a round's drafts up to its first
    rejection; later ones say nothing), with `prior_acceptance` counted as two judged drafts. A row
    whose prior makes k = 0 best never drafts, so never learns otherwise: give it a calibrated prior
    (the draft exit's measured acceptance). Probing with one draft every few rounds was tried and
    cost more than it found at batch 8, where one row's draft step holds up the whole batch."""
    judged = sum(judged_drafts(d, a) for d, a in zip(drafted, accepted))
    return best_k(cost, sum(accepted), judged, prior_acceptance, k_max)


def best_k(cost: SpecCost, accepted: int, judged: int, prior_acceptance: float, k_max: int) -> int:
    """`cost.best_k` at the acceptance `accepted` of `judged` drafts show, with `prior_acceptance`
    counted as two judged drafts."""
    return cost.best_k((accepted + 2 * prior_acceptance) / (judged + 2), k_max)


def spec_speedup_ceiling(num_layers: int, draft_exit: int, acceptance: float, k: int) -> float:
    """Tokens per layer evaluation against full depth's, at `acceptance` and k drafts (the layer-count
    ceiling: what a device where a position costs its layers could gain at most)."""
    return SpecCost.from_layers(num_layers, draft_exit).speedup(acceptance, k)
