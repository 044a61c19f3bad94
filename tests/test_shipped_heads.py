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


@pytest.mark.slow
def test_the_calibrated_default_is_lossless_on_held_out_prompts(smollm2_home):
    """Issue 26: what generate() runs without policy= on this device (the shipped calibration's choice)
    gives full depth's tokens on prompts training never saw."""
    from drex_hf.calibration_file import choice_for
    from drex_hf.hub import load_tokenizer
    from drex_hf.training.prompts import read_prompt_file

    model = EarlyExitModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
    tok = load_tokenizer(model.base_source)
    held_out = FOLDER.parents[1] / "benchmarks" / "prompts"
    chosen = (("heldout-chat.txt", 10), ("heldout-prose.jsonl", 0))
    prompts = [read_prompt_file(held_out / name)[i] for name, i in chosen]
    choice = choice_for(model.policy_choice, 1)
    for prompt in prompts:
        message = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        default = model.generate(ids, max_new_tokens=24, return_dict_in_generate=True)
        assert torch.equal(default.sequences, model.generate(ids, policy="full", max_new_tokens=24))
        assert default.stats.policy == (choice["policy"] if choice else "drex")
        if choice and choice["policy"] == "self_spec":
            assert default.stats.rounds > 0 and default.stats.rounds <= default.stats.decoded_tokens


@pytest.mark.slow
def test_lossless_benchmark_runs_every_row_and_keeps_full_depths_tokens(smollm2_home, tmp_path):
    import os
    import subprocess
    import sys

    script = FOLDER.parents[1] / "benchmarks" / "lossless.py"
    done = subprocess.run(
        [sys.executable, str(script), "--count", "1", "--batch-sizes", "1,2", "--max-new-tokens", "6",
         "--repeats", "1", "--policies", "default,full,self_spec@ngram/2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "lossless.json").read_text())
    one, two = report["batches"]["1"]["rows"], report["batches"]["2"]["rows"]
    assert set(one) == {"default", "full", "self_spec@ngram/2", "hf_generate", "hf_prompt_lookup"}
    assert set(two) == {"default", "full", "self_spec@ngram/2"}  # HF's lookup refuses batches
    for rows in (one, two):
        assert rows["default"]["same_as_full"] == 1.0 and rows["self_spec@ngram/2"]["same_as_full"] == 1.0
        assert len(rows["full"]["x_full_runs"]) == 1 and rows["full"]["x_full"] == 1.0
    assert one["hf_prompt_lookup"]["same_as_full"] == one["hf_generate"]["same_as_full"]  # HF's lookup is lossless
    assert "| self_spec@ngram/2 |" in (tmp_path / "lossless.md").read_text()
