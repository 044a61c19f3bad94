"""`drex calibrate` (DESIGN.md §8): Learn-then-Test thresholds on synthetic populations whose right
answer is known, the guarantee checked over many random splits, refusals of too little data."""

import math

import pytest
import torch

from drex_hf.calibration.thresholds import (
    CalibrationDataError,
    Observations,
    binomial_p_value,
    learn_then_test,
    tokens_needed,
)


def _population(n, prompts, agree_prob, exits=1, seed=0, useless_first=False):
    """Confidences uniform in [0, 1]; each token agrees with probability agree_prob(confidence) at the
    last exit (a useless first exit, if asked, agrees at random whatever its confidence)."""
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(exits, n, generator=gen)
    agree = torch.rand(exits, n, generator=gen) < agree_prob(conf)
    if useless_first:
        agree[0] = torch.rand(n, generator=gen) < 0.5
    prompt = torch.arange(n) % prompts
    return Observations(conf.float(), agree, prompt)


def test_binomial_p_value_is_the_exact_tail():
    for n, k, t in [(10, 10, 0.9), (20, 18, 0.8), (50, 30, 0.5), (7, 0, 0.3)]:
        exact = sum(math.comb(n, i) * t**i * (1 - t) ** (n - i) for i in range(k, n + 1))
        assert binomial_p_value(k, n, t) == pytest.approx(exact, rel=1e-9, abs=1e-15)


def test_a_known_step_threshold_is_recovered():
    """Tokens above confidence 0.6 always agree, below never: agreement(τ) = 0.4 + τ for τ ≤ 0.6, so
    the loosest threshold meeting 0.95 is 0.55; with plenty of data LTT lands just above it."""
    obs = _population(40000, 400, lambda c: (c > 0.6).float())
    result = learn_then_test(obs, target=0.95, delta=0.1)
    (tau,) = result.thresholds
    assert 0.55 <= tau <= 0.58, result.tested
    assert result.test_agreement >= 0.95
    assert result.exit_fractions[0] == pytest.approx(1 - tau, abs=0.02)


def test_a_useless_exit_stays_shut_and_the_useful_one_is_recovered():
    obs = _population(40000, 400, lambda c: (c > 0.6).float(), exits=2, useless_first=True)
    result = learn_then_test(obs, target=0.95, delta=0.1)
    assert result.exit_fractions[0] < 0.01, result.thresholds
    assert 0.54 <= result.thresholds[1] <= 0.6


def test_the_guarantee_holds_over_many_random_splits():
    """P(agree | c) = 0.5 + 0.5 c gives agreement(τ) = 1 - (1 - τ)^2 / 4 exactly; over 200 independent
    calibrations the share whose thresholds truly fall short of the target must be at most delta
    (plus three standard errors of a 200-draw proportion)."""
    target, delta, runs = 0.95, 0.1, 200
    failures, exiting = 0, 0
    for seed in range(runs):
        obs = _population(1500, 60, lambda c: 0.5 + 0.5 * c, seed=seed)
        result = learn_then_test(obs, target=target, delta=delta, seed=seed)
        (tau,) = result.thresholds
        true_agreement = 1 - (1 - min(tau, 1.0)) ** 2 / 4
        failures += true_agreement < target
        exiting += math.isfinite(tau)
    assert failures / runs <= delta + 3 * math.sqrt(delta * (1 - delta) / runs)
    assert exiting > runs / 2  # the test is not passed by never exiting


def test_too_little_data_is_refused_with_the_tokens_needed():
    needed = tokens_needed(0.95, 0.1, "binomial")
    assert needed == 45  # 0.95^45 < 0.1 <= 0.95^44
    obs = _population(60, 6, lambda c: c)
    with pytest.raises(CalibrationDataError, match=r"at least 45 test tokens"):
        learn_then_test(obs, target=0.95, delta=0.1)
    with pytest.raises(CalibrationDataError, match="at least 2 prompts"):
        learn_then_test(_population(500, 1, lambda c: c), target=0.9, delta=0.1)
    with pytest.raises(CalibrationDataError, match="target agreement"):
        learn_then_test(obs, target=1.5, delta=0.1)
    with pytest.raises(CalibrationDataError, match="unknown bound"):
        learn_then_test(obs, target=0.9, delta=0.1, bound="chernoff")


