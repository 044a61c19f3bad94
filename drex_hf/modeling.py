"""`EarlyExitModelForCausalLM`: a HF causal LM with exit heads, saved and loaded like a peft adapter.

The wrapper holds the (frozen) base model, the `EarlyExitConfig` and one `ExitHead` per exit point.
`save_pretrained` writes only the heads (`exit_config.json`, `exit_heads.safetensors`, `README.md`)
and `push_to_hub` uploads only those; `from_pretrained` takes a folder or a hub id, resolves the base
from the config and checks its sizes. `forward` can return
every exit's logits and confidences in one pass (training, calibration); `generate` decodes with
per-token early exit. Unknown attributes are forwarded to the base model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from drex_hf.arch import ArchAdapter, build_attention_mask, get_adapter
from drex_hf.calibration_file import CALIBRATION_FILES, choice_for, exits_off_notice, read_calibration, stale_files
from drex_hf.config import CALIBRATION_NAME, CONFIG_NAME, EarlyExitConfig, parse_threshold
from drex_hf.errors import (
    BaseModelMismatchError,
    ConfigError,
    ConfigTypeError,
    GenerationInputError,
    ModelNotFoundError,
    WeightsFileError,
)
from drex_hf.fileio import sha256_file, staged_folder
from drex_hf.generation.api import EarlyExitGenerateOutput
from drex_hf.generation.settings import check_positions
from drex_hf.heads import ExitHead, exit_confidence
from drex_hf.hub import BaseSource, load_base

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "exit_heads.safetensors"
CARD_NAME = "README.md"
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# Attributes whose assignment on the wrapper must land on the base model.
FORWARDED_SETTERS = frozenset({"generation_config"})


@dataclass
class EarlyExitCausalLMOutput(ModelOutput):
    """`forward` output. `exit_logits[j]`, `exit_confidences[j]` belong to `exit_layers[j]`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_confidences: torch.Tensor | None = None
    exit_hidden_states: tuple[torch.Tensor, ...] | None = None


