import pytest
import torch
from conftest import ARCHS, make_tiny, padded_batch
from transformers import AutoModelForCausalLM, BertConfig, OPTConfig

from drex_hf.arch import build_attention_mask, get_adapter
from drex_hf.errors import UnsupportedArchitectureError


@pytest.mark.parametrize("kind", ARCHS)
def test_adapter_runs_the_models_own_layers_exactly(kind):
    """Embeddings + every layer + final norm + lm_head through the adapter == the model's forward."""
    model = make_tiny(kind)
    arch = get_adapter(model)
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (4, 32, 99)
    ids, mask = padded_batch([7])
    positions = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        hidden = arch.embed(ids, positions)
        rotary = arch.position_embeddings(hidden, positions)
        for index in range(arch.num_layers):
            attn_mask = build_attention_mask(positions, 7, window=arch.layer_window(index), dtype=hidden.dtype)
            hidden = arch.run_layer(
                index, hidden, attention_mask=attn_mask, position_ids=positions, position_embeddings=rotary, cache=None
            )
        logits = arch.lm_head(arch.final_norm(hidden))
        expected = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ARCHS)
def test_kv_projection_matches_what_the_layer_caches(kind):
    """A layer's own cached K/V for input h equals kv_projection(h): the fill uses the same maths."""
    model = make_tiny(kind)
    arch = get_adapter(model)
    captured = {}

    class Capture:
        def update(self, keys, values, layer_idx, *args, **kwargs):
            captured[layer_idx] = (keys, values)
            return keys, values

    hidden = torch.randn(2, 3, 32)
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])
    with torch.no_grad():
        rotary = arch.position_embeddings(hidden, positions)
        mask = build_attention_mask(positions - positions[:, :1], 3, dtype=hidden.dtype)
        arch.run_layer(
            2, hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary, cache=Capture()
        )
        keys, values = arch.kv_projection(2, hidden, rotary)
    assert keys.shape == (2, arch.num_kv_heads, 3, arch.head_dim)
    torch.testing.assert_close(keys, captured[2][0], rtol=0, atol=0)
    torch.testing.assert_close(values, captured[2][1], rtol=0, atol=0)


def test_unsupported_architecture_lists_the_supported_ones():
    model = AutoModelForCausalLM.from_config(
        OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4)
    )
    with pytest.raises(UnsupportedArchitectureError, match="'opt'.*supported model types: gpt2, llama, mistral, qwen2"):
        get_adapter(model)
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        get_adapter(
            AutoModelForCausalLM.from_config(
                BertConfig(
                    vocab_size=99,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=64,
                    is_decoder=True,
                )
            )
        )


def test_unsupported_attention_implementation_is_named():
    model = make_tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedArchitectureError, match="flash_attention_2"):
        get_adapter(model).check_attention_implementation()


def test_mask_is_float_causal_windowed_and_padding_aware():
    query = torch.tensor([[0, 1, 2, 3]])
    valid = torch.tensor([[False, True, True, True]])
    mask = build_attention_mask(query, 4, key_valid=valid, window=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.float32
    visible = (mask[0, 0] == 0).int().tolist()
    assert visible == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert mask[0, 0, 0, 1] == torch.finfo(torch.float32).min
