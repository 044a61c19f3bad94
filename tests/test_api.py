"""`generate()` keeps its engines for the next call with the same options — their stores, cost models
and captured graphs with them — and `release_engines()` lets them go."""

import math

import torch
from conftest import make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.generation.api import engines


def _model():
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=[0.5, math.inf, 0.5], head="norm")
    return EarlyExitModelForCausalLM.from_base(make_tiny("llama"), config)


def test_generate_reuses_its_engine_for_the_same_options_and_releases_it_on_request():
    model = _model()
    ids, mask = padded_batch([5, 9, 3])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True)
    first = model.generate(ids, **kwargs)
    (engine,) = engines.held(model)
    cost = engine.cost
    again = model.generate(ids, **kwargs)
    assert engines.held(model) == [engine] and engine.cost is cost  # the same engine, its cost model measured once
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.exit_layers, again.exit_layers)
    assert again.stats is not first.stats and again.stats.tokens == first.stats.tokens  # each call's own counts
    shorter = model.generate(ids, **{**kwargs, "max_new_tokens": 3})  # fewer positions: still the same engine
    assert engines.held(model) == [engine] and torch.equal(shorter.sequences, first.sequences[:, :-3])
    alone = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=6, eos_token_id=None)
    assert len(engines.held(model)) == 2 and engines.held(model)[1] is engine  # another batch: another engine
    model.generate(ids, policy="full", attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    held = engines.held(model)
    assert len(held) == 2 and engine not in held  # at most two: the least recently used went first
    assert torch.equal(alone[0], first.sequences[0, : alone.shape[1]])
    assert model.release_engines() == 2 and engines.held(model) == []
    model.generate(ids, **kwargs)  # a fresh engine after the release
    assert len(engines.held(model)) == 1 and engines.held(model)[0] is not engine


def test_a_self_spec_engine_is_reused_too():
    model = _model()
    ids, mask = padded_batch([5, 9])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, policy="self_spec", draft_exit=0, draft_tokens=2)
    first = model.generate(ids, **kwargs)
    (engine,) = engines.held(model)
    again = model.generate(ids, **kwargs)
    assert engines.held(model) == [engine] and torch.equal(first, again)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=6, policy="full")
    assert torch.equal(first, full)
