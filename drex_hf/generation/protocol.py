"""What the generation engine needs of a model, as a Protocol: generation types against it, never
against `EarlyExitModelForCausalLM`, so that no module here imports the model class (which sits above
generation and calls into it: `modeling.generate` -> `generation.api.generate`)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class EarlyExitModel(Protocol):
    """An early-exit causal LM as the engine sees it: the base model's parts through its `arch`
    adapter, the exit heads in exit order, and where they live."""

    arch: Any  # drex_hf.arch.ArchAdapter
    exit_config: Any  # drex_hf.config.EarlyExitConfig
    heads: nn.ModuleList
    base_model: nn.Module

    @property
    def exit_layers(self) -> list[int]: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def heads_device(self) -> torch.device: ...
