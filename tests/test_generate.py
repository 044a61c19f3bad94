"""generate(): DESIGN.md §5 invariants for the reference decoder, and its HF-style arguments."""

import math

import pytest
import torch
from conftest import ARCHS, assert_every_exit_taken, covering_thresholds, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import ConfigError, GenerationInputError
from drex_hf.generation.reference import ReferenceDecoder, RequestKV, generate_reference
from drex_hf.generation.settings import DecodeSettings

LENGTHS = [5, 9, 3]  # three prompts of different lengths, left-padded


def _wrap(kind="llama", thresholds=math.inf, confidence="max_prob", exit_layers=(1, 2), head="norm", **kw):
    config = EarlyExitConfig(exit_layers=list(exit_layers), thresholds=thresholds, confidence=confidence, head=head)
    return EarlyExitModelForCausalLM.from_base(make_tiny(kind, **kw), config)


def _spread_thresholds(model, ids, mask, quantile=0.7):
    """Per-exit thresholds at a quantile of the confidences seen while decoding, so tokens exit at
    several exits: a first run with thresholds of 1.0 (checked, almost never passed) records them."""
    prompts = [ids[b, mask[b].bool()] for b in range(ids.shape[0])]
    runs = generate_reference(model, prompts, DecodeSettings(max_new_tokens=10), [1.0] * model.exit_config.num_exits)
    values = [[v for r in runs for checks in r.checks for layer, v in checks if layer == e] for e in model.exit_layers]
    return [float(torch.tensor(v).quantile(quantile)) for v in values]


# ---------------------------------------------------------------- invariant 3: full depth is exact
QWEN2_WINDOWED = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)  # layers 2, 3 windowed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", [*ARCHS, "qwen2-windowed"])
def test_infinite_thresholds_and_full_policy_equal_hf_greedy_generate(kind, attn):
    extra = QWEN2_WINDOWED if kind == "qwen2-windowed" else {}
    model = _wrap(kind.removesuffix("-windowed"), thresholds=math.inf, attn_implementation=attn, **extra)
    ids, mask = padded_batch(LENGTHS)
    expected = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=12, policy="full", return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert torch.equal(full.sequences, expected)
    last = model.num_layers - 1
    real = out.sequences[:, ids.shape[1] :] != model.generation_config.pad_token_id
    assert bool((out.exit_layers[real] == last).all())
    assert torch.equal(out.exit_layers, full.exit_layers)


def test_eos_stops_a_row_and_pads_like_hf():
    model = _wrap("llama", thresholds=math.inf)
    ids, mask = padded_batch(LENGTHS)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    eos = int(first[0, ids.shape[1] + 2])  # row 0's third new token becomes the end-of-sequence id
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    expected = model.base_model.generate(ids, do_sample=False, **kwargs)
    out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, expected)
    assert out.exit_layers[0, 3:].eq(-1).all() and out.exit_layers[0, :3].eq(3).all()