def test_hoeffding_is_more_conservative_than_the_exact_binomial():
    obs = _population(4000, 80, lambda c: 0.5 + 0.5 * c, seed=3)
    exact = learn_then_test(obs, target=0.95, delta=0.1, bound="binomial")
    loose = learn_then_test(obs, target=0.95, delta=0.1, bound="hoeffding")
    assert loose.thresholds[0] >= exact.thresholds[0]
    assert tokens_needed(0.95, 0.1, "hoeffding") > tokens_needed(0.95, 0.1, "binomial")


# ---------------------------------------------------------------- cost constants and which exits pay
from drex_hf.calibration.costs import CostTable, choose_exits, expected_token_ms, prediction_errors  # noqa: E402

ROWS = [1, 2, 4, 8, 16, 32]


def _synthetic_timer(layers, check, fill, noise=0.0, seed=0):
    """ms = a + b·n for each kind of work, per segment / exit point, with optional relative noise."""
    gen = torch.Generator().manual_seed(seed)
    table = {"layers": layers, "check": check, "fill": fill}

    def timer(kind, index, n):
        a, b = table[kind][index]
        wobble = 1 + noise * (2 * float(torch.rand(1, generator=gen)) - 1)
        return (a + b * n) * wobble

    return timer


def test_the_cost_fit_recovers_known_constants_and_predicts_held_out_row_counts():
    layers, check, fill = [(2.0, 0.5), (3.0, 0.25), (1.5, 1.0)], [(0.4, 0.05), (0.2, 0.02)], [(0.1, 0.01)] * 2
    costs = CostTable.measure(_synthetic_timer(layers, check, fill), 3, ROWS)
    model = costs.cost_model(context=128, device="synthetic")
    for s, ((a, b), (ca, cb)) in enumerate(zip(layers, [*check, (0.0, 0.0)])):
        assert model.a_ms[s] == pytest.approx(a + ca)
        assert model.b_ms[s] == pytest.approx(b + cb)
    errors = prediction_errors(model, _synthetic_timer(layers, check, fill), [3, 6, 12, 24])
    assert errors["median"] < 1e-9 and errors["count"] == 12
    noisy = CostTable.measure(_synthetic_timer(layers, check, fill, noise=0.03, seed=1), 3, ROWS)
    fitted = noisy.cost_model(context=128, device="synthetic")
    for s, (_, b) in enumerate(layers):
        extra = check[s] if s < 2 else (0.0, 0.0)
        assert fitted.b_ms[s] == pytest.approx(b + extra[1], rel=0.1)
    held_out = prediction_errors(fitted, _synthetic_timer(layers, check, fill, noise=0.03, seed=2), [3, 6, 12, 24])
    assert held_out["median"] <= 0.05 and held_out["p95"] <= 0.1


def test_the_cost_fit_recovers_the_per_position_cost_and_predicts_a_held_out_context():
    """ms = a + b·n + c·n·(context − 128): one timing at a longer context recovers c per segment, and
    the model then predicts steps at a context it never timed."""
    layers, check, fill = [(2.0, 0.5), (3.0, 0.25), (1.5, 1.0)], [(0.4, 0.05), (0.2, 0.02)], [(0.1, 0.01)] * 2
    per_position = [0.002, 0.0, 0.004]
    flat = _synthetic_timer(layers, check, fill)

    def timer(kind, index, n, context=128):
        extra = per_position[index] * n * (context - 128) if kind == "layers" else 0.0
        return flat(kind, index, n) + extra

    costs = CostTable.measure(timer, 3, ROWS, long_context=512, reference_context=128)
    assert costs.context_ms == pytest.approx(per_position)
    model = costs.cost_model(context=128, device="synthetic")
    errors = prediction_errors(model, timer, [3, 6, 12, 24], [320])
    assert errors["contexts"] == [128, 320] and errors["count"] == 24 and errors["median"] < 1e-9
    assert model.predict(2, 8, True, 320) == pytest.approx(timer("layers", 2, 8, 320))
    flat_model = CostTable.measure(timer, 3, ROWS).cost_model(context=128, device="synthetic")
    assert prediction_errors(flat_model, timer, [24], [512])["p95"] > 0.1  # without it, long contexts mispredict
    with pytest.raises(ValueError, match="must exceed"):
        CostTable.measure(timer, 3, ROWS, long_context=64, reference_context=128)


