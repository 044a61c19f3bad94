"""Per-architecture adapters: the one place that knows where a model keeps its parts.

An adapter exposes a causal LM's embeddings, decoder layers, final norm, lm_head, position
encoding (rotary or learned) and each layer's input norm + k/v projections (for KV fill), and runs
one unmodified transformers decoder layer with our masks and cache. Everything else in drex_hf
drives models through this interface. Supported: Llama (SmolLM2), Qwen2, Mistral, GPT-2.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, ClassVar

import torch
from torch import nn

from drex_hf.errors import UnsupportedArchitectureError

SUPPORTED_ATTENTION = ("sdpa", "eager")


class ArchAdapter:
    """Base adapter; subclasses fill in where the parts live for one family of models."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        if hasattr(model, "get_base_model"):  # a peft wrapper: the layers live in the wrapped model
            model = model.get_base_model()
        self.model = model
        self.config = model.config
        self._cache_kwarg = _cache_keyword(self.layers[0])

    # ------------------------------------------------------------------ parts
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`lm_head(features)` (inside an engine's step on the CPU, as `drex_hf.products` chooses)."""
        return self.lm_head(features)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def input_vocab_size(self) -> int:
        """Number of token ids the embedding accepts."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def num_kv_heads(self) -> int:
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    @property
    def position_limit(self) -> int | None:
        """A hard limit on positions (learned position embeddings), or None (rotary: no hard limit)."""
        return None

    def input_norm(self, index: int) -> nn.Module:
        raise NotImplementedError

    def attention_modules(self) -> list[nn.Module]:
        """Each decoder layer's attention module (what reads `config._attn_implementation`)."""
        raise NotImplementedError

    def kv_modules(self) -> tuple[str, ...]:
        """The submodules of a decoder layer that make what it caches (its input norm and key/value
        projections), by name inside the layer: what a draft layer shares with the layer it stands
        for (`drex_hf.draft_layer`), so its keys and values are that layer's own."""
        raise NotImplementedError

    @property
    def rotary_half(self) -> bool:
        """Whether keys are rotated in the rotate-half convention with `position_embeddings`' (cos,
        sin) over the whole head — what the fused KV-fill kernel implements."""
        return False

    def layer_window(self, index: int) -> int | None:
        """Sliding-window size of layer `index` (None: full causal attention)."""
        return None

    # ------------------------------------------------------------------ computation
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What every layer needs for positions (rotary cos/sin), or None."""
        return None

    def run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Any,
        module: nn.Module | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Run decoder layer `index` unmodified; `cache.update` receives its new keys/values.
        `extra` keywords travel through the layer to its attention function (and `cache.update`).
        `module`: run it in the layer's place (a draft layer standing for layer `index`)."""
        kwargs: dict[str, Any] = {
            **extra,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
            self._cache_kwarg: cache,
        }
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        out = (self.layers[index] if module is None else module)(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def kv_projection(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values layer `index` would cache if its input were `hidden` ([n, q, H]).

        This is KV fill by projection: the layer's input norm and k/v projections applied to the
        exit hidden state, with rotary at the tokens' positions. Returns `[n, kv_heads, q, head_dim]`.
        """
        raise NotImplementedError

    def kv_fill_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Every layer's k/v projections with its input norm's scale folded in, for KV fill as one
        matrix product: weight `[L, 2 * kv_heads * head_dim, H]` (keys' rows, then values'), bias
        `[L, 2 * kv_heads * head_dim]` or None. None when this model's norms cannot be folded; then
        `kv_projection` runs layer by layer."""
        return None

    def kv_fill_normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The input norm without its learned scale (the part shared by every layer)."""
        raise NotImplementedError

    def rotate_keys(
        self, keys: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Apply the position encoding to keys `[n, heads, q, head_dim]` (identity without rotary)."""
        return keys

    def check_attention_implementation(self) -> None:
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise UnsupportedArchitectureError(
                f"attn_implementation {impl!r} is not supported: drex_hf drives decoder layers with "
                f"explicit masks; load the base with attn_implementation='sdpa' or 'eager'"
            )


class LlamaAdapter(ArchAdapter):
    """Llama and its close relatives (Qwen2, Mistral): pre-norm layers, rotary, GQA."""

    model_types = ("llama",)

    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.config.hidden_size // self.config.num_attention_heads)

    def input_norm(self, index: int) -> nn.Module:
        return self.layers[index].input_layernorm

    def kv_modules(self) -> tuple[str, ...]:
        return ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj")

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    @property
    def rotary_half(self) -> bool:
        return True

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(input_ids)

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.rotary_emb(hidden, position_ids)

    def kv_projection(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        return self.rotate_keys(keys, position_embeddings), values

    def rotate_keys(
        self, keys: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        cos, sin = position_embeddings
        # The architecture's own rotary function, from the module that defines its layers.
        apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        _, keys = apply_rotary(keys, keys, cos, sin)
        return keys

    def kv_fill_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        norms = [self.input_norm(i) for i in range(self.num_layers)]
        eps = {getattr(n, "variance_epsilon", None) for n in norms}
        projections = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in self.layers]
        plain = all(type(p) is nn.Linear for pair in projections for p in pair)
        if not plain or len(eps) != 1 or None in eps or not all(type(n).__name__.endswith("RMSNorm") for n in norms):
            return None
        dtype = projections[0][0].weight.dtype
        weights, biases = [], []
        for norm, (k_proj, v_proj) in zip(norms, projections):  # folded in fp32 one layer at a time, kept in dtype
            scale = norm.weight.float()
            weights.append((torch.cat([k_proj.weight.float(), v_proj.weight.float()]) * scale).to(dtype))
            if k_proj.bias is not None:
                biases.append(torch.cat([k_proj.bias, v_proj.bias]).to(dtype))
        return torch.stack(weights), torch.stack(biases) if biases else None

    def kv_fill_normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        eps = self.input_norm(0).variance_epsilon
        h = hidden.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)

    def layer_window(self, index: int) -> int | None:
        return getattr(self.layers[index].self_attn, "sliding_window", None)


class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)

    def layer_window(self, index: int) -> int | None:
        return getattr(self.config, "sliding_window", None)


class GPT2Adapter(ArchAdapter):
    """GPT-2: learned absolute positions added to the embeddings, fused q/k/v `Conv1D`."""

    model_types = ("gpt2",)

    @property
    def backbone(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.h

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.ln_f

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.n_embd // self.config.n_head)

    @property
    def position_limit(self) -> int | None:
        return int(self.config.n_positions)

    def input_norm(self, index: int) -> nn.Module:
        return self.layers[index].ln_1

    def kv_modules(self) -> tuple[str, ...]:
        return ("ln_1", "attn.c_attn")  # GPT-2 projects queries, keys and values in one product

    def attention_modules(self) -> list[nn.Module]:
        return [layer.attn for layer in self.layers]

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.wte(input_ids) + self.backbone.wpe(position_ids)
        return self.backbone.drop(hidden)

    def kv_projection(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        x = layer.ln_1(hidden)
        _, keys, values = layer.attn.c_attn(x).split(layer.attn.split_size, dim=2)
        shape = (*x.shape[:-1], -1, self.head_dim)
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)

    def kv_fill_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        norms = [self.input_norm(i) for i in range(self.num_layers)]
        if len({n.eps for n in norms}) != 1 or not all(type(n) is nn.LayerNorm and n.weight is not None for n in norms):
            return None
        hidden = self.hidden_size
        dtype = self.layers[0].attn.c_attn.weight.dtype
        weights, biases = [], []
        for norm, layer in zip(norms, self.layers):  # folded in fp32 one layer at a time, kept in dtype
            # Conv1D: y = x @ W + b with W [H, 3H]; keys and values are its last two thirds
            w_kv = layer.attn.c_attn.weight[:, hidden:].float()
            b_kv = layer.attn.c_attn.bias[hidden:].float()
            weights.append((w_kv * norm.weight.float().unsqueeze(1)).T.to(dtype))
            biases.append((norm.bias.float() @ w_kv + b_kv).to(dtype))
        return torch.stack(weights), torch.stack(biases)

    def kv_fill_normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],), eps=self.input_norm(0).eps)


ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, Qwen2Adapter, MistralAdapter, GPT2Adapter)
SUPPORTED_MODEL_TYPES = tuple(sorted(t for a in ADAPTERS for t in a.model_types))


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for `model`'s architecture, or an error listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls(model)
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} ({type(model).__name__}) is not supported by drex_hf; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def build_attention_mask(
    query_index: torch.Tensor,
    kv_length: int,
    *,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive float mask `[n, 1, q, kv_length]` for explicit-mask attention.

    `query_index [n, q]` gives each query's slot index in the key/value sequence; a key at index j
    is visible when j <= query index, j is inside the sliding window (if any), and
    `key_valid [n, kv_length]` (if given) marks it as a real token. Float, not boolean: eager
    attention adds the mask to the scores, so a boolean mask would silently be wrong there.
    """
    keys = torch.arange(kv_length, device=query_index.device)
    q = query_index.unsqueeze(-1)  # [n, q, 1]
    visible = keys <= q
    if window is not None:
        visible = visible & (keys > q - window)
    if key_valid is not None:
        visible = visible & key_valid.unsqueeze(1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=query_index.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _cache_keyword(layer: nn.Module) -> str:
    """Name of the decoder layer's cache argument: `cache` (transformers >= 5.2x) or older names."""
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "layer_past"):
        if name in params:
            return name
    raise UnsupportedArchitectureError(
        f"{type(layer).__name__}.forward takes none of cache / past_key_values / layer_past; "
        f"this transformers version is not supported"
    )
