"""Exceptions raised on bad input.

Every error a user can cause by what they pass in (a config, a folder, a prompt, a policy) is a
`DrexError`, so the CLI can turn it into one line and exit code 2, and so callers can catch our
errors without catching torch's. Each subclass also derives from the builtin a Python user would
expect (`ValueError`, `FileNotFoundError`).
"""

from __future__ import annotations


class DrexError(Exception):
    """Base class of drex_hf's user-facing errors."""


class ConfigError(DrexError, ValueError):
    """An `EarlyExitConfig` value (or exit_config.json) is invalid."""


class UnsupportedArchitectureError(DrexError, ValueError):
    """The base model's architecture has no adapter in `drex_hf.arch`."""


class BaseModelMismatchError(DrexError, ValueError):
    """Exit heads were made for a base model of different sizes than the one given."""


class WeightsFileError(DrexError, ValueError):
    """A weights file is missing tensors, has wrong shapes, or cannot be read."""


class ModelNotFoundError(DrexError, FileNotFoundError):
    """A model folder, file or hub id could not be resolved."""


class OutputFolderError(DrexError, OSError):
    """A folder to write into is a file, sits under a file, or cannot be written."""


class GenerationInputError(DrexError, ValueError):
    """Bad arguments to `generate()`: empty prompt, prompt too long, unknown policy, ..."""


class KernelInputError(DrexError, ValueError):
    """A kernel was given tensors of the wrong shape, dtype, device or index range."""