# ---------------------------------------------------------------- threshold 0: everything exits first
@pytest.mark.parametrize("kind", ARCHS)
def test_threshold_zero_exits_every_token_at_the_first_exit_and_fills_kv_by_projection(kind):
    model = _wrap(kind, thresholds=[0.0, math.inf])
    ids, mask = padded_batch(LENGTHS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True)
    assert out.exit_layers[:, 0].eq(model.num_layers - 1).all()  # the prefill token is full depth
    assert out.exit_layers[:, 1:].eq(1).all()  # every decoded token came from exit layer 1

    # Hand computation for the first decoded token, from the base model's own forward pass.
    prompt = ids[1, mask[1].bool()]
    settings = DecodeSettings(max_new_tokens=2)
    decoder = ReferenceDecoder(model, settings, [0.0, math.inf])
    kv = RequestKV(model.num_layers)
    with torch.no_grad():
        first = decoder.pick(decoder.prefill(prompt, kv), 0, 0)
        token, layer, _ = decoder.decode_token(first, prompt.shape[0], kv, 0, 1)
        seq = torch.cat([prompt, torch.tensor([first])]).unsqueeze(0)
        hidden = model.base_model(seq, output_hidden_states=True).hidden_states[2][:, -1:]  # after layer 1
        assert token == int(model.heads[0].logits(hidden)[0, -1].argmax()) and layer == 1
        arch, position = model.arch, prompt.shape[0]
        for skipped in (2, 3):
            block = arch.layers[skipped]
            if kind == "gpt2":
                _, k, v = block.attn.c_attn(block.ln_1(hidden)).split(32, dim=2)
                k, v = (t.view(1, 1, 4, 8).transpose(1, 2) for t in (k, v))
            else:
                x = block.input_layernorm(hidden)
                k = block.self_attn.k_proj(x).view(1, 1, 2, 8).transpose(1, 2)
                v = block.self_attn.v_proj(x).view(1, 1, 2, 8).transpose(1, 2)
                cos, sin = arch.backbone.rotary_emb(k, torch.tensor([[position]]))
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                half = k.shape[-1] // 2
                k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
            assert kv.length(skipped) == position + 1
            torch.testing.assert_close(kv.keys[skipped][:, :, position : position + 1], k, rtol=0, atol=1e-6)
            torch.testing.assert_close(kv.values[skipped][:, :, position : position + 1], v, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- invariants 1 and 2
# The reference decoder runs each request alone, so for it these two tests check prompt splitting,
# per-request seeding and padding; they are written for, and bind, the rebatching engine later.
@pytest.mark.parametrize("confidence", ["max_prob", "margin", "saturation", "classifier"])
@pytest.mark.parametrize("kind", ARCHS)
def test_batch_independence_greedy(kind, confidence):
    model = _wrap(kind, confidence=confidence, exit_layers=(0, 1, 2))
    if confidence == "classifier":  # an untrained classifier says 0.5 everywhere; give it an opinion
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    ids, mask = padded_batch(LENGTHS)
    prompts = [ids[b, mask[b].bool()] for b in range(len(LENGTHS))]
    model.exit_config.thresholds, _ = covering_thresholds(model, prompts, [(DecodeSettings(max_new_tokens=10), None)])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True)
    for b, n in enumerate(LENGTHS):
        alone = model.generate(ids[b : b + 1, -n:], max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True)
        assert torch.equal(batch.sequences[b, ids.shape[1] :], alone.sequences[0, n:])
        assert torch.equal(batch.exit_layers[b], alone.exit_layers[0])
    assert_every_exit_taken(batch.exit_layers, model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_independence_seeded_sampling(kind):
    model = _wrap(kind)
    ids, mask = padded_batch(LENGTHS)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=2.0, eos_token_id=None)
    seeds = [11, 22, 33]
    prompts = [ids[b, mask[b].bool()] for b in range(len(LENGTHS))]
    sampled = DecodeSettings(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=2.0)
    model.exit_config.thresholds, _ = covering_thresholds(model, prompts, [(sampled, seeds)])
    batch = model.generate(ids, attention_mask=mask, seed=seeds, return_dict_in_generate=True, **kwargs)
    again = model.generate(ids, attention_mask=mask, seed=seeds, return_dict_in_generate=True, **kwargs)
    assert torch.equal(batch.sequences, again.sequences)
    for b, n in enumerate(LENGTHS):
        alone = model.generate(ids[b : b + 1, -n:], seed=[seeds[b]], return_dict_in_generate=True, **kwargs)
        assert torch.equal(batch.sequences[b, ids.shape[1] :], alone.sequences[0, n:])
        assert torch.equal(batch.exit_layers[b], alone.exit_layers[0])
    other = model.generate(ids, attention_mask=mask, seed=[44, 55, 66], **kwargs)
    assert not torch.equal(other, batch.sequences)  # the seed matters: sampling is really random
    assert_every_exit_taken(batch.exit_layers, model)


