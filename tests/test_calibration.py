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
