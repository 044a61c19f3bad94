"""The wrapper: from_base / save_pretrained / from_pretrained, forward with exits, attribute forwarding."""

import json
import math
import os

import pytest
import torch
import yaml
from conftest import ARCHS, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import (
    BaseModelMismatchError,
    ConfigError,
    GenerationInputError,
    ModelNotFoundError,
    WeightsFileError,
)
from drex_hf.modeling import SAVED_FILES


def _trained_like(model, seed=3):
    """Perturb every head parameter, so a reload that dropped or mixed up a tensor would show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.heads.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture
def saved(tmp_path, tiny_base_dir):
    config = EarlyExitConfig(exit_layers=[0, 2], head="adapter", adapter_rank=4, confidence="margin", thresholds=0.05)
    model = _trained_like(EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config))
    out = tmp_path / "heads"
    model.save_pretrained(out)
    return model, out


def test_save_writes_exactly_three_files_and_reload_is_identical(saved):
    model, out = saved
    assert sorted(os.listdir(out)) == sorted(SAVED_FILES)
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # no temporary folder left
    reloaded = EarlyExitModelForCausalLM.from_pretrained(out)
    assert reloaded.exit_config == model.exit_config
    ids, mask = padded_batch([5, 9, 3])
    with torch.no_grad():
        a = model(ids, attention_mask=mask, output_exit_logits=True)
        b = reloaded(ids, attention_mask=mask, output_exit_logits=True)
    for x, y in zip(a.exit_logits + (a.logits,), b.exit_logits + (b.logits,)):
        assert torch.equal(x, y)
    assert torch.equal(a.exit_confidences, b.exit_confidences)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True)
    ga, gb = model.generate(ids, **kwargs), reloaded.generate(ids, **kwargs)
    assert torch.equal(ga.sequences, gb.sequences) and torch.equal(ga.exit_layers, gb.exit_layers)
    assert set(ga.exit_layers[:, 1:].flatten().tolist()) != {3}  # the heads really were used


def test_saved_files_hold_no_base_weights(saved):
    from safetensors import safe_open

    _, out = saved
    with safe_open(str(out / "exit_heads.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("heads.") for k in keys)
    assert not any("lm_head" in k or "embed" in k or "layers." in k for k in keys)
    config = json.loads((out / "exit_config.json").read_text())
    assert (config["base_num_layers"], config["base_hidden_size"], config["base_vocab_size"]) == (4, 32, 99)
    assert config["base_model_type"] == "llama"


def test_model_card_has_front_matter(saved):
    _, out = saved
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "drex_hf" and "early-exit" in meta["tags"]
    assert meta["base_model"].endswith("tiny-llama")
    assert "| exit layers | 0, 2 |" in text and "Not evaluated yet" in text


def test_save_over_an_existing_folder_replaces_the_files(saved):
    model, out = saved
    (out / "notes.txt").write_text("mine")
    model.exit_config.thresholds = 0.5
    model.save_pretrained(out)
    assert EarlyExitConfig.from_json_file(out / "exit_config.json").thresholds == 0.5
    assert (out / "notes.txt").read_text() == "mine"


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = EarlyExitModelForCausalLM.from_base(make_tiny("llama"), EarlyExitConfig(exit_layers=[1]))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary folder

    monkeypatch.undo()
    model.save_pretrained(tmp_path / "old")
    before = {p: (tmp_path / "old" / p).read_bytes() for p in SAVED_FILES}
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    model.exit_config.thresholds = 0.1
    with torch.no_grad():  # other weights: the file must be written (the same heads would reuse the old file)
        model.heads[0].classifier.fc2.bias.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "old")
    assert {p: (tmp_path / "old" / p).read_bytes() for p in SAVED_FILES} == before
    assert sorted(os.listdir(tmp_path)) == ["old"]


def test_save_interrupted_between_files_is_detected_at_load(saved, monkeypatch):
    """Over an existing folder the files move one by one, config last; a crash in between leaves
    new weights beside the old config, whose recorded sha256 then refuses them."""
    model, out = saved
    real_replace, moved = os.replace, []

    def crash_after_weights(src, dst):
        if moved:
            raise OSError("killed")
        moved.append(dst)
        real_replace(src, dst)

    _trained_like(model, seed=9)
    monkeypatch.setattr(os, "replace", crash_after_weights)
    with pytest.raises(OSError, match="killed"):
        model.save_pretrained(out)
    monkeypatch.undo()
    assert [os.path.basename(p) for p in moved] == ["exit_heads.safetensors"]
    with pytest.raises(WeightsFileError, match="sha256 differs"):
        EarlyExitModelForCausalLM.from_pretrained(out)


def test_saved_folder_has_normal_permissions(saved):
    _, out = saved
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


def test_base_model_override_and_size_mismatch(saved, tiny_base_dir):
    _, out = saved
    base = make_tiny("llama")
    model = EarlyExitModelForCausalLM.from_pretrained(out, base_model=base)
    assert model.base_model is base
    bigger = make_tiny("llama", num_hidden_layers=6)
    with pytest.raises(BaseModelMismatchError) as err:
        EarlyExitModelForCausalLM.from_pretrained(out, base_model=bigger)
    assert "layers 4" in str(err.value) and "layers 6" in str(err.value)
    other = make_tiny("llama", hidden_size=48)
    with pytest.raises(BaseModelMismatchError, match="hidden size 32.*hidden size 48"):
        EarlyExitModelForCausalLM.from_pretrained(out, base_model=other)
    with pytest.raises(BaseModelMismatchError, match="model type gpt2"):
        EarlyExitModelForCausalLM.from_pretrained(out, base_model=make_tiny("gpt2"))


def test_from_pretrained_bad_folders(saved, tmp_path):
    _, out = saved
    with pytest.raises(ModelNotFoundError, match="exit-heads folder not found"):
        EarlyExitModelForCausalLM.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="missing exit_config.json, exit_heads.safetensors"):
        EarlyExitModelForCausalLM.from_pretrained(empty)

    weights = out / "exit_heads.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated: the recorded sha256 catches it first
    with pytest.raises(WeightsFileError, match="sha256 differs"):
        EarlyExitModelForCausalLM.from_pretrained(out)
    config_path = out / "exit_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "weights_sha256": None}))  # e.g. a hand-written config
    for broken in (b"\x00garbage" * 10, good[: len(good) // 2]):
        weights.write_bytes(broken)
        with pytest.raises(WeightsFileError, match="not a valid safetensors file"):
            EarlyExitModelForCausalLM.from_pretrained(out)
    weights.write_bytes(good)

    config_path.write_text(json.dumps({**config, "head": "norm"}))  # the file has adapter tensors
    with pytest.raises(WeightsFileError, match="says head 'norm', but .* holds 'adapter' heads"):
        EarlyExitModelForCausalLM.from_pretrained(out)
    config_path.write_text(json.dumps({**config, "adapter_rank": 8}))
    with pytest.raises(WeightsFileError, match=r"has shape \(4, 32\), expected \(8, 32\)"):
        EarlyExitModelForCausalLM.from_pretrained(out)
    config_path.write_text(json.dumps({**config, "exit_layers": [0, 3]}))
    with pytest.raises(ConfigError, match="last layer"):
        EarlyExitModelForCausalLM.from_pretrained(out)
    config_path.write_text(json.dumps({**config, "base_model": None}))
    with pytest.raises(ConfigError, match="names no base_model"):
        EarlyExitModelForCausalLM.from_pretrained(out)


def test_from_base_checks_exit_layers_against_the_base():
    with pytest.raises(ConfigError, match="exit layer 7 is out of range: the base model has 4"):
        EarlyExitModelForCausalLM.from_base(make_tiny("llama"), EarlyExitConfig(exit_layers=[1, 7]))
    with pytest.raises(GenerationInputError, match=r"loading arguments \['dtype'\] apply only"):
        EarlyExitModelForCausalLM.from_base(make_tiny("llama"), EarlyExitConfig(exit_layers=[1]), dtype=torch.float16)


def test_forward_rejects_bad_ids():
    model = EarlyExitModelForCausalLM.from_base(make_tiny("llama"), EarlyExitConfig(exit_layers=[1]))
    with pytest.raises(GenerationInputError, match="input_ids must be a torch.Tensor"):
        model(None, output_exit_logits=True)
    with pytest.raises(GenerationInputError, match="token id 99"):
        model(torch.tensor([[1, 99]]), output_exit_logits=True)


@pytest.mark.parametrize("kind", ARCHS)
def test_forward_with_exits_matches_the_base_and_the_heads(kind):
    model = _trained_like(
        EarlyExitModelForCausalLM.from_base(make_tiny(kind), EarlyExitConfig(exit_layers=[0, 2], confidence="max_prob"))
    )
    ids, mask = padded_batch([5, 9, 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate passes for left padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_exit_logits=True, labels=ids)
        base = model.base_model(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], base.logits[valid], rtol=0, atol=1e-5)
    assert out.exit_confidences.shape == (2, 3, 9)
    for j, layer in enumerate(model.exit_layers):
        hidden = base.hidden_states[layer + 1]
        torch.testing.assert_close(out.exit_hidden_states[j][valid], hidden[valid], rtol=0, atol=1e-5)
        expected = model.heads[j].logits(hidden)
        torch.testing.assert_close(out.exit_logits[j][valid], expected[valid], rtol=0, atol=1e-4)
        probs = torch.softmax(expected.float(), -1).amax(-1)
        torch.testing.assert_close(out.exit_confidences[j][valid], probs[valid], rtol=0, atol=1e-5)
    assert out.loss is not None and torch.isfinite(out.loss)
    plain = model(ids, attention_mask=mask)  # without exits: the base model's own forward
    assert torch.equal(plain.logits, model.base_model(ids, attention_mask=mask).logits)


def test_attributes_are_forwarded_to_the_base():
    base = make_tiny("llama")
    model = EarlyExitModelForCausalLM.from_base(base, EarlyExitConfig(exit_layers=[1]))
    assert model.config is base.config
    assert model.generation_config is base.generation_config
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert not model.training and not model.heads.training
    assert model.train() is model and model.heads.training and model.base_model.training
    model.eval()
    assert model.to(torch.float64) is model
    assert model.heads[0].norm.weight.dtype == torch.float64 and base.lm_head.weight.dtype == torch.float64
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018


def test_bfloat16_base_gets_bfloat16_heads_and_generates():
    base = make_tiny("llama").to(torch.bfloat16)
    model = EarlyExitModelForCausalLM.from_base(base, EarlyExitConfig(exit_layers=[1, 2], thresholds=[0.0, math.inf]))
    assert all(p.dtype == torch.bfloat16 for p in model.heads.parameters())
    ids, mask = padded_batch([4, 6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 10) and out.exit_layers[:, 1:].eq(1).all()