@pytest.mark.parametrize("confidence", ["max_prob", "saturation", "classifier"])
def test_zero_involuntary_exits_and_no_missed_exits(confidence):
    """Through the rebatching engine, with the confidences its own verdicts brought back: a token
    leaves at the first exit whose confidence passes, never earlier and never later."""
    from drex_hf.generation.engine import DrexEngine

    model = _wrap("qwen2", confidence=confidence, exit_layers=(0, 1, 2))
    if confidence == "classifier":
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    ids, mask = padded_batch(LENGTHS)
    settings = DecodeSettings(max_new_tokens=12)
    prompts = [ids[b, mask[b].bool()] for b in range(len(LENGTHS))]
    thresholds, (results,) = covering_thresholds(model, prompts, [(settings, None)])
    engine = DrexEngine(model, max_batch=3, max_len=24, settings=settings, thresholds=thresholds, record_checks=True)
    with torch.no_grad():
        for prompt in prompts:
            engine.add_request(prompt)
        outputs = engine.run()
    assert engine.stats.involuntary_exits == 0 and engine.stats.missed_exits == 0
    by_layer = dict(zip(model.exit_layers, thresholds))
    exits = 0
    for rid, reference in enumerate(results):
        got = outputs[rid]
        assert (got.tokens, got.exit_layers) == (reference.tokens, reference.exit_layers)
        for layer, checks, ref_checks in zip(got.exit_layers[1:], got.checks[1:], reference.checks[1:]):
            assert [c[0] for c in checks] == [c[0] for c in ref_checks]  # the same exits checked as alone
            passed = [check_layer for check_layer, value in checks if value >= by_layer[check_layer]]
            if layer == model.num_layers - 1:
                assert passed == [] and len(checks) == len(thresholds)
            else:
                exits += 1
                assert passed == [layer] and checks[-1][0] == layer  # passed here, nowhere before
    assert exits > 0
    assert_every_exit_taken([r.exit_layers for r in outputs.values()], model, thresholds)

    # The first decoded token's confidences equal those of a teacher-forced forward pass (the cache
    # is still all full depth then): the checks above are made on correctly computed confidences.
    for prompt, result in zip(prompts, results):
        seq = torch.cat([prompt, torch.tensor(result.tokens[:1])]).unsqueeze(0)
        with torch.no_grad():
            conf = model(seq, output_exit_logits=True).exit_confidences[:, 0, -1]
        checked = [value for _, value in result.checks[1]]
        torch.testing.assert_close(torch.tensor(checked), conf[: len(checked)], rtol=0, atol=1e-5)


def test_thresholds_argument_overrides_the_config():
    model = _wrap("llama", thresholds=math.inf)
    ids, mask = padded_batch(LENGTHS)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, thresholds=0.0, return_dict_in_generate=True
    )
    assert out.exit_layers[:, 1:].eq(1).all()
    assert model.exit_config.threshold_list() == [math.inf, math.inf]


def test_streamer_gets_prompt_then_each_token():
    model = _wrap("llama", thresholds=math.inf)
    ids, _ = padded_batch([6])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = model.generate(ids, max_new_tokens=5, eos_token_id=None, streamer=recorder)
    assert torch.equal(recorder.puts[0], ids)
    assert [int(t) for t in recorder.puts[1:]] == out[0, 6:].tolist() and recorder.ended


def test_generation_config_merges_like_hf():
    """A passed GenerationConfig is merged with the model's own (eos) and HF's defaults, as in HF."""
    from transformers import GenerationConfig

    model = _wrap("llama", thresholds=math.inf)
    ids, mask = padded_batch(LENGTHS)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    model.generation_config.eos_token_id = int(first[1, ids.shape[1] + 3])  # the model's own eos now stops row 1
    for config in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_length=15)):
        expected = model.base_model.generate(ids, attention_mask=mask, generation_config=config)
        out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
        full = model.generate(
            ids, attention_mask=mask, generation_config=config, policy="full", return_dict_in_generate=True
        )
        assert torch.equal(full.exit_layers, out.exit_layers) and out.exit_layers[1, 4:].eq(-1).all()


