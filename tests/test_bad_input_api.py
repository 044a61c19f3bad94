"""Bad arguments to the Python API: each one a DrexError naming the argument and the bad value.

A user of HF Transformers catches `ValueError` / `TypeError`: every error here is also one of those
(a wrong type is also a `TypeError`). The corrupt-GGUF case is also run through the CLI, which must
print one line and exit with code 2.
"""

import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import ConfigError, GenerationInputError, WeightsFileError
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.settings import DecodeSettings

IDS = torch.tensor([[3, 4, 5]])


def _wrap(kind="llama", **config):
    config.setdefault("exit_layers", [1])
    config.setdefault("thresholds", 0.5)
    return EarlyExitModelForCausalLM.from_base(make_tiny(kind), EarlyExitConfig(**config))


@pytest.fixture(scope="module")
def model():
    return _wrap()


# ---------------------------------------------------------------- a corrupt .gguf
GARBLED = struct.pack("<4sIQQ", b"GGUF", 3, 1, 1) + b"\xff" * 8  # a header, then a key of impossible length
NO_ARCHITECTURE = struct.pack("<4sIQQ", b"GGUF", 3, 0, 0)  # a header and nothing else


@pytest.mark.parametrize(
    "content", [b"GGUF but not really", b"", b"hello, not a model at all\n" * 4, GARBLED, NO_ARCHITECTURE]
)
def test_a_corrupt_gguf_is_one_clear_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch, content):
    monkeypatch.setenv("DREX_HOME", str(tmp_path / "home"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(content)
    with pytest.raises(WeightsFileError, match=r"fake\.gguf.*not a (readable )?GGUF") as caught:
        EarlyExitModelForCausalLM.from_base(str(fake), EarlyExitConfig(exit_layers=[1]))
    assert isinstance(caught.value, ValueError)
    from drex_hf.hub import load_base

    with pytest.raises(WeightsFileError, match=r"fake\.gguf"):
        load_base(fake)
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []  # no half conversion, no temporary folder


def test_a_corrupt_gguf_as_the_base_of_saved_heads_is_one_clear_error(tmp_path, monkeypatch, model):
    monkeypatch.setenv("DREX_HOME", str(tmp_path / "home"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not really")
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(WeightsFileError, match=r"fake\.gguf"):
        EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads", base_model=str(fake))


@pytest.mark.parametrize("content", [b"GGUF but not really", GARBLED])
def test_cli_generate_on_a_corrupt_gguf_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, content):
    from drex_hf.cli.main import main

    monkeypatch.setenv("DREX_HOME", str(tmp_path / "home"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(content)
    code = main(["generate", str(fake), "--prompt", "hi", "--exit-layers", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "fake.gguf" in err and "GGUF" in err and "Traceback" not in err


# ---------------------------------------------------------------- seeds
@pytest.mark.parametrize(
    ("seed", "message"),
    [
        (2**70, r"seed 1180591620717411303424 is out of range: seeds are integers in \[0, 2\*\*64\)"),
        (2**64, r"seed 18446744073709551616 is out of range"),
        (-1, r"seed -1 is out of range"),
        ([-5], r"seed -5 is out of range"),
        ([2**64 + 1], r"seed 18446744073709551617 is out of range"),
    ],
)
def test_generate_refuses_seeds_outside_64_bits(model, seed, message):
    with pytest.raises(GenerationInputError, match=message):
        model.generate(IDS, do_sample=True, max_new_tokens=2, seed=seed)


def test_an_int_seed_for_a_batch_must_leave_room_for_seed_plus_i(model):
    batch = torch.tensor([[3, 4], [5, 6], [7, 8]])
    message = r"seed=18446744073709551614 gives prompt 2 the seed 18446744073709551614 \+ 2, which is 2\*\*64 or more"
    with pytest.raises(
        GenerationInputError, match=message + r": with 3 prompts an int seed must be at most 2\*\*64 - 3"
    ):
        model.generate(batch, do_sample=True, max_new_tokens=2, seed=2**64 - 2)
    out = model.generate(batch, do_sample=True, max_new_tokens=2, seed=2**64 - 3)  # the largest that fits
    assert out.shape == (3, 4)
    a = model.generate(IDS, do_sample=True, max_new_tokens=4, seed=np.int64(11))  # numpy integers are seeds too
    assert torch.equal(a, model.generate(IDS, do_sample=True, max_new_tokens=4, seed=11))


@pytest.mark.parametrize("seed", [1.5, "7", True, [2.5]])
def test_non_integer_seeds_are_type_errors(model, seed):
    with pytest.raises(GenerationInputError, match="seed must be an integer") as caught:
        model.generate(IDS, do_sample=True, max_new_tokens=2, seed=seed)
    assert isinstance(caught.value, TypeError)


def test_engine_add_request_refuses_bad_seeds_before_taking_a_slot(model):
    engine = DrexEngine(model, max_batch=1, max_len=8, policy="full", settings=DecodeSettings(4, do_sample=True))
    with pytest.raises(GenerationInputError, match=r"seed 1180591620717411303424 is out of range"):
        engine.add_request(torch.tensor([3, 4]), seed=2**70)
    with pytest.raises(GenerationInputError, match=r"seed must be an integer, got 'x'") as caught:
        engine.add_request(torch.tensor([3, 4]), seed="x")
    assert isinstance(caught.value, TypeError)
    engine.add_request(torch.tensor([3, 4]), seed=2**64 - 1)  # the slot is still free; the largest seed is fine
    assert len(engine.run()[0].tokens) == 4


def test_exit_distribution_refuses_a_bad_seed():
    with pytest.raises(GenerationInputError, match=r"ExitDistribution seed must be an integer, got 'x'") as caught:
        ExitDistribution((0.5, 0.5), seed="x")
    assert isinstance(caught.value, TypeError)
    with pytest.raises(GenerationInputError, match=r"ExitDistribution seed -3 is out of range"):
        ExitDistribution((0.5, 0.5), seed=-3)
    assert ExitDistribution((0.5, 0.5), seed=np.int64(2**62)).seed == 2**62


# ---------------------------------------------------------------- forward past the positions
def test_forward_with_exits_past_gpt2_positions_is_refused_like_generate():
    model = _wrap("gpt2")  # n_positions = 64
    with pytest.raises(GenerationInputError, match="prompt 0 has 70 tokens but the model has 64 positions"):
        model(torch.randint(3, 99, (1, 70)), output_exit_logits=True)
    # left padding does not count: positions come from the mask
    ids = torch.randint(3, 99, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with pytest.raises(GenerationInputError, match="prompt 0 has 70 tokens"):
        model(ids, attention_mask=mask, output_exit_logits=True)
    mask[0, :6] = 0
    out = model(ids, attention_mask=mask, output_exit_logits=True)
    assert out.logits.shape == (2, 70, 99)
    out = model(torch.randint(3, 99, (1, 64)), output_exit_logits=True)  # exactly the limit
    assert out.logits.shape == (1, 64, 99)


# ---------------------------------------------------------------- from_base arguments
@pytest.mark.parametrize("config", [{"exit_layers": [1]}, None, [1]])
def test_from_base_refuses_a_config_that_is_not_an_early_exit_config(config):
    with pytest.raises(ConfigError, match=r"config must be an EarlyExitConfig") as caught:
        EarlyExitModelForCausalLM.from_base(make_tiny("llama"), config)
    assert isinstance(caught.value, TypeError)
    if isinstance(config, dict):
        assert "EarlyExitConfig(**config)" in str(caught.value)


def test_from_base_refuses_an_unknown_dtype_before_loading(tiny_base_dir):
    with pytest.raises(GenerationInputError, match=r"dtype='float33' is not a torch dtype"):
        EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[1]), dtype="float33")
    with pytest.raises(GenerationInputError, match=r"torch_dtype=3 is not a torch dtype"):
        EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[1]), torch_dtype=3)
    ok = EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[1]), dtype="float16")
    assert ok.heads_device.type == "cpu" and ok.arch.lm_head.weight.dtype == torch.float16


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", r"device='gpu0' is not a device torch knows"),
        (3.5, r"device=3.5 is not a device torch knows"),
        pytest.param(
            "cuda",
            r"device='cuda': CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        ("cuda:99", r"device='cuda:99'"),
    ],
)
def test_from_base_and_from_pretrained_refuse_a_bad_device(tmp_path, model, device, message):
    with pytest.raises(GenerationInputError, match=message):
        EarlyExitModelForCausalLM.from_base(make_tiny("llama"), EarlyExitConfig(exit_layers=[1]), device=device)
    model.save_pretrained(tmp_path / "heads")
    with pytest.raises(GenerationInputError, match=message):
        EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads", base_model=make_tiny("llama"), device=device)


# ---------------------------------------------------------------- generate / engine arguments
def test_cost_model_of_a_wrong_type_is_a_clear_type_error(model):
    with pytest.raises(GenerationInputError, match=r"cost_model must be a CostModel or the path of a calibration "
                       r"file, got int 123") as caught:  # fmt: skip
        model.generate(IDS, max_new_tokens=2, cost_model=123)
    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens="4"), r"max_new_tokens must be an integer, got '4'"),
        (dict(max_new_tokens=4.0), r"max_new_tokens must be an integer, got 4.0"),
        (dict(max_new_tokens=None, max_length="9"), r"max_length must be an integer, got '9'"),
        (dict(top_k="5", do_sample=True), r"top_k must be an integer, got '5'"),
        (dict(top_p="0.5", do_sample=True), r"top_p must be a number, got '0.5'"),
        (dict(pad_token_id="0"), r"pad_token_id must be an integer, got '0'"),
        (dict(eos_token_id=[2, "3"]), r"eos_token_id must be an integer or a list of integers, got \[2, '3'\]"),
    ],
)
def test_generate_arguments_of_a_wrong_type_name_the_argument(model, kwargs, message):
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(GenerationInputError, match=message) as caught:
        model.generate(IDS, **kwargs)
    assert isinstance(caught.value, TypeError)


