"""`drex calibrate --metric` (CALM's textual consistency): the p-values for a mean of [0, 1] losses,
the fixed-sequence test over prompts, the two degenerate models (exits that change nothing, exits
that change every token), calibration.json and the card saying which guarantee each entry carries,
older files, and the CLI's refusals."""

import importlib.util
import json
import math
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, tiny_tokenizer

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.calibration.calibrate import card_section, save
from drex_hf.calibration.sequences import certify, lcs_length, ordered_candidates, rouge_l
from drex_hf.calibration.thresholds import (
    CalibrationDataError,
    Observations,
    binomial_p_value,
    risk_p_value,
    tokens_needed,
)
from drex_hf.calibration_file import entry_guarantee, read_calibration
from drex_hf.cli.main import main
from drex_hf.device import device_name
from drex_hf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the p-values


ROOT = Path(__file__).resolve().parents[1]


def _rejections(draw, n, alpha, bound, delta, trials, seed):
    rng = random.Random(seed)
    hits = 0
    for _ in range(trials):
        losses = [draw(rng) for _ in range(n)]
        hits += risk_p_value(sum(losses) / n, n, alpha, bound) <= delta
    return hits / trials


@pytest.mark.parametrize("bound", ["hoeffding_bentkus", "hoeffding"])
def test_a_p_value_at_the_null_rejects_at_most_delta_of_the_time(bound):
    """Losses whose expected value is exactly alpha (the boundary of H0: risk >= alpha), continuous
    and 0/1: P(p <= delta) must not exceed delta beyond three standard errors of the simulation."""
    delta, trials = 0.1, 1500
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    for alpha, n in [(0.1, 30), (0.3, 15)]:
        continuous = _rejections(lambda r, a=alpha: r.uniform(0, 2 * a), n, alpha, bound, delta, trials, seed=1)
        binary = _rejections(lambda r, a=alpha: float(r.random() < a), n, alpha, bound, delta, trials, seed=2)
        assert continuous <= delta + slack and binary <= delta + slack, (alpha, n, continuous, binary)
    # and it is not valid by never rejecting: well below alpha, most draws reject (Hoeffding needs more)
    n = 150 if bound == "hoeffding_bentkus" else 600
    assert _rejections(lambda r: r.uniform(0, 0.06), n, 0.1, bound, delta, 100, seed=3) > 0.8


def test_hoeffding_bentkus_lies_between_the_exact_tail_and_hoeffding():
    for n, failures, alpha in [(30, 0, 0.1), (40, 2, 0.2), (100, 5, 0.1), (25, 3, 0.3), (60, 10, 0.25)]:
        risk = failures / n
        exact = risk_p_value(risk, n, alpha, "binomial")
        assert exact == pytest.approx(
            sum(math.comb(n, i) * alpha**i * (1 - alpha) ** (n - i) for i in range(failures + 1))
        )
        hb = risk_p_value(risk, n, alpha, "hoeffding_bentkus")
        assert exact <= hb + 1e-12 and hb <= risk_p_value(risk, n, alpha, "hoeffding") + 1e-12


def test_the_p_value_grows_with_the_mean_loss_and_shrinks_with_more_prompts():
    for bound in ("hoeffding_bentkus", "hoeffding"):
        alpha = 0.1
        by_risk = [risk_p_value(r / 200, 50, alpha, bound) for r in range(0, 41)]
        assert all(a <= b + 1e-15 for a, b in zip(by_risk, by_risk[1:])), bound
        assert by_risk[-1] == 1.0 and risk_p_value(0.5, 50, alpha, bound) == 1.0  # at/above alpha: no evidence
        by_n = [risk_p_value(0.02, n, alpha, bound) for n in (20, 40, 80, 160)]
        assert all(a > b for a, b in zip(by_n, by_n[1:])) and by_n[-1] < by_n[0] / 5, (bound, by_n)


