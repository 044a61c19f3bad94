"""A LoRA on the backbone (joint training), through peft, saved beside the exit heads.

`add_lora` injects trainable LoRA layers into the base model in place (the wrapper's references to
the decoder layers stay valid). `lora_tensors` collects them for saving; `load_lora` injects the
same layers into a freshly loaded base, loads the tensors strictly and merges them into the base
weights, so inference costs nothing extra. The exit config records the LoRA's settings and its
file's sha256 under `extra["lora"]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from drex_hf.errors import WeightsFileError

LORA_WEIGHTS_NAME = "lora_adapter.safetensors"


def _config(rank: int, alpha: float, target_modules: list[str], dropout: float) -> Any:
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("joint LoRA training and LoRA heads need peft: pip install peft (drex-hf[train])") from None
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, bias="none")


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0) -> None:
    """Inject a trainable LoRA into `model.base_model` (an EarlyExitModelForCausalLM); heads stay as they are."""
    from peft import inject_adapter_in_model

    from drex_hf.errors import ConfigError

    base = model.base_model
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    unknown = sorted(set(target_modules) - names)
    if unknown:
        raise ConfigError(f"lora.target_modules {unknown} are not modules of the base model")
    inject_adapter_in_model(_config(rank, alpha, target_modules, dropout), base)
    for name, param in base.named_parameters():
        param.requires_grad_("lora_" in name)
    device, dtype = model.arch.lm_head.weight.device, next(base.parameters()).dtype
    for name, param in base.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(device=device, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    model.exit_config.extra["lora"] = {
        "rank": rank,
        "alpha": alpha,
        "target_modules": list(target_modules),
    }


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.base_model.named_parameters())


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.base_model.named_parameters()
        if "lora_" in name
    }


def load_lora(model: nn.Module, path: Path, settings: dict[str, Any]) -> None:
    """Inject the LoRA described by `settings`, load it from `path` and merge it into the base weights."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        rank, alpha, targets = int(settings["rank"]), float(settings["alpha"]), list(settings["target_modules"])
    except (KeyError, TypeError, ValueError):
        raise WeightsFileError(f"exit config extra.lora is malformed: {settings!r}") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsFileError(f"{path} is not a readable safetensors file: {err}") from None
    base = model.base_model
    inject_adapter_in_model(_config(rank, alpha, targets, 0.0), base)
    expected = {name: p for name, p in base.named_parameters() if "lora_" in name}
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))[:4]
        unexpected = sorted(set(tensors) - set(expected))[:4]
        raise WeightsFileError(f"{path} does not match the LoRA config: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in expected.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise WeightsFileError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(tensors[name])
            param.requires_grad_(False)
    for module in base.modules():
        if isinstance(module, LoraLayer):
            module.merge()
