"""The heads shipped in model_cards/smollm2-135m-drex/: small, load offline, and do better than
untrained heads on the model's own continuations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM

FOLDER = Path(__file__).resolve().parents[1] / "model_cards" / "smollm2-135m-drex"
# DESIGN.md §9: heads trained ~10 min on self-generated text, agreement on held-out self-generated text
REFERENCE_SELF = [0.25, 0.28, 0.34, 0.60]


def test_shipped_folder_is_complete_and_small():
    names = {p.name for p in FOLDER.iterdir()}
    assert {"exit_config.json", "exit_heads.safetensors", "README.md", "eval_results.json", "exit_profile.png"} <= names
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 10 * 2**20
    card = (FOLDER / "README.md").read_text()
    assert "drex train recipes/smollm2-135m.yaml" in card and "exit_profile.png" in card


def test_shipped_results_state_the_comparison_with_design_reference():
    results = json.loads((FOLDER / "eval_results.json").read_text())
    assert results["exit_layers"] == [5, 11, 17, 23] and results["num_layers"] == 30
    ours = [e["agreement"] for e in results["groups"]["self"]["exits"]]
    assert len(ours) == 4 and all(0 < a < 1 for a in ours)
    assert all(a > r for a, r in zip(ours, REFERENCE_SELF)), (ours, REFERENCE_SELF)
    assert results["groups"]["human"]["positions"] > 1000 and results["groups"]["self"]["positions"] > 1000


@pytest.mark.slow
def test_shipped_heads_load_offline_and_beat_untrained_heads(smollm2_home):
    from drex_hf.hub import load_tokenizer

    trained = EarlyExitModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
    assert trained.base_source.kind == "gguf" and trained.exit_config.base_gguf_sha256
    untrained = EarlyExitModelForCausalLM.from_base(
        trained.base_model, EarlyExitConfig(exit_layers=[5, 11, 17, 23], head="shared")
    )
    tok = load_tokenizer(trained.base_source)
    prompts = ["Explain how rain forms.", "Write two sentences about the Moon."]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    agree_trained, agree_untrained = torch.zeros(4), torch.zeros(4)
    count = 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        seq = trained.base_model.generate(ids, max_new_tokens=40, do_sample=False)
        start = ids.shape[1] - 1
        a = trained(seq, output_exit_logits=True)
        b = untrained(seq, output_exit_logits=True)
        final = a.logits[0, start:-1].argmax(-1)
        for j in range(4):
            agree_trained[j] += (a.exit_logits[j][0, start:-1].argmax(-1) == final).sum()
            agree_untrained[j] += (b.exit_logits[j][0, start:-1].argmax(-1) == final).sum()
        count += len(final)
    # on the model's own continuation, the trained heads agree with the final layer more often
    assert (agree_trained / count).mean() > (agree_untrained / count).mean() + 0.05, (agree_trained, agree_untrained)