# ---------------------------------------------------------------- numpy scalars
def test_numpy_scalars_are_accepted_as_thresholds_and_exit_layers(model):
    config = EarlyExitConfig(exit_layers=[np.int64(0), np.int32(2)], thresholds=np.float32(0.75))
    assert config.exit_layers == [0, 2] and all(type(v) is int for v in config.exit_layers)
    assert config.thresholds == pytest.approx(0.75) and type(config.thresholds) is float
    config = EarlyExitConfig(exit_layers=np.array([0, 2]), thresholds=[np.float64(0.5), np.float32(0.25)])
    assert config.thresholds == [0.5, 0.25] and all(type(v) is float for v in config.thresholds)
    assert EarlyExitConfig.from_dict(json.loads(config.to_json_string())) == config  # plain JSON numbers
    a = model.generate(IDS, max_new_tokens=4, thresholds=np.float32(0.5), return_dict_in_generate=True)
    b = model.generate(IDS, max_new_tokens=4, thresholds=0.5, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.exit_layers, b.exit_layers)
    with pytest.raises(ConfigError, match=r"exit_layers must hold integers, got np.True_"):
        EarlyExitConfig(exit_layers=[np.bool_(True)])
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\] or inf, got np.True_"):
        EarlyExitConfig(exit_layers=[1], thresholds=np.bool_(True))


