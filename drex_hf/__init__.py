"""drex_hf: dynamic-rebatching early-exit inference for HuggingFace Transformers.

Public API: `EarlyExitConfig` (what the exit heads are) and `EarlyExitModelForCausalLM` (a base
causal LM plus exit heads, with `from_base` / `from_pretrained` / `save_pretrained` / `generate`).
"""

from drex_hf.config import EarlyExitConfig
from drex_hf.errors import DrexError
from drex_hf.modeling import EarlyExitCausalLMOutput, EarlyExitGenerateOutput, EarlyExitModelForCausalLM

__version__ = "0.1.0"
__all__ = [
    "DrexError",
    "EarlyExitCausalLMOutput",
    "EarlyExitConfig",
    "EarlyExitGenerateOutput",
    "EarlyExitModelForCausalLM",
    "__version__",
]
