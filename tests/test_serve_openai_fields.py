"""The OpenAI fields ordinary clients send, through the official `openai` client against a live
`drex serve` on 127.0.0.1 (tiny Llama, untrained heads that exit): prompt lists, `logprobs` with
`echo` (equal to HF's own log-softmax under `--policy full`), chat `logprobs`/`top_logprobs`,
presence and frequency penalties, and `stream_options.include_usage`; under `drex` a logprob is the
exit head's for an exited token; `--policy self_spec` serves full depth's tokens and logprobs; the
server's default is the card's calibrated choice."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from serve_support import make_heads_dir, reference, serving

from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.sampling import RequestSampling
from drex_hf.generation.scheduler import CostModel
from drex_hf.generation.settings import DecodeSettings
from drex_hf.serve.server import ServeOptions, served_policy

PROMPTS = ["w5 w6 w7", "w9", "w12 w13 w5 w6 w7 w8", "w30 w31"]
TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return make_heads_dir(tmp_path_factory.mktemp("serve-fields"))


@pytest.fixture(scope="module")
def full(heads_dir):
    with serving(heads_dir, policy="full", max_batch=4, max_len=64) as served:
        yield served


@pytest.fixture(scope="module")
def drex(heads_dir):
    with serving(heads_dir, policy="drex", max_batch=4, max_len=64) as served:
        yield served


def client_of(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ids_of(served, text):
    return list(served.tokenizer(text)["input_ids"])


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """HF's own float32 log-softmax of the base model's logits at every position of `ids`."""
    with torch.no_grad():
        return model.base_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


# ---------------------------------------------------------------------- prompt lists
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_prompt_list_equals_each_prompt_sent_alone(full, stream):
    client = client_of(full)
    alone = [client.completions.create(model=full.name, prompt=p, max_tokens=6, temperature=0.8, seed=7)
             for p in PROMPTS]  # fmt: skip
    if stream:
        texts, reasons = [""] * len(PROMPTS), [None] * len(PROMPTS)
        chunks = client.completions.create(
            model=full.name, prompt=PROMPTS, max_tokens=6, temperature=0.8, seed=7, stream=True
        )
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    else:
        together = client.completions.create(model=full.name, prompt=PROMPTS, max_tokens=6, temperature=0.8, seed=7)
        assert [c.index for c in together.choices] == list(range(len(PROMPTS)))
        texts = [c.text for c in together.choices]
        reasons = [c.finish_reason for c in together.choices]
        assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
        assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert texts == [a.choices[0].text for a in alone]
    assert reasons == [a.choices[0].finish_reason for a in alone]
    assert len(set(texts)) > 1  # the prompts do not all give one text


def test_a_list_of_token_id_prompts_equals_each_alone(full):
    client = client_of(full)
    prompts = [ids_of(full, p) for p in PROMPTS[:3]]
    together = client.completions.create(model=full.name, prompt=prompts, max_tokens=5, temperature=0)
    for choice, ids in zip(together.choices, prompts):
        tokens, _ = reference(full.model, ids, 5)
        assert choice.text == full.tokenizer.decode(tokens, skip_special_tokens=True)


# ---------------------------------------------------------------------- logprobs
def test_full_logprobs_with_echo_equal_hf_log_softmax(full):
    """Every prompt token after the first and every generated token: its logprob and the top ones
    equal HF's own log-softmax of the same tokens within 1e-4 (fp32)."""
    out = client_of(full).completions.create(
        model=full.name, prompt=PROMPTS, max_tokens=6, temperature=0, echo=True, logprobs=3,
        extra_body={"return_exit_layers": True},
    )  # fmt: skip
    for choice, prompt in zip(out.choices, PROMPTS):
        ids = ids_of(full, prompt)
        assert choice.text.startswith(prompt)  # echo: the prompt, then the completion
        tokens = ids + choice.token_ids
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing before it
        assert logprobs.tokens == [full.tokenizer.decode([t]) for t in tokens]
        reference_ = hf_logprobs(full.model, tokens)
        for i in range(1, len(tokens)):
            assert abs(logprobs.token_logprobs[i] - reference_[i - 1, tokens[i]].item()) < TOL, i
            best = reference_[i - 1].topk(3)
            expected = {full.tokenizer.decode([int(t)]): v.item() for v, t in zip(best.values, best.indices)}
            assert set(logprobs.top_logprobs[i]) == set(expected)
            assert all(abs(logprobs.top_logprobs[i][k] - v) < TOL for k, v in expected.items())
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
        # greedy: each generated token is its position's most likely one
        for i in range(len(ids), len(tokens)):
            assert logprobs.token_logprobs[i] == pytest.approx(max(logprobs.top_logprobs[i].values()), abs=1e-6)


