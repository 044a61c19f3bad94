"""The self-speculative reference decoder (issue 19): greedy equals full depth token for token, the
acceptance counts equal a teacher-forced check, and seeded sampling is reproducible, batch independent
and distributed as full depth's sampling (a chi-square test on a tiny vocabulary)."""

import math

import pytest
import torch
from conftest import make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.reference import generate_self_spec

EXITS = (0, 1, 2)
LENGTHS = [5, 9, 3, 12, 1]  # prompts of different lengths
NEW = 13  # not a multiple of 2 or 4


def _model(kind, seed=1, **overrides):
    """A tiny model with exits after layers 0, 1, 2 whose head norms are perturbed (seeded), so that
    drafts are sometimes accepted and sometimes rejected. GPT-2's tied embeddings, scaled by make_tiny,
    would make it repeat its input token: it is untied here."""
    if kind == "gpt2":
        overrides.setdefault("tie_word_embeddings", False)
    config = EarlyExitConfig(exit_layers=list(EXITS), thresholds=math.inf, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind, seed=seed, **overrides), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.heads:
            head.norm.weight.mul_(1 + 0.5 * torch.randn(head.norm.weight.shape, generator=gen))
    return model


def _prompts(lengths=LENGTHS, seed=0):
    ids, mask = padded_batch(lengths, seed=seed)
    return [ids[b, mask[b].bool()] for b in range(len(lengths))]


def _full(model, prompts, settings, seeds=None):
    return [r.tokens for r in generate_reference(model, prompts, settings, [math.inf] * len(EXITS), seeds)]


def _eos_cut_draft(out, k, eos):
    """Whether the request ended at an eos that was an accepted draft before the k-th draft position."""
    return bool(out.drafted) and out.tokens[-1] in eos and 0 < out.accepted[-1] == out.drafted[-1] < k


# ---------------------------------------------------------------- (a) greedy equals full depth
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_full_depth(kind):
    model = _model(kind)
    prompts = _prompts()
    plain = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, plain)
    # eos: the tokens full depth emits at position 5 of the first rows, so those rows end mid-run
    eos = tuple(sorted({tokens[5] for tokens in want[:3]}))
    ended = DecodeSettings(max_new_tokens=NEW, eos_token_ids=eos)
    want_ended = _full(model, prompts, ended)
    assert any(len(tokens) < NEW for tokens in want_ended)
    accepted = rejected = cut = 0
    for draft_exit in EXITS:
        for k in (1, 2, 4):
            for settings, expected in ((plain, want), (ended, want_ended)):
                outs = generate_self_spec(model, prompts, settings, draft_exit, k)
                for b, out in enumerate(outs):
                    assert out.tokens == expected[b], (kind, draft_exit, k, b, settings.eos_token_ids)
                    assert all(0 <= a <= d <= k for a, d in zip(out.accepted, out.drafted))
                    accepted += sum(out.accepted)
                    rejected += sum(d - a for d, a in zip(out.drafted, out.accepted))
                    cut += settings is ended and _eos_cut_draft(out, k, set(eos))
    assert accepted > 0 and rejected > 0, (accepted, rejected)
    assert cut > 0, "no row ended at an eos that cut its draft short"


def test_greedy_tiny_budgets():
    """max_new_tokens 1, 2 (no room to draft) and 3 equal full depth; 1 runs no verify round, 2 drafts
    nothing, 3 drafts one token first."""
    model = _model("llama")
    prompts = _prompts([4, 7])
    for new in (1, 2, 3):
        settings = DecodeSettings(max_new_tokens=new)
        outs = generate_self_spec(model, prompts, settings, 1, 4)
        assert [o.tokens for o in outs] == _full(model, prompts, settings)
        assert all(o.drafted[:1] == ([] if new == 1 else [new - 2]) for o in outs)