def _fractions(natural):
    """Each token's first confident exit drawn once (`natural[j]`: share confident first at exit j);
    a token whose exit is switched off leaves at the next enabled exit where it is also confident —
    here, the next enabled one at all (confidence only grows with depth in this toy)."""

    def fractions_for(enabled):
        out, carried = [0.0] * len(enabled), 0.0
        for j, share in enumerate(natural):
            carried += share
            if enabled[j]:
                out[j], carried = carried, 0.0
        return out

    return fractions_for


def test_an_exit_whose_check_costs_more_than_it_saves_is_switched_off():
    # three equal segments of 1 ms per row; exit 0's check costs 2 ms per row (a vocabulary projection)
    # and lets 5 % out; exit 1's check is nearly free and lets 50 % out
    layers = [(0.0, 1.0)] * 3
    check = [(0.0, 2.0), (0.0, 0.01)]
    fill = [(0.0, 0.05), (0.0, 0.02)]
    costs = CostTable.measure(_synthetic_timer(layers, check, fill), 3, ROWS)
    enabled, steps = choose_exits(costs, _fractions([0.05, 0.5]), rows=8)
    assert enabled == [False, True], steps
    full = expected_token_ms(costs, [0, 0], [False, False], 8)
    assert expected_token_ms(costs, _fractions([0.05, 0.5])(enabled), enabled, 8) < full
    assert steps[0]["net_savings_ms"][0] < 0 < steps[0]["net_savings_ms"][1]


def test_when_no_exit_pays_every_exit_is_switched_off():
    layers = [(0.0, 1.0)] * 3
    check = [(0.0, 8.0), (0.0, 8.0)]  # each check costs 8 layers, as the vocabulary projection on SmolLM2
    costs = CostTable.measure(_synthetic_timer(layers, check, [(0.0, 0.05)] * 2), 3, ROWS)
    enabled, _ = choose_exits(costs, _fractions([0.3, 0.4]), rows=8)
    assert enabled == [False, False]


def test_the_measure_whose_checks_pay_is_picked_and_saved_observations_round_trip(tmp_path):
    """The same tokens under two measures: max_prob's checks cost 8 layers (a vocabulary projection)
    and never pay, the classifier's cost almost nothing and let half the tokens out at the last exit
    with the same quality — so the classifier is the device's measure. Observations keep both."""
    from drex_hf.calibration.calibrate import _exits_for

    obs = _population(20000, 400, lambda c: (c > 0.5).float(), exits=2)
    obs = Observations(obs.confidence, obs.agree, obs.prompt, "max_prob", {"classifier": obs.confidence.clone()})
    layers = [(0.0, 1.0)] * 3
    expensive = CostTable.measure(_synthetic_timer(layers, [(0.0, 8.0)] * 2, [(0.0, 0.05)] * 2), 3, ROWS)
    cheap = expensive.with_checks([[0.01 * n for n in ROWS]] * 2)
    by_measure = {
        "max_prob": _exits_for(obs, expensive, 0.95, 0.1, "binomial", 0, 8),
        "classifier": _exits_for(obs.with_measure("classifier"), cheap, 0.95, 0.1, "binomial", 0, 8),
    }
    assert by_measure["max_prob"]["enabled"] == [False, False]
    assert any(by_measure["classifier"]["enabled"])
    full = expected_token_ms(expensive, [0, 0], [False, False], 8)
    assert by_measure["max_prob"]["token_ms"] == pytest.approx(full)
    assert by_measure["classifier"]["token_ms"] < 0.8 * full
    assert by_measure["classifier"]["result"].test_agreement >= 0.95
    # a promise short of the required margin over a real full-depth step switches every exit off
    promised = full / by_measure["classifier"]["learn_token_ms"]
    strict = _exits_for(obs.with_measure("classifier"), cheap, 0.95, 0.1, "binomial", 0, 8, full, promised * 1.01)
    assert strict["enabled"] == [False, False] and "full depth" in strict["steps"][-1]["reason"]
    lenient = _exits_for(obs.with_measure("classifier"), cheap, 0.95, 0.1, "binomial", 0, 8, full, promised * 0.99)
    assert lenient["enabled"] == by_measure["classifier"]["enabled"]

    obs.save(tmp_path / "obs.safetensors")
    back = Observations.load(tmp_path / "obs.safetensors")
    assert back.measures == ["max_prob", "classifier"] and torch.equal(back.agree, obs.agree)
    assert torch.equal(back.with_measure("classifier").confidence, obs.others["classifier"])
    with pytest.raises(CalibrationDataError, match="no saturation confidences"):
        back.with_measure("saturation")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationDataError, match="no readable observations"):
        Observations.load(tmp_path / "broken.safetensors")
    with pytest.raises(CalibrationDataError, match="no saved observations"):
        Observations.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- the command and from_pretrained
