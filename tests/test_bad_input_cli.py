"""Bad input to every `drex` subcommand: exit code 2, one line naming the option and the value, found
before the work starts (most of these never load a model: loading is patched to fail), and nothing
partial left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-llama.yaml"
SYNTHETIC = ["bench", "--synthetic-config", "tiny", "--exit-dist", "1,0,0,0", "--max-new-tokens", "2", "--no-hf"]


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `drex argv`; assert exit code 2 and one line on stderr, without a traceback; return it."""
    with pytest.raises(SystemExit) as exc:  # argparse exits itself; main() returns the code otherwise
        sys.exit(main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: these inputs must be refused before one."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(EarlyExitModelForCausalLM, "from_base", fail)
    monkeypatch.setattr(EarlyExitModelForCausalLM, "from_pretrained", fail)
    import drex_hf.bench.synthetic

    monkeypatch.setattr(drex_hf.bench.synthetic, "synthetic_model", fail)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be created in: a chmod 0o555 folder, or /sys for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    else:
        folder = Path("/sys")
    try:
        (folder / "drex-probe").mkdir()
    except OSError:
        yield folder
    else:
        (folder / "drex-probe").rmdir()
        pytest.skip(f"{folder} is writable here")
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


@pytest.fixture
def heads_dir(tmp_path, tiny_base_dir):
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=[0.0, 0.5])
    EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config).save_pretrained(tmp_path / "heads")
    return tmp_path / "heads"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


# ---------------------------------------------------------------------- output folders, checked first
@pytest.mark.parametrize("where", ["file", "under-file", "read-only"])
def test_bench_out_that_cannot_be_written_is_refused_before_the_run(where, tmp_path, read_only_dir, capsys, no_loading):
    out = {"file": a_file(tmp_path), "under-file": a_file(tmp_path) / "bench", "read-only": read_only_dir / "bench"}
    err = refused([*SYNTHETIC, "--batch-sizes", "1", "--out", out[where]], capsys)
    assert f"--out {out[where]}" in err
    assert {"file": "is a file", "under-file": "is a file", "read-only": "is not writable"}[where] in err


@pytest.mark.parametrize("option", ["--output", "train.output_dir"])
def test_train_output_that_cannot_be_written_is_refused_before_training(
    option, tmp_path, read_only_dir, tiny_base_dir, capsys, no_loading
):
    argv = ["train", TINY_RECIPE, "--set", f"model.base={tiny_base_dir}", "--no-progress"]
    out = a_file(tmp_path)
    given = ["--output", out] if option == "--output" else ["--set", f"train.output_dir={out}"]
    err = refused([*argv, *given], capsys)
    assert f"{option} {out} is a file" in err
    assert not Path(f"{out}.run").exists()  # no run folder beside it
    ro = read_only_dir / "heads"
    given = ["--output", ro] if option == "--output" else ["--set", f"train.output_dir={ro}"]
    assert f"{option} {ro}: {read_only_dir} is not writable" in refused([*argv, *given], capsys)


def test_train_under_a_read_only_run_folder_is_refused(tmp_path, read_only_dir, tiny_base_dir, capsys, no_loading):
    argv = ["train", TINY_RECIPE, "--set", f"model.base={tiny_base_dir}", "--output", tmp_path / "heads"]
    err = refused([*argv, "--set", f"train.run_dir={read_only_dir / 'run'}"], capsys)
    assert f"train.run_dir {read_only_dir / 'run'}" in err and "not writable" in err
    assert not (tmp_path / "heads").exists()


def test_calibrate_into_a_folder_it_cannot_write_is_refused(heads_dir, tmp_path, capsys, no_loading):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder anyway")
    text = tmp_path / "text.txt"
    text.write_text("w5 w6 w7 " * 100)
    heads_dir.chmod(0o555)
    try:
        err = refused(["calibrate", heads_dir, "--data", text], capsys)
    finally:
        heads_dir.chmod(0o755)
    assert f"MODEL_DIR {heads_dir}" in err and "not writable" in err


