"""What a server needs from the engine: per-request sampling parameters (each row its own, equal to
that request decoded alone), cancelling a queued or running request (its slot free at once, its
neighbours' tokens unchanged), finished requests handed over instead of kept, and statistics of a
fixed size however long it runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_every_exit_taken, covering_thresholds, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.sampling import RequestSampling
from drex_hf.generation.scheduler import CostModel, RandomPolicy
from drex_hf.generation.settings import DecodeSettings

LENGTHS = [5, 9, 3, 12, 1, 7, 4, 10]
NEW = 12
PARAMS = [
    RequestSampling(0.0),
    RequestSampling(0.7),
    RequestSampling(1.0, 0.9),
    RequestSampling(1.3, 0.8, 20),
    RequestSampling(2.0, 0.95, 50),
    RequestSampling(0.0),
    RequestSampling(0.5, 1.0, 7),
    RequestSampling(1.0),
]
SEEDS = [11 + 7 * i for i in range(len(LENGTHS))]


@pytest.fixture(scope="module")
def model():
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=math.inf, confidence="max_prob", head="norm")
    return EarlyExitModelForCausalLM.from_base(make_tiny("llama"), config)


@pytest.fixture(scope="module")
def prompts():
    ids, mask = padded_batch(LENGTHS)
    return [ids[b, mask[b].bool()] for b in range(len(LENGTHS))]


def _settings(p: RequestSampling) -> DecodeSettings:
    """The engine-wide settings that decode like `p` (what generate() would be given)."""
    if p.greedy:
        return DecodeSettings(max_new_tokens=NEW)
    return DecodeSettings(max_new_tokens=NEW, do_sample=True, temperature=p.temperature, top_k=p.top_k or None,
                          top_p=p.top_p)  # fmt: skip


def _engine(model, rows, thresholds, **kwargs):
    kwargs.setdefault("cost_model", CostModel.constant(4))
    return DrexEngine(
        model, max_batch=rows, max_len=max(LENGTHS) + NEW, settings=DecodeSettings(max_new_tokens=NEW),
        thresholds=thresholds, per_request_sampling=True, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def thresholds(model, prompts):
    """Thresholds under which greedy and sampled tokens leave at every exit point."""
    sampled = DecodeSettings(max_new_tokens=NEW, do_sample=True, temperature=1.3, top_p=0.9)
    found, _ = covering_thresholds(model, prompts, [(DecodeSettings(max_new_tokens=NEW), None), (sampled, SEEDS)])
    return found


def _references(model, prompts, thresholds):
    return [
        generate_reference(model, [prompt], _settings(p), thresholds, [seed])[0]
        for prompt, p, seed in zip(prompts, PARAMS, SEEDS)
    ]


@pytest.mark.parametrize("policy", ["drex", "random"])
def test_each_row_samples_with_its_own_parameters_as_if_alone(model, prompts, thresholds, policy):
    references = _references(model, prompts, thresholds)
    assert len({tuple(r.tokens) for r in references}) == len(references)
    chosen = RandomPolicy(num_segments=4, seed=5) if policy == "random" else "drex"  # riders included
    engine = _engine(model, len(prompts), thresholds, policy=chosen)
    with torch.no_grad():
        ids = [engine.add_request(p, seed=s, sampling=k) for p, s, k in zip(prompts, SEEDS, PARAMS)]
        done = engine.run()
    for i, want in zip(ids, references):
        assert (done[i].tokens, done[i].exit_layers) == (want.tokens, want.exit_layers), i
    assert_every_exit_taken([done[i].exit_layers for i in ids], model, thresholds)


def test_a_greedy_row_among_sampled_ones_equals_generate(model, prompts, thresholds):
    """generate() (engine-wide settings) and a per-request engine pick the same tokens."""
    for i in (0, 3):
        settings = _settings(PARAMS[i])
        kwargs = {} if PARAMS[i].greedy else {"do_sample": True, "temperature": settings.temperature,
                                              "top_k": settings.top_k, "top_p": settings.top_p}  # fmt: skip
        out = model.generate(prompts[i][None], max_new_tokens=NEW, thresholds=thresholds, seed=SEEDS[i],
                             cost_model=CostModel.constant(4), return_dict_in_generate=True, **kwargs)  # fmt: skip
        want = _references(model, prompts, thresholds)[i]
        assert out.sequences[0, LENGTHS[i] :].tolist() == want.tokens


def test_cancel_frees_the_slot_at_once_and_leaves_the_neighbours_unchanged(model, prompts, thresholds):
    references = _references(model, prompts, thresholds)
    ended = []
    engine = _engine(model, 4, thresholds)
    with torch.no_grad():
        first = [engine.add_request(prompts[i], seed=SEEDS[i], sampling=PARAMS[i], on_finish=ended.append)
                 for i in range(3)]  # fmt: skip
        for _ in range(7):
            engine.step()
        assert engine.cancel(first[1]) is True and engine.cancel(first[1]) is False
        cancelled = next(o for o in ended if o.request_id == first[1])
        assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < NEW
        assert cancelled.tokens == references[1].tokens[: len(cancelled.tokens)]
        late = engine.add_request(prompts[3], seed=SEEDS[3], sampling=PARAMS[3], on_finish=ended.append)
        assert engine.requests.by_slot.get(1) is None and engine.prefill_queue[-1].slot == 1  # the cancelled one's slot
        queued = engine.add_request(prompts[4], seed=SEEDS[4], sampling=PARAMS[4], on_finish=ended.append)
        assert engine.cancel(queued) is True  # before its prefill
        engine.run()
    by_id = {o.request_id: o for o in ended}
    assert by_id[queued].finish_reason == "cancelled" and by_id[queued].tokens == []
    assert engine.finished[queued] is by_id[queued]  # kept like every ended request (keep_finished)
    for rid, i in ((first[0], 0), (first[2], 2), (late, 3)):
        assert (by_id[rid].tokens, by_id[rid].exit_layers) == (references[i].tokens, references[i].exit_layers)
        assert by_id[rid].finish_reason == "length"
    assert engine.cancel(12345) is False
    assert not engine.requests and not engine.prefill_queue


def test_finished_requests_are_handed_over_not_kept_and_statistics_stay_bounded(model, prompts, thresholds):
    ended = []
    engine = _engine(model, 2, thresholds, keep_finished=False, stats_window=16)
    with torch.no_grad():
        for wave in range(3):
            for i in range(2):
                engine.add_request(prompts[i], seed=wave, sampling=PARAMS[i], on_finish=ended.append)
            engine.run()
    assert engine.finished == {} and len(ended) == 6 and {o.finish_reason for o in ended} == {"length"}
    assert engine.stats.steps > 16 and engine.stats.tokens == 6 * NEW  # the counters count everything
    assert len(engine.stats.measured_ms) == len(engine.stats.predicted_ms) == len(engine.stats.step_segments) == 16
    assert engine.stats.prediction_error()["median"] is not None


def test_an_eos_ends_a_request_with_finish_reason_stop(model, prompts, thresholds):
    want = _references(model, prompts, thresholds)[0].tokens
    engine = DrexEngine(model, max_batch=1, max_len=32, settings=DecodeSettings(max_new_tokens=NEW,
                        eos_token_ids=(want[2],)), thresholds=thresholds, cost_model=CostModel.constant(4))  # fmt: skip
    with torch.no_grad():
        rid = engine.add_request(prompts[0])
        out = engine.run()[rid]
    assert out.finish_reason == "stop" and out.tokens == want[: want.index(want[2]) + 1]


def test_bad_per_request_sampling_is_refused(model, prompts, thresholds):
    for args, message in [((-1.0,), "temperature"), ((1.0, 0.0), "top_p"), ((1.0, 1.5), "top_p"),
                          ((1.0, 1.0, -2), "top_k"), ((math.nan,), "temperature")]:  # fmt: skip
        with pytest.raises(GenerationInputError, match=message):
            RequestSampling(*args)
    with pytest.raises(GenerationTypeError, match="top_k"):
        RequestSampling(1.0, 1.0, 2.5)
    plain = DrexEngine(model, max_batch=1, max_len=32, thresholds=thresholds, cost_model=CostModel.constant(4))
    with pytest.raises(GenerationInputError, match="per_request_sampling"):
        plain.add_request(prompts[0], sampling=RequestSampling(0.5))
    with pytest.raises(GenerationInputError, match="stats_window"):
        _engine(model, 1, thresholds, stats_window=0)


def test_a_cancel_from_a_token_callback_waits_for_the_steps_end(model, prompts, thresholds):
    """A callback may cancel its own or another request mid-step: it takes effect when the step ends
    (the step's rows stay whole), and the neighbours' tokens are unchanged."""
    references = _references(model, prompts, thresholds)
    engine = _engine(model, 3, thresholds)
    ended, ids = [], []

    def on_token(rid, token, layer):
        if rid == ids[0] and len(seen) == 3:
            assert engine.cancel(ids[1]) is True  # deferred: still running at this point
            assert ids[1] in {r.output.request_id for r in engine.requests}
        seen.append(rid) if rid == ids[0] else None

    seen: list[int] = []
    with torch.no_grad():
        for i in range(3):
            ids.append(engine.add_request(prompts[i], seed=SEEDS[i], sampling=PARAMS[i], callback=on_token,
                                          on_finish=ended.append))  # fmt: skip
        engine.run()
    by_id = {o.request_id: o for o in ended}
    assert by_id[ids[1]].finish_reason == "cancelled" and len(by_id[ids[1]].tokens) < NEW
    for i in (0, 2):
        assert (by_id[ids[i]].tokens, by_id[ids[i]].exit_layers) == (references[i].tokens, references[i].exit_layers)
