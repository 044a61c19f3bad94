"""Files on disk that do not fit together: a calibration left from other heads, a malformed
calibration.json, a hand-edited exit_config.json, the user's own README.md, a read-only target.

Each refusal names the file and the field that is wrong, and leaves nothing stale or half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import ConfigError, DrexError, WeightsFileError
from drex_hf.fileio import sha256_file
from drex_hf.modeling import SAVED_FILES

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama.yaml"
CALIBRATION_FILES = ("calibration.json", "calibration.png", "calibration_observations.safetensors")


def _heads(seed: int = 0, exit_layers=(0, 2)) -> EarlyExitModelForCausalLM:
    model = EarlyExitModelForCausalLM.from_base(
        make_tiny("llama"), EarlyExitConfig(exit_layers=list(exit_layers), thresholds=0.5)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.heads.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _calibrate_by_hand(folder, thresholds, *, heads_sha256="file", **fields) -> dict:
    """A calibration.json as `drex calibrate` writes it (the fields from_pretrained reads), with its
    companions; `heads_sha256="file"` ties it to the heads file in `folder`, None leaves it out."""
    data = {"format": 1, "exit_layers": [0, 2], "confidence": "max_prob", "guarantee": {"thresholds": thresholds}}
    data["cost_models"] = {}
    if heads_sha256 == "file":
        heads_sha256 = sha256_file(folder / "exit_heads.safetensors")
    if heads_sha256 is not None:
        data["heads_sha256"] = heads_sha256
    data.update(fields)
    (folder / "calibration.json").write_text(json.dumps(data))
    (folder / "calibration.png").write_bytes(b"\x89PNG fake")
    (folder / "calibration_observations.safetensors").write_bytes(b"observations of these heads")
    return data


@pytest.fixture
def folder(tmp_path):
    """A saved heads folder whose base is given by object at load (a tiny Llama from its config)."""
    out = tmp_path / "heads"
    _heads(seed=1).save_pretrained(out)
    return out


def _load(folder, **kwargs):
    return EarlyExitModelForCausalLM.from_pretrained(folder, base_model=make_tiny("llama"), **kwargs)


# ---------------------------------------------------------------- case 1: a calibration of other heads
def test_a_new_save_removes_the_calibration_of_the_heads_it_replaces(folder, caplog):
    _calibrate_by_hand(folder, [0.1, 0.2])
    assert _load(folder).exit_config.threshold_list() == [0.1, 0.2]  # made for these heads: applied
    new = _heads(seed=2)
    new.exit_config.thresholds = [0.7, 0.8]
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        new.save_pretrained(folder)
    assert not [name for name in CALIBRATION_FILES if (folder / name).exists()]  # nothing stale left
    assert "calibration.json" in caplog.text and "other heads" in caplog.text
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES)
    assert _load(folder).exit_config.threshold_list() == [0.7, 0.8]  # the new heads' own thresholds


def test_heads_at_other_exits_saved_over_a_calibrated_folder_load_without_its_calibration(folder):
    """The issue's other half of case 1: a calibration for exits [0, 2] left beside heads at [1, 2]
    made that folder unloadable; the save removes it and the folder loads with the new heads' own."""
    _calibrate_by_hand(folder, [0.1, 0.2])
    other = _heads(seed=3, exit_layers=(1, 2))
    other.exit_config.thresholds = [0.6, 0.7]
    other.save_pretrained(folder)
    assert not [name for name in CALIBRATION_FILES if (folder / name).exists()]
    loaded = _load(folder)
    assert loaded.exit_layers == [1, 2] and loaded.exit_config.threshold_list() == [0.6, 0.7]


def test_saving_the_same_heads_again_keeps_their_calibration(folder):
    _calibrate_by_hand(folder, [0.1, 0.2])
    model = _load(folder)
    model.save_pretrained(folder)  # e.g. loaded, looked at, saved back: the same weights file
    assert all((folder / name).is_file() for name in CALIBRATION_FILES)
    assert _load(folder).exit_config.threshold_list() == [0.1, 0.2]


