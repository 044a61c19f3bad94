"""The same guarantees on a CUDA device (skipped on machines without one)."""

import math

import pytest
import torch
from conftest import make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
def test_engine_with_compiled_triton_kernels_equals_the_reference_decoder(kind, monkeypatch):
    """On CUDA the dispatcher picks Triton by itself: the engine's rows, KV writes, KV fill,
    confidences and indexed decode attention all run compiled kernels, with the reference's tokens."""
    from test_engine import EXITS, LENGTHS, _assert_same_as_reference, _engine_run, _prompts, _thresholds

    from drex_hf.generation.reference import generate_reference
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
    thresholds = _thresholds(model, prompts)
    settings = DecodeSettings(max_new_tokens=12)
    reference = generate_reference(model, prompts, settings, thresholds)
    results, _ = _engine_run(model, prompts, settings, thresholds, cost_model=CostModel.constant(4))
    _assert_same_as_reference(results, reference)
    assert dispatch.broken() == {}
    assert {layer for r in results for layer in r.exit_layers[1:]} & set(EXITS)