def test_sampling_uses_hf_default_top_k():
    from drex_hf.generation.settings import merge_generation_config, settings_from_config

    model = _wrap("llama")
    merged = merge_generation_config(model.base_model, None, {"do_sample": True, "max_new_tokens": 3})
    settings = settings_from_config(merged, 5)
    assert settings.top_k == 50 and settings.do_sample  # HF's default when nothing sets top_k
    assert [type(w).__name__ for w in settings.warpers()] == ["TopK"]


def test_assigning_generation_config_reaches_the_base():
    from transformers import GenerationConfig

    model = _wrap("llama")
    config = GenerationConfig(max_new_tokens=3, eos_token_id=None)
    model.generation_config = config
    assert model.base_model.generation_config is config
    ids, _ = padded_batch([6])
    assert model.generate(ids).shape == (1, 9)


# ---------------------------------------------------------------- bad input
def test_bad_generate_inputs_are_clear_errors():
    model = _wrap("gpt2", thresholds=math.inf)  # n_positions = 64
    ids, mask = padded_batch(LENGTHS)
    cases = [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(input_ids=ids, attention_mask=mask * torch.tensor([[0], [1], [1]])), "row 0 of attention_mask has no"),
        (dict(input_ids=ids, attention_mask=mask.flip(1)), "not left-padded"),
        (dict(input_ids=ids, attention_mask=mask[:, 1:]), "attention_mask has shape"),
        (dict(input_ids=ids.float()), "integer token ids"),
        (dict(input_ids=torch.randint(3, 99, (1, 60)), max_new_tokens=10), "needs 69 positions but the model has 64"),
        (dict(input_ids=ids, attention_mask=mask, policy="fastest"), "unknown policy 'fastest'"),
        (dict(input_ids=ids, attention_mask=mask, policy="full", exit_trace=[[3]] * 3), "do not apply to policy="),
        (dict(input_ids=ids, attention_mask=mask, exit_trace=[[3, 7]] * 3), r"holds layer\(s\) \[7\]"),
        (dict(input_ids=ids, attention_mask=mask, exit_trace=[[3]] * 2), "2 rows for 3 prompts"),
        (dict(input_ids=ids, attention_mask=mask, exit_trace="trace.json"), "exit_trace must be"),
        (dict(input_ids=ids, attention_mask=mask, num_beams=4), r"unsupported argument\(s\) \['num_beams'\]"),
        (dict(input_ids=ids, attention_mask=mask, max_new_tokens=0), "max_new_tokens` must be greater than 0"),
        (dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(input_ids=ids, attention_mask=mask, do_sample=True, seed=[1, 2]), "seed has 2 values for 3 prompts"),
        (dict(input_ids=ids, attention_mask=mask, streamer=object()), "streamer supports a batch of 1"),
        (dict(input_ids=torch.tensor([[5, 150]])), "token id 150, outside the model's vocabulary 0..98"),
        (dict(input_ids=torch.tensor([[5, -1]])), "token id -1"),
        (dict(input_ids=ids, attention_mask=mask.tolist()), "attention_mask must be a torch.Tensor"),
        (dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature="hot"), "temperature must be a number"),
        (dict(input_ids=ids, attention_mask=mask, eos_token_id="x"), "eos_token_id must be an integer"),
        (dict(input_ids=ids, attention_mask=mask, do_sample=True, seed="abc"), "seed must be an integer or a list"),
        (dict(input_ids=ids, attention_mask=mask, min_length=8), r"unsupported argument\(s\) \[.min_length.\]"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("max_new_tokens", 4)
        with pytest.raises(GenerationInputError, match=message):
            model.generate(**kwargs)
    with pytest.raises(ConfigError, match=r"threshold must be in \[0, 1\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, thresholds=1.5)


def test_unsupported_generation_config_fields_are_refused_not_ignored():
    model = _wrap("llama", thresholds=math.inf)
    model.generation_config.encoder_repetition_penalty = 1.5  # (repetition_penalty is supported: test_processors.py)
    ids, _ = padded_batch([6])
    with pytest.raises(GenerationInputError, match=r"sets encoder_repetition_penalty=1.5"):
        model.generate(ids, max_new_tokens=3)


def test_small_integer_dtypes_and_numpy_seeds_are_accepted():
    import numpy as np

    model = _wrap("llama", thresholds=math.inf)
    ids, _ = padded_batch([6])
    expected = model.generate(ids, max_new_tokens=4, do_sample=True, seed=7)
    assert torch.equal(
        model.generate(ids.to(torch.int16), max_new_tokens=4, do_sample=True, seed=np.int64(7)), expected
    )


def test_unsupported_attention_is_refused_before_decoding():
    from drex_hf.errors import UnsupportedArchitectureError

    model = _wrap("llama")
    model.config._attn_implementation = "flex_attention"
    ids, _ = padded_batch([6])
    with pytest.raises(UnsupportedArchitectureError, match="flex_attention"):
        model.generate(ids, max_new_tokens=3)
    with pytest.raises(UnsupportedArchitectureError, match="flex_attention"):
        model(ids, output_exit_logits=True)


def test_full_policy_with_dict_outputs_in_the_generation_config():
    model = _wrap("llama", thresholds=math.inf)
    model.generation_config.return_dict_in_generate = True
    ids, mask = padded_batch(LENGTHS)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=4, policy="full")
    drex = model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(full.sequences, drex.sequences) and torch.equal(full.exit_layers, drex.exit_layers)


def test_padding_without_a_mask_is_inferred_like_hf():
    """No attention_mask, pad id (0, not an eos id) in the ids: HF treats it as padding, and so do we."""
    model = _wrap("llama", thresholds=math.inf)
    ids, _ = padded_batch(LENGTHS)
    expected = model.base_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6), expected)