def test_streamed_logprobs_equal_the_whole_response(full):
    client = client_of(full)
    whole = client.completions.create(model=full.name, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=2)
    streamed: list[float] = []
    for chunk in client.completions.create(
        model=full.name, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == whole.choices[0].logprobs.token_logprobs and len(streamed) == 8


def test_chat_logprobs_and_top_logprobs_equal_hf(full):
    out = client_of(full).chat.completions.create(
        model=full.name, messages=[{"role": "user", "content": "w5 w6 w7"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=4, extra_body={"return_exit_layers": True},
    )  # fmt: skip
    choice = out.choices[0]
    prompt = full.tokenizer.apply_chat_template(
        [{"role": "user", "content": "w5 w6 w7"}], tokenize=False, add_generation_prompt=True
    )
    ids = list(full.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    reference_ = hf_logprobs(full.model, ids + choice.token_ids)
    content = choice.logprobs.content
    assert len(content) == len(choice.token_ids) == 5
    for j, (entry, token) in enumerate(zip(content, choice.token_ids)):
        row = reference_[len(ids) - 1 + j]
        assert abs(entry.logprob - row[token].item()) < TOL
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=TOL)
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_drex_logprobs_are_the_exit_heads_and_match_the_offline_engine(drex):
    """Under drex an exited token's logprob is its exit head's: the served ones equal an offline
    engine's for the same request, and tokens left at more than one exit point."""
    out = client_of(drex).completions.create(
        model=drex.name, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2,
        extra_body={"return_exit_layers": True},
    )  # fmt: skip
    choice = out.choices[0]
    engine = DrexEngine(drex.model, max_batch=1, max_len=64, settings=DecodeSettings(max_new_tokens=12),
                        per_request_sampling=True, logprobs=2, cost_model=CostModel.constant(3))  # fmt: skip
    rid = engine.add_request(ids_of(drex, PROMPTS[0]), max_new_tokens=12, sampling=RequestSampling(0.0), logprobs=2)
    offline = engine.run()[rid]
    assert choice.token_ids == offline.tokens and choice.exit_layers == offline.exit_layers
    assert len(set(choice.exit_layers)) > 1, choice.exit_layers  # exits were taken, not only full depth
    assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in offline.logprobs], abs=1e-6)
    last = drex.model.arch.num_layers - 1
    reference_ = hf_logprobs(drex.model, ids_of(drex, PROMPTS[0]) + choice.token_ids)
    first_exit = next(j for j, layer in enumerate(choice.exit_layers) if layer < last)
    # before the first early exit the states are full depth's: HF agrees there, and not at the exited token
    n = len(ids_of(drex, PROMPTS[0]))
    for j in range(first_exit):
        assert abs(choice.logprobs.token_logprobs[j] - reference_[n - 1 + j, choice.token_ids[j]].item()) < TOL
    exited = choice.logprobs.token_logprobs[first_exit]
    assert abs(exited - reference_[n - 1 + first_exit, choice.token_ids[first_exit]].item()) > TOL


# ---------------------------------------------------------------------- penalties
def test_penalties_apply_per_row_and_equal_the_offline_engine(full):
    client = client_of(full)
    ids = ids_of(full, "w5")
    plain = client.completions.create(model=full.name, prompt=ids, max_tokens=20, temperature=0,
                                      extra_body={"return_exit_layers": True})  # fmt: skip
    body = dict(model=full.name, max_tokens=20, temperature=0, presence_penalty=1.5, frequency_penalty=1.0,
                extra_body={"return_exit_layers": True})  # fmt: skip
    penalised = client.completions.create(prompt=ids, **body)
    together = client.completions.create(prompt=[ids, ids_of(full, "w9 w10")], **body)
    engine = DrexEngine(full.model, max_batch=1, max_len=64, policy="full",
                        settings=DecodeSettings(max_new_tokens=20), per_request_sampling=True)  # fmt: skip
    rid = engine.add_request(ids, max_new_tokens=20,
                             sampling=RequestSampling(0.0, presence_penalty=1.5, frequency_penalty=1.0))  # fmt: skip
    assert penalised.choices[0].token_ids == engine.run()[rid].tokens == together.choices[0].token_ids
    assert penalised.choices[0].token_ids != plain.choices[0].token_ids  # the penalties changed the tokens
    repeats = [len(c.token_ids) - len(set(c.token_ids)) for c in (plain.choices[0], penalised.choices[0])]
    assert repeats[1] < repeats[0], repeats


# ---------------------------------------------------------------------- usage chunk
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_the_usage_chunk_ends_the_stream(full, chat):
    client = client_of(full)
    common = dict(model=full.name, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
    if chat:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "w5"}], **common))
    else:
        chunks = list(client.completions.create(prompt=["w5", "w9 w10"], **common))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == (4 if chat else 8)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    without = list(client.completions.create(model=full.name, prompt="w5", max_tokens=2, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in without)  # no usage unless asked


# ---------------------------------------------------------------------- policies
def test_self_spec_serves_full_depths_tokens_and_logprobs(heads_dir):
    with serving(heads_dir, policy="self_spec", draft_source="mixed", draft_tokens=3, max_batch=4, max_len=64) as s:
        client = client_of(s)
        out = client.completions.create(
            model=s.name, prompt=PROMPTS, max_tokens=10, temperature=0, logprobs=1, echo=True,
            extra_body={"return_exit_layers": True},
        )  # fmt: skip
        for choice, prompt in zip(out.choices, PROMPTS):
            ids = ids_of(s, prompt)
            full_tokens, _ = reference(s.model, ids, 10, policy="full")
            assert choice.token_ids == full_tokens
            assert set(choice.exit_layers) == {s.model.arch.num_layers - 1}  # every token full depth's
            reference_ = hf_logprobs(s.model, ids + full_tokens)
            got = choice.logprobs.token_logprobs
            assert max(abs(got[i] - reference_[i - 1, (ids + full_tokens)[i]].item()) for i in range(1, len(got))) < TOL
        stats = s.state.worker.engine.stats
        assert stats.accepted > 0  # drafts were accepted, not only full-depth steps
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=s.name, prompt="w5", max_tokens=2, presence_penalty=0.5)
        assert err.value.body["param"] == "presence_penalty" and "self_spec" in err.value.body["message"]
        sampled = client.completions.create(model=s.name, prompt="w5 w6", max_tokens=8, temperature=0.9, seed=3)
        assert sampled.choices[0].finish_reason in ("stop", "length") and math.isfinite(sampled.usage.total_tokens)