def test_the_binomial_bound_refuses_losses_that_are_not_counts():
    with pytest.raises(CalibrationDataError, match="0/1 losses"):
        risk_p_value(0.123, 10, 0.1, "binomial")
    assert risk_p_value(0.2, 10, 0.3, "binomial") == pytest.approx(1 - binomial_p_value(3, 10, 0.3))


def test_rouge_l_on_ids_is_rouge_score_on_the_same_words():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    gen = random.Random(0)
    for _ in range(50):
        a = [gen.randrange(5) for _ in range(gen.randrange(1, 12))]
        b = [gen.randrange(5) for _ in range(gen.randrange(1, 12))]
        words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        assert rouge_l(a, b) == pytest.approx(scorer.score(words(b), words(a))["rougeL"].fmeasure)
    assert lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2 and rouge_l([], []) == 1.0 and rouge_l([1], []) == 0.0


# ---------------------------------------------------------------- the fixed-sequence test


INF = math.inf
LADDER = [([INF, INF], 0.0), ([0.9, INF], 0.1), ([0.8, INF], 0.2), ([0.8, 0.5], 0.4), ([0.5, 0.5], 0.6)]


def _fake_answers(bad, n):
    """answers_for: every answer equals its reference except under the candidates in `bad` (all wrong
    there); exits: one token at exit 0 per answer. Records the candidates it was asked for."""
    references = [[i, i + 1, i + 2] for i in range(n)]
    calls = []

    def answers_for(thresholds):
        calls.append(thresholds)
        if thresholds in bad:
            return [[99] + r[1:] for r in references], [[0, 2, 2]] * n
        return [list(r) for r in references], [[0, 2, 2]] * n

    return references, answers_for, calls


def test_fixed_sequence_stops_at_the_first_failure_and_never_generates_past_it():
    references, answers_for, calls = _fake_answers(bad=[[0.8, 0.5]], n=40)
    result = certify(LADDER, answers_for, references, "exact", 0.9, 0.1, learn_prompts=40)
    assert result.thresholds == [0.8, INF]  # the last one before the failure, though a later one would pass
    assert calls == [[0.9, INF], [0.8, INF], [0.8, 0.5]]
    assert [c["rejected"] for c in result.tested] == [True, True, True, False]
    assert result.mean_score == 1.0 and result.exit_fractions == pytest.approx([1 / 3, 0.0])
    assert result.bound == "binomial" and result.test_prompts == 40 and result.learn_prompts == 40


def test_when_every_exit_changes_the_answer_no_exit_is_certified():
    references, answers_for, calls = _fake_answers(bad=[c for c, _ in LADDER], n=40)
    result = certify(LADDER, answers_for, references, "rouge_l", 0.9, 0.1)
    assert result.thresholds == [INF, INF] and not result.exits_anything
    assert calls == [[0.9, INF]] and result.mean_score == 1.0 and result.exit_fractions == [0.0, 0.0]
    assert result.tested[1]["mean_score"] == pytest.approx(2 / 3)  # one token of three replaced: LCS 2 of 3


def test_too_few_test_prompts_are_refused_before_anything_is_generated():
    assert tokens_needed(0.9, 0.1, "hoeffding_bentkus") == 22  # 0.9^22 < 0.1 <= 0.9^21
    references, answers_for, calls = _fake_answers(bad=[], n=21)
    with pytest.raises(CalibrationDataError, match=r"at least 22 test prompts"):
        certify(LADDER, answers_for, references, "rouge_l", 0.9, 0.1, learn_prompts=21)
    assert calls == []
    references, answers_for, _ = _fake_answers(bad=[], n=22)  # 22 perfect answers do pass
    assert certify(LADDER, answers_for, references, "rouge_l", 0.9, 0.1).thresholds == [0.5, 0.5]
    with pytest.raises(CalibrationDataError, match="binomial bound needs 0/1 losses"):
        certify(LADDER, answers_for, references, "rouge_l", 0.9, 0.1, bound="binomial")
    with pytest.raises(CalibrationDataError, match="unknown metric"):
        certify(LADDER, answers_for, references, "bleu", 0.9, 0.1)
    with pytest.raises(CalibrationDataError, match=r"must be in \(0, 1\)"):
        certify(LADDER, answers_for, references, "exact", 1.0, 0.1)


