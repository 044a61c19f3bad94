"""The calibration.json file format: read back, checked, and tied to the heads it was made for.

`drex calibrate` (drex_hf.calibration) writes calibration.json (with a plot and its observations)
beside the heads, and records the sha256 of their weights file as `heads_sha256`. `read_calibration`
checks the file field by field before `from_pretrained` applies it; `stale_files` tells
`save_pretrained` which of these files belong to other heads than the ones it just saved, so it can
remove them; `choice_for` is the policy `generate()` follows from a device entry's `policy_choice`.

Why a top-level module and not drex_hf.calibration.files: the model class (drex_hf.modeling) reads
and removes these files, and drex_hf.calibration sits above modeling (it measures a model). The
format therefore lives at the bottom layer beside config.py (exit_config.json's format), imports
only config and errors, and both modeling and calibration import it from here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from drex_hf.config import CALIBRATION_NAME, CONFIDENCE_MEASURES, DRAFT_SOURCES, parse_threshold
from drex_hf.errors import ConfigError

logger = logging.getLogger(__name__)

PLOT_NAME = "calibration.png"
OBSERVATIONS_NAME = "calibration_observations.safetensors"
CALIBRATION_FILES = (CALIBRATION_NAME, PLOT_NAME, OBSERVATIONS_NAME)  # all made from one set of heads
HEADS_SHA_KEY = "heads_sha256"
# what a set of thresholds was certified for: tokens agreeing with full depth (`thresholds`), or whole
# greedy answers scoring against full depth's (`sequences`); a file or entry naming none is the former
GUARANTEE_KINDS = ("token_agreement", "sequence")
SEQUENCE_METRICS = ("rouge_l", "exact")  # the scores drex_hf.calibration.sequences certifies
POLICY_CHOICES = ("full", "drex", "self_spec")  # what a device entry's policy_choice may name


def read_calibration(path: Path, exit_layers: list[int], heads_sha256: str | None) -> dict[str, Any]:
    """The calibration in `path`, checked against heads exiting at `exit_layers` whose weights file
    has `heads_sha256`; any problem is a `ConfigError` naming the file and the field.

    A file recording other heads' sha256 is refused, not skipped: applied, it would run these heads
    on thresholds tested for others; skipped with a warning, the heads would silently run slower or
    worse than the folder promises. Transformers likewise refuses weights that do not fit unless
    asked; here `from_pretrained(..., calibration=False)` is the way to load the heads without it.
    A file from before the sha256 was recorded (no `heads_sha256`) is applied with a warning, as it
    always was: its exit layers are still checked, and `save_pretrained` removes it when it saves
    other heads into the folder.

    Checked: exit_layers, heads_sha256, every thresholds list (one per exit), the confidence measures,
    and what each guarantee (the file's, and a device entry's when it records one) states: its kind,
    and for a sequence guarantee its metric, target and delta. The rest (sample sizes, timings,
    scores) is reported, not applied, and is not checked.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); run drex calibrate again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a drex calibrate file), got {type(data).__name__}")
    layers = data.get("exit_layers")
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ConfigError(f"{path}: field exit_layers must be a list of layer indices, got {layers!r}")
    if layers != list(exit_layers):
        raise ConfigError(
            f"{path} was made for exit layers {layers} (field exit_layers), these heads exit at {list(exit_layers)}"
        )
    recorded = data.get(HEADS_SHA_KEY)
    if recorded is not None and not _is_sha256(recorded):
        raise ConfigError(f"{path}: field {HEADS_SHA_KEY} must be a sha256 (64 hex digits), got {recorded!r}")
    if recorded is None:
        logger.warning(
            "%s records no %s (written before drex_hf tied calibrations to their heads): applied unchecked; "
            "run `drex calibrate` again to tie it to these heads",
            path, HEADS_SHA_KEY,
        )  # fmt: skip
    elif heads_sha256 is not None and recorded != heads_sha256:
        raise ConfigError(
            f"{path} was made for other heads: its {HEADS_SHA_KEY} is {recorded[:16]}..., the heads' weights file "
            f"has {heads_sha256[:16]}... (saved again after calibrating, or copied from another folder); run "
            f"`drex calibrate` again, or load with calibration=False"
        )
    guarantee = data.get("guarantee")
    if not isinstance(guarantee, dict):
        raise ConfigError(f"{path}: field guarantee must be a JSON object with thresholds, got {guarantee!r}")
    _check_thresholds(path, "guarantee.thresholds", guarantee.get("thresholds"), layers)
    _check_guarantee(path, "guarantee", guarantee)
    _check_measure(path, "confidence", data.get("confidence"))
    entries = data.get("cost_models", {})
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: field cost_models must be a JSON object (device -> entry), got {entries!r}")
    for device, entry in entries.items():
        field = f"cost_models[{device!r}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: field {field} must be a JSON object, got {entry!r}")
        _check_thresholds(path, f"{field}.thresholds", entry.get("thresholds"), layers)
        _check_measure(path, f"{field}.confidence", entry.get("confidence"))
        if "guarantee" in entry:
            if not isinstance(entry["guarantee"], dict):
                raise ConfigError(f"{path}: field {field}.guarantee must be a JSON object, got {entry['guarantee']!r}")
            _check_guarantee(path, f"{field}.guarantee", entry["guarantee"])
        if "policy_choice" in entry:
            check_choices(path, f"{field}.policy_choice", entry["policy_choice"], layers)
    return data


