"""The scheduler's cost constants, fitted from timings, and which exit points pay on this device.

A `CostTable` holds, for every segment (the layers between consecutive exit points) and a range of
row counts, the milliseconds of its layers alone and of its exit check (head + confidence), plus the
KV fill of the layers after each exit. It is measured on a real model by `profile_runner` (warm-up,
the fastest of several repeats, CUDA synchronised) or by any `timer(kind, index, rows)` — a synthetic
one in tests. From it come the scheduler's `CostModel` (segment + check, interpolated over rows), the
prediction error on row counts left out of the fit, and each exit's expected net saving per token:
P(exit) × the later segments' cost − P(reach) × the check's cost − P(exit) × the KV fill's cost.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from drex_hf.generation.profile import fit_line
from drex_hf.generation.scheduler import CostModel, error_summary, interpolate

# (kind: "layers" | "check" | "fill" | ..., segment or exit, rows[, cached positions]) -> ms; without the
# context argument a timer times at its reference context
Timer = Callable[..., float]


@dataclass
class CostTable:
    rows: list[int]
    layers_ms: list[list[float]]  # [segment][row count]
    check_ms: list[list[float]]  # [exit point = segment s < last][row count]
    fill_ms: list[list[float]]  # [exit point][row count]: KV fill of every layer after it
    regroup_ms: list[float] | None = None  # [segment]: extra ms per row when rows are scattered
    project_ms: list[float] | None = None  # [row count]: deferred vocabulary projections (features -> logits)
    context_ms: list[float] | None = None  # [segment]: ms per row per cached position beyond the reference

    @classmethod
    def measure(
        cls,
        timer: Timer,
        segments: int,
        rows: list[int],
        progress: Callable[[], None] | None = None,
        regroup: bool = False,
        project: bool = False,
        long_context: int | None = None,
        reference_context: int | None = None,
    ) -> CostTable:
        """Time every kind of work at every row count with `timer`; with `regroup`, also each segment
        on three slots in four ("scattered", gathered copies) against as many contiguous rows; with
        `long_context`, each segment at the largest row count with that many cached positions, whose
        difference from the reference context gives the per-row, per-position cost (`context_ms`)."""
        out = cls(rows, [], [], [], [] if regroup else None)
        if long_context is not None:
            if reference_context is None or long_context <= reference_context:
                raise ValueError(f"long_context {long_context} must exceed the reference context {reference_context}")
            out.context_ms = []
        if project:
            out.project_ms = [timer("project", 0, n) for n in rows]
        for s in range(segments):
            out.layers_ms.append([timer("layers", s, n) for n in rows])
            if regroup:
                n = max(1, 3 * max(rows) // 4)
                apart, together = timer("scattered", s, n), timer("layers", s, n)
                out.regroup_ms.append(max(0.0, (apart - together) / n))
            if out.context_ms is not None:
                n = max(rows)
                longer = timer("layers", s, n, long_context)
                spread = (long_context - reference_context) * n
                out.context_ms.append(max(0.0, (longer - out.layers_ms[s][-1]) / spread))
            if s < segments - 1:
                out.check_ms.append([timer("check", s, n) for n in rows])
                out.fill_ms.append([timer("fill", s, n) for n in rows])
            if progress:
                progress()
        return out

    def with_checks(self, check_ms: list[list[float]]) -> CostTable:
        """The same table with other exit checks' times (another confidence measure's)."""
        return dataclasses.replace(self, check_ms=[list(t) for t in check_ms])

    def per_row(self, table: list[float], n: int) -> float:
        """Milliseconds per row at n rows, interpolated over the measured row counts."""
        return interpolate(self.rows, table, n) / n

    def cost_model(self, context: int, device: str) -> CostModel:
        """What the scheduler predicts from: a step of segment s is its layers plus its check (the last
        segment's 'check' is the final norm and lm_head, measured as part of its layers)."""
        table = []
        for s, layers in enumerate(self.layers_ms):
            check = self.check_ms[s] if s < len(self.check_ms) else [0.0] * len(self.rows)
            table.append([a + b for a, b in zip(layers, check)])
        lines = [fit_line(self.rows, t) for t in table]
        regroup = self.regroup_ms or [0.0] * len(table)
        return CostModel(
            [a for a, _ in lines],
            [b for _, b in lines],
            regroup,
            context,
            source="calibration",
            device=device,
            rows=list(self.rows),
            table_ms=table,
            fill_ms=[list(t) for t in self.fill_ms] or None,
            project_ms=self.project_ms,
            context_ms=self.context_ms,
        )

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "layers_ms": self.layers_ms,
            "check_ms": self.check_ms,
            "fill_ms": self.fill_ms,
            "regroup_ms": self.regroup_ms,
            "project_ms": self.project_ms,
            "context_ms": self.context_ms,
        }


def prediction_errors(model: CostModel, timer: Timer, rows: list[int], contexts: list[int] | None = None) -> dict:
    """Relative error of the model's step predictions at row counts (and cached-position counts) it
    was not fitted on: every held-out row count at the reference context and at each of `contexts`."""
    predicted, measured = [], []
    segments = len(model.a_ms)
    for context in [None, *(contexts or [])]:
        at = () if context is None else (context,)
        for s in range(segments):
            for n in rows:
                took = timer("layers", s, n, *at) + (timer("check", s, n, *at) if s < segments - 1 else 0.0)
                measured.append(took)
                predicted.append(model.segment_ms(s, n, context))
    return {
        "rows": rows,
        "contexts": [model.context_ref, *(contexts or [])],
        **error_summary(predicted, measured),
        "count": len(measured),
    }


