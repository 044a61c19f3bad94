"""Drafts from a request's own text (`draft_source="ngram"`) and per-row mixing with the exit head
(`"mixed"`), issue 26: the index proposes what followed the latest earlier occurrence of the longest
matching suffix; greedy output equals full depth token for token on tiny Llama / Qwen2 / GPT-2 at
batches 1 / 3 / 8, with rows ending at eos inside a draft and requests joining mid-run; seeded
sampling keeps full depth's marginals (chi-square) and a row's tokens do not depend on its batch."""

import pytest
import torch
from test_self_spec import CHI2_CRITICAL_0001, SAMPLING, _chi_square, _exact_marginals, _full, _model, _prompts
from test_spec_engine import LENGTHS_8, NEW, _run

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.generation.spec.ngram import NgramIndex

SOURCES = (("ngram", None), ("mixed", 1))


def _ended_on_an_accepted_draft(out, eos):
    """Whether the request's last token was an eos its last round drafted and full depth accepted:
    every round emits its accepted drafts and one token of full depth's, except such a last round."""
    if not out.drafted or out.tokens[-1] not in eos or not out.accepted[-1]:
        return False
    return len(out.tokens) == 1 + sum(a + 1 for a in out.accepted[:-1]) + out.accepted[-1]


# ---------------------------------------------------------------- the index
def test_index_drafts_what_followed_the_latest_longest_match():
    text = NgramIndex([5, 6, 7, 8, 5, 6, 9, 1, 6], max_n=3)
    assert text.draft(3) == [9, 1, 6]  # suffix (6,): latest earlier 6 is at 5, followed by 9 1 6
    text.append(9)  # suffix (6, 9) occurred at 5..6: what followed it, up to the end of the text
    assert text.draft(4) == [1, 6, 9]
    assert text.draft(1) == [1]
    tokens = [1, 2, 3, 9, 2, 3, 4, 1, 2, 3]
    assert NgramIndex(tokens, max_n=3).draft(2) == [9, 2]  # the longest suffix first: (1, 2, 3) at 0..2
    assert NgramIndex(tokens, max_n=2).draft(2) == [4, 1]  # bigrams: the latest (2, 3) is at 4..5
    assert NgramIndex([4, 5, 6]).draft(3) == []  # the suffix itself is never its own match
    assert NgramIndex([4, 4]).draft(0) == []
    assert NgramIndex([]).draft(2) == []


@pytest.mark.parametrize("sizes, match", [((0, 2), "ngram_min"), ((2, 1), "must not exceed"), ((1, True), "ngram_max")])
def test_index_refuses_bad_sizes(sizes, match):
    with pytest.raises(GenerationInputError, match=match):
        NgramIndex([1, 2], min_n=sizes[0], max_n=sizes[1])


# ---------------------------------------------------------------- greedy equals full depth
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_full_depth_batched(kind):
    model = _model(kind, seed=3 if kind == "gpt2" else 1)  # seed 1's tiny GPT-2 never repeats what it read
    everything = _prompts(LENGTHS_8)
    plain = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, everything, plain)
    eos = tuple(sorted({tokens[5] for tokens in want[:3]}))  # rows 0..2 end mid-run
    ended = DecodeSettings(max_new_tokens=NEW, eos_token_ids=eos)
    want_ended = _full(model, everything, ended)
    seen = {"ngram": [0, 0], "head": [0, 0]}  # per source: drafts accepted, rejected
    cut = 0
    for size in (1, 3, 8):
        prompts = everything[:size] if size != 1 else everything[3:4]
        offset = 3 if size == 1 else 0
        for source, draft_exit in SOURCES:
            for k in (2, 4, "adaptive"):
                for settings, expected in ((plain, want), (ended, want_ended)):
                    outs, engine = _run(model, prompts, settings, draft_exit, k, draft_source=source)
                    for b, out in enumerate(outs):
                        where = (kind, size, source, k, b, settings.eos_token_ids)
                        assert out.tokens == expected[offset + b], where
                        assert out.exit_layers == [model.num_layers - 1] * len(out.tokens)
                        cut += settings is ended and _ended_on_an_accepted_draft(out, set(eos))
                    stats = engine.stats
                    seen["ngram"][0] += stats.ngram_accepted
                    seen["ngram"][1] += stats.ngram_drafted - stats.ngram_accepted
                    seen["head"][0] += stats.accepted - stats.ngram_accepted
                    seen["head"][1] += stats.drafted - stats.accepted - stats.ngram_drafted + stats.ngram_accepted
                    if source == "ngram":
                        assert stats.draft_steps == 0 and stats.drafted == stats.ngram_drafted
    assert all(a > 0 and r > 0 for a, r in seen.values()), seen  # both sources drafted, hit and missed
    assert cut > 0, "no row ended at an eos that was an accepted draft"