def guarantee_kind(guarantee: dict[str, Any]) -> str:
    """Which guarantee `guarantee` (a file's, or a device entry's) states; none named: token agreement
    (files from before sequence guarantees)."""
    return guarantee.get("kind", "token_agreement")


def entry_guarantee(entry: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """The guarantee a device entry's thresholds carry: its own `guarantee`, or, for an entry written
    before entries recorded one, token agreement at the file's token target when the file states one
    (such entries were tested at it), else token agreement with no target known."""
    own = entry.get("guarantee")
    if isinstance(own, dict):
        return own
    top = calibration.get("guarantee")
    if isinstance(top, dict) and guarantee_kind(top) == "token_agreement" and "target_agreement" in top:
        return {"kind": "token_agreement", **{k: top[k] for k in ("target_agreement", "delta", "bound") if k in top}}
    return {"kind": "token_agreement"}


def exits_off_notice(path: Path, device: str, entry: dict[str, Any], exit_layers: list[int]) -> str | None:
    """One line saying that `entry` (the calibration for `device`) switches every exit off, and why
    — the best net saving an exit was measured to give, or the speed-up that fell short of the
    margin — or None when some exit stays on."""
    if any(parse_threshold(t, "thresholds") != float("inf") for t in entry.get("thresholds", [])):
        return None
    measure = entry.get("confidence") or "the heads' measure"
    why = "no exit paid on its own"
    steps = entry.get("exit_choice") or []
    short = [step["reason"] for step in steps if isinstance(step, dict) and step.get("reason")]
    savings = next((step.get("net_savings_ms") for step in steps if isinstance(step, dict)), None)
    if short:  # the exits that paid on their own, together, missed the required speed-up
        why = f"with its paying exits on, the expected token was {short[-1]}"
    elif savings and len(savings) == len(exit_layers):
        best = max(range(len(savings)), key=savings.__getitem__)
        why = (
            f"no exit pays: the best, at layer {exit_layers[best]}, was expected to save "
            f"{savings[best]:+.3f} ms per token (its check costs more than the layers it skips)"
        )
    margin = entry.get("min_speedup")
    tail = f" (exits must promise {margin}x full depth)" if margin else ""
    return (
        f"{path} switches every exit off on {device} ({measure}): {why}{tail}. Every token leaves at full "
        "depth; pass thresholds= to generate() (or from_pretrained(calibration=False)) to exit anyway"
    )


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it cannot be read, is not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_heads_sha256(data: dict[str, Any] | None) -> str | None:
    """The heads sha256 a calibration file's contents record; None when they record none."""
    value = None if data is None else data.get(HEADS_SHA_KEY)
    return value if _is_sha256(value) else None


def stale_files(folder: Path, new_sha256: str, old_sha256: str | None) -> list[str]:
    """The calibration files in `folder` that do not belong to heads whose weights file has
    `new_sha256` (`old_sha256`: the weights file the folder held before). They belong when
    calibration.json records `new_sha256`, or records nothing (an older file) while the weights
    did not change; otherwise every calibration file there is stale."""
    present = [name for name in CALIBRATION_FILES if (folder / name).exists()]
    if not present:
        return []
    data = read_json_object(folder / CALIBRATION_NAME)
    if data is not None and recorded_heads_sha256(data) == new_sha256:
        return []
    if data is not None and data.get(HEADS_SHA_KEY) is None and old_sha256 == new_sha256:
        return []
    return present


def choice_for(choices: dict[str, Any] | None, batch: int) -> dict[str, Any] | None:
    """The calibrated choice for `batch` rows: the entry of the largest calibrated batch size not
    above it (the smallest one when every one is above); None without choices."""
    if not choices:
        return None
    sizes = sorted(int(b) for b in choices)
    below = [b for b in sizes if b <= batch]
    return choices[str(below[-1] if below else sizes[0])]


def describe_choice(choice: dict[str, Any]) -> str:
    """A policy choice in words: 'full', or 'self_spec (own text, k 8)' / '(draft exit 23, k 4)'."""
    policy = choice["policy"]
    if policy != "self_spec":
        return policy
    source = choice.get("draft_source", "head")
    where = "own text" if source == "ngram" else f"draft exit {choice['draft_exit']}"
    return f"{policy} ({where}{', else the head' if source == 'mixed' else ''}, k {choice['draft_tokens']})"


def check_choices(path: Any, field: str, choices: Any, exit_layers: list[int]) -> None:
    """Refuse a malformed `policy_choice` field (read_calibration's check), naming it."""
    if not isinstance(choices, dict) or not choices:
        raise ConfigError(f"{path}: field {field} must be a JSON object (batch size -> choice), got {choices!r}")
    for batch, entry in choices.items():
        where = f"{field}[{batch!r}]"
        if not str(batch).isdigit() or int(batch) < 1:
            raise ConfigError(f"{path}: field {field} keys must be batch sizes (positive integers), got {batch!r}")
        if not isinstance(entry, dict) or entry.get("policy") not in POLICY_CHOICES:
            policy = entry.get("policy") if isinstance(entry, dict) else entry
            raise ConfigError(
                f"{path}: field {where}.policy must be one of {', '.join(POLICY_CHOICES)}, got {policy!r}"
            )
        if entry["policy"] == "self_spec":
            source, e, k = entry.get("draft_source", "head"), entry.get("draft_exit"), entry.get("draft_tokens")
            if source not in DRAFT_SOURCES:
                raise ConfigError(
                    f"{path}: field {where}.draft_source must be one of {', '.join(DRAFT_SOURCES)}, got {source!r}"
                )
            if e not in exit_layers and not (source == "ngram" and e is None):
                raise ConfigError(
                    f"{path}: field {where}.draft_exit must be one of the exit layers {exit_layers}, got {e!r}"
                )
            if k != "adaptive" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ConfigError(
                    f"{path}: field {where}.draft_tokens must be a positive integer or 'adaptive', got {k!r}"
                )


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_thresholds(path: Path, field: str, values: Any, layers: list[int]) -> None:
    if not isinstance(values, list):
        raise ConfigError(f"{path}: field {field} must be a list of one threshold per exit {layers}, got {values!r}")
    if len(values) != len(layers):
        raise ConfigError(
            f"{path}: field {field} has {len(values)} value{'s' * (len(values) != 1)} for {len(layers)} exit "
            f"layers {layers}: run drex calibrate again"
        )
    for i, value in enumerate(values):
        parse_threshold(value, f"{path}: field {field}[{i}]")


def _check_guarantee(path: Path, field: str, guarantee: dict[str, Any]) -> None:
    """The fields that say what a guarantee promises: its kind, and for a sequence guarantee the
    metric and the target and delta it was tested at (what the card and the warnings state)."""
    kind = guarantee_kind(guarantee)
    if kind not in GUARANTEE_KINDS:
        raise ConfigError(f"{path}: field {field}.kind is {kind!r}; known kinds: {', '.join(GUARANTEE_KINDS)}")
    if kind != "sequence":
        return
    metric = guarantee.get("metric")
    if metric not in SEQUENCE_METRICS:
        raise ConfigError(f"{path}: field {field}.metric is {metric!r}; known: {', '.join(SEQUENCE_METRICS)}")
    for key in ("target", "delta"):
        value = guarantee.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{path}: field {field}.{key} must be a number in (0, 1), got {value!r}")


def _check_measure(path: Path, field: str, value: Any) -> None:
    if value is not None and value not in CONFIDENCE_MEASURES:
        raise ConfigError(
            f"{path}: field {field} names an unknown confidence measure {value!r} "
            f"(known: {', '.join(CONFIDENCE_MEASURES)})"
        )
