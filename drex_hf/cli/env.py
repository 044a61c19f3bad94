"""`drex env`: versions, device and Triton availability, for bug reports and for checking a setup."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
from typing import Any

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import HelpFormatter

PACKAGES = ("torch", "transformers", "accelerate", "peft", "safetensors", "triton", "datasets", "evaluate", "gguf")


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "env",
        help=COMMANDS["env"],
        description="Print drex_hf's environment: Python and package versions, the device, Triton.",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(run=run)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """The facts `drex env` prints, as a dict (also used by benchmarks to label results)."""
    import torch

    from drex_hf import __version__
    from drex_hf.hub import drex_home

    info = {"drex_hf": __version__, "python": platform.python_version(), "platform": platform.platform()}
    info.update({name: _version(name) for name in PACKAGES})
    info["torch"] = f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = (
            f"cuda:0 {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
            f" ({torch.cuda.device_count()} visible)"
        )
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); CUDA not available"
    info["triton kernels"] = _triton_status(torch.cuda.is_available())
    info["kernels in use"] = _kernels_in_use("cuda" if torch.cuda.is_available() else "cpu")
    info["DREX_HOME"] = str(drex_home())
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "unset")
    return info


def _triton_status(cuda: bool) -> str:
    if importlib.util.find_spec("triton") is None:
        return "unavailable (triton not installed): torch reference paths only"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install must not crash `drex env`
        return f"unavailable (import failed: {type(err).__name__}: {err})"
    if cuda:
        return "available on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return "installed, but no CUDA device: torch reference paths (TRITON_INTERPRET=1 runs the interpreter)"


def _kernels_in_use(device: str) -> str:
    import warnings

    from drex_hf.kernels import dispatch

    setting = os.environ.get(dispatch.ENV) or "unset"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = dispatch.backend(device)
    except ValueError as err:
        return f"none: {err}"
    why = f": {caught[0].message}" if caught else ""
    return f"{chosen} on {device} ({dispatch.ENV}={setting}){why}"


def run(args: argparse.Namespace) -> int:
    info = environment()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
