"""Exceptions raised on bad input.

Every error a user can cause by what they pass in (a config, a folder, a prompt, a policy) is a
`DrexError`, so the CLI can turn it into one line and exit code 2, and so callers can catch our
errors without catching torch's. Each subclass also derives from the builtin a Python user would
expect (`ValueError`, `FileNotFoundError`); an argument of the wrong type is also a `TypeError`.
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


class ConfigTypeError(ConfigError, TypeError):
    """A config of the wrong type: `from_base(base, {...})` or `None` where an `EarlyExitConfig` goes."""


class GenerationInputError(DrexError, ValueError):
    """Bad arguments to `generate()`, the engine or a model's loading arguments (`device`, `dtype`):
    empty prompt, prompt too long, unknown policy, a seed outside 64 bits, ..."""


class GenerationTypeError(GenerationInputError, TypeError):
    """An argument of the wrong type: `max_new_tokens="4"`, `seed="x"`, `cost_model=123`, ..."""


class KernelInputError(DrexError, ValueError):
    """A kernel was given tensors of the wrong shape, dtype, device or index range."""


class OutputLocationError(DrexError, PermissionError):
    """A folder (or hub repository) to write cannot be written: a file is in the way, it is read-only,
    or the hub is offline."""
