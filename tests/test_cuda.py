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