import json  # noqa: E402
import logging  # noqa: E402

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM  # noqa: E402
from drex_hf.cli.main import main  # noqa: E402
from drex_hf.device import device_name  # noqa: E402
from drex_hf.errors import ConfigError  # noqa: E402
from drex_hf.fileio import sha256_file  # noqa: E402
from drex_hf.generation.spec.ngram import read_corpus_answers  # noqa: E402
from drex_hf.generation.spec.vocab import coverage  # noqa: E402


@pytest.fixture
def heads_and_text(tmp_path, tiny_base_dir):
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=[0.9, 0.9])
    EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config).save_pretrained(tmp_path / "heads")
    gen = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(3, 99, (3000,), generator=gen)]
    (tmp_path / "held_out.txt").write_text(" ".join(words))
    return tmp_path / "heads", tmp_path / "held_out.txt"


def _calibrate(heads, text, *extra):
    args = ["calibrate", str(heads), "--data", str(text), "--target-agreement", "0.6", "--delta", "0.2"]
    args += ["--prompts", "24", "--prompt-tokens", "6", "--max-new-tokens", "10", "--rows", "1,2,4"]
    return main([*args, "--holdout-rows", "3", "--repeats", "1", "--decision-rows", "4", *extra])


def test_calibrate_writes_the_file_and_plot_and_from_pretrained_uses_them(heads_and_text, capsys):
    heads, text = heads_and_text
    assert _calibrate(heads, text) == 0
    out = capsys.readouterr().out
    assert "test agreement" in out and "wrote" in out
    data = json.loads((heads / "calibration.json").read_text())
    assert data["heads_sha256"] == sha256_file(heads / "exit_heads.safetensors")  # tied to these heads
    assert (heads / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    card = (heads / "README.md").read_text()
    assert card.count("## Calibration (`drex calibrate`)") == 1 and "calibration.png" in card
    device = device_name("cpu")
    entry = data["cost_models"][device]
    g = data["guarantee"]
    assert data["observations"]["tokens"] == g["learn_tokens"] + g["test_tokens"] == 240
    assert g["target_agreement"] == 0.6 and g["delta"] == 0.2 and data["command"].startswith("drex calibrate")
    assert entry["rows"] == [1, 2, 4] and len(entry["table_ms"]) == len(entry["segments"])
    assert entry["prediction_error"]["rows"] == [3] and entry["prediction_error"]["median"] >= 0
    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    expected = [math.inf if t == "inf" else t for t in entry["thresholds"]]
    assert model.exit_config.threshold_list() == pytest.approx(expected)
    assert model.calibration_path == heads / "calibration.json"
    if any(math.isfinite(t) for t in expected):  # the calibrated segments: generate() takes the file's constants
        ids = torch.tensor([[5, 6, 7, 8]])
        out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
        assert "calibration file" in out.stats.cost_source
    measures = entry["measures"]
    assert set(measures) == {"max_prob", "margin", "classifier", "saturation"}
    fastest = max(m["learn_expected_speedup"] for m in measures.values())  # chosen on the learn half
    assert measures[entry["confidence"]]["learn_expected_speedup"] == fastest
    assert model.exit_config.confidence == entry["confidence"]
    # boundary_factor is a measured time ratio: only its presence and sign are the test's (timings are benchmarks')
    assert entry["min_speedup"] == 1.05 and math.isfinite(entry["boundary_factor"]) and entry["boundary_factor"] > 0
    assert (heads / "calibration_observations.safetensors").is_file()
    # profiling again on the saved observations: the same guarantee, a new timing
    reuse = ["calibrate", str(heads), "--reuse-observations", "--rows", "1,2,4", "--holdout-rows", "3", "--repeats"]
    assert main([*reuse, "1", "--decision-rows", "4", "--target-agreement", "0.6", "--delta", "0.2"]) == 0
    again = json.loads((heads / "calibration.json").read_text())
    assert again["guarantee"] == data["guarantee"] and again["observations"]["reused"]
    assert again["observed_by"] == data["command"] and "--reuse-observations" in again["cost_models"][device]["made_by"]
    assert _calibrate(heads, text, "--reuse-observations") == 2  # --data and --reuse-observations exclude each other
    assert _calibrate(heads, text, "--seed", "1") == 0  # again: the card's section is replaced, not repeated
    assert (heads / "README.md").read_text().count("## Calibration (`drex calibrate`)") == 1
    uncalibrated = EarlyExitModelForCausalLM.from_pretrained(heads, calibration=False)
    assert uncalibrated.exit_config.threshold_list() == [0.9, 0.9]


def test_another_devices_calibration_gives_the_guaranteed_thresholds_and_says_so(heads_and_text, caplog):
    heads, _ = heads_and_text
    guaranteed = {"thresholds": [0.7, "inf"]}
    other = {"thresholds": [0.2, 0.3], "segments": [[0, 1], [2, 2], [3, 3]]}
    calibration = {"exit_layers": [1, 2], "guarantee": guaranteed, "cost_models": {"NVIDIA H100 80GB HBM3": other}}
    (heads / "calibration.json").write_text(json.dumps(calibration))
    with caplog.at_level(logging.WARNING):
        model = EarlyExitModelForCausalLM.from_pretrained(heads)
    assert model.exit_config.threshold_list() == [0.7, math.inf]
    assert model.calibration_path is None
    assert "no cost constants for" in caplog.text and "NVIDIA H100" in caplog.text
    (heads / "calibration.json").write_text("{not json")
    with pytest.raises(ConfigError, match="calibration.json"):
        EarlyExitModelForCausalLM.from_pretrained(heads)
    calibration["exit_layers"] = [0, 2]
    (heads / "calibration.json").write_text(json.dumps(calibration))
    with pytest.raises(ConfigError, match="exit layers"):
        EarlyExitModelForCausalLM.from_pretrained(heads)


def test_calibrate_choose_policy_records_the_choice_and_generate_follows_it(heads_and_text, capsys):
    heads, text = heads_and_text
    extra = ["--choose-policy", "--choice-batch-sizes", "1,4", "--draft-tokens", "1,2"]
    assert _calibrate(heads, text, *extra) == 0
    out = capsys.readouterr().out
    entry = json.loads((heads / "calibration.json").read_text())["cost_models"][device_name("cpu")]
    choices = entry["policy_choice"]
    assert sorted(choices) == ["1", "4"]
    for batch, choice in choices.items():
        assert f"policy at batch {batch}: {choice['policy']}" in out
        spec = [row for name, row in choice["measured"].items() if name.startswith("self_spec")]
        assert len(spec) == 2 * 2 and all(row["exact"] == 1.0 for row in spec)  # 2 exits x k 1, 2: lossless
    assert "`generate()` uses **" in (heads / "README.md").read_text()
    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, return_dict_in_generate=True)
    assert out.stats.policy == choices["1"]["policy"]