def expected_token_ms(costs: CostTable, exit_fractions: list[float], enabled: list[bool], rows: int) -> float:
    """Expected milliseconds per token at `rows` rows per step, when a token leaves at enabled exit j
    with probability exit_fractions[j] (fractions of all tokens) and checks run at every enabled exit
    it reaches, and an exited token pays its KV fill and its deferred vocabulary projection. Disabled
    exits neither check nor let tokens out."""
    total, reach = 0.0, 1.0
    for s, layers in enumerate(costs.layers_ms):
        total += reach * costs.per_row(layers, rows)
        if s < len(costs.check_ms) and enabled[s]:
            total += reach * costs.per_row(costs.check_ms[s], rows)
            leave = min(exit_fractions[s], reach)
            total += leave * costs.per_row(costs.fill_ms[s], rows)
            if costs.project_ms:  # an exited token skips the last segment's lm_head but is projected later
                total += leave * costs.per_row(costs.project_ms, rows)
            reach -= leave
    return total


def net_savings(costs: CostTable, exit_fractions: list[float], enabled: list[bool], rows: int) -> list[float]:
    """Per exit point: milliseconds per token saved by having it on, the others as in `enabled`."""
    out = []
    for j in range(len(costs.check_ms)):
        on, off = list(enabled), list(enabled)
        on[j], off[j] = True, False
        out.append(
            expected_token_ms(costs, exit_fractions, off, rows) - expected_token_ms(costs, exit_fractions, on, rows)
        )
    return out


def choose_exits(
    costs: CostTable, fractions_for: Callable[[list[bool]], list[float]], rows: int
) -> tuple[list[bool], list[dict]]:
    """Switch off, one at a time, the exit whose net saving is most negative, re-deriving the exit
    fractions (`fractions_for(enabled)`) after each change, until every exit left on pays; then keep
    exits only if the result beats full depth. Returns the enabled mask and the steps taken."""
    enabled = [True] * len(costs.check_ms)
    steps = []
    while True:
        fractions = fractions_for(enabled)
        savings = net_savings(costs, fractions, enabled, rows)
        worst = min((s, j) for j, s in enumerate(savings) if enabled[j]) if any(enabled) else None
        steps.append({"enabled": list(enabled), "exit_fractions": fractions, "net_savings_ms": savings})
        if worst is None or worst[0] >= 0:
            break
        enabled[worst[1]] = False
    full = expected_token_ms(costs, [0.0] * len(enabled), [False] * len(enabled), rows)
    if any(enabled) and expected_token_ms(costs, fractions_for(enabled), enabled, rows) >= full:
        enabled = [False] * len(enabled)
    return enabled, steps


def profile_runner(runner, context: int, repeats: int = 5, statistic: str = "median") -> Timer:  # noqa: ANN001
    """A timer over a real engine's `Runner`: the median (or fastest) of `repeats` synchronised runs
    after a warm-up, on the runner's still-empty slots, with every row's keys/values at `context`
    positions. "layers" is a segment's layers alone (the last segment: with the final norm and the
    vocabulary projection), "check" its exit check alone, "fill" and "project" those programs. The
    median predicts what a step will take; the minimum, what it can take."""
    from drex_hf.device import time_ms as timed_ms

    device, store = runner.device, runner.store

    def position_at(positions: int | None) -> int:
        positions = min(context, store.max_len) if positions is None else positions
        if positions > store.max_len:
            raise ValueError(f"cannot time at {positions} cached positions: the store holds {store.max_len}")
        return max(0, positions - 1)

    @torch.no_grad()
    def timer(kind: str, index: int, n: int, positions: int | None = None) -> float:
        position = position_at(positions)
        rows = list(range(n))
        if kind == "scattered":  # n rows on three slots in four: the gathered path
            kind, rows = "layers", [i for i in range(store.slots) if i % 4 != 3][:n]
        if kind.startswith("check:"):  # another confidence measure's check on the same rows
            from drex_hf.heads import exit_confidence

            measure = kind.split(":", 1)[1]
            x = runner.state.hidden[:n].clone()
            previous = x.clone()  # saturation compares with the previous exit's states: same shape, same cost
            head = runner.programs.heads[index]
            return timed_ms(lambda: exit_confidence(measure, head, x, previous), repeats, device, statistic)
        if kind not in ("layers", "check", "fill", "project"):
            raise ValueError(f"unknown timing kind {kind!r}")
        took = timed_ms(runner.probe(kind, index, rows, position), repeats, device, statistic)
        runner.clear()
        return took

    return timer


@torch.no_grad()
def boundary_factor(whole, segmented, rows: int, context: int, repeats: int = 9) -> float:  # noqa: ANN001
    """A full-depth step as one segment ÷ the same layers run segment by segment (the segment
    boundaries' own cost, with no checks), both runners on `rows` rows at `context` positions,
    timed in alternation so that the machine's drift falls on both alike (medians of `repeats`)."""
    from drex_hf.device import synchronize

    slots = list(range(rows))

    def probes(runner) -> list:  # noqa: ANN001
        position = max(0, min(context, runner.store.max_len) - 1)
        return [runner.probe("layers", s, slots, position) for s in range(len(runner.segments))]

    steps = {id(whole): probes(whole), id(segmented): probes(segmented)}

    def run(runner) -> float:  # noqa: ANN001
        synchronize(runner.device)
        start = time.perf_counter()
        for probe in steps[id(runner)]:
            probe()
        synchronize(runner.device)
        return time.perf_counter() - start

    run(whole), run(segmented)  # warm-up
    one, many = [], []
    for _ in range(repeats):
        one.append(run(whole))
        many.append(run(segmented))
    whole.clear()
    segmented.clear()
    return statistics.median(one) / statistics.median(many)
