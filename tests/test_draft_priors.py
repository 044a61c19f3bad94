"""Calibrated priors per kind of text draft and the batch's allocation of verify positions
(`spec.priors`, issue 26 scope 4): the curves are counted exactly, the allocation takes the most
valuable positions while tokens per cost rise, and with them a greedy row still gets full depth's
tokens at batches 1 / 3 / 8 with requests joining mid-run, while sampled rows keep their own k, so a
row's tokens never depend on its neighbours."""

import json

import pytest
import torch
from test_ngram_drafting import check_joining_mid_run
from test_self_spec import SAMPLING, _full, _model, _prompts
from test_spec_engine import LENGTHS_8, NEW

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.cost import SpecCost
from drex_hf.generation.spec.engine import SpecEngine, model_drafting
from drex_hf.generation.spec.ngram import CorpusIndex, NgramIndex
from drex_hf.generation.spec.priors import (
    DraftPriors,
    VerifyCurve,
    allocate,
    fit_draft_priors,
    read_draft_priors,
    text_draft,
    write_draft_priors,
)

FLAT = VerifyCurve([(1, 10.0), (9, 10.0)])  # any number of positions costs what one does
STEEP = VerifyCurve([(1, 10.0), (2, 20.0)])  # each position costs a whole step


# ---------------------------------------------------------------- the curves
def test_text_draft_names_its_class():
    text = NgramIndex([1, 2, 3, 9, 1, 2, 3], max_n=3)
    assert text.lookup(2) == (3, [9, 1])
    assert text_draft(text, None, 2) == ("ngram3", [9, 1])
    assert text_draft(NgramIndex([5, 6, 5], max_n=3), None, 3) == ("ngram1", [6, 5])
    corpus = CorpusIndex([[7, 8, 4], [7, 8, 4]])
    assert text_draft(NgramIndex([1, 7]), corpus, 2) == ("corpus", [8, 4])
    assert text_draft(NgramIndex([1, 2]), None, 2) == (None, [])


def test_fit_counts_each_position_s_draft_against_the_answer():
    # prompt 1 2 3; the answer repeats it, then leaves it: at answer positions 1..5 the text drafts
    prompt, answer = [1, 2, 3], [1, 2, 3, 4, 5, 6]
    priors = fit_draft_priors([(prompt, answer)], None, k_max=3)
    # t=1 text 1 2 3 1: suffix (3, 1)? no; (1,) at 0 -> drafts 2 3 1 vs answer 2 3 4: 2 accepted (ngram1)
    # t=2 text ..1 2: (1, 2) at 0 -> 3 1 2 vs 3 4 5: 1 (ngram2); t=3 text ..1 2 3: (1, 2, 3) -> 1 2 3 vs 4 5 6: 0
    # t=4 (.. 3 4): no 4 before -> none; t=5: none
    assert priors.curves == {"ngram1": [1.0, 1.0, 0.0], "ngram2": [1.0, 0.0, 0.0], "ngram3": [0.0, 0.0, 0.0]}
    assert priors.fitted_on["rounds"] == {"ngram1": 1, "ngram2": 1, "ngram3": 1}
    assert priors.fitted_on["answers"] == 1 and priors.fitted_on["tokens"] == 6


def test_priors_file_round_trips_and_bad_ones_are_refused(tmp_path):
    priors = DraftPriors({"ngram3": [0.9, 0.8], "corpus": [0.3, 0.1]}, {"answers": 2})
    path = tmp_path / "draft_priors.json"
    write_draft_priors(path, priors, command="test")
    again = read_draft_priors(path)
    assert again.curves == priors.curves and again.fitted_on == {"answers": 2, "command": "test"}
    assert not (tmp_path / "draft_priors.json.partial").exists()
    for curves, match in (({"ngram3": [0.5, 0.7]}, "non-increasing"), ({"head": [0.5]}, "unknown draft class"),
                          ({"ngram2": [1.5]}, "non-increasing chances"), ({}, "non-empty")):  # fmt: skip
        path.write_text(json.dumps({"format": 1, "curves": curves}))
        with pytest.raises(GenerationInputError, match=match):
            read_draft_priors(path)
    path.write_text("{not json")
    with pytest.raises(GenerationInputError, match="cannot read the draft priors"):
        read_draft_priors(path)


# ---------------------------------------------------------------- the allocation
def test_allocation_takes_positions_while_tokens_per_cost_rise():
    priors = DraftPriors({"ngram3": [0.9, 0.8, 0.7, 0.1], "ngram1": [0.2, 0.05], "corpus": [0.3]})
    offers = [("ngram3", 4), ("ngram1", 2), ("corpus", 1)]
    assert allocate(offers, 0, 0, priors, FLAT) == [4, 2, 1]  # free positions: everything worth anything
    assert allocate(offers, 0, 0, priors, STEEP) == [0, 0, 0]  # each costs a step: nothing is worth it
    middle = VerifyCurve([(1, 10.0), (3, 10.0), (7, 16.0)])  # 2 more positions free, then 1.5 each
    assert allocate(offers, 0, 0, priors, middle) == [3, 0, 0]  # 3 rows + 2.4 tokens at 6 positions, 14.5 ms
    assert allocate([("ngram3", 2)], 5, 5, priors, VerifyCurve([(1, 10.0), (6, 10.0), (8, 12.0)])) == [2]
    assert allocate([], 3, 3, priors, FLAT) == []


def test_verify_curve_interpolates_and_refuses_nonsense():
    curve = VerifyCurve([(1, 10.0), (5, 30.0)])
    assert curve.cost(3) == pytest.approx(20.0) and curve.cost(9) == pytest.approx(50.0)
    for points in ([(1, 10.0)], [(0, 1.0), (2, 2.0)], [(1, 0.0), (2, 1.0)]):
        with pytest.raises(GenerationInputError, match="VerifyCurve"):
            VerifyCurve(points)