# ---------------------------------------------------------------- (b) teacher-forced acceptance counts
def _teacher_forced(model, prompt, tokens, draft_exit, k, budget):
    """Per verify round (drafted, accepted), from full depth's greedy tokens and the draft head's
    greedy token at each position given full depth's prefix (one forward with exit logits)."""
    sequence = torch.cat([prompt, torch.tensor(tokens)]).unsqueeze(0)
    with torch.no_grad():
        exit_logits = model(input_ids=sequence, output_exit_logits=True).exit_logits[EXITS.index(draft_exit)]
    # draft[m]: the head's token m given prompt + tokens[:m]
    draft = exit_logits[0, len(prompt) - 1 :].argmax(dim=-1).tolist()
    rounds, index = [], 1
    while index < budget:
        drafted = min(k, budget - index - 1)
        accepted = 0
        while accepted < drafted and draft[index + accepted] == tokens[index + accepted]:
            accepted += 1
        rounds.append((drafted, accepted))
        index += accepted + 1
    return rounds


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_acceptance_counts_equal_teacher_forced(kind):
    model = _model(kind)
    prompts = _prompts()
    settings = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, settings)
    for draft_exit in EXITS:
        for k in (1, 2, 4):
            outs = generate_self_spec(model, prompts, settings, draft_exit, k)
            for prompt, tokens, out in zip(prompts, want, outs):
                rounds = _teacher_forced(model, prompt, tokens, draft_exit, k, NEW)
                assert list(zip(out.drafted, out.accepted)) == rounds, (kind, draft_exit, k)
                # every input position runs all L layers once: drafted ones 0..e, then the rest
                assert out.layers == [(d + 1) * model.num_layers for d in out.drafted]
                assert out.layers_per_token == sum(out.layers) / (NEW - 1)


# ---------------------------------------------------------------- (c) seeded sampling
SAMPLING = dict(do_sample=True, temperature=2.0, top_k=9)


def test_sampling_reproducible_and_batch_independent():
    model = _model("qwen2")
    prompts = _prompts()
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING)
    seeds = [11, 12, 13, 14, 2**63 + 5]
    outs = generate_self_spec(model, prompts, settings, 1, 3, seeds)
    again = generate_self_spec(model, prompts, settings, 1, 3, seeds)
    assert [o.tokens for o in outs] == [o.tokens for o in again]
    alone = [generate_self_spec(model, [p], settings, 1, 3, [s])[0] for p, s in zip(prompts[::-1], seeds[::-1])]
    assert [o.tokens for o in outs] == [o.tokens for o in alone[::-1]]
    assert len({tuple(o.tokens) for o in generate_self_spec(model, [prompts[0]] * 4, settings, 1, 3, [1, 2, 3, 4])}) > 1
    # token 0 (the prefill's) is full depth's own draw for the same seed: the FULL sub-stream
    assert [o.tokens[0] for o in outs] == [t[0] for t in _full(model, prompts, settings, seeds)]
    drafted = sum(sum(o.drafted) for o in outs)
    accepted = sum(sum(o.accepted) for o in outs)
    assert 0 < accepted < drafted


# Chi-square critical values at significance 0.001 by degrees of freedom (standard tables).
CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
                      9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697}  # fmt: skip


def _chi_square(counts, probs):
    """Pearson's statistic of `counts` against `probs` (cells with expected count < 5 pooled, the pool
    merged into the smallest cell if still < 5) and its degrees of freedom."""
    n = sum(counts)
    cells = sorted(zip((p * n for p in probs), counts))
    pooled = [sum(e for e, _ in cells if e < 5), sum(c for e, c in cells if e < 5)]
    kept = [[e, c] for e, c in cells if e >= 5]
    if pooled[0] > 0:
        if pooled[0] < 5:
            kept[0] = [kept[0][0] + pooled[0], kept[0][1] + pooled[1]]
        else:
            kept.append(pooled)
    else:
        assert pooled[1] == 0, "tokens of probability 0 under full depth were drawn"
    return sum((c - e) ** 2 / e for e, c in kept), len(kept) - 1


