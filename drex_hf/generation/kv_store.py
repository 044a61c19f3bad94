"""`RowKVCache`: static per-request slots for keys/values, plugged into transformers' attention.

One allocation per model: keys and values `[layers, slots + 1, kv_heads, max_len, head_dim]` in the
model's dtype, zero-initialised (masked keys must stay finite); the extra slot is scratch, where
padding rows of a bucketed step write (never handed to a request). `keys(l)` is layer l's view.
Before a segment runs, `bind()` names the slots in the call, each one's query positions and the
key/value length to attend over — all known on the host, so binding reads nothing back from the
device; the decoder layers' own attention then calls `update()`, which writes the new keys/values at
each row's own positions (`kv_append`) and returns the rows' keys/values up to that length (views
when the rows are a contiguous run of slots, a gathered copy otherwise) — or, bound `indexed`, the
whole layer store for indexed decode attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from drex_hf.errors import GenerationInputError
from drex_hf.generation.attention import IndexedRows
from drex_hf.kernels import kv_append

if TYPE_CHECKING:
    from drex_hf.generation.protocol import EarlyExitModel


class EngineFullError(GenerationInputError):
    """No free slot for a new request."""


class RowKVCache(Cache):
    def __init__(
        self,
        *,
        num_layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(layers=[])
        if slots < 1 or max_len < 1:
            raise GenerationInputError(f"RowKVCache needs slots >= 1 and max_len >= 1, got {slots} and {max_len}")
        shape = (num_layers, slots + 1, kv_heads, max_len, head_dim)  # + the scratch slot
        self.key_store = torch.zeros(shape, dtype=dtype, device=device)
        self.value_store = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.slots, self.max_len = num_layers, slots, max_len
        self.scratch = slots  # where padding rows write; never allocated
        self._free = list(range(slots))
        self._arange = torch.arange(slots + 1, device=device)
        self._layer_index = torch.arange(num_layers, device=device)
        self._rows: torch.Tensor | slice = slice(0, 0)
        self._write_rows: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None
        self._kv_len = 0
        self._indexed: IndexedRows | None = None

    @classmethod
    def for_model(cls, model: EarlyExitModel, slots: int, max_len: int) -> RowKVCache:
        """A cache for `model`'s layers and key/value heads, in its base weights' dtype, on the device
        of its heads."""
        arch = model.arch
        return cls(
            num_layers=arch.num_layers,
            slots=slots,
            kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            max_len=max_len,
            dtype=next(model.base_model.parameters()).dtype,
            device=model.heads_device,
        )

    # ------------------------------------------------------------------ slots
    def allocate(self) -> int:
        """The lowest free slot; `EngineFullError` when every slot holds a request."""
        if not self._free:
            raise EngineFullError(
                f"no free slot: all {self.slots} slots hold running requests (max_batch={self.slots}); "
                f"wait for one to finish (engine.has_free_slot) or build the engine with a larger max_batch"
            )
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def keys(self, layer: int) -> torch.Tensor:
        return self.key_store[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self.value_store[layer]

    def nbytes(self) -> int:
        return self.key_store.nbytes + self.value_store.nbytes

    def tensors(self) -> list[torch.Tensor]:
        """The store's own tensors (what a captured program may touch besides the model's)."""
        return [self.key_store, self.value_store, self._arange, self._layer_index]

    # ------------------------------------------------------------------ the attention interface
    def bind(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        *,
        kv_len: int,
        span: tuple[int, int] | None = None,
        lengths: torch.Tensor | None = None,
        indexed: bool = False,
    ) -> None:
        """Rows of the next layer calls: `slots [n]` and their query positions `[n, q]`, attending
        over the first `kv_len` positions. `span` (lo, hi): the slots are exactly lo..hi-1, read as
        views. `indexed` (one query per row, `lengths [n]` = position + 1): `update()` returns the
        whole layer store and the attention reads each row in place through `indexed_rows()`."""
        self._kv_len = kv_len
        self._write_pos = positions
        self._indexed = None
        if span is not None and not indexed:
            self._rows = slice(*span)
            self._write_rows = self._arange[: span[1] - span[0]]
            return
        self._rows = self._write_rows = slots
        if indexed:
            self._indexed = IndexedRows(slots, lengths, kv_len)

    def indexed_rows(self) -> IndexedRows | None:
        """The bound rows' slots and lengths, when bound `indexed`."""
        return self._indexed

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the bound rows' new keys/values `[n, kv_heads, q, head_dim]` at their positions."""
        keys, values = self.key_store[layer_idx], self.value_store[layer_idx]
        if isinstance(self._rows, slice):
            keys, values = keys[self._rows], values[self._rows]
        kv_append(keys, values, self._write_rows, self._write_pos, key_states, value_states, check_indices=False)
        if self._indexed is not None:
            return keys, values  # the whole layer store: indexed attention reads the rows in place
        if isinstance(self._rows, slice):
            return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]
        window_k = self.key_store[layer_idx, :, :, : self._kv_len]
        window_v = self.value_store[layer_idx, :, :, : self._kv_len]
        return window_k.index_select(0, self._rows), window_v.index_select(0, self._rows)

    def write(
        self,
        layers: range,
        slots: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_layer: torch.Tensor,
    ) -> None:
        """KV fill: keys/values `[n, len(layers), kv_heads, head_dim]` for one position per slot, kept
        only for the layers at or after each row's `first_layer` (the others are written back as they
        were: one indexed read and write for all rows, whatever their first layers)."""
        block = slice(layers.start, layers.stop)
        keep = (self._layer_index[block].unsqueeze(0) >= first_layer.unsqueeze(1))[:, :, None, None]
        for store, new in ((self.key_store, keys), (self.value_store, values)):
            old = store[block, slots, :, positions]
            store[block, slots, :, positions] = torch.where(keep, new.to(store.dtype), old)

    @property
    def kv_len(self) -> int:
        """Key/value positions the bound rows attend over (the longest row's position + 1)."""
        return self._kv_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len
