"""Which implementation runs each kernel: Triton on CUDA tensors, the torch reference elsewhere.

`DREX_KERNELS=torch|triton` overrides the choice (read at every call, so it can change at run time).
On CPU, `triton` means Triton's interpreter, which needs `TRITON_INTERPRET=1` set before triton is
imported. A missing or broken Triton — an import that fails, a kernel that fails to compile or
launch — falls back to the torch reference with one warning, never a crash; a kernel that failed
once is not tried again in this process. Bad inputs are refused by the launchers before dispatch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from drex_hf.errors import ConfigError
from drex_hf.kernels import _triton

ENV = "DREX_KERNELS"
CHOICES = ("torch", "triton")

_warned: set[str] = set()
_broken: dict[str, str] = {}


def requested() -> str | None:
    """The backend `DREX_KERNELS` asks for, or None when it is unset (Triton on CUDA, torch elsewhere)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ConfigError(
            f"{ENV}={value!r} is not a kernel backend; use 'torch' or 'triton', "
            f"or leave it unset (Triton on CUDA, torch elsewhere)"
        )
    return value


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend(device: torch.device | str) -> str:
    """'triton' or 'torch': what kernels on tensors of `device` run as now."""
    device = torch.device(device)
    choice = requested()
    if choice == "torch" or (choice is None and device.type != "cuda"):
        return "torch"
    if _triton.triton is None:
        _warn_once("import", f"Triton is not usable ({_triton.IMPORT_ERROR}); drex_hf runs its torch kernels")
        return "torch"
    if device.type != "cuda" and not _triton.INTERPRET:
        _warn_once(
            "interpreter",
            f"{ENV}=triton, but the tensors are on {device.type} and Triton's interpreter is off "
            f"(set TRITON_INTERPRET=1 before triton is imported); drex_hf runs its torch kernels",
        )
        return "torch"
    return "triton"


def launch(name: str, device: torch.device, run_triton: Callable[[], Any], run_torch: Callable[[], Any]) -> Any:
    """Run kernel `name` with Triton when `backend(device)` says so, else (or if it fails) the reference.

    A failed Triton launch must leave the outputs for the reference to overwrite: every kernel
    here writes each output element at most once, from inputs it does not modify.
    """
    if name in _broken or backend(device) == "torch":
        return run_torch()
    try:
        return run_triton()
    except Exception as error:  # compile errors, missing drivers, out of resources...
        _broken[name] = f"{type(error).__name__}: {error}"
        _warn_once(name, f"Triton kernel {name!r} failed ({_broken[name]}); using its torch reference from now on")
        return run_torch()


def broken() -> dict[str, str]:
    """Kernels that failed in this process, with the error each raised."""
    return dict(_broken)


def reset() -> None:
    """Forget failures and warnings (for tests)."""
    _warned.clear()
    _broken.clear()