def test_resaving_heads_written_by_an_older_drex_keeps_their_file_and_calibration(folder):
    """An older save's weights file carries other metadata: the same tensors saved again must not
    change its bytes (its sha256 is what the calibration records), or the calibration would be lost."""
    from safetensors.torch import load_file, save_file

    weights = folder / "exit_heads.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt", "drex_hf": "exit_heads"})  # as before
    config = json.loads((folder / "exit_config.json").read_text())
    config["weights_sha256"] = sha256_file(weights)
    (folder / "exit_config.json").write_text(json.dumps(config))
    _calibrate_by_hand(folder, [0.1, 0.2])
    before = weights.read_bytes()
    _load(folder).save_pretrained(folder)
    assert weights.read_bytes() == before and all((folder / name).is_file() for name in CALIBRATION_FILES)
    assert _load(folder).exit_config.threshold_list() == [0.1, 0.2]


def test_drex_train_output_into_a_calibrated_folder_removes_the_stale_calibration(folder, tiny_base_dir, capsys):
    from drex_hf.cli.main import main

    _calibrate_by_hand(folder, [0.1, 0.2])
    argv = ["train", str(TINY_RECIPE), "--set", f"model.base={tiny_base_dir}", "--set", "optim.steps=1"]
    assert main([*argv, "--set", "heads.exit_layers=[0, 2]", "--output", str(folder), "--no-progress"]) == 0
    assert not [name for name in CALIBRATION_FILES if (folder / name).exists()]
    thresholds = EarlyExitConfig.from_json_file(folder / "exit_config.json").threshold_list()
    assert EarlyExitModelForCausalLM.from_pretrained(folder).exit_config.threshold_list() == thresholds


def test_a_calibration_made_for_other_heads_is_refused_at_load(folder):
    _calibrate_by_hand(folder, [0.1, 0.2], heads_sha256="ab" * 32)  # e.g. copied from another folder
    with pytest.raises(ConfigError, match=r"calibration\.json.*heads_sha256.*calibration=False") as err:
        _load(folder)
    assert "abababababababab" in str(err.value) and str(folder) in str(err.value)
    assert _load(folder, calibration=False).exit_config.threshold_list() == [0.5, 0.5]


def test_a_calibration_from_before_the_heads_hash_still_loads_and_says_it_is_unchecked(folder, caplog):
    _calibrate_by_hand(folder, [0.1, 0.2], heads_sha256=None)
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        model = _load(folder)
    assert model.exit_config.threshold_list() == [0.1, 0.2]
    assert "records no heads_sha256" in caplog.text and "calibration.json" in caplog.text


def test_calibration_save_records_the_heads_and_refuses_heads_changed_since(folder):
    from drex_hf.calibration.calibrate import save

    (folder / "README.md").unlink()  # its calibration section needs a whole drex calibrate result
    entry = {"thresholds": [0.3, 0.4]}
    calibration = {"exit_layers": [0, 2], "guarantee": {"thresholds": [0.1, 0.2]}, "cost_models": {"cpu": entry}}
    save(dict(calibration), folder, None)
    data = json.loads((folder / "calibration.json").read_text())
    assert data["heads_sha256"] == sha256_file(folder / "exit_heads.safetensors")
    (folder / "calibration.json").unlink()
    with pytest.raises(ConfigError, match=r"heads_sha256.*exit_heads\.safetensors"):
        save({**calibration, "heads_sha256": "cd" * 32}, folder, None)  # the heads were saved again meanwhile
    assert not (folder / "calibration.json").exists()
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]


def test_calibration_save_drops_other_devices_entries_made_for_other_heads(folder):
    from drex_hf.calibration.calibrate import save

    _calibrate_by_hand(folder, [0.1, 0.2], heads_sha256="ab" * 32, cost_models={"old device": {"thresholds": [1, 1]}})
    (folder / "README.md").unlink()  # its calibration section needs a whole drex calibrate result
    calibration = {"exit_layers": [0, 2], "guarantee": {"thresholds": [0.1, 0.2]}, "cost_models": {"cpu": {}}}
    save(calibration, folder, None)
    assert list(json.loads((folder / "calibration.json").read_text())["cost_models"]) == ["cpu"]


