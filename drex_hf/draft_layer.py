"""A draft head with one decoder layer after a shallow exit (Kangaroo's shape, issue 26).

An exit head maps the hidden state after layer e straight to logits (norm, adapter, lm_head). A
`DraftLayer` runs one more decoder layer first: a copy of layer e+1 behind a learned gate, trained by
distillation on the model's own generations (`drex_hf.training.draft_layer`), then a copy of the
exit head's norm and adapter (or of the final norm) and the shared lm_head.
It drafts for `self_spec` at exit e; it never emits a token (verification does), so it cannot
change any output.

Its cache is layer e+1's own. The copy shares, by reference, the submodules that make what layer
e+1 caches (`ArchAdapter.kv_modules`: the input norm and the key/value projections), and trains
the rest (queries, output projection, MLP, second norm, final norm). So its keys and values at a
position are exactly what layer e+1 would cache there from the same exit hidden state, and a draft
step writes them into layer e+1's slot in the key/value store: the verify pass rewrites the same
positions before any deeper layer reads them, and verified positions already hold them. The draft
layer needs no cache of its own. (Kangaroo's adapter keeps its own keys and values; sharing them
trades a little of the layer's freedom for no memory and no extra writes in verification.)

Saved beside the heads as `draft_layer.safetensors`: the trained tensors of each exit's layer
(`exit{e}.layer.*`, `exit{e}.gate`, and `exit{e}.head.*` or `exit{e}.norm.*`), the shared ones left
out, with the exits, which of them start from their exit head, and the base's layer count as metadata.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drex_hf.errors import GenerationInputError, UnsupportedArchitectureError, WeightsFileError

DRAFT_LAYER_NAME = "draft_layer.safetensors"
FORMAT = 1


class DraftLayer(nn.Module):
    """Layer `exit_layer + 1`'s copy (sharing its key/value submodules), behind a gate, then the
    features of `head` (a copy of the exit's head: its norm and adapter) or, without one, a copy of
    the final norm; the base's lm_head by reference. See the module docstring.

    Its output is `x + gate * (layer(x) - x)`. With gate 1 and no head it computes exactly what layer
    e+1 and the final norm compute; with gate 0 and the exit's head, exactly what that exit head
    drafts: where distillation starts (`drex_hf.training.draft_layer`), so training only adds."""

    def __init__(self, arch: Any, exit_layer: int, head: nn.Module | None = None, gate: float = 1.0) -> None:
        super().__init__()
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 0 <= exit_layer < arch.num_layers - 1:
            raise GenerationInputError(
                f"a draft layer follows an exit layer in [0, {arch.num_layers - 1}), got {exit_layer!r}"
            )
        try:
            shared_names = arch.kv_modules()
        except NotImplementedError as e:
            raise UnsupportedArchitectureError(f"{type(arch).__name__} has no draft layers") from e
        self.exit_layer, self.index = exit_layer, exit_layer + 1
        base = arch.layers[self.index]
        memo: dict[int, Any] = {id(arch.config): arch.config}  # one config: attention switches reach the copy
        for shared in (arch.lm_head, arch.final_norm, *(base.get_submodule(name) for name in shared_names)):
            memo[id(shared)] = shared  # the same module object in the copy: layer e+1's keys and values
        self.layer = copy.deepcopy(base, memo)
        self.gate = nn.Parameter(torch.tensor(float(gate), dtype=arch.lm_head.weight.dtype))
        if head is not None and not callable(getattr(head, "features", None)):
            raise GenerationInputError(f"a draft layer's head needs a features() method, got {type(head).__name__}")
        self.head = copy.deepcopy(head, memo) if head is not None else None
        self.norm = copy.deepcopy(arch.final_norm) if head is None else None
        self.shared_names = tuple(shared_names)
        self._lm_head = (arch.lm_head,)  # by reference: not a submodule, never saved or trained here
        for name, parameter in self.named_parameters():
            if not self.is_shared(name):  # layer e+1's own are left as the base has them
                parameter.requires_grad_(True)

    @property
    def lm_head(self) -> nn.Module:
        return self._lm_head[0]

    def is_shared(self, name: str) -> bool:
        """Whether parameter `name` (as in `named_parameters()`) is layer e+1's own, not this layer's."""
        return any(name.startswith(f"layer.{shared}.") for shared in self.shared_names)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors this layer trains (the shared ones left out), by name."""
        return {k: v for k, v in self.state_dict().items() if not self.is_shared(k)}

    def mix(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The draft layer's output from its input (the exit's hidden state) and `layer`'s output."""
        return inputs + self.gate * (outputs - inputs)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the lm_head sees: the draft layer's output (`hidden`) through the head's norm and
        adapter, or the norm."""
        return self.head.features(hidden) if self.head is not None else self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(hidden))


def write_draft_layers(path: str | os.PathLike, layers: Mapping[int, DraftLayer], num_layers: int) -> None:
    """Save each exit's draft layer (trained tensors only) to `path`, written whole or not at all."""
    from safetensors.torch import save_file

    tensors = {}
    for e, layer in sorted(layers.items()):
        for name, tensor in layer.trained_state().items():
            tensors[f"exit{e}.{name}"] = tensor.detach().to("cpu").contiguous()
    with_head = sorted(e for e, layer in layers.items() if layer.head is not None)
    metadata = {"format": str(FORMAT), "exits": json.dumps(sorted(layers)), "base_num_layers": str(num_layers),
                "with_exit_head": json.dumps(with_head)}  # fmt: skip
    partial = f"{path}.partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def read_draft_layers(
    path: str | os.PathLike, arch: Any, heads: Mapping[int, nn.Module] | None = None
) -> dict[int, DraftLayer]:
    """The draft layers saved in `path`, built on `arch`'s layers (its device and dtype) and, for one
    that started from its exit's head, on a copy of `heads[exit]` (the model's heads by exit); a file
    made for another base or not matching its layers is refused, naming what differs."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file
        raise WeightsFileError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        exits = [int(e) for e in json.loads(metadata["exits"])]
        num_layers = int(metadata["base_num_layers"])
        with_head = {int(e) for e in json.loads(metadata.get("with_exit_head", "[]"))}
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsFileError(f"{path} lacks its draft-layer metadata (exits, base_num_layers)") from e
    if num_layers != arch.num_layers:
        raise WeightsFileError(f"{path} was made for a base with {num_layers} layers, this one has {arch.num_layers}")
    device, dtype = arch.lm_head.weight.device, arch.lm_head.weight.dtype
    out = {}
    for e in exits:
        head = None
        if e in with_head:
            head = (heads or {}).get(e)
            if head is None:
                raise WeightsFileError(f"{path}: exit {e}'s draft layer was made on exit {e}'s head, which is missing")
        layer = DraftLayer(arch, e, head=head).to(device=device, dtype=dtype)
        expected = layer.trained_state()
        prefix = f"exit{e}."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise WeightsFileError(
                f"{path}: exit {e}'s draft layer does not match this base (missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, other shapes {wrong[:4]})"
            )
        layer.load_state_dict(state, strict=False)
        for name, parameter in layer.named_parameters():
            if not layer.is_shared(name):
                parameter.requires_grad_(False)
        out[e] = layer.eval()
    return out
