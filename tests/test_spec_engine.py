"""The batched self-speculative engine (`SpecEngine`, `generate(policy="self_spec")`, issue 19):
greedy output equals full depth token for token in batches of 1, 3 and 8 prompts of different
lengths, for k 1/2/4 at each exit point, with rows ending at eos mid-draft; every round's drafted and
accepted counts equal the one-request oracle's (whose counts the teacher-forced check in
test_self_spec.py pins); seeded sampling equals the oracle's draws and is batch independent;
requests joining mid-run; adaptive drafting; trace acceptance; refusals."""

import math

import pytest
import torch
from test_self_spec import EXITS, SAMPLING, _eos_cut_draft, _full, _model, _prompts

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.cost import SpecCost, adaptive_k
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.generation.spec.reference import generate_self_spec

LENGTHS_8 = [5, 9, 3, 12, 1, 7, 2, 10]
NEW = 13


def _run(model, prompts, settings, draft_exit, k, seeds=None, max_batch=None, **options):
    engine = SpecEngine(
        model,
        max_batch=max_batch or len(prompts),
        max_len=max(p.shape[0] for p in prompts) + settings.max_new_tokens,
        draft_exit=draft_exit,
        draft_tokens=k,
        settings=settings,
        **options,
    )
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, seed=None if seeds is None else seeds[i])
    results = engine.run()
    return [results[i] for i in range(len(prompts))], engine


# ---------------------------------------------------------------- greedy equals full depth
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_full_depth_batched(kind):
    model = _model(kind)
    everything = _prompts(LENGTHS_8)
    plain = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, everything, plain)
    eos = tuple(sorted({tokens[5] for tokens in want[:3]}))  # rows 0..2 end mid-run
    ended = DecodeSettings(max_new_tokens=NEW, eos_token_ids=eos)
    want_ended = _full(model, everything, ended)
    assert any(len(tokens) < NEW for tokens in want_ended)
    accepted = rejected = cut = 0
    for size in (1, 3, 8):
        prompts = everything[:size] if size != 1 else everything[3:4]
        offset = 3 if size == 1 else 0
        for draft_exit in EXITS:
            for k in (1, 2, 4):
                for settings, expected in ((plain, want), (ended, want_ended)):
                    outs, engine = _run(model, prompts, settings, draft_exit, k)
                    # the oracle's rounds (pinned by the teacher-forced check), on the largest batch
                    oracle = generate_self_spec(model, prompts, settings, draft_exit, k) if size == 8 else outs
                    for b, (out, ref) in enumerate(zip(outs, oracle)):
                        where = (kind, size, draft_exit, k, b, settings.eos_token_ids)
                        assert out.tokens == expected[offset + b], where
                        assert (out.drafted, out.accepted) == (ref.drafted, ref.accepted), where
                        assert out.exit_layers == [model.num_layers - 1] * len(out.tokens)
                        cut += settings is ended and _eos_cut_draft(out, k, set(eos))
                    accepted += engine.stats.accepted
                    rejected += engine.stats.drafted - engine.stats.accepted
                    assert engine.stats.drafted == sum(sum(o.drafted) for o in outs)
    assert accepted > 0 and rejected > 0, (accepted, rejected)
    assert cut > 0, "no row ended at an eos that cut its draft short"