# ---------------------------------------------------------------------- calibrate's options, before the model
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rows", "1,2,4"], "--decision-rows 8 is above the largest timed row count in --rows 1,2,4"),
        (["--rows", "0,1"], "argument --rows: counts must be positive integers, got 0 in '0,1'"),
        (["--rows", ""], "argument --rows: expected at least one integer, got ''"),
        (["--holdout-rows", "3,3"], "argument --holdout-rows: 3 given twice in '3,3'"),
        (["--context", "64", "--long-context", "64"], "--long-context 64 must exceed --context 64"),
        (["--seed", str(10**23)], "--seed: seed 100000000000000000000000 is out of range"),
        (["--seed", "-1"], "argument --seed: seed -1 is out of range"),
        # a sequence guarantee (--metric): what its test could never use, before anything is generated
        (["--metric", "bleu"], "argument --metric: invalid choice: 'bleu' (choose from 'rouge_l', 'exact')"),
        (["--metric", "rouge_l", "--target", "1.5"], "argument --target: must be strictly between 0 and 1, got 1.5"),
        (["--metric", "exact", "--target", "0"], "argument --target: must be strictly between 0 and 1, got 0"),
        (["--target", "0.9"], "--target is the mean score of a sequence guarantee and needs --metric rouge_l or exact"),
        (["--metric", "rouge_l", "--bound", "binomial"], "--metric rouge_l: the binomial bound needs 0/1 losses"),
        (
            ["--metric", "rouge_l", "--prompts", "30"],
            "--prompts 30: 15 test prompts (of 30) can never show a mean rouge_l >= 0.9 with probability >= 0.90 "
            "(hoeffding_bentkus bound): even if every answer matched full depth, at least 22 test prompts are needed",
        ),
        (["--metric", "exact", "--reuse-observations"], "--metric generates drex's answers to the prompts"),
    ],
)
def test_calibrate_refuses_option_combinations_up_front(extra, message, heads_dir, tmp_path, capsys, no_loading):
    text = tmp_path / "text.txt"
    text.write_text("w5 w6 w7 " * 100)
    assert message in refused(["calibrate", heads_dir, "--data", text, *extra], capsys)
    assert not (heads_dir / "calibration.json").exists()


def test_calibrate_data_must_be_a_text_file(heads_dir, tmp_path, capsys, no_loading):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert f"--data {binary} is not UTF-8 text (byte 128" in refused(["calibrate", heads_dir, "--data", binary], capsys)
    assert f"--data {tmp_path} is a folder" in refused(["calibrate", heads_dir, "--data", tmp_path], capsys)
    assert not (heads_dir / "calibration.json").exists()


def test_calibrate_library_refuses_rows_it_cannot_time(tiny_base_dir):
    from drex_hf.calibration.calibrate import calibrate
    from drex_hf.calibration.thresholds import CalibrationDataError

    model = EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[1]))
    with pytest.raises(CalibrationDataError, match=r"decision_rows 8 is above the largest timed row count in rows"):
        calibrate(model, [], rows=[1, 2, 4], holdout_rows=[3])
    with pytest.raises(CalibrationDataError, match=r"rows must be positive row counts, got \[0, 1\]"):
        calibrate(model, [], rows=[0, 1], decision_rows=1)


# ---------------------------------------------------------------------- seeds and lists (argparse types)
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_seed_outside_64_bits_is_one_line(command, heads_dir, capsys, no_loading):
    argv = ["generate", heads_dir, "--prompt", "w5", "--do-sample"] if command == "generate" else SYNTHETIC
    err = refused([*argv, "--seed", "100000000000000000000000"], capsys)
    assert "argument --seed: seed 100000000000000000000000 is out of range: seeds are integers in [0, 2**64)" in err


@pytest.mark.parametrize(
    "sizes, message",
    [
        ("", "expected at least one integer, got ''"),
        ("1,8,1", "1 given twice in '1,8,1'"),
        ("2,-1", "counts must be positive integers, got -1 in '2,-1'"),
    ],
)
def test_bench_batch_sizes_must_be_distinct_positive_counts(sizes, message, capsys, no_loading):
    err = refused([*SYNTHETIC, "--batch-sizes", sizes], capsys)
    assert f"argument --batch-sizes: {message}" in err


