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


def test_profile_engine_accounts_for_every_step_of_each_policy(tmp_path):
    """The engine profile on the moderate shape (CPU, 3 tokens): each policy's steps are all counted,
    drex's segments run in step, and its per-method times fit inside the decode time."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_engine.py"), "moderate", "--batch", "3",
         "--max-new-tokens", "3", "--policies", "full,drex@1.0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    full, drex = report["policies"]
    assert full["policy"] == "full" and drex["policy"] == "drex@1.0"
    for r in (full, drex):
        # every scheduled step is a segment's; steps beyond them only project deferred tokens
        assert sum(r["steps_per_segment"].values()) == r["calls"]["scheduler"] <= r["steps"]
        assert 0 < sum(r["seconds"].values()) <= r["decode_s"]
    assert set(full["steps_per_segment"]) == {"0"} and {"0"} <= set(drex["steps_per_segment"]) <= {"0", "1", "2", "3"}


def test_synthetic_shapes_are_real_models_and_unknown_names_are_refused():
    from drex_hf.bench.synthetic import SHAPES, synthetic_model
    from drex_hf.errors import ConfigError

    assert SHAPES["llama-7b"].exits == [7, 15, 23] and SHAPES["moderate"].exits == [3, 7, 11]
    with pytest.raises(ConfigError, match="unknown synthetic shape 'llama-70b'"):
        synthetic_model("llama-70b")
