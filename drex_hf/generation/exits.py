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

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from drex_hf.errors import GenerationInputError
from drex_hf.generation.sampling import host_uniforms
from drex_hf.seeds import check_seed


@dataclass(frozen=True)
class ExitDistribution:
    """P(token leaves at exit point j) for each exit point in order, then P(full depth); sums to 1.

    `seed` (an integer in [0, 2**64)) plus the request's seed (or id) seeds each request's draws."""

    probabilities: tuple[float, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        probs = tuple(float(p) for p in self.probabilities)
        if any(not math.isfinite(p) or p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise GenerationInputError(
                f"an exit distribution needs non-negative probabilities summing to 1, got {list(self.probabilities)}"
            )
        object.__setattr__(self, "probabilities", probs)
        object.__setattr__(self, "seed", check_seed(self.seed, "ExitDistribution seed"))

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
            self.cumulative = tuple(itertools.accumulate(probabilities))

    def next_layer(self) -> int:
        """The next decoded token's exit layer."""
        return next_layers([self])[0]

    def _replayed(self) -> int:
        if self.replay is None or self.index >= len(self.replay) or self.replay[self.index] < 0:
            return self.points[-1]
        return int(self.replay[self.index])


def next_layers(requests: list[RequestExits]) -> list[int]:
    """Each request's next decoded token's exit layer: replayed, or drawn from its distribution — token
    i's exit is the counter-based draw (seed, i), inverted on the host, for all the drawn ones at once."""
    for r in requests:
        r.index += 1
    out = [r._replayed() if r.seed is None else -1 for r in requests]
    drawn = [i for i, r in enumerate(requests) if r.seed is not None]
    if not drawn:
        return out
    u = host_uniforms([requests[i].seed for i in drawn], [requests[i].index for i in drawn])
    groups: dict[tuple, list[int]] = {}  # requests drawing from the same distribution, inverted together
    for j, i in enumerate(drawn):
        groups.setdefault((requests[i].cumulative, tuple(requests[i].points)), []).append(j)
    for (cumulative, points), members in groups.items():
        at = np.searchsorted(np.asarray(cumulative), u[members] * cumulative[-1], side="right")
        for j, k in zip(members, np.minimum(at, len(points) - 1).tolist()):
            out[drawn[j]] = points[k]
    return out