def test_candidates_are_ordered_by_the_learn_prompts_exit_rate_with_disabled_exits_shut():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(2, 4000, generator=gen)
    obs = Observations(conf, torch.rand(2, 4000, generator=gen) < 0.5 + 0.5 * conf, torch.arange(4000) % 40)
    ordered = ordered_candidates(obs)
    rates = [rate for _, rate in ordered]
    assert ordered[0] == ([INF, INF], 0.0) and len(ordered) > 3 and rates == sorted(rates)
    shut = ordered_candidates(obs, enabled=[False, True])
    assert all(t[0] == INF for t, _ in shut) and len({tuple(t) for t, _ in shut}) == len(shut)


# ---------------------------------------------------------------- real tiny models, end to end


def _heads(tmp_path, negate_exit_norms=False):
    """Heads on a tiny Llama whose layers after the first exit add nothing (o_proj and down_proj
    zero), so every exit sees the final hidden state: with the final norm the exits' tokens are full
    depth's; with it negated (`negate_exit_norms`), each exit picks full depth's least likely token."""
    base = make_tiny("llama")
    for layer in base.model.layers[2:]:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model = EarlyExitModelForCausalLM.from_base(str(folder), EarlyExitConfig(exit_layers=[1, 2], head="norm"))
    if negate_exit_norms:
        for head in model.heads:
            head.norm.weight.data.neg_()
    model.save_pretrained(tmp_path / "heads")
    gen = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(3, 99, (2000,), generator=gen)]
    (tmp_path / "held.txt").write_text(" ".join(words))
    return tmp_path / "heads", tmp_path / "held.txt"


def _sequence_calibrate(heads, text, *extra):
    args = ["calibrate", str(heads), "--data", str(text), "--metric", "exact", "--target", "0.6", "--delta", "0.2"]
    args += ["--prompts", "16", "--prompt-tokens", "5", "--max-new-tokens", "6", "--rows", "1,2", "--holdout-rows"]
    return main([*args, "2", "--repeats", "1", "--decision-rows", "2", "--measures", "max_prob", *extra])


def test_exits_that_change_nothing_certify_the_most_aggressive_candidate(tmp_path, capsys):
    heads, text = _heads(tmp_path)
    assert _sequence_calibrate(heads, text, "--no-progress") == 0
    out = capsys.readouterr().out
    data = json.loads((heads / "calibration.json").read_text())
    g = data["guarantee"]
    assert g["kind"] == "sequence" and g["metric"] == "exact" and g["target"] == 0.6 and g["delta"] == 0.2
    assert g["bound"] == "binomial" and g["prompts"] == 8 and g["learn_prompts"] == 8
    assert all(c["rejected"] for c in g["tested"]) and len(g["tested"]) >= 2  # nothing failed: the last one won
    assert g["thresholds"] == g["tested"][-1]["thresholds"] and all(t != "inf" for t in g["thresholds"])
    assert g["mean_score"] == 1.0 and g["tested"][-1]["identical"] == 8
    assert g["exiting"] > 0.5 and g["exiting"] == pytest.approx(sum(g["exit_fractions"]))
    assert "certified thresholds" in out and "tokens that still exit" in out
    # the file reads back with the guarantee's kind, and the card says which guarantee each entry has
    entry = data["cost_models"][device_name("cpu")]
    assert entry["guarantee"]["kind"] == "sequence" and entry["guarantee"]["metric"] == "exact"
    assert read_calibration(heads / "calibration.json", [1, 2], None)["guarantee"]["kind"] == "sequence"
    card = (heads / "README.md").read_text()
    assert "**Guarantee (sequence, exact).**" in card and "exact ≥ 0.6 (test mean" in card
    model = EarlyExitModelForCausalLM.from_pretrained(heads)  # this device's (sequence-certified) entry
    assert model.exit_config.threshold_list() == [math.inf if t == "inf" else t for t in entry["thresholds"]]
    from drex_hf.cli.bench import _load_heads  # --thresholds guaranteed selects a sequence guarantee too

    chosen = _load_heads(Namespace(model=str(heads), thresholds="guaranteed"), torch.float32, torch.device("cpu"))
    assert chosen.exit_config.threshold_list() == pytest.approx(g["thresholds"])