# ---------------------------------------------------------------- the engine
GENEROUS = DraftPriors({f"ngram{n}": [0.6, 0.5, 0.4, 0.3] for n in (1, 2, 3)})


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_allocated_greedy_drafting_equals_full_depth(kind):
    model = _model(kind, seed=3 if kind == "gpt2" else 1)
    everything = _prompts(LENGTHS_8)
    want = _full(model, everything, DecodeSettings(max_new_tokens=NEW))
    curve = VerifyCurve([(1, 10.0), (3, 10.0), (24, 40.0)])  # a few positions free, then each costs
    offered = kept = 0
    for size in (1, 3, 8):
        prompts, offset = (everything[3:4], 3) if size == 1 else (everything[:size], 0)
        engine = SpecEngine(model, max_batch=size, max_len=40, draft_tokens="adaptive", max_draft_tokens=4,
                            draft_source="ngram", draft_priors=GENEROUS, verify_curve=curve,
                            settings=DecodeSettings(max_new_tokens=NEW))  # fmt: skip
        for p in prompts:
            engine.add_request(p)
        outs = engine.run()
        for b in range(size):
            assert outs[b].tokens == want[offset + b], (kind, size, b)
        stats = engine.stats
        assert stats.allocated_rounds > 0 and stats.ngram_drafted == stats.allocated_drafts
        offered, kept = offered + stats.offered_drafts, kept + stats.allocated_drafts
        if size == 8:  # 8 rows: a position costs 1.4 ms against 17 ms for the step's 8 tokens: none pays
            assert stats.allocated_drafts == 0 < stats.offered_drafts
    assert 0 < kept < offered, (kept, offered)  # some offered drafts were verified, some trimmed away


def test_allocation_with_requests_joining_mid_run_equals_full_depth():
    model = _model("qwen2")
    cheap = SpecCost(draft=0.1, verify_fixed=10.0, verify_per_position=1.0, full=11.0)  # rows without a match draft
    engine = SpecEngine(model, max_batch=3, max_len=32, draft_tokens="adaptive", max_draft_tokens=3,
                        draft_source="mixed", draft_exit=1, draft_priors=GENEROUS, verify_curve=FLAT, cost=cheap,
                        settings=DecodeSettings(max_new_tokens=32))  # fmt: skip
    check_joining_mid_run(model, engine)
    assert engine.stats.allocated_rounds > 0 and engine.stats.draft_steps > 0  # text and head rounds both ran


def test_sampled_rows_keep_their_own_k_so_their_tokens_do_not_depend_on_the_batch():
    model = _model("qwen2")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    seeds = [11, 12, 13, 14, 15, 7, 8, 9]

    cost = SpecCost(draft=0.0, verify_fixed=10.0, verify_per_position=1.0, full=11.0)  # sampled rows' own k: 2

    def run(rows, curve):
        engine = SpecEngine(model, max_batch=len(rows), max_len=40, draft_tokens="adaptive", max_draft_tokens=3,
                            draft_source="ngram", draft_priors=GENEROUS, verify_curve=curve, cost=cost,
                            settings=settings)  # fmt: skip
        for i in rows:
            engine.add_request(prompts[i], seed=seeds[i])
        out = engine.run()
        return [out[j].tokens for j in range(len(rows))], engine

    batch, engine = run(list(range(8)), STEEP)
    assert engine.stats.allocated_rounds == 0 and engine.stats.ngram_drafted > 0  # drafted, never allocated
    assert [run([i], FLAT)[0][0] for i in range(8)] == batch


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"draft_tokens": 3, "draft_priors": GENEROUS}, GenerationInputError, "draft_tokens='adaptive'"),
        ({"draft_source": "head", "draft_exit": 1, "draft_priors": GENEROUS}, GenerationInputError, "ngram or mixed"),
        ({"draft_priors": {"ngram1": [0.5]}}, GenerationTypeError, "draft_priors must be a DraftPriors"),
        ({"draft_priors": GENEROUS, "verify_curve": [(1, 2.0)]}, GenerationTypeError, "verify_curve must be"),
        ({"verify_curve": FLAT}, GenerationInputError, "verify_curve applies with draft_priors"),
    ],
)
def test_engine_refusals_name_the_argument(options, error, match):
    options = {"draft_tokens": "adaptive", "draft_source": "ngram", **options}
    with pytest.raises(error, match=match):
        SpecEngine(_model("llama"), max_batch=1, max_len=16, **options)


def test_model_drafting_passes_priors_to_adaptive_text_drafting_only():
    model = _model("llama")
    model.draft_priors = GENEROUS
    assert model_drafting(model, "adaptive", "ngram")["draft_priors"] is GENEROUS
    assert model_drafting(model, "adaptive", "mixed")["draft_priors"] is GENEROUS
    assert "draft_priors" not in model_drafting(model, 4, "ngram")
    assert "draft_priors" not in model_drafting(model, "adaptive", "head")


def test_a_measured_curve_prices_positions_on_the_engine_s_own_slots():
    model = _model("llama")
    settings = DecodeSettings(max_new_tokens=4)
    engine = SpecEngine(model, max_batch=2, max_len=24, draft_tokens="adaptive", max_draft_tokens=4,
                        draft_source="ngram", draft_priors=GENEROUS, settings=settings)  # fmt: skip
    points = engine.verify_curve.points
    assert [p for p, _ in points] == [2, 4, 6, 8, 10] and all(ms > 0 for _, ms in points)
    engine.add_request(torch.tensor([1, 2, 1, 2, 1]))
    assert engine.run()[0].tokens == _full(model, [torch.tensor([1, 2, 1, 2, 1])], settings)[0]