def test_mixed_rounds_take_the_text_where_it_matches_and_the_head_elsewhere():
    model = _model("llama")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW)
    outs, engine = _run(model, prompts, settings, 1, 3, draft_source="mixed")
    stats = engine.stats
    assert 0 < stats.ngram_rounds < stats.rounds and stats.draft_steps > 0
    assert 0 < stats.fresh_verify_steps < stats.verify_steps  # passes with and without text drafts ran
    assert [o.tokens for o in outs] == _full(model, prompts, settings)


JOINING_BUDGETS = [NEW, 4, NEW, 9, 2, NEW, 6, NEW]


def check_joining_mid_run(model, engine):
    """Feed eight prompts with their own budgets into `engine` (3 slots) as slots free up; each
    request's tokens must equal full depth's alone."""
    prompts, budgets = _prompts(LENGTHS_8, seed=3), JOINING_BUDGETS
    waiting, ids = list(range(len(prompts))), {}
    while waiting or engine.active:
        while waiting and engine.has_free_slot:
            i = waiting.pop(0)
            ids[engine.add_request(prompts[i], max_new_tokens=budgets[i])] = i
        engine.step()
    for rid, out in engine.finished.items():
        i = ids[rid]
        assert out.tokens == _full(model, [prompts[i]], DecodeSettings(max_new_tokens=budgets[i]))[0], i


def test_requests_joining_mid_run_equal_full_depth():
    model = _model("qwen2")
    for source, draft_exit in SOURCES:
        engine = SpecEngine(model, max_batch=3, max_len=32, draft_exit=draft_exit, draft_tokens=3,
                            draft_source=source, settings=DecodeSettings(max_new_tokens=32))  # fmt: skip
        check_joining_mid_run(model, engine)
        assert engine.stats.ngram_rounds > 0, source


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("source, draft_exit", SOURCES)
def test_sampling_is_batch_independent(source, draft_exit):
    """A row's seeded tokens are the same alone, in the batch of eight, and in a reversed pair."""
    model = _model("qwen2")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    seeds = [11, 12, 13, 14, 2**63 + 5, 7, 8, 9]
    outs, engine = _run(model, prompts, settings, draft_exit, 3, seeds, draft_source=source)
    assert engine.stats.ngram_drafted > 0 and 0 <= engine.stats.ngram_accepted < engine.stats.ngram_drafted
    alone = [_run(model, [p], settings, draft_exit, 3, [s], draft_source=source)[0][0] for p, s in zip(prompts, seeds)]
    assert [o.tokens for o in alone] == [o.tokens for o in outs]
    pair, _ = _run(model, prompts[:2][::-1], settings, draft_exit, 3, seeds[:2][::-1], draft_source=source)
    assert [o.tokens for o in pair[::-1]] == [o.tokens for o in outs[:2]]


