"""drex_hf: dynamic-rebatching early-exit inference for HuggingFace Transformers.

Public API: `EarlyExitConfig` (what the exit heads are) and `EarlyExitModelForCausalLM` (a base
causal LM plus exit heads, with `from_base` / `from_pretrained` / `save_pretrained` / `generate`).
The model classes load on first use, so that `drex --help` and the CLI's argument checks do not
wait for torch and transformers to import.
"""

from typing import TYPE_CHECKING, Any

from drex_hf.config import EarlyExitConfig
from drex_hf.errors import DrexError

if TYPE_CHECKING:
    from drex_hf.modeling import EarlyExitCausalLMOutput, EarlyExitGenerateOutput, EarlyExitModelForCausalLM

_FROM_MODELING = ("EarlyExitCausalLMOutput", "EarlyExitGenerateOutput", "EarlyExitModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "DrexError",
    "EarlyExitCausalLMOutput",
    "EarlyExitConfig",
    "EarlyExitGenerateOutput",
    "EarlyExitModelForCausalLM",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_MODELING:
        from drex_hf import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'drex_hf' has no attribute {name!r}")
