"""The README.md written beside saved exit heads: YAML front matter plus what the heads are.

Front matter follows the HF hub's model-card metadata (base_model, library_name, tags, datasets).
The body states the config; evaluation and calibration tables are added by the training and
calibration steps when they have measured something, and say so plainly when they have not.
"""

from __future__ import annotations

from typing import Any

import yaml

from drex_hf.config import EarlyExitConfig


def render_model_card(
    config: EarlyExitConfig,
    *,
    datasets: list[str] | None = None,
    evaluation_markdown: str | None = None,
) -> str:
    """Return the model card text for heads with `config`."""
    meta: dict[str, Any] = {"library_name": "drex_hf", "tags": ["early-exit", "drex", "text-generation"]}
    if config.base_model:
        meta["base_model"] = config.base_model
    if datasets:
        meta["datasets"] = list(datasets)
    front = yaml.safe_dump(meta, sort_keys=True).strip()

    rows = [
        ("base model", f"`{config.base_model}`" if config.base_model else "not recorded"),
        ("base revision", config.base_revision or "—"),
        (
            "base sizes",
            f"{config.base_model_type}, {config.base_num_layers} layers, hidden {config.base_hidden_size}, "
            f"vocab {config.base_vocab_size}",
        ),
        ("exit layers", ", ".join(str(e) for e in config.exit_layers)),
        ("head", config.head + (f" (rank {config.adapter_rank})" if config.head == "adapter" else "")),
        ("confidence", config.confidence),
        ("thresholds", config.describe_thresholds()),
        ("KV fill for skipped layers", config.kv_fill),
    ]
    if config.base_gguf_sha256:
        rows.append(("base GGUF sha256", f"`{config.base_gguf_sha256}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    evaluation = evaluation_markdown or "Not evaluated yet: these heads have no measured agreement or speed-up."
    name = config.base_model.rsplit("/", 1)[-1] if config.base_model else "a causal LM"
    return f"""---
{front}
---

# Early-exit heads for {name}

Exit heads for drex_hf (dynamic-rebatching early-exit inference). This folder
holds only the heads (`exit_config.json`, `exit_heads.safetensors`); the base model's weights are
loaded from `base_model`.

```python
from drex_hf import EarlyExitModelForCausalLM

model = EarlyExitModelForCausalLM.from_pretrained("path/to/this/folder")
out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64, return_dict_in_generate=True)
out.sequences, out.exit_layers
```

## Configuration

| setting | value |
| --- | --- |
{table}

## Evaluation

{evaluation}
"""
