"""Triton, if it imports: the kernel files take `triton`, `tl` and `jit` from here.

Without Triton (or with a broken install) the kernel files still import — their `@jit` functions
become plain Python functions that are never launched — and `IMPORT_ERROR` says why, so the
dispatcher can fall back to the torch references with one warning instead of failing at import.
"""

from __future__ import annotations

import os
from typing import Any

IMPORT_ERROR: str | None = None
try:
    import triton
    import triton.language as tl
except Exception as error:  # ImportError, or a broken install raising anything at import
    triton, tl = None, None
    IMPORT_ERROR = f"{type(error).__name__}: {error}"

    class _Language:  # what kernel signatures and bodies name at definition time
        constexpr = Any

    tl = _Language()


def jit(fn: Any = None, *, do_not_specialize: tuple[str, ...] = ()) -> Any:
    """`triton.jit` when Triton is present; the plain function otherwise (never launched).

    `do_not_specialize` names integer arguments whose value changes from call to call in one process
    (row counts, split lengths, the first layer of a KV fill): Triton otherwise compiles a variant per
    value class (1, divisible by 16, other), and a variant first met in the middle of a decode costs a
    compilation — seconds, on the GPU, inside a step."""

    def wrap(f: Any) -> Any:
        if triton is None:
            return f
        return triton.jit(f, do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit(f)

    return wrap(fn) if fn is not None else wrap


def interpreting() -> bool:
    """Whether kernels run through Triton's CPU interpreter (`TRITON_INTERPRET=1` before import)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed when the kernels are decorated (Triton reads the variable then, not at launch).
INTERPRET = triton is not None and interpreting()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