def test_the_default_policy_is_the_cards_calibrated_choice(full):
    model = full.model
    saved = model.policy_choice
    try:
        model.policy_choice = {"1": {"policy": "self_spec", "draft_source": "ngram", "draft_tokens": 4},
                               "8": {"policy": "full"}}  # fmt: skip
        one = served_policy(model, ServeOptions(max_batch=1))
        assert (one.policy, one.draft_source, one.draft_tokens) == ("self_spec", "ngram", 4)
        assert "calibrated choice here at --max-batch 1" in one.describe()
        assert served_policy(model, ServeOptions(max_batch=16)).policy == "full"
        assert served_policy(model, ServeOptions(max_batch=16, policy="drex")).policy == "drex"  # --policy wins
        spec = served_policy(model, ServeOptions(max_batch=16, policy="self_spec"))  # drafting as the card's
        assert (spec.policy, spec.draft_source, spec.draft_tokens) == ("self_spec", "ngram", 4)
        mine = served_policy(model, ServeOptions(max_batch=16, policy="self_spec", draft_source="head", draft_tokens=2))
        assert (mine.draft_source, mine.draft_exit, mine.draft_tokens) == ("head", model.exit_layers[-1], 2)
        model.policy_choice = None
        assert served_policy(model, ServeOptions(max_batch=4)).policy == "drex"
        plain = served_policy(model, ServeOptions(max_batch=4, policy="self_spec"))
        assert (plain.draft_source, plain.draft_exit, plain.draft_tokens) == ("head", model.exit_layers[-1], 4)
    finally:
        model.policy_choice = saved
