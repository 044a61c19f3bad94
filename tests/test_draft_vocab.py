"""Head drafts on a frequency-ranked vocabulary subset (`spec.vocab`, issue 26): the draft head
projects onto the subset only; verification and every emitted token use the whole vocabulary, so a
subset never changes the output (greedy: full depth's tokens; sampling: full depth's marginals and
a row's tokens independent of its batch), even a subset that holds none of the tokens full depth
writes."""

import pytest
import torch
from test_self_spec import CHI2_CRITICAL_0001, SAMPLING, _chi_square, _exact_marginals, _full, _model, _prompts
from test_spec_engine import LENGTHS_8, NEW, _run

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.generation.spec.vocab import (
    SubsetHead,
    coverage,
    rank_vocabulary,
    read_draft_vocab,
    subset_for_coverage,
    write_draft_vocab,
)


def _head_counts(engine):
    """(head drafts accepted, head drafts made): text drafts taken out."""
    stats = engine.stats
    return stats.accepted - stats.ngram_accepted, stats.drafted - stats.ngram_drafted


def test_subset_logits_are_the_heads_on_the_subset_and_minus_infinity_elsewhere():
    model = _model("llama")
    head = model.heads[1]
    ids = torch.tensor([7, 3, 50, 11])
    subset = SubsetHead(head, ids, model.arch.vocab_size)
    hidden = torch.randn(2, 5, model.arch.hidden_size)
    with torch.no_grad():
        full, sub = head.logits(hidden).float(), subset.logits(hidden)
    assert sub.shape == full.shape and len(subset) == 4
    torch.testing.assert_close(sub[..., ids], full[..., ids])
    rest = torch.ones(model.arch.vocab_size, dtype=torch.bool)
    rest[ids] = False
    assert torch.isneginf(sub[..., rest]).all()
    assert set(sub.argmax(-1).flatten().tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_subset_never_changes_greedy_output(kind):
    """At batches 1 / 3 / 8, head and mixed drafting, with rows ending at eos mid-run: the tokens are
    full depth's with a subset of the tokens full depth writes, a subset of none of them (no head
    draft is ever accepted) and the whole vocabulary (the same acceptances as no subset)."""
    model = _model(kind, seed=3 if kind == "gpt2" else 1)
    vocab = model.arch.vocab_size
    everything = _prompts(LENGTHS_8)
    plain = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, everything, plain)
    eos = tuple(sorted({tokens[5] for tokens in want[:3]}))
    ended = DecodeSettings(max_new_tokens=NEW, eos_token_ids=eos)
    want_ended = _full(model, everything, ended)
    written = rank_vocabulary(want)
    subsets = {
        "written": torch.tensor(written[: max(2, len(written) // 2)]),
        "none written": torch.tensor(sorted(set(range(vocab)) - set(written) - set(eos))),
        "all": torch.arange(vocab),
    }
    accepted, drafted = {}, {}
    for size in (1, 3, 8):
        prompts = everything[:size] if size != 1 else everything[3:4]
        offset = 3 if size == 1 else 0
        for source in ("head", "mixed"):
            for settings, expected in ((plain, want), (ended, want_ended)):
                base, engine = _run(model, prompts, settings, 1, 3, draft_source=source)
                assert [o.tokens for o in base] == expected[offset : offset + size]
                plain_counts = _head_counts(engine)
                for name, ids in subsets.items():
                    outs, engine = _run(model, prompts, settings, 1, 3, draft_source=source, draft_vocab=ids)
                    where = (kind, size, source, name, settings.eos_token_ids)
                    assert [o.tokens for o in outs] == expected[offset : offset + size], where
                    counts = _head_counts(engine)
                    accepted[name] = accepted.get(name, 0) + counts[0]
                    drafted[name] = drafted.get(name, 0) + counts[1]
                    if name == "none written":
                        assert counts[0] == 0, where  # drafted, never right
                    if name == "all":
                        assert counts == plain_counts, where
    assert accepted["written"] > 0 and drafted["none written"] > 0, (accepted, drafted)


def test_a_subset_keeps_sampling_batch_independent_and_full_depths_marginals():
    """Seeded rows are the same alone and batched; tokens 1 and 2 over 1500 seeds, 64 at a time,
    against their exact full-depth marginals (Pearson's chi-square at 0.001), with the head drafting
    among half the vocabulary (its proposal's support is the subset)."""
    model = _model("qwen2")
    prompts = _prompts(LENGTHS_8)
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    ids = torch.arange(0, model.arch.vocab_size, 2)
    seeds = [11, 12, 13, 14, 2**63 + 5, 7, 8, 9]
    outs, engine = _run(model, prompts, settings, 1, 3, seeds, draft_vocab=ids)
    assert 0 < engine.stats.accepted < engine.stats.drafted
    alone = [_run(model, [p], settings, 1, 3, [s], draft_vocab=ids)[0][0] for p, s in zip(prompts, seeds)]
    assert [o.tokens for o in alone] == [o.tokens for o in outs]

    vocab, n = 12, 1500
    model = _model("llama", vocab_size=vocab)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    sampled = DecodeSettings(max_new_tokens=3, **SAMPLING)
    exact = _exact_marginals(model, prompt, sampled, vocab)
    p1, p2 = exact["p1"], exact["p2"]
    subset = torch.tensor([0, 2, 3, 5, 7, 8])
    engine = SpecEngine(model, max_batch=64, max_len=16, draft_exit=1, draft_tokens=2, settings=sampled,
                        draft_vocab=subset)  # fmt: skip
    waiting = list(range(n))
    while waiting or engine.active:
        while waiting and engine.has_free_slot:
            engine.add_request(prompt, seed=waiting.pop(0))
        engine.step()
    results = [out for _, out in sorted(engine.finished.items())]
    assert 0.05 * engine.stats.drafted < engine.stats.accepted < 0.95 * engine.stats.drafted
    for position, probs in ((1, p1), (2, p2)):
        counts = torch.bincount(torch.tensor([o.tokens[position] for o in results]), minlength=vocab).tolist()
        statistic, df = _chi_square(counts, probs.tolist())
        assert statistic < CHI2_CRITICAL_0001[df], (position, statistic, df)
    outside = set(range(vocab)) - set(subset.tolist())
    assert sum(o.tokens[1] in outside for o in results) > 0.05 * n  # what the head never drafts still comes


@pytest.mark.parametrize("sample", [False, True])
def test_the_subset_replays_under_capture(sample):
    """Captured once per program and replayed (the CPU recorder): the same tokens as eager."""
    from test_capture import BUCKETS, _recorder

    model = _model("llama")
    prompts = _prompts(LENGTHS_8[:6])
    settings = DecodeSettings(max_new_tokens=NEW, **(SAMPLING if sample else {}))
    seeds = [7 + i for i in range(6)]
    options = dict(max_batch=6, max_len=40, draft_exit=1, draft_tokens=3, settings=settings,
                   draft_vocab=torch.arange(0, model.arch.vocab_size, 3))  # fmt: skip
    holder = {}
    engine = SpecEngine(model, **options, graphs=_recorder(holder), static_shapes=True, buckets=BUCKETS)
    holder["engine"] = engine
    eager = SpecEngine(model, **options)
    for each in (engine, eager):
        for prompt, seed in zip(prompts, seeds):
            each.add_request(prompt, seed=seed if sample else None)
        each.run()
    assert engine.runner.graphs.replays > len(engine.runner.graphs.graphs) and engine.stats.accepted > 0
    assert [engine.finished[i].tokens for i in range(6)] == [eager.finished[i].tokens for i in range(6)]
    if not sample:
        assert [eager.finished[i].tokens for i in range(6)] == _full(model, prompts, settings)


# ---------------------------------------------------------------- choosing, saving, loading
def test_the_smallest_ranked_prefix_that_covers_the_target():
    answers = [[1, 1, 1, 2, 2, 3], [1, 2, 4], [1, 1, 2, 5], [1, 9, 9, 9]]
    assert rank_vocabulary(answers[:3]) == [1, 2, 3, 4, 5]  # counts 6, 4, 1, 1, 1: ties by id
    chosen = subset_for_coverage(answers, 0.75)
    assert chosen["ranked_on"] == 3 and chosen["checked_on"] == 1
    assert chosen["ids"] == [1, 2] and chosen["size"] == 2  # 10 of 13 tokens >= 0.75
    assert chosen["coverage_fit"] == pytest.approx(10 / 13)
    assert chosen["coverage_held_out"] == pytest.approx(coverage([1, 2], [[1, 9, 9, 9]])) == 0.25
    assert subset_for_coverage(answers, 1.0)["ids"] == [1, 2, 3, 4, 5]
    for bad in (0.0, 1.5, True, "0.9"):
        with pytest.raises(GenerationInputError, match="coverage"):
            subset_for_coverage(answers, bad)


def test_the_vocabulary_file_round_trips_and_bad_ones_are_refused(tmp_path):
    path = tmp_path / "draft_vocab.safetensors"
    write_draft_vocab(path, {"ids": [5, 2, 9], "size": 3})
    assert read_draft_vocab(path, 10).tolist() == [5, 2, 9]
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(GenerationInputError, match="outside"):
        read_draft_vocab(path, 8)
    path.write_bytes(b"not safetensors")
    with pytest.raises(GenerationInputError, match="cannot read the draft vocabulary"):
        read_draft_vocab(path, 10)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([1, 2], GenerationTypeError, "tensor of token ids"),
        (torch.tensor([[1, 2]]), GenerationInputError, "1-D"),
        (torch.tensor([0.5]), GenerationInputError, "integer"),
        (torch.tensor([], dtype=torch.long), GenerationInputError, "non-empty"),
        (torch.tensor([1, 999]), GenerationInputError, "outside"),
        (torch.tensor([1, 1]), GenerationInputError, "more than once"),
    ],
)
def test_bad_subsets_are_refused_naming_what_is_wrong(ids, error, match):
    model = _model("llama")
    with pytest.raises(error, match=match):
        SpecEngine(model, max_batch=1, max_len=16, draft_exit=1, draft_tokens=2, draft_vocab=ids)


def test_a_saved_vocabulary_is_loaded_and_generate_drafts_among_it(tmp_path):
    from drex_hf import EarlyExitModelForCausalLM

    model = _model("llama")
    prompts = _prompts(LENGTHS_8[:2])
    settings = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, settings)
    model.save_pretrained(tmp_path)
    written = sorted(set(range(model.arch.vocab_size)) - set(rank_vocabulary(want)))
    write_draft_vocab(tmp_path / "draft_vocab.safetensors", {"ids": written})
    loaded = EarlyExitModelForCausalLM.from_pretrained(tmp_path, base_model=model.base_model)
    assert loaded.draft_vocab.tolist() == written
    batch = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True,
                                           padding_side="left")  # fmt: skip
    out = loaded.generate(batch, attention_mask=mask, policy="self_spec", draft_exit=1, draft_tokens=3,
                          max_new_tokens=NEW, return_dict_in_generate=True)  # fmt: skip
    width = batch.shape[1]
    assert [out.sequences[b, width:].tolist() for b in range(2)] == want
    assert out.stats.drafted > 0 and out.stats.accepted == 0  # the head drafted among what full depth never writes