def test_sampling_with_text_drafts_keeps_full_depths_marginals():
    """Tokens 1 and 2 over 1500 seeds, batched 64 at a time, against their exact full-depth marginals
    (Pearson's chi-square at 0.001). The prompt holds every token once, so every first token has a
    match and tokens 1 and 2 are drafted from the prompt: accepted with probability p(draft), else
    drawn from p without the draft."""
    vocab, n = 12, 1500
    model = _model("llama", vocab_size=vocab)
    prompt = torch.randperm(vocab, generator=torch.Generator().manual_seed(4))
    settings = DecodeSettings(max_new_tokens=4, **SAMPLING)
    exact = _exact_marginals(model, prompt, settings, vocab)
    p0, p1, p2 = exact["p0"], exact["p1"], exact["p2"]
    engine = SpecEngine(model, max_batch=64, max_len=16, draft_tokens=2, draft_source="ngram", settings=settings)
    ids, waiting = {}, list(range(n))
    while waiting or engine.active:
        while waiting and engine.has_free_slot:
            i = waiting.pop(0)
            ids[engine.add_request(prompt, seed=i)] = i
        engine.step()
    outs = [out for _, out in sorted(engine.finished.items())]
    assert all(o.drafted[0] >= 1 for o in outs if o.tokens[0] != prompt[-1])
    accepted = sum(o.accepted[0] >= 1 for o in outs if o.drafted[0])  # the first draft, with probability p
    rejected = sum(o.accepted[0] == 0 for o in outs if o.drafted[0])
    assert accepted > 0.04 * n and rejected > 0.5 * n, (accepted, rejected)  # both branches well exercised
    for position, probs in ((1, p1), (2, p2)):
        counts = torch.bincount(torch.tensor([o.tokens[position] for o in outs]), minlength=vocab).tolist()
        statistic, df = _chi_square(counts, probs.tolist())
        assert statistic < CHI2_CRITICAL_0001[df], (position, statistic, df)
    # power: emitting the text's drafts unverified puts token 1 where the prompt says, far from p1
    follows = {int(prompt[i]): int(prompt[i + 1]) for i in range(vocab - 1)}
    q1 = torch.zeros(vocab, dtype=torch.float64)
    for t0 in range(vocab):
        q1[follows.get(t0, t0)] += p0[t0]
    assert n * float(((q1 - p1) ** 2 / p1).sum()) > 3 * CHI2_CRITICAL_0001[vocab - 1]


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(draft_source="lookup"), "draft_source"),
        (dict(draft_source="mixed", draft_exit=None), "needs draft_exit"),
        (dict(draft_source="ngram", ngram_min=3, ngram_max=2), "ngram_min"),
        (dict(draft_source="ngram", ngram_prior=1.0), "ngram_prior"),
    ],
)
def test_engine_refusals_name_the_argument(options, match):
    model = _model("llama")
    call = dict(max_batch=2, max_len=16, draft_exit=1, draft_tokens=2)
    call.update(options)
    with pytest.raises(GenerationInputError, match=match):
        SpecEngine(model, **call)


# ---------------------------------------------------------------- the model's own answers
def test_corpus_drafts_the_most_frequent_continuation_longest_context_first(tmp_path):
    from drex_hf.generation.spec.ngram import CorpusIndex, read_draft_corpus, write_draft_corpus

    answers = [[1, 2, 3, 4], [1, 2, 3, 4], [9, 2, 3, 7], [5, 2, 3, 7], [5, 2, 3, 7]]
    corpus = CorpusIndex(answers, min_n=2, max_n=3, min_count=2)
    assert corpus.draft([8, 1, 2, 3], 2) == [4]  # (1, 2, 3) -> 4 twice; (2, 3, 4) was never followed
    assert corpus.draft([8, 2, 3], 2) == [7]  # (2, 3) -> 7 three times, 4 twice
    assert corpus.draft([9, 2, 3], 2) == [7]  # (9, 2, 3) seen once: below min_count, so (2, 3) decides
    assert corpus.draft([6, 6], 3) == [] and corpus.draft([1], 3) == []
    path = tmp_path / "draft_corpus.safetensors"
    write_draft_corpus(path, answers)
    assert read_draft_corpus(path).draft([8, 2, 3], 2) == [7]
    path.write_bytes(b"not safetensors")
    with pytest.raises(GenerationInputError, match="cannot read the draft corpus"):
        read_draft_corpus(path)


def test_rows_without_a_match_draft_from_the_corpus_and_keep_full_depths_tokens():
    from drex_hf.generation.spec.ngram import CorpusIndex

    model = _model("llama")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, settings)
    others = _full(model, _prompts(LENGTHS_8, seed=5), DecodeSettings(max_new_tokens=24))  # its own answers
    corpus = CorpusIndex(others + want[:2], min_n=1, min_count=1)
    plain, _ = _run(model, prompts, settings, None, 4, draft_source="ngram")
    outs, engine = _run(model, prompts, settings, None, 4, draft_source="ngram", draft_corpus=corpus)
    assert [o.tokens for o in outs] == want
    more = sum(map(sum, (o.drafted for o in outs))) - sum(map(sum, (o.drafted for o in plain)))
    assert more > 0 and engine.stats.ngram_accepted > 0  # the corpus drafted where the text had no match
    sampled = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    seeds = list(range(8))
    batch, _ = _run(model, prompts, sampled, None, 3, seeds, draft_source="ngram", draft_corpus=corpus)
    alone = [_run(model, [p], sampled, None, 3, [s], draft_source="ngram", draft_corpus=corpus)[0][0]
             for p, s in zip(prompts, seeds)]  # fmt: skip
    assert [o.tokens for o in alone] == [o.tokens for o in batch]
    with pytest.raises(GenerationTypeError, match="draft_corpus"):
        SpecEngine(model, max_batch=1, max_len=16, draft_source="ngram", draft_corpus=[[1, 2]])
