"""The benchmark scripts run: `benchmarks/kernels.py --smoke` on CPU through Triton's interpreter
(both paths of every kernel, compared case by case), and a clear refusal without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels.py"


def _run(*args, env_extra=None):
    env = {**os.environ, "TRITON_INTERPRET": "1", **(env_extra or {})}
    env.pop("DREX_KERNELS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_kernel_benchmark_smoke_runs_every_kernel_and_both_paths_agree(tmp_path):
    done = _run("--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["interpreter"] is True and result["dtype"] == "float32"
    names = {case["kernel"].split(" ")[0] for case in result["cases"]}
    assert names == {
        "gather_rows",
        "scatter_rows",
        "kv_append",
        "indexed_decode_attention",
        "kv_fill_project",
        "logit_confidence",
    }
    for case in result["cases"]:
        assert case["triton_ms"] > 0 and case["torch_ms"] > 0, case
        assert case["max_abs_diff"] <= 1e-5, case  # fp32: the two paths agree to rounding
        if case["kernel"] in ("gather_rows", "scatter_rows", "kv_append"):
            assert case["max_abs_diff"] == 0.0, case  # copies are exact
    fills = [c for c in result["cases"] if "one_layer_ms" in c]
    assert fills and all(c["one_layer_ms"] > 0 for c in fills)
    table = (tmp_path / "kernels.md").read_text()
    assert "say nothing about kernel speed" in table and "| indexed_decode_attention | 3 | 130 |" in table


def test_kernel_benchmark_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the real benchmark; nothing to refuse")
    done = _run("--out", str(tmp_path))
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr
    assert not (tmp_path / "kernels.json").exists()