def _fresh_text_check(heads, text, out, *extra):
    """benchmarks/calibration.py's main, in this process."""
    spec = importlib.util.spec_from_file_location("fresh_check", ROOT / "benchmarks" / "calibration.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = [str(heads), "--data", str(text), "--prompts", "6", "--prompt-tokens", "5", "--max-new-tokens", "6"]
    assert script.main([*args, "--seed", "3", "--out", str(out), *extra]) == 0
    return json.loads((out / "calibration_check.json").read_text())


def test_the_fresh_text_check_scores_a_sequence_guarantee_on_whole_answers(tmp_path, capsys):
    """benchmarks/calibration.py on a sequence-certified file generates drex's answers on new prompts
    and scores them against full depth's: exits that change nothing give identical answers while
    most tokens still exit, and the table says the promise was met; exits that change every token
    would score far below (the --no-answers run shows only the token check)."""
    heads, text = _heads(tmp_path)
    assert _sequence_calibrate(heads, text, "--no-progress") == 0
    fresh = tmp_path / "fresh.txt"
    gen = torch.Generator().manual_seed(7)
    fresh.write_text(" ".join(f"w{int(i)}" for i in torch.randint(3, 99, (800,), generator=gen)))
    capsys.readouterr()
    check = _fresh_text_check(heads, fresh, tmp_path / "check")
    guaranteed = check["rows"][0]
    assert guaranteed["thresholds"] == "guaranteed" and guaranteed["guarantee"]["kind"] == "sequence"
    answers = guaranteed["answers"]
    assert answers["identical"] == 6 and answers["mean_rouge_l"] == 1.0 and answers["mean_exact"] == 1.0
    assert sum(answers["exit_fractions"]) > 0.5 and guaranteed["meets_target"] is True
    assert "exact >= 0.6 (delta 0.2) — met" in capsys.readouterr().out
    plain = _fresh_text_check(heads, fresh, tmp_path / "plain", "--no-answers")
    assert all("answers" not in r for r in plain["rows"])
    assert plain["rows"][0]["agreement"] == 1.0  # the token check of the same thresholds


def test_exits_that_change_every_token_certify_none_and_the_file_says_so(tmp_path, capsys):
    heads, text = _heads(tmp_path, negate_exit_norms=True)
    assert _sequence_calibrate(heads, text, "--no-progress", "--metric", "rouge_l", "--target", "0.5") == 0
    out = capsys.readouterr().out
    data = json.loads((heads / "calibration.json").read_text())
    g = data["guarantee"]
    assert g["kind"] == "sequence" and g["metric"] == "rouge_l" and g["bound"] == "hoeffding_bentkus"
    assert g["thresholds"] == ["inf", "inf"] and g["exiting"] == 0 and g["exit_fractions"] == [0.0, 0.0]
    assert data["cost_models"][device_name("cpu")]["thresholds"] == ["inf", "inf"]
    assert "every exit stays off" in out
    assert "No threshold vector with an exit passed" in (heads / "README.md").read_text()
    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    assert model.exit_config.threshold_list() == [math.inf, math.inf]


# ---------------------------------------------------------------- files: kinds, older files, refusals


def _old_style_calibration():
    """calibration.json as drex_hf wrote it before guarantees had kinds."""
    entry = {
        "thresholds": [0.2, "inf"],
        "exits_paying": [True, False],
        "decision_rows": 8,
        "expected_speedup": 1.1,
        "prediction_error": {"median": 0.01, "p95": 0.02, "rows": [3]},
        "confidence": "max_prob",
    }
    g = {"thresholds": [0.3, 0.4], "target_agreement": 0.95, "delta": 0.1, "bound": "binomial", "learn_tokens": 10}
    g |= {"test_tokens": 50, "test_agreement": 0.97, "exit_fractions": [0.1, 0.2]}
    return {
        "exit_layers": [1, 2],
        "confidence": "max_prob",
        "command": "drex calibrate old",
        "observations": {"tokens": 60, "prompts": 6},
        "guarantee": g,
        "cost_models": {"NVIDIA H100 80GB HBM3": entry},
    }


def test_an_older_file_reads_as_token_agreement_and_keeps_saying_so_when_merged(tmp_path):
    old = _old_style_calibration()
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    assert read_calibration(tmp_path / "calibration.json", [1, 2], None) == old
    assert entry_guarantee(old["cost_models"]["NVIDIA H100 80GB HBM3"], old) == {
        "kind": "token_agreement", "target_agreement": 0.95, "delta": 0.1, "bound": "binomial"
    }  # fmt: skip
    card = card_section(old)
    assert "**Guarantee (token agreement).**" in card and "token agreement ≥ 0.95 (δ 0.1)" in card
    # a sequence calibration saved over it keeps the other device's entry, stamped with its own kind
    new = _old_style_calibration()
    seq = {"kind": "sequence", "metric": "rouge_l", "target": 0.9, "delta": 0.1, "bound": "hoeffding_bentkus"}
    seq |= {"thresholds": ["inf", "inf"], "learn_prompts": 30, "prompts": 30, "mean_score": 1.0, "tested": []}
    seq |= {"exit_fractions": [0.0, 0.0], "exiting": 0.0}
    new["guarantee"] = seq
    new["cost_models"] = {"cpu:test": {**old["cost_models"]["NVIDIA H100 80GB HBM3"], "guarantee": dict(seq)}}
    save(new, tmp_path, None)
    merged = json.loads((tmp_path / "calibration.json").read_text())
    assert merged["guarantee"]["kind"] == "sequence"
    assert merged["cost_models"]["NVIDIA H100 80GB HBM3"]["guarantee"]["kind"] == "token_agreement"
    assert merged["cost_models"]["NVIDIA H100 80GB HBM3"]["guarantee"]["target_agreement"] == 0.95
    assert merged["cost_models"]["cpu:test"]["guarantee"]["kind"] == "sequence"
    text = card_section(merged)
    assert "**Guarantee (sequence, rouge_l).**" in text and "token agreement ≥ 0.95" in text and "rouge_l ≥ 0.9" in text


@pytest.mark.parametrize(
    "change, field",
    [
        ({"kind": "paragraph"}, "guarantee.kind"),
        ({"kind": "sequence", "metric": "bleu", "target": 0.9, "delta": 0.1}, "guarantee.metric"),
        ({"kind": "sequence", "metric": "exact", "target": 1.5, "delta": 0.1}, "guarantee.target"),
        ({"kind": "sequence", "metric": "exact", "target": 0.9, "delta": "0.1"}, "guarantee.delta"),
    ],
)
def test_a_guarantee_that_states_nothing_usable_is_refused_naming_the_field(tmp_path, change, field):
    data = _old_style_calibration()
    data["guarantee"] |= change
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        read_calibration(tmp_path / "calibration.json", [1, 2], None)
    data = _old_style_calibration()
    data["cost_models"]["NVIDIA H100 80GB HBM3"]["guarantee"] = change
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"cost_models\['NVIDIA H100 80GB HBM3'\]\.guarantee\." + field.split(".")[1]):
        read_calibration(tmp_path / "calibration.json", [1, 2], None)