# ---------------------------------------------------------------- thresholds=None
def test_thresholds_none_never_means_never_exit():
    with pytest.raises(ConfigError, match=r"thresholds=None.*float\('inf'\).*never exit") as caught:
        EarlyExitConfig(exit_layers=[1], thresholds=None)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ConfigError, match=r"thresholds\[1\] \(exit layer 2\)=None"):
        EarlyExitConfig(exit_layers=[1, 2], thresholds=[0.5, None])
    with pytest.raises(ConfigError, match=r"thresholds=None"):
        EarlyExitConfig.from_dict({"exit_layers": [1], "thresholds": None})
    assert EarlyExitConfig(exit_layers=[1], thresholds="inf").thresholds == math.inf


def test_generate_thresholds_none_means_the_configs(model):
    a = model.generate(IDS, max_new_tokens=4, thresholds=None, return_dict_in_generate=True)
    b = model.generate(IDS, max_new_tokens=4, thresholds=0.5, return_dict_in_generate=True)
    assert torch.equal(a.exit_layers, b.exit_layers)
    with pytest.raises(ConfigError, match=r"thresholds\[0\] \(exit layer 1\)=None"):
        model.generate(IDS, max_new_tokens=4, thresholds=[None])


# ---------------------------------------------------------------- eos / pad outside the vocabulary
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eos_token_id=1000), r"eos_token_id 1000 is outside the model's vocabulary 0..98"),
        (dict(eos_token_id=[2, 99]), r"eos_token_id 99 is outside the model's vocabulary 0..98"),
        (dict(eos_token_id=-1), r"eos_token_id -1 is outside"),
        (dict(pad_token_id=1000), r"pad_token_id 1000 is outside the model's vocabulary 0..98"),
        (dict(pad_token_id=-5), r"pad_token_id -5 is outside"),
    ],
)
def test_generate_refuses_eos_and_pad_ids_outside_the_vocabulary(model, kwargs, message):
    with pytest.raises(GenerationInputError, match=message):
        model.generate(IDS, max_new_tokens=2, **kwargs)


def test_a_generation_config_or_engine_settings_with_special_ids_outside_the_vocabulary_are_refused(model):
    from transformers import GenerationConfig

    with pytest.raises(GenerationInputError, match=r"eos_token_id 500 is outside"):
        model.generate(IDS, generation_config=GenerationConfig(max_new_tokens=2, eos_token_id=500))
    with pytest.raises(GenerationInputError, match=r"pad_token_id 99 is outside"):
        DrexEngine(model, max_batch=1, max_len=8, settings=DecodeSettings(4, pad_token_id=99))
    with pytest.raises(GenerationInputError, match=r"eos_token_id 123 is outside"):
        DrexEngine(model, max_batch=1, max_len=8, settings=DecodeSettings(4, eos_token_ids=(2, 123)))
