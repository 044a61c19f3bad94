"""`RowKVCache`: static per-request slots for keys/values, plugged into transformers' attention.

One allocation per model: keys and values `[layers, slots, kv_heads, max_len, head_dim]` in the
model's dtype, zero-initialised (masked keys must stay finite); `keys(l)` is layer l's
`[slots, kv_heads, max_len, head_dim]` view. Before a segment runs, `bind()` names the slots in the
call and each one's query positions; the decoder layers' own attention then calls `update()`, which
writes the new keys/values at each row's own positions (`kv_append`) and returns the rows'
keys/values up to the longest one (a view when the rows are a contiguous run of slots, a gathered
copy otherwise) — or, bound `indexed`, the whole layer store for indexed decode attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from drex_hf.errors import GenerationInputError
from drex_hf.generation.attention import IndexedRows
from drex_hf.kernels import kv_append

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitModelForCausalLM


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
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.key_store = torch.zeros(shape, dtype=dtype, device=device)
        self.value_store = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.slots, self.max_len = num_layers, slots, max_len
        self._free = list(range(slots))
        self._rows: torch.Tensor | slice = slice(0, 0)
        self._write_rows: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None
        self._kv_len = 0
        self._indexed: IndexedRows | None = None

    @classmethod
    def for_model(cls, model: EarlyExitModelForCausalLM, slots: int, max_len: int) -> RowKVCache:
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

    # ------------------------------------------------------------------ the attention interface
    def bind(self, slots: list[int], positions: torch.Tensor, *, indexed: bool = False) -> None:
        """Rows of the next layer calls: `slots` (sorted ascending) and their query positions `[n, q]`.

        `indexed` (one query per row): `update()` returns the whole layer store and the attention
        reads each row in place through `indexed_rows()`, instead of a gathered window."""
        lo, hi = slots[0], slots[-1] + 1
        device = self.key_store.device
        self._kv_len = int(positions.max()) + 1
        self._write_pos = positions
        self._indexed = None
        if not indexed and hi - lo == len(slots):  # a contiguous run of slots: views, no gathered copy
            self._rows = slice(lo, hi)
            self._write_rows = torch.arange(len(slots), device=device)
            return
        self._rows = self._write_rows = torch.tensor(slots, device=device)
        if indexed:
            self._indexed = IndexedRows(self._rows, positions[:, -1] + 1, self._kv_len)

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
        self, layers: range, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """KV fill: keys/values `[n, len(layers), kv_heads, head_dim]` for one position per slot, all layers at once."""
        block = slice(layers.start, layers.stop)
        self.key_store[block, slots, :, positions] = keys.to(self.key_store.dtype)
        self.value_store[block, slots, :, positions] = values.to(self.value_store.dtype)

    @property
    def kv_len(self) -> int:
        """Key/value positions the bound rows attend over (the longest row's position + 1)."""
        return self._kv_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len
