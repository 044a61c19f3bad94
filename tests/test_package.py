"""Packaging promises: the public API, and heavy optional packages imported only when used."""

import subprocess
import sys

import drex_hf


def test_public_api():
    assert {"EarlyExitConfig", "EarlyExitModelForCausalLM", "EarlyExitGenerateOutput"} <= set(drex_hf.__all__)


def test_import_and_generate_load_no_training_or_evaluation_packages():
    code = (
        "import sys, torch, math\n"
        "from transformers import LlamaConfig, AutoModelForCausalLM\n"
        "from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "base = AutoModelForCausalLM.from_config(cfg)\n"
        "m = EarlyExitModelForCausalLM.from_base(base, EarlyExitConfig(exit_layers=[1]))\n"
        "m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)\n"
        "print(sorted(n for n in ('datasets', 'evaluate', 'peft', 'gguf') if n in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