def _exact_marginals(model, prompt, settings, vocab):
    """Full depth's exact distributions of new tokens 1 and 2 after `prompt` under `settings`' warpers
    (every continuation of 1 and 2 tokens, one forward each): p0, p1_given [t0, t1], p2_given
    [t0, t1, t2], p1, p2, and `warped` (logits -> the warped distribution)."""
    warpers = settings.warpers()

    def warped(logits):
        scores = logits.float()
        for warper in warpers:
            scores = warper(scores)
        return torch.softmax(scores, dim=-1).double()

    with torch.no_grad():
        ones = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
        twos = torch.cat([ones.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab).unsqueeze(1)], dim=1)
        p0 = warped(model.base_model(input_ids=prompt.unsqueeze(0)).logits[0, -1])
        p1_given = warped(model.base_model(input_ids=ones).logits[:, -1])
        p2_given = warped(model.base_model(input_ids=twos).logits[:, -1]).reshape(vocab, vocab, vocab)
    return {"p0": p0, "p1_given": p1_given, "p2_given": p2_given, "p1": p0 @ p1_given,
            "p2": torch.einsum("a,ab,abc->c", p0, p1_given, p2_given), "warped": warped, "ones": ones}  # fmt: skip


def test_sampling_distribution_matches_full_depth(decode=generate_self_spec):
    """Tokens 1 and 2 (the drafted ones: max_new_tokens 4, k 2) over many seeds, against their exact
    marginal distributions under full-depth sampling, by Pearson's chi-square at significance 0.001.
    `decode`: the decoder under test (test_spec_engine.py passes the batched engine)."""
    vocab, n = 12, 1500
    model = _model("llama", vocab_size=vocab)
    prompt = torch.tensor([3, 7, 5, 9])
    settings = DecodeSettings(max_new_tokens=4, **SAMPLING)
    exact = _exact_marginals(model, prompt, settings, vocab)
    p0, p1_given, p2_given, p1, p2 = (exact[k] for k in ("p0", "p1_given", "p2_given", "p1", "p2"))
    with torch.no_grad():  # the draft head's distribution of token 1, at exit 0
        q1_given = exact["warped"](model(input_ids=exact["ones"], output_exit_logits=True).exit_logits[0][:, -1])
    outs = decode(model, [prompt] * n, settings, 0, 2, seeds=list(range(n)))
    assert all(o.drafted[0] == 2 for o in outs)
    rejected = sum(o.accepted[0] < 2 for o in outs)
    assert 0.1 * n < rejected < 0.9 * n  # both branches of the acceptance rule are well exercised
    # every token drawn is inside full depth's top-k for its own prefix
    assert all(p1_given[o.tokens[0], o.tokens[1]] > 0 and p2_given[tuple(o.tokens[:3])] > 0 for o in outs)
    for position, probs in ((1, p1), (2, p2)):
        counts = torch.bincount(torch.tensor([o.tokens[position] for o in outs]), minlength=vocab).tolist()
        statistic, df = _chi_square(counts, probs.tolist())
        assert statistic < CHI2_CRITICAL_0001[df], (position, statistic, df)
    # power: a decoder that emitted its drafts unverified would have token 1 distributed as q1; the
    # expected statistic then (the non-centrality n * sum (q - p)^2 / p) far exceeds the critical value
    q1 = p0 @ q1_given
    noncentrality = n * float(((q1 - p1) ** 2 / p1).sum())
    assert noncentrality > 3 * CHI2_CRITICAL_0001[vocab - 1], noncentrality


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kwargs, error, names",
    [
        (dict(draft_exit=3), GenerationInputError, "draft_exit"),
        (dict(draft_exit=1.0), GenerationTypeError, "draft_exit"),
        (dict(draft_tokens=0), GenerationInputError, "draft_tokens"),
        (dict(draft_tokens=True), GenerationTypeError, "draft_tokens"),
        (dict(seeds=[1]), GenerationInputError, "seeds"),
        (dict(settings=DecodeSettings(max_new_tokens=4, repetition_penalty=1.2)), GenerationInputError, "repetition"),
    ],
)
def test_refusals_name_the_argument(kwargs, error, names):
    model = _model("llama")
    call = dict(settings=DecodeSettings(max_new_tokens=4), draft_exit=1, draft_tokens=2, seeds=None)
    call.update(kwargs)
    with pytest.raises(error, match=names):
        generate_self_spec(model, _prompts([3, 4]), **call)
