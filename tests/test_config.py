import json
import math

import pytest

from drex_hf import EarlyExitConfig
from drex_hf.errors import ConfigError, ModelNotFoundError


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = EarlyExitConfig(
        exit_layers=[3, 7, 11],
        head="adapter",
        adapter_rank=8,
        confidence="classifier",
        thresholds=[0.9, math.inf, 0.5],
        base_model="org/model",
        base_revision="abc",
        base_model_type="llama",
        base_num_layers=16,
        base_hidden_size=64,
        base_vocab_size=1000,
        base_gguf_sha256="f" * 64,
        extra={"note": "x"},
    )
    path = tmp_path / "exit_config.json"
    path.write_text(cfg.to_json_string())
    data = json.loads(path.read_text())  # strict JSON: inf is written as "inf", not Infinity
    assert data["thresholds"] == [0.9, "inf", 0.5]
    again = EarlyExitConfig.from_json_file(path)
    assert again == cfg
    assert again.threshold_list() == [0.9, math.inf, 0.5]


def test_single_threshold_applies_to_every_exit():
    cfg = EarlyExitConfig(exit_layers=[1, 2], thresholds="inf")
    assert cfg.threshold_list() == [math.inf, math.inf]
    assert EarlyExitConfig(exit_layers=[1, 2], thresholds=0).threshold_list() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exit_layers=[]), "exit_layers is empty"),
        (dict(exit_layers=[2, 1]), "sorted"),
        (dict(exit_layers=[1, 1]), "duplicates"),
        (dict(exit_layers=[-1]), "out of range"),
        (dict(exit_layers=[1.5]), "integers"),
        (dict(exit_layers=[1, 5], base_num_layers=4), "exit layer 5 is out of range"),
        (dict(exit_layers=[1, 3], base_num_layers=4), "last layer"),
        (dict(exit_layers=[1], thresholds=1.5), "threshold must be in [0, 1]"),
        (dict(exit_layers=[1], thresholds=-0.1), "threshold must be in [0, 1]"),
        (dict(exit_layers=[1], thresholds=float("nan")), "threshold must be in [0, 1]"),
        (dict(exit_layers=[1], thresholds=-math.inf), "threshold must be in [0, 1]"),
        (dict(exit_layers=[1, 2], thresholds=[0.5]), "one per exit"),
        (dict(exit_layers=[1], thresholds="high"), "threshold must be a number"),
        (dict(exit_layers=[1], head="mlp"), "unknown head 'mlp'"),
        (dict(exit_layers=[1], confidence="entropy"), "unknown confidence 'entropy'"),
        (dict(exit_layers=[1], kv_fill="copy"), "unknown kv_fill 'copy'"),
        (dict(exit_layers=[1], adapter_rank=0), "adapter_rank"),
        (dict(exit_layers=[1], format_version=99), "format_version 99"),
        (dict(exit_layers=[1], format_version="1"), "format_version must be an integer"),
        (dict(exit_layers=[1], base_num_layers="4"), "base_num_layers must be a positive integer"),
        (dict(exit_layers=[1], base_vocab_size=0), "base_vocab_size must be a positive integer"),
        (dict(exit_layers=[1], base_model=3), "base_model must be a string"),
        (dict(exit_layers=[1], extra=[]), "extra must be a JSON object"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        EarlyExitConfig(**kwargs)
    assert message in str(err.value)


def test_validate_for_base_names_the_layer_count():
    cfg = EarlyExitConfig(exit_layers=[1, 2])
    cfg.validate_for_base(4)
    with pytest.raises(ConfigError, match=r"exit layer 2 is out of range: the base model has 2 decoder layers"):
        cfg.validate_for_base(2)
    with pytest.raises(ConfigError, match="last layer"):
        cfg.validate_for_base(3)


def test_bad_json_files(tmp_path):
    with pytest.raises(ModelNotFoundError):
        EarlyExitConfig.from_json_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        EarlyExitConfig.from_json_file(broken)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"exit_layers": [1], "exit_layer": 2}))
    with pytest.raises(ConfigError, match=r"unknown exit config key\(s\) \['exit_layer'\]"):
        EarlyExitConfig.from_json_file(unknown)
    no_layers = tmp_path / "no_layers.json"
    no_layers.write_text(json.dumps({"head": "norm"}))
    with pytest.raises(ConfigError, match="no 'exit_layers'"):
        EarlyExitConfig.from_json_file(no_layers)
