"""CPU matrix products, chosen by measurement: the kernel and the row count each product runs as.

A decode pass on a CPU is a few rows times every weight of the model, so it reads the weights from
memory, and the BLAS's choice of code path decides its speed. On the 2-core VM (MKL, AMD EPYC),
SmolLM2-135M's nn.Linear products, swept cold in layer order, took:

    rows                      1      2      3      4      5      8     16
    x @ W.T (F.linear)     60.6  100.5  117.2   88.2   77.5   69.9   81.5   ms
    (W @ x.T).T            31.6*  31.5   33.7   47.2   43.9   53.2   75.7   ms   (* run as 2 rows)

F.linear runs 2 to 4 rows row by row, re-reading each weight, and one row as a single-threaded
matrix-vector product; the transposed product streams each weight once for all rows. Which is
faster depends on the BLAS, the CPU, the shapes and the rows, so nothing is assumed: the first
engine built on a model measures both kernels over the model's own weights (read cold, as a pass
reads them), at 1..8 rows and at a few larger probes, before any step, and each row count keeps the
fastest kernel and padded count (a padded or other kernel only where it saves over 5 %). Padding rows are zeros and are
dropped from the result, so a row's values are its own.

It is used only inside the engines' steps (`use_products`, thread-local), on CPU weights of models
whose linear weights hold at least `MIN_BYTES` (a tiny model's passes are Python, not products),
without autograd. Elsewhere — HF's own `generate`, training, CUDA — every product is F.linear.
`DREX_CPU_PRODUCTS=off` turns it off; `on` uses it whatever the model's size.
"""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

KERNELS = ("linear", "transposed")
MOST_PADDED_ROWS = 8  # 1..8 rows may run padded to any count up to this
PROBES = (12, 24, 48)  # larger row counts take the kernel measured at the nearest probe (not padded)
MIN_BYTES = 64 * 2**20  # models whose linear weights are smaller run F.linear (their passes are Python)
SAVING = 0.95  # a padded count or another kernel is taken only when it costs less than this fraction
ENV = "DREX_CPU_PRODUCTS"

_LOCAL = threading.local()
_TABLES: dict[tuple, ProductTable] = {}
_MEASURE = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """How a product over some rows runs: `kernel` (one of `KERNELS`) at `rows` rows (padded)."""

    kernel: str
    rows: int


class ProductTable:
    """Per group of weights (`layers`: every decoder layer's nn.Linear, `head`: the lm_head), the
    `Choice` for each row count, measured lazily (`choice`) or given (tests: `fixed`)."""

    def __init__(self, groups: dict[str, list[torch.Tensor]], repeats: int = 3, every: int = 3) -> None:
        self.groups, self.repeats, self.every = groups, repeats, every
        self.choices: dict[tuple[str, int], Choice] = {}
        self.spent: dict[str, dict[tuple[str, int], float]] = {g: {} for g in groups}  # ms per sweep
        self.measure_s = 0.0
        self.fixed: dict[str, Choice] | None = None

    @classmethod
    def given(cls, choices: dict[str, Choice]) -> ProductTable:
        """A table that answers `choices[group]` for every row count (it pads only counts below the
        choice's rows): tests use it to run each kernel and padding on purpose."""
        table = cls({})
        table.fixed = dict(choices)
        return table

    def choice(self, group: str, rows: int) -> Choice:
        if self.fixed is not None:
            fixed = self.fixed.get(group, Choice("linear", rows))
            return Choice(fixed.kernel, max(fixed.rows, rows))
        key = (group, rows)
        found = self.choices.get(key)
        if found is None:
            with _MEASURE:
                found = self.choices.get(key) or self._choose(group, rows)
                self.choices[key] = found
        return found

    def measure_all(self) -> None:
        """Measure every count a choice can need (1..8 rows at each padded count, and the probes) now,
        so that no step ever pays for a measurement: a timed step would count it (a calibration's
        cost model did, by 185 %)."""
        for group in self.groups:
            for rows in (*range(1, MOST_PADDED_ROWS + 1), *PROBES):
                for kernel in KERNELS:
                    self._measure(group, kernel, rows)

    def _choose(self, group: str, rows: int) -> Choice:
        if rows <= MOST_PADDED_ROWS:
            for m in range(rows, MOST_PADDED_ROWS + 1):
                for kernel in KERNELS:
                    self._measure(group, kernel, m)
            spent = self.spent[group]
            plain = spent[("linear", rows)]
            best = min(((k, m) for k in KERNELS for m in range(rows, MOST_PADDED_ROWS + 1)), key=spent.__getitem__)
            return Choice(*best) if spent[best] < SAVING * plain else Choice("linear", rows)
        probe = min(PROBES, key=lambda p: abs(p - rows))
        for kernel in KERNELS:
            self._measure(group, kernel, probe)
        spent = self.spent[group]
        faster = spent[("transposed", probe)] < SAVING * spent[("linear", probe)]
        return Choice("transposed" if faster else "linear", rows)

    def _measure(self, group: str, kernel: str, rows: int) -> None:
        """The best of `repeats` sweeps over every `every`-th weight of the group (all of a single
        one), each product with `rows` rows of zeros: far more bytes than a cache holds, so each
        weight is read from memory as in a pass."""
        if (kernel, rows) in self.spent[group]:
            return
        start = time.perf_counter()
        weights = self.groups[group]
        sample = weights[:: self.every] if len(weights) > 1 else weights
        inputs = {(w.shape[1], w.dtype): torch.zeros(rows, w.shape[1], dtype=w.dtype) for w in sample}
        best = float("inf")
        with torch.no_grad():
            for _ in range(self.repeats):
                begin = time.perf_counter()
                for w in sample:
                    _run(kernel, inputs[(w.shape[1], w.dtype)], w)
                best = min(best, time.perf_counter() - begin)
        self.spent[group][(kernel, rows)] = best * 1e3 * len(weights) / len(sample)
        self.measure_s += time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """The choices made so far and what was measured (ms per sweep of the group), for reports."""
        choices = {f"{g}/{n}": {"kernel": c.kernel, "rows": c.rows} for (g, n), c in sorted(self.choices.items())}
        spent = {g: {f"{k}/{m}": round(v, 3) for (k, m), v in sorted(s.items())} for g, s in self.spent.items()}
        return {"choices": choices, "spent_ms": spent, "measure_s": round(self.measure_s, 3)}