def test_calibrate_refuses_bad_input_and_writes_nothing(heads_and_text, tmp_path, capsys):
    heads, text = heads_and_text
    assert _calibrate(heads, tmp_path / "missing.txt") == 2
    assert "missing.txt" in capsys.readouterr().err
    code = main(["calibrate", str(heads), "--data", str(text), "--prompts", "4", "--max-new-tokens", "3"])
    assert code == 2
    assert "test tokens are needed" in capsys.readouterr().err
    assert not (heads / "calibration.json").exists() and not (heads / "calibration.png").exists()
    assert _calibrate(tmp_path, text) == 2  # not an exit-heads folder
    assert "exit-heads folder" in capsys.readouterr().err


def test_regrouping_cost_is_measured_and_merged_segments_add_up():
    from drex_hf.calibration.calibrate import _merge

    layers, check, fill = [(2.0, 0.5), (3.0, 0.25), (1.5, 1.0)], [(0.4, 0.05), (0.2, 0.02)], [(0.1, 0.01)] * 2
    base = _synthetic_timer(layers, check, fill)

    def timer(kind, index, n):  # scattered rows cost 0.02 ms more per row, in every segment
        return base("layers", index, n) + 0.02 * n if kind == "scattered" else base(kind, index, n)

    costs = CostTable.measure(timer, 3, ROWS, regroup=True)
    assert costs.regroup_ms == pytest.approx([0.02] * 3)
    merged = _merge(costs, [False, True])  # exit 0 off: segments 0 and 1 become one
    assert len(merged.layers_ms) == 2 and merged.regroup_ms == pytest.approx([0.04, 0.02])
    assert merged.layers_ms[0] == pytest.approx([a + b for a, b in zip(costs.layers_ms[0], costs.layers_ms[1])])
    assert merged.check_ms == [costs.check_ms[1]]
    model = merged.cost_model(context=128, device="synthetic")
    assert model.regroup_ms == pytest.approx([0.04, 0.02])
    assert model.predict(0, 8, False, 128) == pytest.approx(model.predict(0, 8, True, 128) + 0.04 * 8)