def test_options_that_do_not_apply_are_refused():
    model = _wrap("llama", thresholds=math.inf)
    ids, mask = padded_batch(LENGTHS)
    with pytest.raises(GenerationInputError, match="sets output_scores=True"):
        from transformers import GenerationConfig

        model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(output_scores=True))
    with pytest.raises(GenerationInputError, match="must be a transformers.GenerationConfig, got dict"):
        model.generate(ids, attention_mask=mask, generation_config={"max_new_tokens": 3})
    with pytest.raises(GenerationInputError, match="do not apply to policy='full'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, policy="full", thresholds=0.5)


def test_threshold_zero_matches_an_independent_hand_decoder_at_every_step():
    """A decoder written here from HF's own pieces (its prefill, its DynamicCache, layers 0-1, the
    exit head, and K/V for layers 2-3 projected by hand) gives the same tokens at every step."""
    from transformers import DynamicCache

    model = _wrap("llama", thresholds=[0.0, math.inf])
    base, arch = model.base_model, model.arch
    ids, mask = padded_batch(LENGTHS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    for b in range(len(LENGTHS)):
        prompt = ids[b, mask[b].bool()].unsqueeze(0)
        cache = DynamicCache(config=base.config)
        with torch.no_grad():
            token = int(base(prompt, use_cache=True, **{arch._cache_kwarg: cache}).logits[0, -1].argmax())
            tokens = [token]
            for step in range(7):
                position = torch.tensor([[prompt.shape[1] + step]])
                hidden = base.model.embed_tokens(torch.tensor([[token]]))
                cos, sin = base.model.rotary_emb(hidden, position)
                for layer in base.model.layers[:2]:
                    hidden = layer(
                        hidden, position_ids=position, position_embeddings=(cos, sin), **{arch._cache_kwarg: cache}
                    )
                token = int(model.heads[0].logits(hidden)[0, -1].argmax())
                tokens.append(token)
                for index in (2, 3):
                    block = base.model.layers[index]
                    x = block.input_layernorm(hidden)
                    k = block.self_attn.k_proj(x).view(1, 1, 2, 8).transpose(1, 2)
                    v = block.self_attn.v_proj(x).view(1, 1, 2, 8).transpose(1, 2)
                    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
                    k = k * c + torch.cat([-k[..., 4:], k[..., :4]], dim=-1) * s
                    cache.update(k, v, index)
        assert out[b, ids.shape[1] :].tolist() == tokens