class EarlyExitModelForCausalLM(nn.Module):
    """A causal LM with exit heads. Build with `from_base` (new heads) or `from_pretrained` (saved heads).

    Constructing it directly attaches new heads described by `config`; if the config already
    records base sizes (heads made for some base), the base must match them.
    """

    def __init__(self, base_model: nn.Module, config: EarlyExitConfig, base_source: BaseSource | None = None) -> None:
        super().__init__()
        _check_config(config)
        arch = get_adapter(base_model)
        if config.base_num_layers is None:  # new heads: from now on the config describes this base
            config.base_model_type = arch.config.model_type
            config.base_num_layers = arch.num_layers
            config.base_hidden_size = arch.hidden_size
            config.base_vocab_size = arch.vocab_size
        else:
            what = f"base model {base_source.name!r}" if base_source and base_source.name else "the given base model"
            _check_base_sizes(config, arch, what)
        config.validate_for_base(arch.num_layers)
        self.base_model = base_model
        self.exit_config = config
        self.arch: ArchAdapter = arch
        self.base_source = base_source
        lm_head = arch.lm_head
        self.heads = nn.ModuleList(
            ExitHead(config, arch.final_norm, lm_head, arch.hidden_size) for _ in config.exit_layers
        )
        self.heads.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        self._cost_models: dict[tuple, Any] = {}  # drex cost models measured by generate(), reused
        self.calibration_path: Path | None = None  # calibration.json with cost constants for this device
        # `drex calibrate --choose-policy`: this device's fastest policy per batch size (`generate(policy=None)`)
        self.policy_choice: dict[str, Any] | None = None
        self.draft_corpus: Any = None  # a CorpusIndex of the model's own answers (draft_corpus.safetensors)
        self.draft_vocab: torch.Tensor | None = None  # the ids head drafts are made among (draft_vocab.safetensors)
        self.draft_priors: Any = None  # per kind of text draft, its acceptance curve (draft_priors.json)
        # by exit: a trained decoder layer head drafts run through (draft_layer.safetensors), not a submodule
        self.draft_layers: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in FORWARDED_SETTERS:  # e.g. model.generation_config = ... must reach the base's generate
            setattr(self.base_model, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ properties
    @property
    def exit_layers(self) -> list[int]:
        return list(self.exit_config.exit_layers)

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def heads_device(self) -> torch.device:
        return self.arch.lm_head.weight.device

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike | nn.Module,
        config: EarlyExitConfig,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        **load_kwargs: Any,
    ) -> EarlyExitModelForCausalLM:
        """New, untrained exit heads on a base model (a loaded model, a folder, a hub id or a .gguf file).

        `load_kwargs` (e.g. `dtype=torch.bfloat16`, `attn_implementation="sdpa"`) go to
        `AutoModelForCausalLM.from_pretrained`. `config` is copied; its base fields are filled from
        the base.
        """
        _check_config(config)
        check_device(device)
        _check_dtype(load_kwargs)
        config = copy.deepcopy(config)
        model, source = _resolve_base(base, revision, None, load_kwargs)
        config.base_model = source.name or config.base_model
        config.base_revision = revision
        config.base_gguf_sha256 = source.gguf_sha256
        config.base_model_type = config.base_num_layers = config.base_hidden_size = config.base_vocab_size = None
        config.weights_sha256 = None
        return _place(cls(model, config, source), device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        base_model: str | os.PathLike | nn.Module | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
        calibration: bool = True,
        **load_kwargs: Any,
    ) -> EarlyExitModelForCausalLM:
        """Load exit heads saved by `save_pretrained` (a folder, or a hub id `org/name` resolved
        through the HF cache, offline when HF_HUB_OFFLINE is set) and the base model they belong to.

        The base comes from `base_model` when given (a model, folder or hub id), else from
        `exit_config.json` (with its revision, and for heads made on a converted GGUF, that exact
        GGUF). A base whose architecture, layer count, hidden size or vocabulary differs from the
        heads' config is refused. With `calibration` (default) a `calibration.json` beside the heads
        (from `drex calibrate`) sets the thresholds and the drex scheduler's cost constants: this
        device's entry when there is one (exits that do not pay here are off), else the guaranteed
        thresholds with cost constants measured at start-up. A calibration made for other heads
        (its recorded heads sha256 differs) or malformed is refused; see
        `drex_hf.calibration_file.read_calibration`.
        """
        from drex_hf.hub import heads_folder, is_hub_id

        check_device(device)
        _check_dtype(load_kwargs)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            if folder.exists() or not is_hub_id(os.fspath(path)):
                raise ModelNotFoundError(f"exit-heads folder not found: {path}")
            from drex_hf.lora import LORA_WEIGHTS_NAME

            # the repository's main revision; what loading reads, not the calibration's plot or observations
            folder = heads_folder(os.fspath(path), [*SAVED_FILES, LORA_WEIGHTS_NAME, CALIBRATION_NAME])
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{path} is not an exit-heads folder: missing {', '.join(missing)} (expected {', '.join(SAVED_FILES)})"
            )
        config = EarlyExitConfig.from_json_file(folder / CONFIG_NAME)
        state = _read_heads_file(folder / WEIGHTS_NAME, config.weights_sha256)
        _check_heads_file_fits(folder, config)
        calibrated = None
        if calibration and (folder / CALIBRATION_NAME).is_file():  # checked before the base is loaded
            heads_sha256 = config.weights_sha256 or sha256_file(folder / WEIGHTS_NAME)  # the former was checked
            calibrated = read_calibration(folder / CALIBRATION_NAME, config.exit_layers, heads_sha256)
        if base_model is None:
            if not config.base_model:
                raise ConfigError(f"{folder / CONFIG_NAME} names no base_model; pass base_model=...")
            base_model = config.base_model
            revision = revision if revision is not None else config.base_revision
            gguf_sha256 = config.base_gguf_sha256
        else:  # the caller chose the weights deliberately; only their sizes are checked
            gguf_sha256 = None
        model, source = _resolve_base(base_model, revision, gguf_sha256, load_kwargs)
        if source.kind == "gguf" and config.base_gguf_sha256 is None:
            logger.warning(
                "exit heads in %s were made on %s's own weights; that is unavailable here, so they run on the "
                "packaged GGUF (%s), whose quantised weights differ slightly",
                folder,
                source.name,
                source.path,
            )
        wrapper = cls(model, config, source)
        wrapper._load_heads_state(state, folder / WEIGHTS_NAME)
        lora = config.extra.get("lora")
        if lora is not None:
            from drex_hf.lora import LORA_WEIGHTS_NAME, load_lora

            lora_path = folder / LORA_WEIGHTS_NAME
            if not lora_path.is_file():
                raise ModelNotFoundError(f"{folder}: the exit config names a LoRA but {LORA_WEIGHTS_NAME} is missing")
            expected = lora.get("sha256") if isinstance(lora, dict) else None
            if expected and sha256_file(lora_path) != expected:
                raise WeightsFileError(
                    f"{lora_path} does not match {CONFIG_NAME} (sha256 differs): the folder mixes two saves"
                )
            load_lora(wrapper, lora_path, lora)
        wrapper = _place(wrapper, device)
        from drex_hf.generation.spec.ngram import DRAFT_CORPUS_NAME, read_draft_corpus

        if (folder / DRAFT_CORPUS_NAME).is_file():  # n-gram drafts for rows whose own text has no match
            wrapper.draft_corpus = read_draft_corpus(folder / DRAFT_CORPUS_NAME)
        from drex_hf.generation.spec.vocab import DRAFT_VOCAB_NAME, read_draft_vocab

        if (folder / DRAFT_VOCAB_NAME).is_file():  # head drafts among the model's most written tokens
            wrapper.draft_vocab = read_draft_vocab(folder / DRAFT_VOCAB_NAME, wrapper.arch.vocab_size)
        from drex_hf.generation.spec.priors import DRAFT_PRIORS_NAME, read_draft_priors

        if (folder / DRAFT_PRIORS_NAME).is_file():  # how far each kind of text draft is worth verifying
            wrapper.draft_priors = read_draft_priors(folder / DRAFT_PRIORS_NAME)
        from drex_hf.draft_layer import DRAFT_LAYER_NAME, read_draft_layers

        if (folder / DRAFT_LAYER_NAME).is_file():  # head drafts through one more decoder layer
            heads = dict(zip(wrapper.exit_layers, wrapper.heads))
            wrapper.draft_layers = read_draft_layers(folder / DRAFT_LAYER_NAME, wrapper.arch, heads)
        if calibrated is not None:
            wrapper._apply_calibration(folder / CALIBRATION_NAME, calibrated)
        return wrapper

    def _apply_calibration(self, path: Path, data: dict[str, Any]) -> None:
        """Thresholds (and cost constants for this device) from a `drex calibrate` file, checked by
        `read_calibration` against these heads."""
        from drex_hf.device import device_name

        entries = data.get("cost_models", {})
        device = device_name(self.heads_device)
        entry = entries.get(device)
        chosen = entry["thresholds"] if entry else data["guarantee"]["thresholds"]
        self.exit_config.thresholds = [parse_threshold(t, f"{path.name} thresholds") for t in chosen]
        measure = entry.get("confidence") if entry else data.get("confidence")
        if measure is not None:  # the measure the thresholds were tested for (the device's fastest)
            self.exit_config.confidence = measure
        self.calibration_path = path if entry else None
        self.policy_choice = entry.get("policy_choice") if entry else None
        notice = exits_off_notice(path, device, entry, list(self.exit_layers)) if entry else None
        if notice is not None:  # not an error, but a surprise: say why nothing will exit here
            logger.warning("%s", notice)
        if entry is None:
            logger.warning(
                "%s has no cost constants for %s (it has: %s): using its guaranteed thresholds, with cost "
                "constants measured at start-up; run `drex calibrate` on this device",
                path, device, ", ".join(sorted(entries)) or "none",
            )  # fmt: skip

    def _load_heads_state(self, state: dict[str, torch.Tensor], where: Path) -> None:
        expected = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsFileError(
                f"{where} does not match the exit config: missing tensors {missing[:8]}, unexpected tensors "
                f"{unexpected[:8]}"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise WeightsFileError(
                    f"{where}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                )
        self.heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items()})

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        card: str | None = None,
        extra_files: dict[str, bytes] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
    ) -> None:
        """Write exactly exit_config.json, exit_heads.safetensors and README.md; never base weights.

        The files are written into a temporary folder beside the target and moved into place
        only when all three are complete; over an existing folder the config moves last, and it
        records the weights' sha256, so a save interrupted halfway is detected at load. A folder
        that cannot be written is refused (naming it) and left as it was.
        Other files in an existing folder are left alone, except a calibration made for other heads
        (calibration.json, its plot and observations: see `drex_hf.calibration_file.stale_files`),
        which is removed once the new heads are in place, and a README.md that drex_hf did not
        write, which is kept, our card then going beside it as README.drex_hf.md (a warning says so).
        A LoRA on the backbone (joint training) is saved as lora_adapter.safetensors. `card`
        replaces the generated card (training writes one with its evaluation); `extra_files`
        (name -> bytes, e.g. eval_results.json) are published with the rest.

        With `push_to_hub`, the files this save wrote (and a calibration kept for these heads) are
        then uploaded to `repo_id` (default: the folder's name), as `push_to_hub` does.
        """
        from drex_hf.hub import check_can_upload

        if push_to_hub:
            repo_id = repo_id or Path(save_directory).expanduser().resolve().name
            check_can_upload(repo_id)  # before any work: an upload that cannot happen saves nothing
        target = Path(save_directory).expanduser()
        names = self._save_files(target, card, extra_files)
        if push_to_hub:
            from drex_hf.hub import upload_files

            upload_files(target, names, repo_id, commit_message=commit_message, private=private, token=token)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the heads' own files (what `save_pretrained` writes), never the base model's, to the
        hub repository `repo_id` (created if needed), as peft does for adapters; returns the commit.

        The heads name their base model (`exit_config.json`'s base_model): one given as a local path
        cannot be found by whoever loads the repository, who then passes `base_model=...`. To publish
        a calibration too, calibrate a saved folder and use `save_pretrained(folder, push_to_hub=True)`.
        """
        import tempfile

        from drex_hf.hub import check_can_upload, is_hub_id, upload_files

        check_can_upload(repo_id)
        base = self.exit_config.base_model
        if base and not is_hub_id(base):
            logger.warning(
                "the heads pushed to %s name their base model by a local path (%s): who loads them from the hub "
                "must pass base_model=...",
                repo_id, base,
            )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="drex-push-") as tmp:
            folder = Path(tmp) / "heads"
            names = self._save_files(folder, None, None)
            return upload_files(
                folder,
                names,
                repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    def _save_files(self, target: Path, card: str | None, extra_files: dict[str, bytes] | None) -> list[str]:
        """`save_pretrained`'s work; returns the names of the heads' files now in `target`."""
        from safetensors.torch import save_file

        from drex_hf.lora import LORA_WEIGHTS_NAME, has_lora, lora_tensors
        from drex_hf.model_card import calibration_section, card_name, render_model_card

        card_file = card_name(target)
        if card_file != CARD_NAME:
            logger.warning(
                "%s has a README.md that drex_hf did not write: it is kept, and the heads' model card is written "
                "beside it as %s",
                target, card_file,
            )  # fmt: skip
        old_weights = target / WEIGHTS_NAME
        old_sha256 = sha256_file(old_weights) if old_weights.is_file() else None
        old_card = target / card_file
        old_card = old_card.read_text(encoding="utf-8", errors="replace") if old_card.is_file() else ""
        lora = has_lora(self)
        order = (WEIGHTS_NAME, LORA_WEIGHTS_NAME) if lora else (WEIGHTS_NAME,)
        order = (*order, card_file, CONFIG_NAME)
        with staged_folder(target, order=order) as tmp:
            tensors = {f"heads.{k}": v.detach().to("cpu").contiguous() for k, v in self.heads.state_dict().items()}
            if old_sha256 is not None and _holds_tensors(old_weights, tensors):
                # the same heads again: their file as it was, so what is tied to its sha256 (a calibration,
                # a hub revision) stays valid — even when it was written by an older drex_hf
                shutil.copyfile(old_weights, tmp / WEIGHTS_NAME)
            else:
                save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=_heads_file_metadata(self.exit_config))
            config = copy.deepcopy(self.exit_config)
            config.weights_sha256 = sha256_file(tmp / WEIGHTS_NAME)
            if lora:
                save_file(lora_tensors(self), str(tmp / LORA_WEIGHTS_NAME), metadata={"drex_hf": "lora"})
                config.extra["lora"] = dict(config.extra.get("lora", {}), sha256=sha256_file(tmp / LORA_WEIGHTS_NAME))
            else:
                config.extra.pop("lora", None)
            stale = stale_files(target, config.weights_sha256, old_sha256) if target.is_dir() else []
            text = card if card is not None else render_model_card(config)
            section = calibration_section(old_card)
            if section and not stale and (target / CALIBRATION_FILES[0]).is_file():  # the calibration stays
                text = text.rstrip("\n") + "\n\n" + section + "\n"
            (tmp / card_file).write_text(text, encoding="utf-8")
            (tmp / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
            for name, content in (extra_files or {}).items():
                (tmp / name).write_bytes(content)
            written = sorted(os.listdir(tmp))
        for name in stale:  # after the new heads are in place: a failed save leaves the folder as it was
            (target / name).unlink(missing_ok=True)
        if stale:
            logger.warning(
                "removed %s from %s: made for other heads than the ones saved now (calibration.json does not record "
                "their sha256); run `drex calibrate` again",
                ", ".join(stale), target,
            )  # fmt: skip
        self.exit_config.weights_sha256 = config.weights_sha256
        self.exit_config.extra = config.extra
        kept = [name for name in CALIBRATION_FILES if name not in stale and (target / name).is_file()]
        return [*written, *kept]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        output_exit_logits: bool = False,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward; with `output_exit_logits=True`, also every exit's outputs.

        With exits, the layers are run here and the result is an `EarlyExitCausalLMOutput` with final
        `logits [B, T, V]`, `exit_logits` (one `[B, T, V]` per exit), `exit_confidences [exits, B, T]`
        and the raw `exit_hidden_states`. Positions come from the mask (`cumsum - 1`), as in HF's
        `generate`, so padded rows get the positions they have when generated; the base model's plain
        forward instead numbers padding too unless given `position_ids`.
        """
        if not output_exit_logits:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if kwargs:
            raise GenerationInputError(
                f"forward(output_exit_logits=True) takes input_ids, attention_mask, labels; got {sorted(kwargs)}"
            )
        from drex_hf.generation.settings import check_token_batch

        input_ids, attention_mask = check_token_batch(input_ids, attention_mask, self.arch.input_vocab_size)
        if self.arch.position_limit is not None:  # learned positions (GPT-2); rotary: no limit, no host read
            # positions come from the mask: left padding takes none
            if attention_mask is None:
                check_positions(self.arch, [input_ids.shape[1]] * input_ids.shape[0])
            else:
                check_positions(self.arch, attention_mask.bool().sum(dim=1).tolist())
        return self._forward_with_exits(input_ids, attention_mask, labels)

    def exit_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        skip_layers: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Run the backbone once: (embeddings, hidden state after each exit layer, last layer's output).

        The last layer's output is before the final norm. `skip_layers` (LayerSkip-style layer
        dropout in training) pass the hidden state through those layers unchanged. Positions come
        from the mask, as in `forward(output_exit_logits=True)`.
        """
        arch = self.arch
        arch.check_attention_implementation()
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = arch.embed(input_ids, position_ids)
        embeddings = hidden
        rotary = arch.position_embeddings(hidden, position_ids)
        query_index = torch.arange(length, device=input_ids.device).expand(batch, length)
        masks: dict[int | None, torch.Tensor] = {}
        exit_hidden = []
        exit_at = set(self.exit_layers)
        for index in range(arch.num_layers):
            if index not in skip_layers:
                window = arch.layer_window(index)
                if window not in masks:
                    masks[window] = build_attention_mask(
                        query_index, length, key_valid=valid, window=window, dtype=hidden.dtype
                    )
                hidden = arch.run_layer(
                    index,
                    hidden,
                    attention_mask=masks[window],
                    position_ids=position_ids,
                    position_embeddings=rotary,
                    cache=None,
                )
            if index in exit_at:
                exit_hidden.append(hidden)
        return embeddings, exit_hidden, hidden

    def _forward_with_exits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> EarlyExitCausalLMOutput:
        arch = self.arch
        embeddings, exit_hidden, hidden = self.exit_states(input_ids, attention_mask)
        previous = embeddings
        exit_logits, confidences = [], []
        for head, state in zip(self.heads, exit_hidden):
            logits = head.logits(state)
            confidence, _ = exit_confidence(self.exit_config.confidence, head, state, previous, logits)
            exit_logits.append(logits)
            confidences.append(confidence)
            previous = state
        logits = arch.lm_head(arch.final_norm(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return EarlyExitCausalLMOutput(
            loss=loss,
            logits=logits,
            exit_logits=tuple(exit_logits),
            exit_confidences=torch.stack(confidences),
            exit_hidden_states=tuple(exit_hidden),
        )

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        policy: str | None = None,
        thresholds: float | list[float] | None = None,
        seed: int | list[int] | None = None,
        exit_trace: Any = None,
        cost_model: Any = None,
        sla_tpot_ms: float | None = None,
        quorum: float = 0.5,
        graphs: bool | None = None,
        generation_config: Any = None,
        streamer: Any = None,
        return_dict_in_generate: bool | None = None,
        tokenizer: Any = None,
        draft_exit: int | None = None,
        draft_tokens: int | str | None = None,
        draft_confidence: float | None = None,
        draft_source: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | EarlyExitGenerateOutput:
        """Generate with per-token early exit (greedy or sampling), like HF's `generate`.

        The batch runs through one `DrexEngine` (DESIGN.md §5); each request's tokens equal what it
        would get alone.

        Args:
            policy: `drex` (per-token exits with rebatching), `full` (full depth), `self_spec`
                (lossless: drafts from each row's own text or from the exit head at `draft_exit`, verified
                by full depth; the output is full depth's — `SpecEngine`), or the batch-wide baselines
                `batch_all` and `batch_majority` (whose outputs depend on the batch). Default: the policy
                `drex calibrate --choose-policy` measured fastest on this device for this batch size
                (with its draft source, exit and k), else `drex`.
            thresholds: override the config's thresholds for this call (one value or one per exit;
                `float("inf")` never exits); None (the default) keeps the config's.
            seed: sampling seed, an integer in [0, 2**64) (numpy integers too; larger or negative
                seeds are refused, never wrapped); an int gives request i the seed `seed + i`, a list
                one per request.
                Each request's draws depend on its seed and token number only, so neighbours never
                change its tokens.
                Default: drawn from torch's global RNG (so `torch.manual_seed` makes runs repeatable).
            exit_trace: take exit decisions from a trace instead of the heads: a `[batch, tokens]`
                tensor (or nested list) of exit layers to replay, e.g. `exit_layers` of an earlier
                run, or an `ExitDistribution` to draw them from (seeded per request).
            cost_model: drex's cost constants: a `CostModel` or a calibration file; default measured
                quickly at start-up.
            sla_tpot_ms: drex: the time per output token no request should exceed.
            quorum: batch_majority's fraction q of confident rows that makes the batch exit.
            graphs: run the engine's programs as CUDA graphs (default: on for CUDA; capture takes a
                few seconds at start-up, so reuse a `DrexEngine` when generating many batches).
            kwargs: `max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
                `eos_token_id`, `pad_token_id`, and HF's `repetition_penalty`, `no_repeat_ngram_size`,
                `min_new_tokens`, `bad_words_ids`, `stop_strings` (applied by transformers' own logits
                processors and `StopStringCriteria`, each row seeing only its own prompt and tokens;
                the exit confidence stays the head's own; processors turn CUDA graphs off), as in HF.
            tokenizer: the tokenizer `stop_strings` are matched with, as in HF.
            draft_source: self_spec: where drafts come from: `head` (the exit head at `draft_exit`, the
                default), `ngram` (each row's own prompt and tokens: what followed the latest earlier
                occurrence of its last tokens, as HF's prompt lookup, batched) or `mixed` (per row and
                round: its text where it matches, else the head).
            draft_exit: self_spec: the exit layer whose head drafts (default: the deepest exit point).
            draft_tokens: self_spec: drafts per round, an integer k (default 4) or "adaptive" (per row,
                from its measured acceptance and costs timed at start-up).
            draft_confidence: self_spec: stop drafting at a draft whose head confidence (max
                probability) is below this (default: never).

        With `return_dict_in_generate=True` the output also carries the run's `EngineStats`.
        """
        from drex_hf.generation import api

        if policy is None:
            policy, draft_source, draft_exit, draft_tokens = self._calibrated_policy(
                input_ids, draft_source, draft_exit, draft_tokens
            )
        return api.generate(
            self,
            input_ids,
            attention_mask,
            policy=policy,
            thresholds=thresholds,
            seed=seed,
            exit_trace=exit_trace,
            cost_model=cost_model,
            sla_tpot_ms=sla_tpot_ms,
            quorum=quorum,
            graphs=graphs,
            generation_config=generation_config,
            streamer=streamer,
            return_dict_in_generate=return_dict_in_generate,
            tokenizer=tokenizer,
            draft_exit=draft_exit,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            draft_source=draft_source,
            kwargs=kwargs,
        )

    def release_engines(self) -> int:
        """Release the engines `generate()` keeps for reuse (their KV stores and captured graphs; at
        most two are kept, the least recently used released first); returns how many there were."""
        from drex_hf.generation.api import release_engines

        return release_engines(self)

    def _calibrated_policy(
        self, input_ids: Any, draft_source: str | None, draft_exit: int | None, draft_tokens: int | str | None
    ) -> tuple[str, str | None, int | None, int | str | None]:
        """`generate`'s default policy: the calibrated choice for this device and batch size (its draft
        source, exit and k unless given), else drex."""
        batch = int(input_ids.shape[0]) if getattr(input_ids, "dim", lambda: 0)() == 2 else 1
        choice = choice_for(self.policy_choice, batch)
        if choice is None:
            return "drex", draft_source, draft_exit, draft_tokens
        if choice["policy"] == "self_spec":
            if draft_source is None:
                draft_source = choice.get("draft_source", "head")
            if draft_exit is None:
                draft_exit = choice.get("draft_exit")
            if draft_tokens is None:
                draft_tokens = choice["draft_tokens"]
        return choice["policy"], draft_source, draft_exit, draft_tokens


def _check_base_sizes(config: EarlyExitConfig, arch: ArchAdapter, what: str) -> None:
    expected = {
        "model type": config.base_model_type,
        "layers": config.base_num_layers,
        "hidden size": config.base_hidden_size,
        "vocab": config.base_vocab_size,
    }
    actual = {
        "model type": arch.config.model_type,
        "layers": arch.num_layers,
        "hidden size": arch.hidden_size,
        "vocab": arch.vocab_size,
    }
    diffs = [k for k, v in expected.items() if v is not None and v != actual[k]]
    if diffs:

        def show(sizes: dict[str, Any]) -> str:
            return ", ".join(f"{k} {sizes[k]}" for k in expected if expected[k] is not None)

        raise BaseModelMismatchError(
            f"exit heads were made for a base with {show(expected)} (base_model {config.base_model!r}), "
            f"but {what} has {show(actual)}"
        )


def _resolve_base(
    base: str | os.PathLike | nn.Module, revision: str | None, gguf_sha256: str | None, load_kwargs: dict[str, Any]
) -> tuple[nn.Module, BaseSource]:
    """A loaded base model and where it came from."""
    if isinstance(base, nn.Module):
        if load_kwargs:
            raise GenerationInputError(
                f"loading arguments {sorted(load_kwargs)} apply only when the base is given by name or path, "
                f"not as a loaded model"
            )
        return base, BaseSource(name=getattr(base.config, "_name_or_path", "") or "", path="", kind="object")
    return load_base(base, revision, gguf_sha256=gguf_sha256, **load_kwargs)


def _check_config(config: Any) -> None:
    if not isinstance(config, EarlyExitConfig):
        hint = ": build one with EarlyExitConfig(**config)" if isinstance(config, dict) else ""
        raise ConfigTypeError(f"config must be an EarlyExitConfig, got {type(config).__name__} {config!r}{hint}")


def check_device(device: Any, option: str | None = None) -> torch.device | None:
    """`device` parsed, refused before anything loads when torch cannot parse it or it is CUDA where
    there is none; None stays None. The error names it as `device=...`, or as the command-line
    `option` (the CLI's `--device`)."""
    if device is None:
        return None
    quoted, plain = (f"{option} {device!r}", f"{option} {device}") if option else (f"device={device!r}",) * 2
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise GenerationInputError(f"{quoted} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerationInputError(f"{plain}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise GenerationInputError(f"{plain}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def _check_dtype(load_kwargs: dict[str, Any]) -> None:
    """A `dtype` / `torch_dtype` loading argument must be a torch dtype, its name, or "auto"."""
    for name in ("dtype", "torch_dtype"):
        value = load_kwargs.get(name)
        if value is None or isinstance(value, (torch.dtype, dict)):  # a dict: per sub-model, HF checks it
            continue
        if not (isinstance(value, str) and (value == "auto" or isinstance(getattr(torch, value, None), torch.dtype))):
            raise GenerationInputError(
                f"{name}={value!r} is not a torch dtype; give e.g. torch.float32, torch.bfloat16, 'float16' or 'auto'"
            )


def _place(model: EarlyExitModelForCausalLM, device: str | torch.device | None) -> EarlyExitModelForCausalLM:
    if device is not None:
        model.to(device)
    return model.eval()


def _holds_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the safetensors file at `path` holds exactly `tensors` (names, dtypes, shapes, values);
    False for a file that cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if set(handle.keys()) != set(tensors):
                return False
            return all(torch.equal(handle.get_tensor(name), tensor) and handle.get_tensor(name).dtype == tensor.dtype
                       for name, tensor in tensors.items())  # fmt: skip
    except Exception:  # noqa: BLE001 - a damaged old file is simply not the same heads
        return False


def _heads_file_metadata(config: EarlyExitConfig) -> dict[str, str]:
    """What the weights file records about the heads it holds, so that an edited config is caught at
    load (the config records the file's sha256, but nothing covers the config itself). One metadata
    key: safetensors writes several in a random order, and the same heads must give the same bytes
    (the sha256 that ties a calibration to them)."""
    record = {"kind": "exit_heads", "exit_layers": list(config.exit_layers), "head": config.head}
    return {"drex_hf": json.dumps(record, sort_keys=True)}


def _check_heads_file_fits(folder: Path, config: EarlyExitConfig) -> None:
    """Refuse a config whose exit layers or head type differ from those the weights file was saved
    with. Files saved before the weights recorded them are checked by their tensors' names only."""
    from safetensors import safe_open

    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata() or {}
    try:
        record = json.loads(metadata.get("drex_hf", "{}"))
    except json.JSONDecodeError:  # older files: "exit_heads"
        record = {}
    record = record if isinstance(record, dict) else {}
    saved = record.get("exit_layers")
    if saved is not None and saved != list(config.exit_layers):
        raise WeightsFileError(
            f"{config_path} says exit_layers {list(config.exit_layers)}, but {weights} holds heads for exit "
            f"layers {saved}: the config was edited after saving; set exit_layers back to {saved}, or train "
            f"heads for {list(config.exit_layers)}"
        )
    saved_head = record.get("head")
    if saved_head is not None and saved_head != config.head:
        raise WeightsFileError(
            f"{config_path} says head {config.head!r}, but {weights} holds {saved_head!r} heads: the config was "
            f"edited after saving; set head back to {saved_head!r}"
        )


def _read_heads_file(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise WeightsFileError(
            f"{path} is not the weights file its exit_config.json was saved with (sha256 differs): the folder "
            f"was changed or a save was interrupted; save the heads again"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise WeightsFileError(f"cannot read exit heads from {path}: not a valid safetensors file ({err})") from None