def test_a_step_prediction_includes_the_kv_fill_and_projections_it_triggers():
    """The first segment starts tokens (KV fill of early exits, their deferred projections) and the
    last completes deferred projections: a calibrated cost model predicts that work too."""
    from drex_hf.generation.scheduler import CostModel

    rows = [1, 2, 4, 8]
    model = CostModel(
        [1.0] * 3, [0.1] * 3, [0.0] * 3, rows=rows, table_ms=[[1.0, 1.1, 1.3, 1.7]] * 3,
        fill_ms=[[0.5, 0.6, 0.8, 1.2], [0.2, 0.2, 0.3, 0.4]], project_ms=[2.0, 2.1, 2.3, 2.7],
    )  # fmt: skip
    assert model.overhead_ms() == 0.0
    assert model.overhead_ms(0, 4) == pytest.approx(0.8)
    assert model.overhead_ms(1, 2, projected=4) == pytest.approx(0.2 + 2.3)
    assert model.overhead_ms(0, 6) == pytest.approx(1.0)  # interpolated between 4 and 8 rows
    assert CostModel.constant(3).overhead_ms(0, 4, projected=3) == 0.0  # no tables: nothing added
    from test_engine import _model, _prompts, _thresholds

    from drex_hf.generation.engine import DrexEngine
    from drex_hf.generation.settings import DecodeSettings

    net = _model("llama", "classifier")  # the classifier check defers projections
    _, _, prompts = _prompts([5, 9, 3, 12, 1, 7, 4, 10])
    thresholds = _thresholds(net, prompts)
    table = [[1.0, 1.1, 1.3, 1.7]] * 4

    def predictions(**tables):
        cost = CostModel([1.0] * 4, [0.1] * 4, [0.01] * 4, rows=rows, table_ms=table, **tables)
        engine = DrexEngine(
            net, max_batch=8, max_len=24, settings=DecodeSettings(max_new_tokens=6), thresholds=thresholds,
            cost_model=cost,
        )  # fmt: skip
        for p in prompts:
            engine.add_request(p)
        engine.run()
        return engine.stats.predicted_ms, engine.stats.step_segments

    plain, segments = predictions()
    loaded, same_segments = predictions(fill_ms=[[5.0] * 4] * 3, project_ms=[7.0] * 4)
    assert segments == same_segments  # the extra terms never change a decision
    extra = [b - a for a, b in zip(plain, loaded)]
    assert all(e == 0 for e, s in zip(extra, segments) if s in (1, 2))  # middle segments start/finish nothing
    assert any(e >= 5.0 for e, s in zip(extra, segments) if s == 0)  # a KV fill (and projections) predicted
    assert any(e >= 7.0 for e, s in zip(extra, segments) if s == 3)  # deferred projections at the last segment


