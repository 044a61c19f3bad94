"""`drex bench` (DESIGN.md §6): every policy on the same prompts, the JSON's counts add up, drex never
forces a token out, a replayed trace is what drex's tokens did, and bad input gets one clear line."""

import json

import pytest
import torch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.cli.main import main

POLICIES = ["full", "batch_all", "batch_majority", "drex"]


@pytest.fixture
def heads(tmp_path, tiny_base_dir):
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=[0.05, 0.1], head="norm")
    folder = tmp_path / "heads"
    EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config).save_pretrained(folder)
    return folder


def _check_counts(document, batches):
    assert [b["batch"] for b in document["batches"]] == batches
    for entry in document["batches"]:
        assert set(entry["policies"]) == set(POLICIES)
        for name, s in entry["policies"].items():
            assert s["tokens"] == sum(s["exits_per_layer"].values()) == sum(len(o) for o in s["outputs"]), name
            assert (
                s["decode_tokens_per_s"] > 0 and s["tpot_ms"]["p50"] > 0 and s["tpot_ms"]["p99"] >= s["tpot_ms"]["p50"]
            )
            assert len(s["outputs"]) == entry["batch"]
        assert entry["policies"]["drex"]["involuntary_exits"] == 0
        assert entry["policies"]["full"]["agreement_with_full"] == 1.0
        # KV fill keeps the cache of full-depth decoding: every policy holds the same store
        assert len({s["kv_cache_bytes"] for s in entry["policies"].values()}) == 1
        drex = entry["policies"]["drex"]
        assert entry["oracle_tokens_per_s"] == pytest.approx(
            entry["policies"]["full"]["decode_tokens_per_s"] * document["num_layers"] / drex["mean_layers"]
        )
        # memory: the runner's row state, and a decode peak that at least holds full depth's logits
        for s in entry["policies"].values():
            assert s["row_state_bytes"] > 0 and s["peak_decode_bytes"] > 0
        vocab = document["vocab_size"]
        assert entry["policies"]["full"]["peak_decode_bytes"] >= entry["batch"] * vocab * 4
        measured = entry["measured_oracle"]
        assert measured["full_s"] > 0 and measured["oracle_s"] > 0
        assert measured["tokens_per_s"] == pytest.approx(
            entry["policies"]["full"]["decode_tokens_per_s"] * measured["full_s"] / measured["oracle_s"]
        )
        # shares: drex's median within-repeat speed-up over full depth ÷ each oracle's speed-up
        runs = zip(drex["decode_tokens_per_s_runs"], entry["policies"]["full"]["decode_tokens_per_s_runs"])
        ratios = sorted(d / f for d, f in runs)
        speedup = ratios[len(ratios) // 2]
        assert entry["drex_share_of_measured_oracle"] == pytest.approx(
            speedup * measured["oracle_s"] / measured["full_s"]
        )
        assert entry["drex_share_of_oracle"] == pytest.approx(speedup * drex["mean_layers"] / document["num_layers"])


def test_bench_on_saved_heads_writes_the_table_json_and_plots(heads, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\n\nw9 w10\nw11 w12 w13 w14\n")
    out = tmp_path / "bench"
    code = main([
        "bench", str(heads), "--prompts", str(prompts), "--batch-sizes", "1,3", "--max-new-tokens", "5",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert torch.is_grad_enabled()  # the command leaves the process as it found it (tests train after it)
    printed = capsys.readouterr().out
    assert "| drex |" in printed and "HF generate" in printed and "oracle" in printed
    document = json.loads((out / "bench.json").read_text())
    _check_counts(document, [1, 3])
    for entry in document["batches"]:
        assert entry["hf_generate"]["decode_tokens_per_s"] > 0
        assert 0.0 <= entry["policies"]["drex"]["rouge_l_vs_full"] <= 1.0
    assert document["exits"] is None and document["thresholds"] == ["0.05", "0.1"]
    for name in ("bench.md", "speed.png", "exits.png"):
        assert (out / name).is_file()
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_a_replayed_trace_is_exactly_where_drex_tokens_left(tmp_path):
    """Synthetic tiny shape, exits replayed from a file: drex's tokens leave where the trace says (token
    0 is the full-depth prefill's), batch_all misses exits, batch_majority forces some out."""
    rows = [[0, 2, 1, 3, 0, 2], [3, 0, 0, 1, 2, 3], [1, 1, 2, 0, 3, 3]]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"exit_layers": [[3, *r] for r in rows]}))
    out = tmp_path / "bench"
    code = main([
        "bench", "--synthetic-config", "tiny", "--exit-trace", str(trace), "--batch-sizes", "3",
        "--max-new-tokens", "7", "--no-hf", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    document = json.loads((out / "bench.json").read_text())
    _check_counts(document, [3])
    drex = document["batches"][0]["policies"]["drex"]
    assert drex["exit_layers"] == [[3, *r] for r in rows]
    assert document["batches"][0]["policies"]["batch_all"]["missed_exits"] > 0
    assert document["batches"][0]["hf_generate"] is None


def test_an_exit_distribution_gives_every_policy_the_same_draws(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--synthetic-config", "tiny", "--exit-dist", "0.5,0,0,0.5", "--batch-sizes", "4"]
    assert main([*args, "--max-new-tokens", "6", "--no-hf", "--repeats", "2", "--out", str(out)]) == 0
    document = json.loads((out / "bench.json").read_text())
    _check_counts(document, [4])
    drex = document["batches"][0]["policies"]["drex"]
    assert set(drex["exits_per_layer"]) <= {"0", "3"} and len(drex["decode_tokens_per_s_runs"]) == 2
    assert document["exit_distribution"] == [0.5, 0.0, 0.0, 0.5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--synthetic-config", "tiny"], "--exit-dist or --exit-trace"),
        (["--synthetic-config", "tiny", "--exit-dist", "0.5,0.5"], "needs 4"),
        (["--synthetic-config", "tiny", "--exit-dist", "0.5,0.5,x,0"], "comma-separated probabilities"),
        (["--synthetic-config", "tiny", "--exit-dist", "1,0,0,0", "--policies", "fastest"], "unknown policy 'fastest'"),
        (["--synthetic-config", "tiny", "--exit-trace", "missing.json"], "no such file"),
        ([], "MODEL_DIR"),
    ],
)
def test_bench_refuses_bad_input_with_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *args, "--batch-sizes", "1", "--max-new-tokens", "2", "--no-hf"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_refuses_a_trace_of_layers_that_are_not_exits_and_an_empty_prompt_file(heads, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([[3, 5, 1]]))  # the tiny shape has layers 0-3
    code = main(["bench", "--synthetic-config", "tiny", "--exit-trace", str(trace), "--batch-sizes", "1"])
    assert code == 2 and "not exit points" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["bench", str(heads), "--prompts", str(empty), "--batch-sizes", "1"]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_threshold_sweep_restores_the_thresholds_and_draws_the_pareto_plot(heads, tmp_path):
    out = tmp_path / "sweep"
    code = main([
        "bench", str(heads), "--sweep-thresholds", "0,0.3,1.01", "--batch-sizes", "2", "--max-new-tokens", "4",
        "--policies", "full,batch_all,drex", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    document = json.loads((out / "sweep.json").read_text())
    points = document["points"]
    assert [p["threshold"] for p in points] == [0.0, 0.3, 1.01]
    # threshold 0: every token leaves at the first exit; above 1 none can: drex is full depth, exactly
    assert points[0]["policies"]["drex"]["mean_layers"] == 2.0
    assert points[-1]["policies"]["drex"]["mean_layers"] == 4.0
    assert points[-1]["policies"]["drex"]["agreement_with_full"] == 1.0
    assert all(p["policies"]["drex"]["involuntary_exits"] == 0 for p in points)
    assert all(p["measured_oracle_speedup"] > 0 for p in points)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert EarlyExitModelForCausalLM.from_pretrained(heads).exit_config.threshold_list() == [0.05, 0.1]


def test_depth_sweep_builds_distributions_of_the_asked_mean_depth_and_a_heat_map(tmp_path):
    from drex_hf.bench.sweep import distribution_for_depth
    from drex_hf.errors import GenerationInputError

    for fraction in (0.5, 0.8, 0.95, 1.0):
        dist = distribution_for_depth(fraction, [3, 7, 11], 16)
        assert dist.mean_layers([3, 7, 11], 16) == pytest.approx(fraction * 16)
    with pytest.raises(GenerationInputError, match="outside what these exits give"):
        distribution_for_depth(0.3, [3, 7, 11], 16)
    out = tmp_path / "depths"
    code = main([
        "bench", "--synthetic-config", "tiny", "--sweep-depths", "0.5,0.95", "--batch-sizes", "2,4",
        "--max-new-tokens", "4", "--policies", "full,batch_all,drex", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [(c["mean_depth"], c["batch"]) for c in cells] == [(0.5, 2), (0.5, 4), (0.95, 2), (0.95, 4)]
    assert all(c["drex_vs_batch_all"] > 0 and c["drex_involuntary_exits"] == 0 for c in cells)
    assert (out / "heatmap.png").is_file()


def test_sla_mode_serves_every_request_and_counts_goodput(tmp_path):
    """Poisson arrivals into 3 slots: every request finishes, goodput never exceeds throughput, and an
    SLA no request can miss counts every request."""
    out = tmp_path / "sla"
    base = ["bench", "--synthetic-config", "tiny", "--exit-dist", "0.3,0.3,0.1,0.3", "--num-prompts", "7"]
    code = main([*base, "--batch-sizes", "3", "--max-new-tokens", "5", "--sla-tpot-ms", "1e9", "--out", str(out)])
    assert code == 0
    runs = json.loads((out / "sla.json").read_text())["runs"]
    assert [r["policy"] for r in runs] == POLICIES
    for r in runs:
        assert r["requests"] == r["met_sla"] == 7
        assert r["goodput_requests_per_s"] == pytest.approx(r["throughput_requests_per_s"])
    assert next(r for r in runs if r["policy"] == "drex")["involuntary_exits"] == 0
    strict = tmp_path / "strict"
    assert (
        main([*base, "--batch-sizes", "3", "--max-new-tokens", "5", "--sla-tpot-ms", "1e-6", "--out", str(strict)]) == 0
    )
    assert all(
        r["met_sla"] == 0 and r["goodput_requests_per_s"] == 0
        for r in json.loads((strict / "sla.json").read_text())["runs"]
    )


def test_thresholds_choice_for_a_heads_folder(heads, tmp_path, capsys):
    calibration = {"exit_layers": [1, 2], "confidence": "margin", "guarantee": {"thresholds": [0.2, "inf"]},
                   "cost_models": {}}  # fmt: skip
    (heads / "calibration.json").write_text(json.dumps(calibration))
    base = ["bench", str(heads), "--batch-sizes", "1", "--max-new-tokens", "3", "--no-hf", "--policies", "full,drex"]
    for choice, expected, measure in [
        ("guaranteed", ["0.2", "inf"], "margin"),
        ("trained", ["0.05", "0.1"], "max_prob"),
        ("0.7", ["0.7", "0.7"], "max_prob"),
        ("0.3,inf", ["0.3", "inf"], "max_prob"),
    ]:
        out = tmp_path / choice
        assert main([*base, "--thresholds", choice, "--out", str(out)]) == 0, choice
        document = json.loads((out / "bench.json").read_text())
        assert document["thresholds"] == expected and document["confidence"] == measure, choice
    out = tmp_path / "classifier"
    assert main([*base, "--thresholds", "trained", "--confidence", "classifier", "--out", str(out)]) == 0
    assert json.loads((out / "bench.json").read_text())["confidence"] == "classifier"
    capsys.readouterr()
    assert main(["bench", "--synthetic-config", "tiny", "--exit-dist", "1,0,0,0", "--confidence", "margin"]) == 2
    assert "--confidence applies to a heads folder" in capsys.readouterr().err
    assert main([*base, "--thresholds", "0.1,0.2,0.3"]) == 2
    assert "3 values for 2 exits" in capsys.readouterr().err
    assert main([*base, "--thresholds", "often"]) == 2
    assert "calibrated, guaranteed, trained" in capsys.readouterr().err
    calibration["guarantee"]["thresholds"] = [0.2]  # one for two exits: checked as from_pretrained checks
    (heads / "calibration.json").write_text(json.dumps(calibration))
    assert main([*base, "--thresholds", "guaranteed", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "calibration.json" in err and "guarantee.thresholds" in err


def test_rows_per_segment_counts_the_rows_that_reach_each_segment():
    from drex_hf.bench.measure import rows_per_segment

    # token 0 is the prefill's; exits after layers 0 and 2 of 4; the second request ends after 2 tokens
    layers = [[3, 0, 2, 3], [3, 3], [3, 2, 0, 0]]
    assert rows_per_segment(layers, [0, 2]) == [[3, 2, 1], [2, 1, 0], [2, 1, 1]]


def test_decode_peak_grows_with_the_batch_and_the_measured_oracle_runs_the_given_exits():
    from drex_hf.bench.measure import measured_oracle, peak_decode_bytes
    from drex_hf.bench.run import build_engine, random_prompts
    from drex_hf.bench.synthetic import synthetic_model
    from drex_hf.generation.exits import ExitDistribution

    model = synthetic_model("tiny")
    dist = ExitDistribution((0.25, 0.25, 0.25, 0.25))
    peaks = {}
    for batch in (2, 16):
        prompts = random_prompts(batch, 3, 6, 256, seed=0)
        engine, _ = build_engine(model, prompts, "drex", 4, dist)
        peaks[batch] = peak_decode_bytes(engine)
        assert all(len(out.tokens) == 4 for out in engine.finished.values())  # it decoded them all
    assert peaks[16] > peaks[2] >= 2 * 256 * 4
    prompts = random_prompts(3, 3, 6, 256, seed=1)
    result = measured_oracle(model, prompts, [[3, 0, 3, 1], [3, 3, 3, 3], [3, 2, 0, 3]])
    assert result["segments"] == [0, 1, 2] and result["full_s"] > 0 and result["oracle_s"] > 0


def test_measured_oracle_runs_each_segment_on_the_rows_that_reach_it(monkeypatch):
    """Every timed round runs full depth on the round's rows, and each segment on exactly the rows
    whose token gets that far (recorded from the oracle's segment programs: the first slots, one
    contiguous block, no exit check)."""
    from drex_hf.bench import measure
    from drex_hf.bench.measure import measured_oracle, rows_per_segment
    from drex_hf.bench.run import random_prompts
    from drex_hf.bench.synthetic import synthetic_model

    calls = []
    original = measure._oracle_layers

    def recording(runner, s, bucket):
        calls.append((len(runner.segments), s, bucket))
        return original(runner, s, bucket)

    monkeypatch.setattr(measure, "_oracle_layers", recording)
    model = synthetic_model("tiny")
    layers = [[3, 0, 3, 1, 2], [3, 3, 0, 3, 0], [3, 2, 2, 3], [3, 1, 3, 3, 3]]  # the third ends early
    measured_oracle(model, random_prompts(4, 3, 6, 256, seed=2), layers)
    full = [rows for segments, _, rows in calls if segments == 1]
    oracle = [(s, rows) for segments, s, rows in calls if segments == 4]
    reach = rows_per_segment(layers, [0, 1, 2])
    assert reach == [[4, 3, 2, 1], [4, 3, 3, 2], [4, 4, 3, 3], [3, 2, 2, 1]]
    assert full == [4] + [r[0] for r in reach]  # the warm-up, then each round
    expected = [(s, rows) for r in [reach[0], *reach] for s, rows in enumerate(r) if rows]
    assert oracle == expected


def test_bench_refuses_fewer_than_two_new_tokens(capsys):
    args = ["bench", "--synthetic-config", "tiny", "--exit-dist", "1,0,0,0", "--batch-sizes", "1"]
    assert main([*args, "--max-new-tokens", "1", "--no-hf"]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and err.count("\n") == 1


def test_context_sequential_engines_and_eager_variants_in_one_table(tmp_path):
    """--context gives every prompt that many tokens; --sequential runs one engine at a time, each reused
    for its warm-up and repeats; a NAME:eager policy is its own row (on the CPU it equals NAME's tokens)."""
    out = tmp_path / "bench"
    args = ["bench", "--synthetic-config", "tiny", "--exit-dist", "0.25,0.25,0.25,0.25", "--batch-sizes", "3",
            "--max-new-tokens", "5", "--context", "20", "--sequential", "--repeats", "2", "--no-hf",
            "--policies", "full,full:eager,drex", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    document = json.loads((out / "bench.json").read_text())
    assert document["context"] == 20 and document["graphs"] is False
    (entry,) = document["batches"]
    policies = entry["policies"]
    assert set(policies) == {"full", "full:eager", "drex"}
    assert policies["full:eager"]["outputs"] == policies["full"]["outputs"]
    for s in policies.values():
        assert len(s["decode_tokens_per_s_runs"]) == 2 and s["decoded_tokens"] == 3 * 4  # one run's, not two
    # prompts of 20 tokens: the store holds 20 + 5 positions per slot, plus the scratch slot
    model_layers, kv_heads, head_dim = 4, 2, 16
    assert policies["full"]["kv_cache_bytes"] == 2 * model_layers * (3 + 1) * kv_heads * 25 * head_dim * 4
    assert policies["drex"]["involuntary_exits"] == 0


def test_hf_static_cache_generate_gives_hf_eagers_tokens():
    """HF's static-cache generate (uncompiled here: transformers compiles it on CUDA only) decodes what
    HF's eager generate does; a failure would be reported in the table, not raised."""
    from drex_hf.bench.run import hf_generate, hf_generate_static, random_prompts
    from drex_hf.bench.synthetic import synthetic_model

    model = synthetic_model("tiny")
    prompts = random_prompts(3, 4, 9, 256, seed=3)
    eager = hf_generate(model, prompts, 6)
    static = hf_generate_static(model, prompts, 6)
    assert "error" not in static, static.get("error")
    assert static["outputs"] == eager["outputs"] and static["decode_tokens_per_s"] > 0


def test_measured_oracle_with_graphs_replays_check_free_segments_at_buckets(monkeypatch):
    """The CUDA branch of the measured oracle, run on the CPU with the replay recorder: both sides
    capture their programs, and each round replays each segment's layers (no exit check) at the bucket
    of the rows that reach it, then one projection."""
    from drex_hf.bench.measure import measured_oracle
    from drex_hf.bench.run import random_prompts
    from drex_hf.bench.synthetic import synthetic_model
    from drex_hf.generation import runner
    from drex_hf.generation.recorder import ReplayRecorder

    monkeypatch.setattr(runner, "CudaRecorder", lambda device: ReplayRecorder(strict=False))  # graphs on the CPU
    model = synthetic_model("tiny")
    layers = [[3, 0, 3, 1, 2], [3, 3, 0, 3, 0], [3, 2, 2, 3, 3]]
    sides = []
    monkeypatch.setattr(
        runner.Runner, "extend", lambda self, *a, _real=runner.Runner.extend: (sides.append(self), _real(self, *a))
    )
    result = measured_oracle(model, random_prompts(3, 3, 6, 256, seed=2), layers, graphs=True)
    assert result["graphs"] is True and result["full_s"] > 0 and result["oracle_s"] > 0
    keys = {key for side in sides for key in side.graphs.graphs}
    assert {key[0] for key in keys} == {"oracle_layers", "oracle_head"}  # check-free segments and the projection
    assert all(side.graphs.replays > 0 for side in sides)
    # rows reaching the segments in the first round: 3, 2, 2, 1, at buckets 3, 2, 2, 1 (the buckets: 1, 2, 3)
    assert {("oracle_layers", 3, 1), ("oracle_layers", 1, 2), ("oracle_layers", 0, 3)} <= keys


# ---------------------------------------------------------------------- self_spec rows
def _spec_counts_add_up(s, batch, new_tokens):
    """A self_spec row's statistics are one run's and consistent with each other."""
    assert s["decoded_tokens"] == batch * (new_tokens - 1) and s["rounds"] > 0
    assert s["accepted"] <= s["tested"] <= s["drafted"]
    assert s["tokens_per_round"] >= 1.0
    assert s["draft_layers_per_token"] + s["verify_layers_per_token"] == pytest.approx(s["layers_per_token"])
    # no confidence stop here: every draft step's row proposed a draft, and ran layers 0..EXIT for it
    assert s["draft_layer_rows"] == s["drafted"] * (s["draft_exit"] + 1)
    assert s["mean_layers"] == s["layers_per_token"] and s["decode_tokens_per_s"] > 0


def test_self_spec_rows_under_the_heads_give_full_depths_tokens(heads):
    """Greedy self_spec from each exit keeps full depth's tokens (measured: agreement 1.0) and reports
    its acceptance, tokens per round, layer split and layer-count ceiling."""
    from drex_hf.bench.run import bench, expand_policies, random_prompts
    from drex_hf.generation.spec.cost import spec_speedup_ceiling

    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    policies = expand_policies(["full", "self_spec@1/2", "self_spec@2"], model.exit_layers, draft_tokens=[3])
    assert policies == ["full", "self_spec@1/2", "self_spec@2/3"]
    prompts = random_prompts(3, 3, 7, model.arch.vocab_size, seed=4)
    (result,) = bench(model, prompts, [3], 7, policies, hf=False, memory=False, oracle=False)
    full = result.policies["full"]
    for name in policies[1:]:
        s = result.policies[name]
        assert s["outputs"] == full["outputs"] and s["agreement_with_full"] == 1.0, name
        assert s["exit_source"] == "heads" and s["acceptance_setting"] is None
        _spec_counts_add_up(s, 3, 7)
        k = s["draft_tokens"]
        expected = spec_speedup_ceiling(model.num_layers, s["draft_exit"], s["per_draft_acceptance"], k)
        assert s["layer_ceiling"] == pytest.approx(expected)
        assert s["speedup_vs_full"] > 0 and s["kv_cache_bytes"] > full["kv_cache_bytes"]  # k + 1 spare positions


def test_trace_acceptance_is_what_the_rows_measure():
    """Trace mode: acceptance 0 accepts nothing (one token per round), 1 accepts every draft, 0.5 lands
    in a binomial band — per judged draft for k = 2, and per draft for k = 1."""
    from drex_hf.bench.run import bench, expand_policies, random_prompts
    from drex_hf.bench.synthetic import synthetic_model

    model = synthetic_model("tiny")
    policies = expand_policies(["self_spec@1/2", "self_spec@2/1/a0.5"], model.exit_layers, acceptances=[0, 0.5, 1])
    assert policies == ["self_spec@1/2/a0", "self_spec@1/2/a0.5", "self_spec@1/2/a1", "self_spec@2/1/a0.5"]
    prompts = random_prompts(8, 3, 6, 256, seed=5)
    (result,) = bench(model, prompts, [8], 13, policies, hf=False, memory=False, oracle=False)
    rows = result.policies
    for s in rows.values():
        assert s["exit_source"] == "trace"
        _spec_counts_add_up(s, 8, 13)
    none, every = rows["self_spec@1/2/a0"], rows["self_spec@1/2/a1"]
    assert none["acceptance_rate"] == none["per_draft_acceptance"] == 0.0 and none["tokens_per_round"] == 1.0
    assert every["acceptance_rate"] == every["per_draft_acceptance"] == 1.0 and every["tokens_per_round"] == 3.0
    for name in ("self_spec@1/2/a0.5", "self_spec@2/1/a0.5"):
        half = rows[name]
        band = 4 * (0.25 / half["tested"]) ** 0.5  # four standard deviations of a binomial share
        assert abs(half["per_draft_acceptance"] - 0.5) < band, (name, half["per_draft_acceptance"], half["tested"])
    assert rows["self_spec@2/1/a0.5"]["acceptance_rate"] == rows["self_spec@2/1/a0.5"]["per_draft_acceptance"]
    # k = 2: a rejection drops the round's later draft, so fewer of the drafted are accepted than of the judged
    assert rows["self_spec@1/2/a0.5"]["acceptance_rate"] < rows["self_spec@1/2/a0.5"]["per_draft_acceptance"]


def test_bench_cli_writes_self_spec_rows_their_section_and_plot(tmp_path):
    out = tmp_path / "bench"
    code = main([
        "bench", "--synthetic-config", "tiny", "--policies", "full,self_spec", "--draft-exits", "1",
        "--draft-tokens", "2,adaptive", "--acceptance", "0.8", "--batch-sizes", "2", "--max-new-tokens", "5",
        "--no-hf", "--no-memory", "--no-measured-oracle", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    document = json.loads((out / "bench.json").read_text())
    rows = ["self_spec@1/2/a0.8", "self_spec@1/adaptive/a0.8"]
    assert document["policies"] == ["full", *rows] and document["acceptance"] == [0.8]
    for entry in document["batches"]:
        assert set(entry["policies"]) == {"full", *rows}
        best = entry["self_spec"]
        fastest = max(rows, key=lambda n: entry["policies"][n]["decode_tokens_per_s"])
        assert best["best"] == fastest and best["pays"] == (best["speedup_vs_full"] > 1.0)
        for name in rows:
            s = entry["policies"][name]
            assert s["acceptance_setting"] == 0.8 and 0.0 <= s["agreement_with_full"] <= 1.0
            _spec_counts_add_up(s, entry["batch"], 5)
    table = (out / "bench.md").read_text()
    assert "## Self-speculative rows" in table and table.count("(best)") == 1
    assert "| self_spec@" not in table.split("## Self-speculative rows")[0]  # the main table keeps its policies
    assert "Batch 2: self_spec " in table
    assert (out / "self_spec.png").read_bytes()[:4] == b"\x89PNG"


def test_the_section_says_plainly_when_self_spec_does_not_pay():
    from drex_hf.bench.report import render_spec
    from drex_hf.bench.run import BatchResult

    def row(tokens_per_s, ratio):
        return {"decode_tokens_per_s": tokens_per_s, "speedup_vs_full": ratio, "tpot_ms": {"p50": 1.0, "p99": 2.0},
                "acceptance_rate": 0.5, "per_draft_acceptance": 0.6, "mean_draft_tokens": 2.0, "tokens_per_round": 1.8,
                "layers_per_token": 5.0, "draft_layers_per_token": 2.0, "verify_layers_per_token": 3.0,
                "agreement_with_full": 1.0, "layer_ceiling": 0.9, "kv_cache_bytes": 2**20}  # fmt: skip

    full = {"decode_tokens_per_s": 100.0}
    slow = BatchResult(8, {"full": full, "self_spec@1/2": row(80.0, 0.8), "self_spec@1/4": row(70.0, 0.7)})
    fast = BatchResult(64, {"full": full, "self_spec@1/2": row(90.0, 0.9), "self_spec@2/4": row(130.0, 1.3)})
    text = "\n".join(render_spec([slow, fast], 4))
    assert "Batch 8: self_spec does not pay here: best 0.80x full depth (self_spec@1/2)." in text
    assert "Batch 64: self_spec pays: self_spec@2/4 at 1.30x full depth." in text
    assert "| 8 | **self_spec@1/2** (best) |" in text and "| 64 | **self_spec@2/4** (best) |" in text


def test_bench_refuses_an_unexpanded_self_spec_row_and_a_draft_exit_that_is_no_exit():
    from drex_hf.bench.run import bench, expand_policies, random_prompts
    from drex_hf.bench.synthetic import synthetic_model
    from drex_hf.errors import GenerationInputError

    model = synthetic_model("tiny")
    prompts = random_prompts(1, 3, 4, 256, seed=0)
    with pytest.raises(GenerationInputError, match=r"'self_spec@1': an engine needs self_spec@EXIT/K"):
        bench(model, prompts, [1], 3, ["full", "self_spec@1"], hf=False)
    with pytest.raises(GenerationInputError, match=r"draft exit 3 is not one of the model's exit points \[0, 1, 2\]"):
        expand_policies(["self_spec@3/2"], model.exit_layers)
    with pytest.raises(GenerationInputError, match="draft_exit must be one of the model's exit layers"):
        bench(model, prompts, [1], 3, ["self_spec@3/2"], hf=False)  # unexpanded: the engine's own check


def test_sla_mode_serves_self_spec_rows_too(tmp_path):
    out = tmp_path / "sla"
    code = main([
        "bench", "--synthetic-config", "tiny", "--policies", "full,self_spec@1/2/a0.8", "--num-prompts", "5",
        "--batch-sizes", "3", "--max-new-tokens", "4", "--sla-tpot-ms", "1e9", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    runs = json.loads((out / "sla.json").read_text())["runs"]
    assert [r["policy"] for r in runs] == ["full", "self_spec@1/2/a0.8"]
    assert all(r["met_sla"] == r["requests"] == 5 and r["involuntary_exits"] == 0 for r in runs)


def test_text_drafting_rows_and_hfs_lossless_peers_at_batch_1_and_their_refusal_beyond(heads):
    """Issue 26: self_spec@ngram/K and self_spec@ngram+EXIT/K rows keep full depth's tokens; HF's prompt
    lookup and assistant_early_exit run at batch 1 (their tokens are HF's greedy ones) and are
    refused at batch 2, which the table says."""
    from drex_hf.bench.report import render
    from drex_hf.bench.run import bench, expand_policies, parse_spec, random_prompts

    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    policies = expand_policies(["full", "self_spec@ngram/3", "self_spec@ngram+1"], model.exit_layers, draft_tokens=[2])
    assert policies == ["full", "self_spec@ngram/3", "self_spec@ngram+1/2"]
    assert [parse_spec(p).draft_source for p in policies[1:]] == ["ngram", "mixed"]
    prompts = [torch.arange(3, model.arch.vocab_size)] + random_prompts(1, 3, 7, model.arch.vocab_size, seed=4)
    results = bench(model, prompts, [1, 2], 7, policies, memory=False, oracle=False, hf_lossless=True)
    for result in results:
        full = result.policies["full"]
        for name in policies[1:]:
            s = result.policies[name]
            assert s["outputs"] == full["outputs"] and s["draft_source"] == parse_spec(name).draft_source, name
            assert s["layer_ceiling"] is None
        assert result.policies["self_spec@ngram/3"]["draft_steps"] == 0
    one, two = results
    assert one.policies["self_spec@ngram/3"]["ngram_rounds"] > 0  # the first prompt holds every token
    for name, peer in one.hf_peers.items():
        assert peer["outputs"] == one.hf["outputs"] and peer["decode_tokens_per_s"] > 0, name
    assert all("batch_size = 1" in peer["refused"] for peer in two.hf_peers.values())
    table = render(results, model.num_layers, model.exit_layers, "test")
    assert "HF prompt lookup (10 tokens) |" in table and "HF prompt lookup (10 tokens): HF refuses batch 2" in table
