"""Kernels for the rebatching paths, each a Triton kernel with a launcher and a torch reference.

`dispatch` picks the implementation per call (Triton on CUDA, torch elsewhere, `DREX_KERNELS`
overrides). The engine calls these functions; tests compare each against its reference.
"""

from drex_hf.kernels.append import kv_append
from drex_hf.kernels.confidence import logit_confidence
from drex_hf.kernels.decode_attention import indexed_decode_attention
from drex_hf.kernels.dispatch import backend
from drex_hf.kernels.kv_fill import kv_fill_project
from drex_hf.kernels.rows import gather_rows, scatter_rows

__all__ = [
    "backend",
    "gather_rows",
    "indexed_decode_attention",
    "kv_append",
    "kv_fill_project",
    "logit_confidence",
    "scatter_rows",
]
