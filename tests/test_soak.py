"""The soak benchmark (`benchmarks/soak.py`) at 500 requests against a live `drex serve` on the tiny
synthetic model: nothing lost or duplicated, every checked response equal to its offline reference,
cancelled streams that freed their slots; and its bookkeeping catches a lost or duplicated response."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_soak_of_500_requests_loses_nothing_and_matches_the_references(tmp_path):
    # a subprocess: the script sets torch's thread count, which must not leak into this test session
    args = ["--requests", "500", "--rate", "150", "--check-sampled", "100", "--check-decoder", "20",
            "--timeout-s", "120", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    checks, flat, server = report["checks"], report["flat"], report["server"]
    assert report["ok"] and report["failures"] == []
    assert checks["lost"] == 0 and checks["duplicated"] == 0, checks
    assert checks["finished"] + checks["cancelled_by_client"] == 500
    assert checks["mismatches"] == 0 and checks["decoder_mismatches"] == [], checks["mismatch_examples"]
    assert checks["checked_greedy"] > 150 and checks["checked_sampled"] == 100  # all greedy ones, 100 sampled
    # cancels happened, mid-stream: the server ended them as cancelled, and all slots are free again
    assert checks["cancelled_by_client"] >= 20 and server["finished_cancelled"] >= 1
    assert flat["idle"] and flat["idle_after"] == {"running": 0, "queue": 0}
    assert sum(server["finished_by_reason"].values()) == 500 and server["exit_code"] == 0
    assert report["latency"]["ttft_ms_p99"] >= report["latency"]["ttft_ms_p50"] > 0
    md = (tmp_path / "soak.md").read_text()
    assert "**PASS**" in md and "| lost | 0 |" in md and "| duplicated | 0 |" in md


def test_the_bookkeeping_counts_a_lost_and_a_duplicated_response():
    soak = _soak_module()
    plans = soak.schedule(4, rate=10.0, seed=3)

    def whole(plan, rid):
        tokens = [104, 105][: plan.max_tokens]
        usage = {"prompt_tokens": len(plan.prompt), "completion_tokens": len(tokens)}
        return soak.Outcome(plan.index, status=200, ids=[rid, rid], text=bytes(tokens).decode(), chunks=2, finals=1,
                            dones=1, token_ids=tokens, exit_layers=[3] * len(tokens), usage=usage)  # fmt: skip

    outcomes = {p.index: whole(p, f"cmpl-{p.index}") for p in plans}
    assert soak.integrity(plans, outcomes) == ([], [])
    outcomes[1].ids[-1] = "cmpl-0"  # a chunk of another response
    outcomes[2].text += outcomes[2].text  # a chunk delivered twice
    del outcomes[3]  # never answered
    lost, duplicated = soak.integrity(plans, outcomes)
    assert lost == [(3, "never answered")]
    assert [i for i, _ in duplicated] == [1, 1, 2], duplicated
    assert "also answered request 0" in duplicated[1][1] and "not the decoded token_ids" in duplicated[2][1]
