"""The same guarantees on a CUDA device (skipped on machines without one)."""

import math
import os

import pytest
import torch
from conftest import make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # conftest.py turns Triton's interpreter on for the CPU kernel tests; on a GPU it would copy every
    # kernel argument to the host, which no CUDA graph capture survives
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available(),
        reason="the Triton interpreter is on: run `TRITON_INTERPRET=0 pytest tests/test_cuda.py` (as gpu.sh does)",
    ),
]


@pytest.fixture(autouse=True)
def exact_float32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_depth_equals_hf_generate_on_cuda(kind):
    model = EarlyExitModelForCausalLM.from_base(
        make_tiny(kind), EarlyExitConfig(exit_layers=[1, 2], thresholds=math.inf), device="cuda"
    )
    assert model.device.type == "cuda" and model.heads[0].norm.weight.device.type == "cuda"
    ids, mask = padded_batch([5, 9, 3])
    expected = model.base_model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12)  # CPU inputs are moved to the model
    assert torch.equal(out, expected)


def test_exits_and_seeded_sampling_on_cuda_in_bfloat16():
    base = make_tiny("qwen2").to(device="cuda", dtype=torch.bfloat16)
    model = EarlyExitModelForCausalLM.from_base(base, EarlyExitConfig(exit_layers=[1, 2], thresholds=[0.0, math.inf]))
    ids, mask = padded_batch([5, 9, 3])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=2.0, eos_token_id=None, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, seed=[1, 2, 3], **kwargs)
    assert batch.exit_layers[:, 1:].eq(1).all()
    alone = model.generate(ids[1:2, -9:], seed=[2], **kwargs)
    assert torch.equal(batch.sequences[1, 9:], alone.sequences[0, 9:])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral"])
def test_engine_with_graphs_and_compiled_triton_kernels_equals_the_reference_decoder(kind, monkeypatch):
    """On CUDA the dispatcher picks Triton by itself and the engine captures its programs as CUDA
    graphs: rows, KV writes, KV fill, confidences and indexed decode attention all run compiled
    kernels inside replayed graphs, with the reference's tokens, at every exit point."""
    from conftest import assert_every_exit_taken, covering_thresholds
    from test_engine import EXITS, LENGTHS, _assert_same_as_reference, _engine_run, _prompts

    from drex_hf.generation.scheduler import CostModel
    from drex_hf.generation.settings import DecodeSettings
    from drex_hf.kernels import dispatch

    monkeypatch.delenv("DREX_KERNELS", raising=False)
    dispatch.reset()
    assert dispatch.backend("cuda") == "triton"
    config = EarlyExitConfig(exit_layers=list(EXITS), thresholds=math.inf, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind), config, device="cuda")
    _, _, prompts = _prompts(LENGTHS[8])
    prompts = [p.cuda() for p in prompts]
    settings = DecodeSettings(max_new_tokens=12)
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, None)])
    results, stats = _engine_run(model, prompts, settings, thresholds, cost_model=CostModel.constant(4))
    _assert_same_as_reference(results, reference)
    assert dispatch.broken() == {}
    assert stats.graphs is not None and stats.graphs["graphs"] > 0
    assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)


def _bf16_model():
    base = make_tiny("llama").to(device="cuda", dtype=torch.bfloat16)
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=math.inf, head="norm")
    return EarlyExitModelForCausalLM.from_base(base, config)


@pytest.mark.parametrize("buckets", [(8,), None])  # one bucket for every step; the default buckets
def test_a_rows_tokens_and_exits_do_not_depend_on_its_batch_in_bfloat16_with_graphs(buckets):
    """The same requests in three batch compositions (alone, among the others in order, reversed among
    new neighbours) give each request the same tokens and exit layers, bf16, CUDA graphs. With one
    bucket every program runs at one shape whatever the batch; with the default buckets a request
    alone runs at bucket 1 and in a batch at larger ones (a GEMM's result may depend on its rows there,
    which a wrong token here would show)."""
    from conftest import covering_thresholds
    from test_engine import LENGTHS, _prompts

    from drex_hf.generation.engine import DrexEngine
    from drex_hf.generation.settings import DecodeSettings

    model = _bf16_model()
    _, _, prompts = _prompts(LENGTHS[8])
    _, _, others = _prompts(LENGTHS[8], seed=5)
    prompts, others = [p.cuda() for p in prompts], [p.cuda() for p in others]
    settings = DecodeSettings(max_new_tokens=16)
    thresholds, _ = covering_thresholds(model, prompts, [(settings, None)])

    def run(batch, seeds):
        engine = DrexEngine(
            model, max_batch=8, max_len=40, settings=settings, thresholds=thresholds, buckets=buckets,
            cost_model=None,
        )  # fmt: skip
        ids = [engine.add_request(p, seed=s) for p, s in zip(batch, seeds)]
        with torch.no_grad():
            out = engine.run()
        assert engine.stats.graphs is not None
        return [(out[i].tokens, out[i].exit_layers) for i in ids]

    together = run(prompts, range(8))
    mixed = run([*reversed(prompts[:4]), *others[:4]], [3, 2, 1, 0, 10, 11, 12, 13])
    assert mixed[:4] == list(reversed(together[:4]))
    for i in (0, 5):
        assert run([prompts[i]], [i]) == [together[i]]
    layers = {layer for _, exits in together for layer in exits[1:]}
    assert layers >= {0, 1, 2, 3}, layers


def test_self_spec_with_graphs_equals_full_depth_and_generate_reuses_its_engine_on_cuda():
    """self_spec's draft and verify programs as CUDA graphs (captured lazily) give full depth's
    greedy tokens; a second generate() with the same options reuses the engine and its graphs."""
    from drex_hf.generation.api import engines

    model = EarlyExitModelForCausalLM.from_base(
        make_tiny("llama"), EarlyExitConfig(exit_layers=[1, 2], thresholds=math.inf), device="cuda"
    )
    ids, mask = padded_batch([5, 9, 3])
    full = model.generate(ids, attention_mask=mask, max_new_tokens=12, policy="full")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, policy="self_spec", draft_exit=1, draft_tokens=3)
    first = model.generate(ids, **kwargs)
    (spec,) = [e for e in engines.held(model) if hasattr(e, "draft_exit")]
    captured = dict(spec.runner.graphs.graphs)
    assert {key[0] for key in captured} == {"draft", "verify"}
    again = model.generate(ids, **kwargs)
    assert torch.equal(first, full) and torch.equal(again, full)
    assert [e for e in engines.held(model) if hasattr(e, "draft_exit")] == [spec]
    assert spec.runner.graphs.replays > 0 and model.release_engines() == 2
