"""The `drex` command line: env, generate, --help, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.cli.main import main


@pytest.fixture
def heads_dir(tmp_path, tiny_base_dir):
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=[0.0, 0.5])
    model = EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config)
    model.save_pretrained(tmp_path / "heads")
    return tmp_path / "heads"


def test_env_prints_versions_and_device(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("drex_hf", "torch", "transformers", "triton", "device", "triton kernels"):
        assert key in out
    assert torch.__version__ in out


def test_generate_prints_text_and_exit_layers(heads_dir, capsys):
    code = main(["generate", str(heads_dir), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens", "5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "=== prompt 1: w5 w6 w7" in out and "=== prompt 2: w9" in out
    assert "@3" in out and "@1" in out  # first token at full depth, then threshold 0 at layer 1
    assert "exits per layer: layer 1: 8, layer 2: 0, full depth (3): 2" in out
    assert "tokens/s" in out


def test_generate_self_spec_prints_full_depths_text_and_its_rounds(heads_dir, capsys):
    args = ["generate", str(heads_dir), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens", "6"]
    assert main([*args, "--policy", "full"]) == 0
    full = capsys.readouterr().out.split("=== policy")[0]
    assert main([*args, "--policy", "self_spec", "--draft-exit", "1", "--draft-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.split("=== policy")[0] == full  # the same text, every token at full depth (@3)
    assert "self_spec: " in out and "drafts accepted" in out and "layers per token (full depth: 4)" in out
    assert main([*args, "--draft-tokens", "2"]) == 2
    assert "--draft-source, --draft-exit and --draft-tokens apply to --policy self_spec" in capsys.readouterr().err
    assert main([*args, "--policy", "self_spec", "--draft-source", "ngram", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out.split("=== policy")[0] == full  # drafts from the prompts' own text
    assert main([*args, "--policy", "self_spec", "--draft-exit", "0"]) == 2
    assert "draft_exit must be one of the model's exit layers [1, 2]" in capsys.readouterr().err


def test_generate_on_a_base_with_new_heads(tiny_base_dir, capsys):
    code = main(
        [
            "generate",
            str(tiny_base_dir),
            "--exit-layers",
            "1",
            "--prompt",
            "w5 w6",
            "--max-new-tokens",
            "3",
            "--policy",
            "full",
        ]
    )
    assert code == 0
    assert "exits per layer: layer 1: 0, full depth (3): 3" in capsys.readouterr().out


def test_new_heads_from_the_cli_get_the_same_default_head_type_as_the_api(tiny_base_dir):
    from drex_hf.cli.common import load_model
    from drex_hf.cli.main import build_parser

    args = build_parser().parse_args(["generate", str(tiny_base_dir), "--exit-layers", "1", "--prompt", "w5"])
    assert load_model(args.model, args).exit_config.head == EarlyExitConfig(exit_layers=[1]).head == "norm"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "NOWHERE", "--prompt", "x", "--exit-layers", "1"], "base model 'NOWHERE' is not a local folder"),
        (["generate", "{base}", "--prompt", "w5"], "not an exit-heads folder"),
        (["generate", "{heads}", "--prompt", "  "], "empty prompt"),
        (["generate", "{heads}", "--prompt", "w5", "--policy", "fastest"], "invalid choice: 'fastest'"),
        (["generate", "{heads}", "--prompt", "w5", "--max-new-tokens", "0"], "must be a positive integer"),
        (["generate", "{heads}", "--prompt", "w5", "--threshold", "2"], "threshold must be in [0, 1]"),
        (["generate", "{base}", "--prompt", "w5", "--exit-layers", "3"], "last layer"),
        (["generate", "{base}", "--prompt", "w5", "--exit-layers", "9"], "exit layer 9 is out of range"),
        (["generate", "{heads}"], "the following arguments are required: --prompt"),
        (["generate", "{heads}", "--prompt", "w5", "--device", "gpu7"], "--device 'gpu7' is not a device"),
        (["generate", "{heads}", "--prompt", "w5", "--device", "cuda:9"], "--device cuda:9: "),
        (["generate", "{heads}", "--prompt", "w5", "--confidence", "margin"], "--confidence applies to new heads"),
        (["generate", "{bare}", "--prompt", "w5", "--exit-layers", "1"], "no usable tokenizer"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, heads_dir, tiny_base_dir, tmp_path, capsys):
    bare = tmp_path / "no-tokenizer"
    make_tiny("llama").save_pretrained(bare)
    argv = [a.format(heads=heads_dir, base=tiny_base_dir, bare=bare) for a in argv]
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_help_shows_defaults():
    def help_text(*command):
        args = [sys.executable, "-m", "drex_hf.cli.main", *command, "--help"]
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    result = help_text("generate")
    assert "(default: drex)" in result and "(default: 32)" in result
    assert "(default: 0.999)" in help_text("demo") and "(default: 48)" in help_text("demo")
    assert "versions" in help_text("env")
    top = subprocess.run([sys.executable, "-m", "drex_hf.cli.main", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "generate" in top.stdout and "env" in top.stdout and "demo" in top.stdout


@pytest.mark.slow
def test_demo_runs_on_smollm2(smollm2_home, capsys):  # smollm2_home: DREX_HOME with the converted GGUF
    assert main(["demo", "--max-new-tokens", "6", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "tokens/s" in out
    assert "exits per layer (early exit): layer 5:" in out
    assert "trained heads from" in out and "smollm2-135m-drex" in out  # the shipped heads, not untrained ones


def test_demo_reads_fitted_thresholds_from_the_shipped_card():
    import json
    import math

    from drex_hf.cli.demo import SHIPPED_HEADS, _fitted_thresholds
    from drex_hf.errors import GenerationInputError

    values, why = _fitted_thresholds(SHIPPED_HEADS, "0.99", "max_prob")
    results = json.loads((SHIPPED_HEADS / "eval_results.json").read_text())
    row = next(r for r in results["groups"]["self"]["targets"] if r["target"] == 0.99 and r["measure"] == "max_prob")
    assert values == [math.inf if t == "inf" else t for t in row["thresholds"]] and "99 %" in why
    with pytest.raises(GenerationInputError, match=r"targets \[0.9, 0.95, 0.99\], not 0.5"):
        _fitted_thresholds(SHIPPED_HEADS, "0.5", "max_prob")
    with pytest.raises(GenerationInputError, match="a number such as 0.99, or 'saved'"):
        _fitted_thresholds(SHIPPED_HEADS, "high", "max_prob")
