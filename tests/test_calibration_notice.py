"""A calibration that switches every exit off on this device says so, and why, in one line at load
(and `drex generate` prints it): otherwise every token leaving at full depth looks like a bug."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny, tiny_tokenizer

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.device import device_name
from drex_hf.fileio import sha256_file


def _entry(thresholds: list, exit_choice: list) -> dict:
    return {"thresholds": thresholds, "confidence": "max_prob", "exit_choice": exit_choice, "min_speedup": 1.05}


def _calibrated(tmp_path, entry: dict):
    base = tmp_path / "base"
    make_tiny("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = EarlyExitModelForCausalLM.from_base(base, EarlyExitConfig(exit_layers=[0, 2], thresholds=0.5))
    heads = tmp_path / "heads"
    model.save_pretrained(heads)
    data = {
        "format": 1,
        "exit_layers": [0, 2],
        "confidence": "max_prob",
        "heads_sha256": sha256_file(heads / "exit_heads.safetensors"),
        "guarantee": {"thresholds": [0.9, 0.9]},
        "cost_models": {device_name("cpu"): entry},
    }
    (heads / "calibration.json").write_text(json.dumps(data))
    return heads


NO_EXIT_PAYS = [{"enabled": [True, True], "net_savings_ms": [-0.5, -0.25]}]


def test_exits_switched_off_by_calibration_are_named_with_the_reason(tmp_path, caplog):
    heads = _calibrated(tmp_path, _entry(["inf", "inf"], NO_EXIT_PAYS))
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        model = EarlyExitModelForCausalLM.from_pretrained(heads)
    lines = [r.getMessage() for r in caplog.records if "switches every exit off" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert str(heads / "calibration.json") in line and device_name("cpu") in line
    assert "at layer 2" in line and "-0.250 ms" in line and "1.05x" in line  # the best saving, and the margin
    assert model.exit_config.threshold_list() == [float("inf")] * 2


def test_a_missed_margin_is_the_reason_given(tmp_path, caplog):
    choice = [*NO_EXIT_PAYS, {"enabled": [False, False], "reason": "1.023x < 1.05x full depth"}]
    heads = _calibrated(tmp_path, _entry(["inf", "inf"], choice))
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        EarlyExitModelForCausalLM.from_pretrained(heads)
    assert "1.023x < 1.05x full depth" in caplog.text


def test_no_notice_while_an_exit_stays_on(tmp_path, caplog):
    heads = _calibrated(tmp_path, _entry([0.8, "inf"], NO_EXIT_PAYS))
    with caplog.at_level(logging.WARNING, logger="drex_hf"):
        model = EarlyExitModelForCausalLM.from_pretrained(heads)
    assert "switches every exit off" not in caplog.text
    assert model.exit_config.threshold_list() == [0.8, float("inf")]


def test_drex_generate_prints_the_notice(tmp_path):
    """A real process: under pytest, logging goes to pytest's handlers instead of the CLI's stderr."""
    heads = _calibrated(tmp_path, _entry(["inf", "inf"], NO_EXIT_PAYS))
    command = [sys.executable, "-m", "drex_hf.cli.main", "generate", str(heads), "--prompt", "w5 w6 w7"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*command, "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "switches every exit off" in line]
    assert len(notices) == 1 and "at layer 2" in notices[0] and "1.05x" in notices[0]
