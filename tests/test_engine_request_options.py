"""The engine's per-request options a server passes on (issue 27): each token's logprob under the
distribution it was picked from (`logprobs=`), OpenAI's presence and frequency penalties per row, a
request's own `sla_tpot_ms` reaching the drex scheduler, and per-request sampling under self_spec."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import covering_thresholds, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.sampling import RequestSampling
from drex_hf.generation.scheduler import CostModel
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.generation.state import TokenLogprob

LENGTHS = [5, 9, 3]
NEW = 10
TOL = 1e-4


def _model(kind: str) -> EarlyExitModelForCausalLM:
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=[0.12, 0.2, 0.3], confidence="max_prob", head="norm")
    return EarlyExitModelForCausalLM.from_base(make_tiny(kind), config)


@pytest.fixture(scope="module")
def model():
    return _model("llama")


@pytest.fixture(scope="module")
def prompts():
    ids, mask = padded_batch(LENGTHS)
    return [ids[b, mask[b].bool()] for b in range(len(LENGTHS))]


@pytest.fixture(scope="module")
def thresholds(model, prompts):
    """Thresholds under which greedy tokens leave at every exit point."""
    found, _ = covering_thresholds(model, prompts, [(DecodeSettings(max_new_tokens=NEW), None)])
    return found


def _hf(model, prompt, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(torch.cat([prompt, torch.tensor(tokens)])[None]).logits[0].float().log_softmax(-1)


def _drex(model, policy="full", **kwargs) -> DrexEngine:
    if policy == "drex":
        kwargs.setdefault("cost_model", CostModel.constant(4))
    return DrexEngine(model, max_batch=3, max_len=40, policy=policy, settings=DecodeSettings(max_new_tokens=NEW),
                      per_request_sampling=True, **kwargs)  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_full_depth_logprobs_equal_hf_log_softmax(kind, prompts):
    model = _model(kind)
    seen: dict[int, list] = {}
    engine = _drex(model, logprobs=4)
    rids = [engine.add_request(p, sampling=RequestSampling(0.0 if i else 0.9), seed=3, logprobs=4,
                               callback=lambda r, t, layer, e: seen.setdefault(r, []).append(e))
            for i, p in enumerate(prompts)]  # fmt: skip
    done = engine.run()
    for rid, prompt in zip(rids, prompts):
        out = done[rid]
        assert out.logprobs == seen[rid] and len(out.logprobs) == len(out.tokens)
        reference = _hf(model, prompt, out.tokens)
        for j, (token, entry) in enumerate(zip(out.tokens, out.logprobs)):
            row = reference[len(prompt) - 1 + j]
            assert abs(entry.logprob - row[token].item()) < TOL
            assert [t for t, _ in entry.top] == row.topk(4).indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(row.topk(4).values.tolist(), abs=TOL)


def test_an_exited_tokens_logprob_is_its_exit_heads(model, prompts, thresholds):
    """Greedy under drex: every token is the argmax of the distribution its logprob is from (its exit
    head's when it exited), tokens left at every exit point, and the logprobs are the same alone
    and in a batch (within float noise)."""
    engine = _drex(model, "drex", logprobs=2, thresholds=thresholds)
    rids = [engine.add_request(p, sampling=RequestSampling(0.0), logprobs=2) for p in prompts]
    together = engine.run()
    layers = {layer for rid in rids for layer in together[rid].exit_layers}
    assert layers == {0, 1, 2, 3}, layers
    for rid, prompt in zip(rids, prompts):
        out = together[rid]
        for token, entry in zip(out.tokens, out.logprobs):
            assert entry.top[0] == (token, pytest.approx(entry.logprob, abs=1e-6))
        alone = _drex(model, "drex", logprobs=2, thresholds=thresholds)
        one = alone.add_request(prompt, sampling=RequestSampling(0.0), logprobs=2)
        mine = alone.run()[one]
        assert mine.tokens == out.tokens and mine.exit_layers == out.exit_layers
        # the same distributions, up to float noise of the batch's shapes
        assert [e.logprob for e in mine.logprobs] == pytest.approx([e.logprob for e in out.logprobs], abs=1e-5)
    # an exited token's logprob is not full depth's (HF's) at that position
    out, prompt = together[rids[0]], prompts[0]
    first = next(j for j, layer in enumerate(out.exit_layers) if layer < 3)
    hf = _hf(model, prompt, out.tokens)[len(prompt) - 1 + first, out.tokens[first]].item()
    assert abs(out.logprobs[first].logprob - hf) > TOL


def test_logprobs_are_refused_past_the_engines_capacity(model, prompts):
    with pytest.raises(GenerationInputError, match="engine built with logprobs"):
        _drex(model).add_request(prompts[0], logprobs=1)
    with pytest.raises(GenerationInputError, match="more than this engine keeps"):
        _drex(model, logprobs=2).add_request(prompts[0], logprobs=3)
    with pytest.raises(GenerationInputError, match=r"\[0, 20\]"):
        _drex(model, logprobs=21)


def test_token_logprob_keeps_the_first_top_of_a_row():
    entry = TokenLogprob.from_row([-0.5, -0.1, -0.5, -2.0, 7.0, 3.0, 9.0], 2)
    assert entry == TokenLogprob(-0.5, ((7, -0.1), (3, -0.5)))


@pytest.mark.parametrize("policy", ["full", "drex"])
def test_penalties_are_per_row_and_equal_alone_and_in_a_batch(model, prompts, policy):
    params = [RequestSampling(0.0, presence_penalty=1.5, frequency_penalty=0.5), RequestSampling(0.0),
              RequestSampling(0.8, frequency_penalty=2.0)]  # fmt: skip
    engine = _drex(model, policy)
    rids = [engine.add_request(p, sampling=s, seed=5, max_new_tokens=20) for p, s in zip(prompts, params)]
    together = engine.run()
    for i in range(3):
        alone = _drex(model, policy)
        rid = alone.add_request(prompts[i], sampling=params[i], seed=5, max_new_tokens=20)
        assert alone.run()[rid].tokens == together[rids[i]].tokens, i
    plain = _drex(model, policy)
    rid = plain.add_request(prompts[0], sampling=RequestSampling(0.0), max_new_tokens=20)
    unpenalised = plain.run()[rid].tokens
    penalised = together[rids[0]].tokens
    assert penalised != unpenalised
    assert len(set(penalised)) > len(set(unpenalised))  # fewer repeats


def test_penalties_follow_openais_formula():
    from drex_hf.generation.sampling import penalise_rows

    scores = torch.zeros(2, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    params = torch.tensor([RequestSampling(0.0, presence_penalty=0.5, frequency_penalty=0.25).row(),
                           RequestSampling(0.0).row()])  # fmt: skip
    out = penalise_rows(scores, params, counts)
    assert out[0].tolist() == [0.0, -0.75, -1.25, 0.0] and out[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(GenerationInputError, match="presence_penalty"):
        RequestSampling(presence_penalty=2.5)


def test_a_requests_sla_reaches_the_scheduler(model, prompts):
    """drex with per-request SLAs: a request with a target the device cannot meet makes the scheduler
    decide by the SLA; the same requests without one never do; tokens are the same either way."""

    def run(sla):
        engine = _drex(model, "drex", sla_per_request=True, record_decisions=True)
        rids = [engine.add_request(p, sampling=RequestSampling(0.0), sla_tpot_ms=sla if i == 1 else None)
                for i, p in enumerate(prompts)]  # fmt: skip
        done = engine.run()
        reasons = [d["reason"] for d in engine.stats.decisions if d is not None]
        return [done[r].tokens for r in rids], reasons, engine

    tokens, reasons, engine = run(1e-6)
    assert any("sla" in r for r in reasons), reasons[:5]
    plain, plain_reasons, _ = run(None)
    assert not any("sla" in r for r in plain_reasons)
    assert tokens == plain
    with pytest.raises(GenerationInputError, match="sla_per_request"):
        _drex(model, "drex").add_request(prompts[0], sla_tpot_ms=5.0)
    with pytest.raises(GenerationInputError, match="positive"):
        engine.add_request(prompts[0], sla_tpot_ms=-1.0)


def test_self_spec_rows_sample_with_their_own_parameters(model, prompts):
    """A self_spec engine with per-request sampling: a sampled row draws what an engine built with
    that row's settings draws (same seed), a greedy row gives full depth's tokens; penalties are
    refused; logprobs are full depth's."""
    params = [RequestSampling(0.9, 0.95), RequestSampling(0.0), RequestSampling(1.2)]
    engine = SpecEngine(model, max_batch=3, max_len=40, draft_exit=1, draft_tokens=3, draft_source="mixed",
                        settings=DecodeSettings(max_new_tokens=NEW), per_request_sampling=True,
                        logprobs=1)  # fmt: skip
    rids = [engine.add_request(p, sampling=s, seed=11, logprobs=1) for p, s in zip(prompts, params)]
    done = engine.run()
    assert engine.stats.accepted > 0
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        settings = DecodeSettings(max_new_tokens=NEW)
        if not p.greedy:
            settings = DecodeSettings(max_new_tokens=NEW, do_sample=True, temperature=p.temperature, top_p=p.top_p)
        alone = SpecEngine(model, max_batch=1, max_len=40, draft_exit=1, draft_tokens=3, draft_source="mixed",
                           settings=settings)  # fmt: skip
        rid = alone.add_request(prompt, seed=11)
        assert alone.run()[rid].tokens == done[rids[i]].tokens, i
        reference = _hf(model, prompt, done[rids[i]].tokens)
        for j, (token, entry) in enumerate(zip(done[rids[i]].tokens, done[rids[i]].logprobs)):
            assert abs(entry.logprob - reference[len(prompt) - 1 + j, token].item()) < TOL
    with pytest.raises(GenerationInputError, match="do not apply to self_spec"):
        engine.add_request(prompts[0], sampling=RequestSampling(0.0, frequency_penalty=1.0))
    assert math.isfinite(done[rids[0]].logprobs[0].logprob)


@pytest.mark.parametrize(
    "rows",
    [
        [RequestSampling(0.0), RequestSampling(0.0)],  # all greedy: argmax only
        [RequestSampling(0.7), RequestSampling(0.0), RequestSampling(1.3)],  # no top-k, no top-p
        [RequestSampling(0.9, 0.8), RequestSampling(0.0), RequestSampling(1.0, 1.0, 5)],  # both, on some rows
    ],
    ids=["greedy", "temperature only", "top-k and top-p"],
)
def test_skipping_unasked_warps_draws_the_same_tokens(rows):
    """An eager CPU picker skips warps no row asks for; it draws exactly what the full path draws."""
    from drex_hf.generation.sampling import pick_rows

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(len(rows), 2000, generator=generator) * 4
    params = torch.tensor([r.row() for r in rows])
    for draw in range(100):
        seeds, counters = torch.arange(len(rows)) + 17, torch.full((len(rows),), draw)
        full = pick_rows(scores, params, seeds, counters)
        assert torch.equal(pick_rows(scores, params, seeds, counters, skip=True), full), draw


@pytest.mark.parametrize("engine_kind", ["drex", "self_spec"])
def test_the_server_engines_options_replay_under_capture_as_eager(model, prompts, thresholds, engine_kind):
    """Per-request sampling (penalties, top-k/top-p on some rows), logprobs: captured once per program
    and replayed by the CPU recorder with fixed shapes — every warp runs, as on a GPU — the same tokens
    and logprobs as the eager engine, which skips what no row asks for."""
    from test_capture import BUCKETS, _recorder

    params = [RequestSampling(0.0, presence_penalty=0.5), RequestSampling(0.9, 0.9, 5), RequestSampling(0.0)]
    if engine_kind == "self_spec":
        params[0] = RequestSampling(0.0)  # self_spec refuses penalties
    settings = DecodeSettings(max_new_tokens=24)

    def build(**capture):
        if engine_kind == "drex":
            return DrexEngine(model, max_batch=3, max_len=40, settings=settings, thresholds=thresholds,
                              per_request_sampling=True, logprobs=2, cost_model=CostModel.constant(4),
                              lazy_capture=True, **capture)  # fmt: skip
        return SpecEngine(model, max_batch=3, max_len=40, draft_exit=1, draft_tokens=3, draft_source="mixed",
                          settings=settings, per_request_sampling=True, logprobs=2, **capture)  # fmt: skip

    holder: dict = {}
    captured = holder["engine"] = build(graphs=_recorder(holder), static_shapes=True, buckets=BUCKETS)
    eager = build()
    outs = []
    for engine in (captured, eager):
        rids = [engine.add_request(p, sampling=s, seed=13, logprobs=2) for p, s in zip(prompts, params)]
        done = engine.run()
        outs.append([done[r] for r in rids])
    assert captured.runner.graphs.replays > len(captured.runner.graphs.graphs) > 0
    for mine, theirs in zip(*outs):
        assert mine.tokens == theirs.tokens and mine.exit_layers == theirs.exit_layers
        assert [e.logprob for e in mine.logprobs] == pytest.approx([e.logprob for e in theirs.logprobs], abs=1e-5)
        assert [[t for t, _ in e.top] for e in mine.logprobs] == [[t for t, _ in e.top] for e in theirs.logprobs]
