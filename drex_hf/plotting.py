"""matplotlib, when installed, set up to draw into files (no display): every plot in the package."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """`matplotlib.pyplot` on the file-only Agg backend, or None when matplotlib is not installed
    (callers then write no picture)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
