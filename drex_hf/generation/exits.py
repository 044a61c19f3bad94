"""Exit sources: where each token's exit decision comes from (DESIGN.md §2, §5).

`heads`: the exit head's confidence against its threshold (the real thing, the default).
`trace`: the exit layer is replayed from a recorded run (`ExitReplay`, e.g. `exit_layers` of an
earlier `generate`) or drawn per token from a stated distribution over the exit points
(`ExitDistribution`), seeded per request so a request's exits never depend on its neighbours (token
i's exit is a function of the request's seed and i: the counter-based draw of `sampling`).
With a trace the engine still pays every real cost (segments, confidence checks, the exiting rows'
vocabulary projection, KV fill); only the decision is taken from the trace.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from drex_hf.errors import GenerationInputError
from drex_hf.generation.sampling import host_uniform


@dataclass(frozen=True)
class ExitDistribution:
    """P(token leaves at exit point j) for each exit point in order, then P(full depth); sums to 1."""

    probabilities: tuple[float, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        probs = tuple(float(p) for p in self.probabilities)
        if any(not math.isfinite(p) or p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise GenerationInputError(
                f"an exit distribution needs non-negative probabilities summing to 1, got {list(self.probabilities)}"
            )
        object.__setattr__(self, "probabilities", probs)

    def check(self, num_exits: int) -> None:
        if len(self.probabilities) != num_exits + 1:
            raise GenerationInputError(
                f"the exit distribution has {len(self.probabilities)} probabilities; this model has {num_exits} "
                f"exit points, so it needs {num_exits + 1} (one per exit point, then full depth)"
            )

    def mean_layers(self, exit_layers: Sequence[int], num_layers: int) -> float:
        depths = [e + 1 for e in exit_layers] + [num_layers]
        return sum(p * d for p, d in zip(self.probabilities, depths))


@dataclass(frozen=True)
class ExitReplay:
    """Recorded exit layers, one row per request: token i of request b leaves at `layers[b][i]`.

    Token 0 comes from the full-depth prefill whatever the trace says; a row that runs out (or holds
    -1, as `generate`'s output does after a row's end) decodes its remaining tokens at full depth.
    """

    layers: tuple[tuple[int, ...], ...]

    @classmethod
    def from_output(cls, exit_layers: torch.Tensor | Sequence[Sequence[int]]) -> ExitReplay:
        rows = exit_layers.tolist() if isinstance(exit_layers, torch.Tensor) else exit_layers
        return cls(tuple(tuple(int(v) for v in row) for row in rows))

    def check(self, exit_layers: Sequence[int], num_layers: int, batch: int) -> None:
        if len(self.layers) != batch:
            raise GenerationInputError(f"the exit trace has {len(self.layers)} rows for {batch} prompts")
        for b, row in enumerate(self.layers):
            check_trace_row(row, exit_layers, num_layers, f"exit trace row {b}")


def check_trace_row(row: Sequence[int], exit_layers: Sequence[int], num_layers: int, what: str) -> None:
    """Refuse a trace row holding layers that are not exit points (or full depth, or -1 for 'no token')."""
    allowed = {*exit_layers, num_layers - 1, -1}
    bad = sorted({int(v) for v in row} - allowed)
    if bad:
        raise GenerationInputError(
            f"{what} holds layer(s) {bad}, which are not exit points of this model; "
            f"allowed: {sorted(allowed - {-1})} (and -1 for 'no token')"
        )


class RequestExits:
    """One request's trace exits: `next_layer()` gives the exit layer of each decoded token in turn."""

    def __init__(
        self,
        exit_layers: Sequence[int],
        num_layers: int,
        replay: Sequence[int] | None = None,
        dist: tuple | None = None,
    ) -> None:
        self.points = [*exit_layers, num_layers - 1]
        self.replay = replay
        self.index = 0  # token 0 is the prefill's
        self.seed: int | None = None
        if dist is not None:
            probabilities, seed = dist
            self.seed = int(seed)
            self.cumulative = list(itertools.accumulate(probabilities))

    def next_layer(self) -> int:
        self.index += 1
        if self.seed is not None:  # token i's exit: the counter-based draw (seed, i), inverted on the host
            u = host_uniform(self.seed, self.index) * self.cumulative[-1]
            return self.points[min(bisect.bisect_right(self.cumulative, u), len(self.points) - 1)]
        if self.replay is None or self.index >= len(self.replay) or self.replay[self.index] < 0:
            return self.points[-1]
        return int(self.replay[self.index])