def _run(kernel: str, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if kernel == "transposed":
        return torch.mm(weight, flat.t()).t()
    return F.linear(flat, weight)


def product(module: nn.Linear, features: torch.Tensor, choice: Choice) -> torch.Tensor:
    """`module(features)` run as `choice`: the rows flattened, padded with zeros to `choice.rows`,
    the kernel, the padding dropped, the bias added."""
    width = features.shape[-1]
    rows = features.numel() // width
    flat = features.reshape(rows, width)
    if choice.rows > rows:
        flat = torch.cat([flat, flat.new_zeros(choice.rows - rows, width)])
    out = _run(choice.kernel, flat, module.weight)[:rows]
    if module.bias is not None:
        out = out + module.bias
    return out.contiguous().view(*features.shape[:-1], out.shape[-1])


def _forward(self: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """An installed nn.Linear's forward: F.linear, or inside `use_products` on the CPU without
    autograd, its table's choice for the rows."""
    table = getattr(_LOCAL, "table", None)
    if (
        table is None
        or features.device.type != "cpu"
        or features.dim() == 0
        or features.shape[-1] == 0
        or (torch.is_grad_enabled() and (features.requires_grad or self.weight.requires_grad))
    ):
        return F.linear(features, self.weight, self.bias)
    rows = features.numel() // features.shape[-1]
    choice = table.choice(self._drex_products, rows)
    if choice.kernel == "linear" and choice.rows == rows:
        return F.linear(features, self.weight, self.bias)
    return product(self, features, choice)


_forward.__name__ = "forward"  # a pickled model's bound method resolves to nn.Linear's own forward


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV} must be auto, on or off, got {mode!r}")
    return mode


def install_products(arch: Any, table: ProductTable | None = None) -> ProductTable | None:
    """The product table for `arch`'s model (shared by every engine on it, measured lazily), with its
    decoder layers' and lm_head's nn.Linear modules taking it inside `use_products`; None where it
    does not apply: not on the CPU, not float weights, linear weights under `MIN_BYTES` (unless
    `DREX_CPU_PRODUCTS=on`), or `DREX_CPU_PRODUCTS=off`. `table`: use this one (tests)."""
    mode = _mode()
    if mode == "off" and table is None:
        return None
    groups: dict[str, list[nn.Linear]] = {"layers": [], "head": []}
    for layer in arch.layers:
        groups["layers"] += [m for m in layer.modules() if type(m) is nn.Linear]
    head = arch.lm_head
    if type(head) is nn.Linear:
        groups["head"].append(head)
    modules = [m for ms in groups.values() for m in ms]
    usable = [m for m in modules if m.weight.device.type == "cpu" and m.weight.dtype.is_floating_point]
    if not usable or len(usable) != len(modules):
        return None
    if table is None:
        total = sum(m.weight.numel() * m.weight.element_size() for m in modules)
        if total < MIN_BYTES and mode != "on":
            return None
        key = tuple((tuple(m.weight.shape), str(m.weight.dtype), m.weight.data_ptr()) for m in modules)
        table = _TABLES.get(key)
        if table is None:
            table = ProductTable({g: [m.weight for m in ms] for g, ms in groups.items() if ms})
            table.measure_all()  # once per process and model, about 2 s on SmolLM2: never inside a step
            _TABLES[key] = table
    for group, members in groups.items():
        for module in members:
            module._drex_products = group
            if not isinstance(module.__dict__.get("forward"), types.MethodType):
                module.forward = types.MethodType(_forward, module)
    return table


@contextmanager
def use_products(table: ProductTable | None) -> Iterator[None]:
    """Inside: installed nn.Linear modules on this thread run as `table` chooses (None: as they are)."""
    previous = getattr(_LOCAL, "table", None)
    _LOCAL.table = table
    try:
        yield
    finally:
        _LOCAL.table = previous


__all__ = ["Choice", "ProductTable", "install_products", "product", "use_products"]
