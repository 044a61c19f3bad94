"""The README.md written beside saved exit heads: YAML front matter plus what the heads are.

Front matter follows the HF hub's model-card metadata (base_model, library_name, tags, datasets).
The body states the config; evaluation and calibration tables are added by the training and
calibration steps when they have measured something, and say so plainly when they have not.
A README.md in the folder that we did not write (no `library_name: drex_hf` in its front matter) is
the user's own: it is kept, and our card goes beside it as README.drex_hf.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from drex_hf.config import EarlyExitConfig

CARD_NAME = "README.md"
ASIDE_CARD_NAME = "README.drex_hf.md"  # our card, beside a README.md of the user's own
CALIBRATION_BEGIN, CALIBRATION_END = "<!-- drex calibrate: begin -->", "<!-- drex calibrate: end -->"


def is_drex_card(text: str) -> bool:
    """Whether `text` is a model card drex_hf wrote: YAML front matter with `library_name: drex_hf`."""
    if not text.startswith("---\n"):
        return False
    front = text[4:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and meta.get("library_name") == "drex_hf"


def card_name(folder: Path) -> str:
    """Where our card goes in `folder`: README.md, unless the folder has a README.md of the user's own."""
    readme = folder / CARD_NAME
    if readme.is_file() and not is_drex_card(readme.read_text(encoding="utf-8", errors="replace")):
        return ASIDE_CARD_NAME
    return CARD_NAME


def calibration_section(card: str) -> str | None:
    """The `drex calibrate` section of a card (markers included), if it has one."""
    if CALIBRATION_BEGIN not in card or CALIBRATION_END not in card:
        return None
    return CALIBRATION_BEGIN + card.split(CALIBRATION_BEGIN, 1)[1].split(CALIBRATION_END, 1)[0] + CALIBRATION_END


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