def test_generate_self_spec_equals_full():
    model = _model("llama")
    ids = torch.tensor([[0, 0, 4, 8, 15], [16, 23, 42, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = model.generate(ids, attention_mask=mask, policy="full", max_new_tokens=NEW, pad_token_id=0)
    for k in (1, 3, "adaptive"):
        spec = model.generate(
            ids,
            attention_mask=mask,
            policy="self_spec",
            draft_exit=1,
            draft_tokens=k,
            max_new_tokens=NEW,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        assert torch.equal(spec.sequences, full), k
        assert (spec.exit_layers == model.num_layers - 1).all()
        assert spec.stats.rounds > 0
        assert spec.stats.drafted > 0 or k == "adaptive"  # adaptive may find drafting does not pay here


# ---------------------------------------------------------------- continuous batching
def test_requests_joining_mid_run_equal_full_depth():
    """Eight requests through three slots, each added as soon as a slot frees, some with their own
    max_new_tokens: each equals full depth alone."""
    model = _model("qwen2")
    prompts = _prompts(LENGTHS_8, seed=3)
    budgets = [NEW, 4, NEW, 9, 2, NEW, 6, NEW]
    engine = SpecEngine(
        model, max_batch=3, max_len=32, draft_exit=1, draft_tokens=2, settings=DecodeSettings(max_new_tokens=32)
    )
    waiting = list(range(len(prompts)))
    ids = {}
    joined_mid_round = 0
    while waiting or engine.active:
        while waiting and engine.has_free_slot:
            i = waiting.pop(0)
            joined_mid_round += any(r.drafting for r in engine.rounds.values())
            ids[engine.add_request(prompts[i], max_new_tokens=budgets[i])] = i
        engine.step()
    assert joined_mid_round > 0, "no request joined while others were drafting"
    for rid, out in engine.finished.items():
        i = ids[rid]
        want = _full(model, [prompts[i]], DecodeSettings(max_new_tokens=budgets[i]))[0]
        assert out.tokens == want, i
        assert out.finish_reason == "length"


def test_cancel_mid_run_frees_the_slot():
    model = _model("llama")
    prompts = _prompts([4, 6])
    engine = SpecEngine(
        model, max_batch=2, max_len=32, draft_exit=0, draft_tokens=2, settings=DecodeSettings(max_new_tokens=32)
    )
    first = engine.add_request(prompts[0], max_new_tokens=12)
    engine.add_request(prompts[1], max_new_tokens=12)
    for _ in range(4):
        engine.step()
    assert engine.cancel(first)
    assert engine.has_free_slot
    results = engine.run()
    assert results[first].finish_reason == "cancelled"
    assert results[1].tokens == _full(model, [prompts[1]], DecodeSettings(max_new_tokens=12))[0]
    assert not engine.cancel(first)


# ---------------------------------------------------------------- sampling
def test_sampling_equals_the_oracle_and_is_batch_independent():
    model = _model("qwen2")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    seeds = [11, 12, 13, 14, 2**63 + 5, 7, 8, 9]
    for draft_exit, k in ((0, 2), (1, 3), (2, 1)):
        outs, engine = _run(model, prompts, settings, draft_exit, k, seeds)
        oracle = generate_self_spec(model, prompts, settings, draft_exit, k, seeds)
        assert [o.tokens for o in outs] == [o.tokens for o in oracle], (draft_exit, k)
        assert [(o.drafted, o.accepted) for o in outs] == [(o.drafted, o.accepted) for o in oracle]
        assert 0 < engine.stats.accepted < engine.stats.drafted
        # alone, in reverse order, in a batch of two: the same tokens
        alone = [_run(model, [p], settings, draft_exit, k, [s])[0][0] for p, s in zip(prompts, seeds)]
        assert [o.tokens for o in alone] == [o.tokens for o in outs]
        pair, _ = _run(model, prompts[:2][::-1], settings, draft_exit, k, seeds[:2][::-1])
        assert [o.tokens for o in pair[::-1]] == [o.tokens for o in outs[:2]]


def test_sampling_distribution_matches_full_depth_batched():
    """The chi-square test of test_self_spec.py, through the engine: 1500 seeded requests, 64 at a
    time, tokens 1 and 2 against their exact full-depth marginals."""
    from test_self_spec import test_sampling_distribution_matches_full_depth

    def batched(model, prompts, settings, draft_exit, k, seeds):
        engine = SpecEngine(model, max_batch=64, max_len=16, draft_exit=draft_exit, draft_tokens=k, settings=settings)
        ids, waiting = {}, list(range(len(prompts)))
        while waiting or engine.active:
            while waiting and engine.has_free_slot:
                i = waiting.pop(0)
                ids[engine.add_request(prompts[i], seed=seeds[i])] = i
            engine.step()
        outs = [None] * len(prompts)
        for rid, out in engine.finished.items():
            outs[ids[rid]] = out
        return outs

    test_sampling_distribution_matches_full_depth(decode=batched)


# ---------------------------------------------------------------- adaptive drafting
def test_adaptive_drafting_equals_the_oracle_and_full_depth():
    model = _model("gpt2")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, settings)
    cost = SpecCost(draft=1.0, verify_fixed=5.0, verify_per_position=0.25, full=5.25)  # a verify-cheap device
    outs, engine = _run(model, prompts, settings, 1, "adaptive", cost=cost, max_draft_tokens=5)
    assert [o.tokens for o in outs] == want

    def choose_k(out):  # the engine's rule: the cost model's best k under the row's own acceptance
        return adaptive_k(cost, out.drafted, out.accepted, 0.5, 5)

    oracle = generate_self_spec(model, prompts, settings, 1, 5, choose_k=choose_k)
    assert [(o.drafted, o.accepted) for o in outs] == [(o.drafted, o.accepted) for o in oracle]
    assert len(engine.stats.draft_lengths) > 1, engine.stats.draft_lengths  # k moved with acceptance


def test_adaptive_k_counts_judged_drafts_only():
    # a rejection at the first of 4 drafts judges one draft, not four: (0 + 2 * 0.9) / (1 + 2) = 0.6
    spread = SpecCost(draft=1.0, verify_fixed=5.0, verify_per_position=0.25, full=5.25)
    assert adaptive_k(spread, [4], [0], 0.9, 8) == spread.best_k(0.6, 8) != spread.best_k(1.8 / 6, 8)
    # all accepted: every draft judged; a round cut by eos or the budget judges what it drafted
    assert adaptive_k(spread, [2, 3], [2, 3], 0.5, 8) == spread.best_k(6 / 7, 8)


def test_best_k_follows_acceptance_and_cost():
    # a device where a verify pass costs little more for more positions (a memory-bound GPU)
    cheap = SpecCost(draft=1.0, verify_fixed=5.0, verify_per_position=0.25, full=5.25)
    ks = [cheap.best_k(a, 8) for a in (0.02, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 4, ks
    assert cheap.speedup(0.8, cheap.best_k(0.8, 8)) > 1.5
    # counted in layers every position runs all L layers once: a round never beats full depth
    layers = SpecCost.from_layers(num_layers=24, draft_exit=5)
    assert layers.round_cost(3) == 4 * 24
    assert all(layers.speedup(a, k) <= 1 + 1e-12 for a in (0.1, 0.5, 0.9, 0.999) for k in range(9))
    assert layers.best_k(0.9, 8) == 0
    # text drafts on the CPU (issue 26): free drafts, a verify of 2 to 9 positions ~1.3x a step once it drafts
    text = SpecCost(draft=0.0, verify_fixed=0.95, verify_per_position=0.05, full=1.0, draft_fixed=0.2)
    assert text.round_cost(0) == pytest.approx(1.0) and text.round_cost(1) == pytest.approx(1.25)
    assert text.best_k(0.15, 8) == 0 and text.best_k(0.5, 8) >= 3  # a poor row stops; a good one drafts on
    linear = SpecCost(draft=0.0, verify_fixed=0.95, verify_per_position=0.05, full=1.0)
    assert linear.best_k(0.15, 8) > 0  # without the jump the same row would keep drafting


def test_draft_confidence_stops_drafting():
    model = _model("llama")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW)
    outs, engine = _run(model, prompts, settings, 2, 4, draft_confidence=0.2)
    assert [o.tokens for o in outs] == _full(model, prompts, settings)
    oracle = generate_self_spec(model, prompts, settings, 2, 4, draft_confidence=0.2)
    assert [(o.drafted, o.accepted) for o in outs] == [(o.drafted, o.accepted) for o in oracle]
    short = full_length = 0
    for out in outs:  # no eos here: a round drafts fewer than min(k, room) only on low confidence
        index = 1
        for drafted, accepted in zip(out.drafted, out.accepted):
            allowed = min(4, NEW - index - 1)
            short += drafted < allowed
            full_length += drafted == allowed
            index += accepted + 1
    assert short > 0 and full_length > 0, (short, full_length)


# ---------------------------------------------------------------- trace acceptance
@pytest.mark.parametrize("acceptance", [0.0, 0.7, 1.0])
def test_trace_acceptance_is_replayed(acceptance):
    model = _model("llama")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=24)
    outs, engine = _run(model, prompts, settings, 0, 4, exit_source="trace", acceptance=acceptance, trace_seed=5)
    stats = engine.stats
    if acceptance == 1.0:
        assert stats.accepted == stats.drafted > 0
    elif acceptance == 0.0:
        assert stats.accepted == 0 and stats.drafted > 0
    else:  # a draft is tested only while its round's drafts before it were accepted
        tested = sum(min(d, a + 1) for o in outs for d, a in zip(o.drafted, o.accepted))
        rate = stats.accepted / tested
        assert abs(rate - acceptance) < 4 * math.sqrt(acceptance * (1 - acceptance) / tested), (rate, tested)
    again, _ = _run(model, prompts, settings, 0, 4, exit_source="trace", acceptance=acceptance, trace_seed=5)
    assert [o.tokens for o in again] == [o.tokens for o in outs]


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "options, error, names",
    [
        (dict(draft_exit=3), GenerationInputError, "draft_exit"),
        (dict(draft_tokens=0), GenerationInputError, "draft_tokens"),
        (dict(draft_tokens="many"), GenerationInputError, "draft_tokens"),
        (dict(draft_tokens=2, max_draft_tokens=4), GenerationInputError, "max_draft_tokens"),
        (dict(draft_confidence=1.5), GenerationInputError, "draft_confidence"),
        (dict(exit_source="trace"), GenerationInputError, "acceptance"),
        (dict(exit_source="trace", acceptance=1.2), GenerationInputError, "acceptance"),
        (dict(acceptance=0.5), GenerationInputError, "acceptance"),
        (dict(cost="fast"), GenerationTypeError, "cost"),
        (dict(settings=DecodeSettings(max_new_tokens=4, stop_strings=["x"])), GenerationInputError, "stop strings"),
    ],
)
def test_engine_refusals_name_the_argument(options, error, names):
    model = _model("llama")
    call = dict(max_batch=2, max_len=16, draft_exit=1, draft_tokens=2)
    call.update(options)
    with pytest.raises(error, match=names):
        SpecEngine(model, **call)


def test_request_refusals():
    model = _model("llama")
    engine = SpecEngine(model, max_batch=1, max_len=8, draft_exit=1, draft_tokens=2)
    with pytest.raises(GenerationInputError, match="empty prompt"):
        engine.add_request([])
    with pytest.raises(GenerationInputError, match="max_len=8"):
        engine.add_request([1, 2, 3], max_new_tokens=7)
    with pytest.raises(GenerationInputError, match="vocabulary"):
        engine.add_request([1, 10_000])
    engine.add_request([1, 2], max_new_tokens=4)
    with pytest.raises(GenerationInputError, match="no free slot"):
        engine.add_request([1, 2], max_new_tokens=4)


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(policy="self_spec", thresholds=0.5), "thresholds"),
        (dict(policy="self_spec", graphs=True), "graphs"),
        (dict(policy="drex", draft_tokens=2), "draft_tokens"),
        (dict(policy="full", draft_exit=1), "draft_exit"),
        (dict(policy="speculative"), "unknown policy 'speculative'"),
    ],
)
def test_generate_refusals(options, names):
    model = _model("llama")
    with pytest.raises(GenerationInputError, match=names):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, **options)


def test_one_upload_and_one_read_per_step():
    """The CPU proxy of the device path: every step (prefill, draft, verify) makes one host-to-device
    copy of its plan and one read-back, whatever the batch, the k or the acceptances."""
    model = _model("llama")
    for k, source in ((1, {}), (4, {}), (3, dict(exit_source="trace", acceptance=0.8))):
        outs, engine = _run(model, _prompts(LENGTHS_8), DecodeSettings(max_new_tokens=NEW), 1, k, **source)
        stats = engine.stats
        assert stats.steps == stats.prefill_steps + stats.draft_steps + stats.verify_steps
        assert stats.uploads == stats.reads == stats.steps, stats
        assert stats.verify_steps < NEW - 1  # fewer verify passes than tokens: rounds emit several