# ---------------------------------------------------------------- case 7: a malformed calibration.json
@pytest.mark.parametrize(
    "fields, field",
    [
        ({"guarantee": {"thresholds": [0.1]}}, "guarantee.thresholds"),  # one threshold for two exits
        ({"guarantee": {"thresholds": [0.1, "high"]}}, "guarantee.thresholds"),
        ({"guarantee": [0.1, 0.2]}, "guarantee"),
        ({"guarantee": {}}, "guarantee.thresholds"),
        ({"exit_layers": "0,2"}, "exit_layers"),
        ({"confidence": "vibes"}, "confidence"),
        ({"cost_models": []}, "cost_models"),
        ({"cost_models": {"cpu:x86_64": {"thresholds": [0.3]}}}, "cost_models['cpu:x86_64'].thresholds"),
        ({"cost_models": {"cpu:x86_64": {"thresholds": [0.3, 0.4], "confidence": 7}}}, "cost_models['cpu:x86_64']"),
        ({"heads_sha256": 12}, "heads_sha256"),
    ],
)
def test_a_malformed_calibration_is_refused_at_load_naming_the_file_and_field(folder, fields, field):
    _calibrate_by_hand(folder, [0.1, 0.2], **fields)
    with pytest.raises(ConfigError) as err:
        _load(folder)
    message = str(err.value)
    assert str(folder / "calibration.json") in message and field in message, message
    assert "\n" not in message


def test_a_calibration_that_is_not_a_json_object_is_refused(folder):
    (folder / "calibration.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"calibration\.json.*JSON object"):
        _load(folder)


# ---------------------------------------------------------------- case 8: a hand-edited exit_config.json
def test_exit_layers_edited_after_saving_are_refused_at_load(folder):
    config_path = folder / "exit_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "exit_layers": [1, 2]}))  # same count: same tensor names
    with pytest.raises(WeightsFileError) as err:
        _load(folder)
    message = str(err.value)
    assert "exit_layers" in message and "[1, 2]" in message and "[0, 2]" in message
    assert "exit_config.json" in message and "exit_heads.safetensors" in message
    config_path.write_text(json.dumps({**config, "exit_layers": [0, 1, 2]}))  # one head more than the file
    with pytest.raises(WeightsFileError, match=r"exit_layers.*\[0, 1, 2\].*\[0, 2\]"):
        _load(folder)


def test_head_type_edited_after_saving_is_refused_at_load(folder):
    config_path = folder / "exit_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "head": "shared"}))
    with pytest.raises(WeightsFileError, match=r"exit_config\.json says head 'shared'.*'norm'"):
        _load(folder)


# ---------------------------------------------------------------- the user's README.md, read-only targets
def test_a_save_keeps_the_users_own_readme_and_writes_its_card_beside_it(folder, caplog):
    (folder / "README.md").write_text("# My project\n\nnotes I wrote\n")
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        _heads(seed=3).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# My project\n\nnotes I wrote\n"
    card = (folder / "README.drex_hf.md").read_text()
    assert card.startswith("---\n") and "library_name: drex_hf" in card
    assert "README.md" in caplog.text and "README.drex_hf.md" in caplog.text
    _load(folder)
    _heads(seed=4).save_pretrained(folder)  # again: the card beside it is ours, and is replaced
    assert (folder / "README.md").read_text() == "# My project\n\nnotes I wrote\n"
    assert (folder / "README.drex_hf.md").read_text() == card  # the same config: the same card


def test_our_own_card_is_replaced(folder):
    first = (folder / "README.md").read_text()
    model = _heads(seed=3)
    model.exit_config.thresholds = 0.25
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() != first and "0.25" in (folder / "README.md").read_text()
    assert not (folder / "README.drex_hf.md").exists()


def test_a_save_under_a_folder_that_cannot_be_written_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "locked" / "heads"

    def denied(*args, dir=None, **kwargs):  # what the OS answers under a read-only folder (root is never refused)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".heads.tmp-x1y2"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(DrexError) as err:
        _heads().save_pretrained(target)
    assert isinstance(err.value, PermissionError)
    message = str(err.value)
    assert str(target) in message and ".tmp-" not in message and "\n" not in message
    assert not target.exists()


def test_a_save_into_a_read_only_folder_names_it_and_leaves_it_as_it_was(folder, monkeypatch):
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(src), None, os.fspath(dst))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(DrexError) as err:
        _heads(seed=5).save_pretrained(folder)
    monkeypatch.undo()
    message = str(err.value)
    assert isinstance(err.value, PermissionError) and str(folder) in message and ".tmp-" not in message
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(folder.parent)) == ["heads"]  # no temporary folder left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the test above simulates it")
def test_a_save_into_a_really_read_only_folder(folder):
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(DrexError, match=str(folder)):
            _heads(seed=5).save_pretrained(folder)
    finally:
        os.chmod(folder, 0o755)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
