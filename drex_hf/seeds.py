"""What a seed is: an integer in [0, 2**64), the 64 bits the device holds. Here, apart from the
sampling code and torch, so that the command line checks `--seed` without importing either."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from drex_hf.errors import GenerationInputError, GenerationTypeError

SEED_LIMIT = 2**64  # seeds are integers in [0, SEED_LIMIT): exactly the values 64 bits hold


def check_seed(seed: Any, what: str = "seed") -> int:
    """A seed given by the user as a Python int in [0, 2**64); numpy integers are accepted.

    Larger or negative seeds are refused rather than wrapped: two different seeds must never give
    the same draws."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise GenerationTypeError(f"{what} must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise GenerationInputError(f"{what} {seed} is out of range: seeds are integers in [0, 2**64)")
    return seed