# ---------------------------------------------------------------------- drex bench self_spec rows
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policies", "full,self_spec@9/2", "--acceptance", "0.8"],
         "'self_spec@9/2': draft exit 9 is not one of the model's exit points [3, 7, 11]"),
        (["--policies", "self_spec@3/0/a0.8"],
         "'self_spec@3/0/a0.8': k must be a positive integer or 'adaptive', got '0'"),
        (["--policies", "self_spec@3/2/a1.5"],
         "'self_spec@3/2/a1.5': an acceptance is a probability in [0, 1], got '1.5'"),
        (["--policies", "self_spec@3/2/0.8"], "the third part is the trace acceptance, spelled aP"),
        (["--policies", "self_spec@x/2"], "the draft exit must be a layer index (or ngram, ngram+EXIT), got 'x'"),
        (["--policies", "self_spec@ngram"], "spell an n-gram row self_spec@ngram/K or self_spec@ngram+EXIT/K"),
        (["--policies", "self_spec@ngram+x/2"], "the draft exit must be a layer index (or ngram, ngram+EXIT)"),
        (["--policies", "self_spec:eager", "--acceptance", "0.8"], "self_spec rows take no engine mode"),
        (["--policies", "self_spec", "--acceptance", "0.8,1.2"],
         "argument --acceptance: '0.8,1.2': an acceptance is a probability in [0, 1], got '1.2'"),
        (["--policies", "self_spec", "--draft-tokens", "1,0", "--acceptance", "0.8"],
         "argument --draft-tokens: '1,0': k must be a positive integer or 'adaptive', got '0'"),
        (["--policies", "self_spec", "--draft-exits", "3,5", "--acceptance", "0.8"],
         "--draft-exits: 5 is not one of the model's exit points [3, 7, 11]"),
        (["--policies", "full,self_spec@3/2"], "self_spec rows on a synthetic config need --acceptance (or /aP)"),
        (["--policies", "full,drex", "--acceptance", "0.8"],
         "--acceptance applies to self_spec rows; --policies names none"),
        (["--policies", "self_spec@3/2", "--draft-tokens", "4", "--acceptance", "0.8"], "--draft-tokens fills in"),
        (["--policies", "self_spec@3/2/a0.8", "--acceptance", "0.8"], "--acceptance fills in self_spec rows"),
        (["--policies", "full,self_spec@3/2/a0.8", "--sweep-depths", "0.5"], "not in the sweeps"),
    ],
)  # fmt: skip
def test_bench_refuses_bad_self_spec_rows_before_the_model_loads(extra, message, capsys, no_loading):
    base = ["bench", "--synthetic-config", "moderate", "--exit-dist", "0.25,0.25,0.25,0.25", "--no-hf"]
    assert message in refused([*base, *extra], capsys)


@pytest.mark.parametrize("policy, extra", [("self_spec@1/2", ["--acceptance", "0.8"]), ("self_spec@1/2/a0.8", [])])
def test_bench_refuses_a_self_spec_acceptance_with_a_heads_folders_own_heads(
    policy, extra, heads_dir, capsys, no_loading
):
    err = refused(["bench", heads_dir, "--policies", f"full,{policy}", *extra], capsys)
    assert "a self_spec acceptance (--acceptance or /aP) is trace mode: it needs --synthetic-config" in err
    err = refused(["bench", heads_dir, "--policies", "self_spec@5/2"], capsys)  # exit_config.json's exits, unloaded
    assert "draft exit 5 is not one of the model's exit points [1, 2]" in err


# ---------------------------------------------------------------------- drex generate
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exit-layers", "1"], "--exit-layers applies to new heads on a base model only; {heads} is an exit-heads"),
        (["--head", "adapter"], "--head applies to new heads on a base model only"),
        (["--exit-layers", "1", "--head", "norm"], "--exit-layers and --head apply to new heads"),
        (["--policy", "full", "--threshold", "0.5"], "--threshold 0.5 does not apply to --policy full"),
    ],
)
def test_generate_refuses_options_it_would_ignore(extra, message, heads_dir, capsys, no_loading):
    err = refused(["generate", heads_dir, "--prompt", "w5", *extra], capsys)
    assert message.format(heads=heads_dir) in err


# ---------------------------------------------------------------------- drex train
def test_train_refuses_a_binary_or_folder_recipe(tmp_path, capsys, no_loading):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"model:\n  base: x\n\xff\xfe\x00")
    assert f"recipe {binary} is not a UTF-8 text file (byte 17" in refused(["train", binary], capsys)
    assert f"recipe {tmp_path} is a folder" in refused(["train", tmp_path], capsys)


def test_a_refused_recipe_leaves_no_run_folder(tmp_path, tiny_base_dir, capsys):
    out = tmp_path / "new" / "heads"
    argv = ["train", TINY_RECIPE, "--set", f"model.base={tiny_base_dir}", "--set", "heads.exit_layers=[1, 7]"]
    err = refused([*argv, "--output", out, "--no-progress"], capsys)
    assert "exit layer 7 is out of range" in err
    assert not (tmp_path / "new").exists()  # neither heads.run nor the folder made for it