def test_calibrate_chooses_among_draft_sources_on_prompt_sets_with_a_corpus_and_a_check(
    heads_and_text, capsys, monkeypatch
):
    """Issue 26: --draft-sources, --choice-prompts (a prompt file), --draft-corpus (full depth's answers,
    saved beside the heads and loaded with them) and --choice-check-prompts (the choice timed again on
    other prompts)."""
    from test_policy_choice import _prefer_spec

    _prefer_spec(monkeypatch)
    heads, text = heads_and_text
    words = [" ".join(f"w{(7 * i + j) % 40}" for j in range(6)) for i in range(12)]
    fit, check = heads.parent / "fit.txt", heads.parent / "check.txt"
    fit.write_text("\n".join(words[:8]) + "\n")
    check.write_text("\n".join(words[8:]) + "\n")
    extra = ["--choose-policy", "--choice-batch-sizes", "1,2", "--draft-tokens", "2,adaptive", "--draft-exits", "2",
             "--draft-sources", "head,ngram,mixed", "--choice-prompts", str(fit), "--choice-check-prompts", str(check),
             "--choice-prompt-count", "4", "--draft-corpus", "3"]  # fmt: skip
    assert _calibrate(heads, text, *extra) == 0
    out = capsys.readouterr().out
    assert "draft_corpus.safetensors" in out
    entry = json.loads((heads / "calibration.json").read_text())["cost_models"][device_name("cpu")]
    for batch, choice in entry["policy_choice"].items():
        spec = {name for name in choice["measured"] if name.startswith("self_spec")}
        assert spec == {f"self_spec:{w}:{k}" for w in ("2", "ngram", "ngram+2") for k in (2, "adaptive")}
        assert choice["policy"] == "self_spec" and choice["checked"]["prompts"] == 4 // int(batch) * int(batch)
        assert f"on {choice['checked']['prompts']} prompts it was not chosen on" in out
    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    assert model.draft_corpus is not None and len(model.draft_corpus) > 0
    # --draft-vocab, alone: the frequency-ranked subset of that corpus, saved beside the heads and loaded
    assert main(["calibrate", str(heads), "--draft-vocab", "0.9", "--choose-policy"]) == 2
    assert "--draft-vocab runs alone" in capsys.readouterr().err
    assert main(["calibrate", str(heads), "--draft-vocab", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "draft_vocab.safetensors" in out and "coverage (not ranked)" in out
    vocab = EarlyExitModelForCausalLM.from_pretrained(heads).draft_vocab
    answers = read_corpus_answers(heads / "draft_corpus.safetensors")
    assert 0 < vocab.numel() <= len({t for a in answers for t in a}) and coverage(vocab.tolist(), answers[:2]) >= 0.9
    # --draft-priors, alone: each kind of text draft's acceptance curve on full depth's answers, saved and loaded
    assert main(["calibrate", str(heads), "--draft-priors", "3", "--choose-policy"]) == 2
    assert "--draft-priors runs alone" in capsys.readouterr().err
    args = ["calibrate", str(heads), "--draft-priors", "4", "--choice-prompts", str(fit), "--max-new-tokens", "12"]
    assert main([*args, "--draft-priors-k", "3"]) == 0
    assert "draft_priors.json" in capsys.readouterr().out
    priors = EarlyExitModelForCausalLM.from_pretrained(heads).draft_priors
    assert priors.fitted_on["answers"] == 4 and priors.fitted_on["corpus"] is True
    assert priors.curves and all(len(curve) == 3 for curve in priors.curves.values())


def test_draft_vocab_needs_a_draft_corpus(heads_and_text, capsys):
    heads, _ = heads_and_text
    assert main(["calibrate", str(heads), "--draft-vocab", "0.9"]) == 2
    assert "draft_corpus.safetensors, which is missing" in capsys.readouterr().err
    assert not (heads / "draft_vocab.safetensors").exists()
    with pytest.raises(SystemExit):  # argparse: not a number
        main(["calibrate", str(heads), "--draft-vocab", "most"])
