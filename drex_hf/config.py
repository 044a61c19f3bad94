"""`EarlyExitConfig`: what a set of exit heads is, and its `exit_config.json` form.

The config names the exit points, the head type, the confidence measure and thresholds, the KV fill
method, and the base model the heads belong to (id/path, revision and its sizes, checked at load).
It is validated on construction; checks that need the base's layer count run again in
`validate_for_base` when heads are attached to a model.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from drex_hf.errors import ConfigError, ModelNotFoundError

FORMAT_VERSION = 1
CONFIG_NAME = "exit_config.json"
CALIBRATION_NAME = "calibration.json"  # written by `drex calibrate` beside the heads
HEAD_TYPES = ("shared", "norm", "adapter")
CONFIDENCE_MEASURES = ("classifier", "saturation", "max_prob", "margin")
DRAFT_SOURCES = ("head", "ngram", "mixed")  # where self_spec drafts come from (generation.spec)
KV_FILL_METHODS = ("project",)


def parse_threshold(value: Any, where: str = "threshold") -> float:
    """Accept a number in [0, 1] (numpy scalars too) or +inf, also spelled "inf" / "Infinity".

    None is refused, not read as "never exit": `generate(thresholds=None)` means "the config's",
    and the same word must not mean the opposite here."""
    if value is None:
        raise ConfigError(
            f"{where}=None is not a threshold: give a number in [0, 1], or float('inf') (\"inf\" in JSON) to never exit"
        )
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: threshold must be a number in [0, 1] or inf, got {value!r}")
    value = float(value)
    if value == math.inf:
        return value
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: threshold must be in [0, 1] or +inf (never exit), got {value}")
    return value


@dataclass
class EarlyExitConfig:
    """Exit points, heads, confidence and thresholds of an early-exit model.

    Args:
        exit_layers: decoder layers (0-based) after which an exit head sits; strictly increasing,
            each below the base's last layer (the model's own head is the last exit).
        head: `shared` (the base's final norm + lm_head), `norm` (own norm initialised from the
            final norm, shared lm_head) or `adapter` (own norm + zero-initialised low-rank
            residual adapter of rank `adapter_rank`, shared lm_head).
        confidence: `classifier` (tiny MLP on the hidden state), `saturation` (cosine between this
            exit's hidden state and the previous exit's), `max_prob` or `margin` (need full logits).
        thresholds: one value for every exit, or one per exit; in [0, 1], or `float("inf")` ("inf")
            to never exit. None is refused (in `generate()`, `thresholds=None` means the config's).
        kv_fill: how keys/values of skipped layers are made for exited tokens (`project`).
        classifier_hidden: width of the confidence classifier's hidden layer.
        base_model: hub id or path of the base model the heads belong to.
        base_revision: hub revision of the base model.
        base_model_type, base_num_layers, base_hidden_size, base_vocab_size: the base's
            architecture and sizes, filled by `from_base` and checked when the heads are loaded.
        base_gguf_sha256: sha256 of the GGUF file the base was converted from, if it was.
        weights_sha256: sha256 of exit_heads.safetensors, written by `save_pretrained` and checked
            at load, so weights and config from different saves are never mixed.
    """

    exit_layers: list[int]
    head: str = "norm"
    adapter_rank: int = 16
    confidence: str = "max_prob"
    thresholds: float | list[float] = 0.9
    kv_fill: str = "project"
    classifier_hidden: int = 64
    base_model: str | None = None
    base_revision: str | None = None
    base_model_type: str | None = None
    base_num_layers: int | None = None
    base_hidden_size: int | None = None
    base_vocab_size: int | None = None
    base_gguf_sha256: str | None = None
    weights_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        layers = self.exit_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ConfigError(f"exit_layers must be a list of layer indices, got {layers!r}")
        layers = list(layers)
        if not layers:
            raise ConfigError("exit_layers is empty: give at least one intermediate decoder layer")
        for value in layers:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"exit_layers must hold integers, got {value!r} in {layers}")
            if value < 0:
                raise ConfigError(f"exit layer {value} is out of range: layers are 0-based")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"exit_layers has duplicates: {layers}")
        if layers != sorted(layers):
            raise ConfigError(f"exit_layers must be sorted in increasing order, got {layers}")
        self.exit_layers = [int(v) for v in layers]  # numpy integers become plain ints (JSON, hashing)

        _check_choice("head", self.head, HEAD_TYPES)
        _check_choice("confidence", self.confidence, CONFIDENCE_MEASURES)
        _check_choice("kv_fill", self.kv_fill, KV_FILL_METHODS)
        for name in ("adapter_rank", "classifier_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        if isinstance(self.thresholds, (list, tuple, np.ndarray)):
            if len(self.thresholds) != len(layers):
                raise ConfigError(
                    f"thresholds has {len(self.thresholds)} values but there are {len(layers)} exit "
                    f"layers {layers}: give one value, or one per exit"
                )
            self.thresholds = [
                parse_threshold(t, f"thresholds[{i}] (exit layer {layer})")
                for i, (t, layer) in enumerate(zip(self.thresholds, layers))
            ]
        else:
            self.thresholds = parse_threshold(self.thresholds, "thresholds")

        for name in ("base_num_layers", "base_hidden_size", "base_vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("base_model", "base_revision", "base_model_type", "base_gguf_sha256", "weights_sha256"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a JSON object, got {self.extra!r}")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise ConfigError(f"format_version must be an integer, got {self.format_version!r}")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"exit config format_version {self.format_version} is not supported by this drex_hf "
                f"(it reads version {FORMAT_VERSION}); upgrade drex_hf"
            )
        if self.base_num_layers is not None:
            self.validate_for_base(self.base_num_layers)

    def validate_for_base(self, num_layers: int) -> None:
        """Check the exit layers against a base model with `num_layers` decoder layers."""
        last = self.exit_layers[-1]  # sorted: only the largest can be out of range or the last layer
        if last >= num_layers:
            raise ConfigError(
                f"exit layer {last} is out of range: the base model has {num_layers} decoder layers "
                f"(0..{num_layers - 1})"
            )
        if last == num_layers - 1:
            raise ConfigError(
                f"exit layer {last} is the base model's last layer; its own head is already the final exit: "
                f"use layers 0..{num_layers - 2}"
            )

    # ---------------------------------------------------------------- accessors
    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def threshold_list(self) -> list[float]:
        """Thresholds as one float per exit layer."""
        if isinstance(self.thresholds, list):
            return list(self.thresholds)
        return [float(self.thresholds)] * self.num_exits

    def describe_thresholds(self) -> str:
        """'0.9, inf' — the thresholds per exit, for people."""
        return ", ".join("inf" if t == math.inf else f"{t:g}" for t in self.threshold_list())

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thresholds"] = thresholds_to_json(self.thresholds)
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyExitConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"an exit config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown exit config key(s) {unknown}; known keys: {sorted(known)}")
        if "exit_layers" not in data:
            raise ConfigError("exit config has no 'exit_layers'")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EarlyExitConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"no exit config at {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def thresholds_to_json(thresholds: float | list[float]) -> Any:
    """Thresholds with +inf spelled "inf" (JSON has no infinity)."""

    def one(value: float) -> Any:
        return "inf" if value == math.inf else value

    if isinstance(thresholds, list):
        return [one(t) for t in thresholds]
    return one(thresholds)
