"""Input checks shared by the kernel launchers: each names the argument and what was expected."""

from __future__ import annotations

import torch

from drex_hf.errors import KernelInputError

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX = (torch.int32, torch.int64)


def tensor(
    name: str, value: object, dims: int, dtypes: tuple[torch.dtype, ...] = FLOATS, device: torch.device | None = None
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dims:
        raise KernelInputError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KernelInputError(f"{name} has dtype {value.dtype}; supported: {names}")
    if device is not None and value.device != device:
        raise KernelInputError(f"{name} is on {value.device}, the other inputs on {device}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise KernelInputError(f"{name} has shape {tuple(value.shape)}, expected {tuple(expected)}")


def in_range(name: str, index: torch.Tensor, low: int | torch.Tensor, high: int | torch.Tensor) -> None:
    """Every element satisfies low <= index < high (elementwise when the bounds are tensors)."""
    if index.numel() and not bool(((index >= low) & (index < high)).all()):
        bad = index[~((index >= low) & (index < high))][:4].tolist()
        raise KernelInputError(f"{name} holds values outside [{_text(low)}, {_text(high)}): {bad}")


def distinct(name: str, index: torch.Tensor) -> None:
    if index.numel() > 1 and index.unique().numel() != index.numel():
        raise KernelInputError(f"{name} repeats a row: each row may be written once ({index.tolist()[:16]})")


def _text(bound: int | torch.Tensor) -> str:
    return str(bound) if isinstance(bound, int) else "per-row bound"