def test_resume_without_a_checkpoint_is_refused_before_the_model_loads(tmp_path, tiny_base_dir, capsys, no_loading):
    out = tmp_path / "heads"
    argv = ["train", TINY_RECIPE, "--set", f"model.base={tiny_base_dir}", "--output", out, "--resume"]
    err = refused(argv, capsys)
    assert f"--resume: no complete checkpoint in {out}.run/checkpoint" in err
    assert not Path(f"{out}.run").exists() and not out.exists()


# ---------------------------------------------------------------------- drex bench --exit-trace
def test_exit_trace_accepts_inline_json_as_documented(tmp_path, capsys):
    out = tmp_path / "bench"
    rows = [[3, 0, 2, 1], [3, 1, 1, 0]]
    argv = ["bench", "--synthetic-config", "tiny", "--exit-trace", json.dumps(rows), "--batch-sizes", "2"]
    argv += ["--policies", "drex", "--no-memory", "--no-measured-oracle", "--no-hf"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out)]) == 0
    document = json.loads((out / "bench.json").read_text())
    assert document["batches"][0]["policies"]["drex"]["exit_layers"] == rows
    capsys.readouterr()
    err = refused(["bench", "--synthetic-config", "tiny", "--exit-trace", "[[3, 0", "--out", out], capsys)
    assert "--exit-trace (inline JSON) is not JSON" in err


def test_exit_trace_file_errors_name_the_file(tmp_path, capsys, no_loading):
    bad = tmp_path / "trace.json"
    bad.write_text("{not json")
    argv = ["bench", "--synthetic-config", "tiny", "--out", tmp_path / "bench", "--exit-trace"]
    assert f"--exit-trace {bad} is not JSON" in refused([*argv, bad], capsys)
    assert f"--exit-trace {tmp_path} is a folder" in refused([*argv, tmp_path], capsys)


# ---------------------------------------------------------------------- drex demo
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--heads", "somewhere", "--untrained"], "--heads and --untrained exclude each other"),
        (["--exit-layers", "1,2"], "--exit-layers applies to --untrained heads"),
        (["--threshold", "0.5"], "--threshold applies to --untrained heads"),
        (["--target", "high"], "--target must be a number such as 0.99, or 'saved'; got 'high'"),
        (["--untrained", "--target", "0.9"], "--target picks trained heads' thresholds"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
    ],
)
def test_demo_refuses_options_before_loading(argv, message, capsys, no_loading):
    assert message in refused(["demo", *argv], capsys)


# ---------------------------------------------------------------------- progress and --help
def test_progress_in_a_log_is_one_line_per_stage_and_no_progress_silences_it(tmp_path, capsys):
    base = [*SYNTHETIC, "--batch-sizes", "1,2", "--policies", "full", "--no-memory", "--no-measured-oracle"]
    base += ["--out", tmp_path / "bench"]
    assert main([str(a) for a in base]) == 0
    err = capsys.readouterr().err  # not a terminal
    assert "\r" not in err and "bench (batch sizes x repeats): 2/2 runs in" in err
    assert main([str(a) for a in [*base, "--batch-sizes", "1", "--no-progress"]]) == 0
    assert "bench (batch sizes x repeats)" not in capsys.readouterr().err


def test_calibrate_progress_in_a_log_is_one_line_per_stage(tmp_path, tiny_base_dir, capsys):
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=[0.9, 0.9])
    EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config).save_pretrained(tmp_path / "heads")
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(3, 99, (3000,), generator=gen)))
    argv = ["calibrate", tmp_path / "heads", "--data", text, "--target-agreement", "0.6", "--delta", "0.2"]
    argv += ["--prompts", "16", "--prompt-tokens", "6", "--max-new-tokens", "10", "--rows", "1,2", "--holdout-rows"]
    argv += ["1", "--repeats", "1", "--decision-rows", "2", "--measures", "max_prob", "--context", "8"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err  # no carriage returns, no cursor moves
    assert "observe (greedy full depth): 16/16 prompts in" in err and "profile segments: 3/3 segments in" in err


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from drex_hf.cli.main import main\n"
        "for argv in (['--help'], ['nonsense']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "calibrate" in done.stdout and "invalid choice: 'nonsense'" in done.stderr
