"""The stub device `benchmarks/host_overhead.py --stub-device` measures the host with: it must schedule
and exit exactly as the real runner does (the same steps, segments, exit layers and counts), so that
what the benchmark times is the engine's real host path; its replay must answer a repeated decode as
the recording did, and refuse a decode that schedules otherwise; and the benchmark's table says what
it ran."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stub_device import Recording, ReplayRunner, StubRunner  # noqa: E402

from drex_hf.bench.run import add, new_engine, random_prompts  # noqa: E402
from drex_hf.bench.synthetic import synthetic_model  # noqa: E402
from drex_hf.generation.exits import ExitDistribution  # noqa: E402
from drex_hf.generation.scheduler import RandomPolicy  # noqa: E402


@pytest.mark.parametrize("policy", ["drex", "batch_all", "batch_majority", "full"])
def test_the_stub_device_schedules_and_exits_as_the_real_runner(policy):
    model = synthetic_model("tiny")
    dist = ExitDistribution((0.2, 0.25, 0.2, 0.35), seed=0)
    prompts = random_prompts(6, 3, 9, 256, seed=1)
    runs = {}
    for name in ("real", "stub"):
        engine = new_engine(model, policy, 8, 6, 24, dist, record_decisions=True)
        if name == "stub":
            engine.runner = StubRunner(engine.runner)
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                add(engine, prompt, i, dist, 5 + i % 3)
            engine.run()
        out = [engine.finished[i] for i in range(6)]
        decisions = [
            (d["segment"], d["rows"], d["bucket"], d["fills"], d["projections"]) for d in engine.stats.decisions
        ]
        runs[name] = ([r.exit_layers for r in out], [len(r.tokens) for r in out], decisions, engine.stats.to_dict())
    real, stub = runs["real"], runs["stub"]
    assert real[0] == stub[0] and real[1] == stub[1]  # each request's exit layers and length
    assert real[2] == stub[2]  # every step: segment, live rows, bucket, fills, projections
    for key in ("steps", "tokens", "layer_rows", "padded_layer_rows", "min_layer_rows", "involuntary_exits",
                "missed_exits", "exits_per_layer"):  # fmt: skip
        assert real[3][key] == stub[3][key], key
    if policy == "drex":
        assert len({layer for row in real[0] for layer in row[1:]}) == 4  # every exit point was taken


def _decode(engine, runner, prompts, dist, tokens):
    engine.reset_stats()
    real, engine.runner = engine.runner, runner
    try:
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                add(engine, prompt, i, dist, tokens)
            engine.run()
    finally:
        engine.runner = real
    return [(o.tokens, o.exit_layers) for _, o in sorted(engine.finished.items())], engine.stats.steps


def test_a_replay_answers_a_repeated_decode_as_recorded_and_refuses_another():
    model = synthetic_model("tiny")
    dist = ExitDistribution((0.2, 0.25, 0.2, 0.35), seed=0)
    prompts = random_prompts(8, 3, 9, 256, seed=2)
    engine = new_engine(model, "drex", 6, 8, 24, dist)
    recording = Recording(engine.runner)
    recorded, steps = _decode(engine, recording, prompts, dist, 6)
    assert len({layer for tokens, layers in recorded for layer in layers[1:]}) == 4  # every exit point
    for _ in range(2):  # later decodes: new epochs and step numbers, the same answers
        replay = ReplayRunner(recording)
        assert _decode(engine, replay, prompts, dist, 6) == (recorded, steps)
        assert len(replay.launches) == steps and len(replay.reads) == steps + 1  # the prefill's read too
        assert all(b >= a for a, b in zip(replay.reads, replay.launches))
    assert engine.runner is recording.real
    with pytest.raises(RuntimeError, match="not the recorded ones"):  # other requests
        _decode(new_engine(model, "drex", 6, 8, 24, dist), ReplayRunner(recording), prompts[:5], dist, 6)
    other = new_engine(model, "drex", 6, 8, 24, dist)
    other.policy = RandomPolicy(other.num_segments, seed=3)  # the same requests, scheduled otherwise
    with pytest.raises(RuntimeError, match="the recording has"):
        _decode(other, ReplayRunner(recording), prompts, dist, 6)


def test_the_stub_benchmark_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--stub-device", "--batch-sizes", "4,8",
         "--max-new-tokens", "4", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "host_overhead_stub.json").read_text())
    rows = {(r["rows"], r["policy"]): r for r in result["results"]}
    assert set(rows) == {(n, p) for n in (4, 8) for p in ("full", "batch_all", "drex")}
    for r in rows.values():
        assert r["host_us_per_round"] > 0 and r["gap_us_mean"] > 0 and r["steps_per_round"] >= 1
    assert rows[(8, "full")]["steps_per_round"] == 1.0 and rows[(8, "drex")]["steps_per_round"] > 1.0
    assert "device stubbed out" in (tmp_path / "host_overhead_stub.md").read_text()
