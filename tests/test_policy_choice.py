"""Which policy is fastest per batch size (issue 19): `measure_policies` measures full, drex and
self_spec on the same prompts and chooses; a calibration entry's `policy_choice` makes
`generate()` without `policy=` follow it; a malformed one is refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from test_bad_input_files import _calibrate_by_hand, _heads

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.calibration.choice import _choose, measure_policies
from drex_hf.calibration_file import choice_for
from drex_hf.device import device_name
from drex_hf.errors import ConfigError, GenerationInputError
from drex_hf.generation.engine import EngineStats
from drex_hf.generation.spec.engine import SpecStats


def test_measure_policies_measures_every_policy_and_keeps_quality():
    model = _heads(seed=3)
    prompts = [torch.randint(1, 99, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 6, 5)]
    choices = measure_policies(
        model, prompts, batch_sizes=[1, 3], max_new_tokens=8, draft_exits=[0, 2], draft_tokens=[1, 2], repeats=1
    )
    assert sorted(choices) == ["1", "3"]
    for entry in choices.values():
        rows = entry["measured"]
        assert set(rows) == {"full", "drex", "self_spec:0:1", "self_spec:0:2", "self_spec:2:1", "self_spec:2:2"}
        assert rows["full"]["ratio"] == 1.0 and rows["full"]["exact"] == 1.0
        for name, row in rows.items():
            assert row["tokens_per_s"] > 0
            if name.startswith("self_spec"):  # lossless, measured on the tokens it produced
                assert row["exact"] == 1.0 and row["rouge_l"] == 1.0
                assert 0 <= row["acceptance_rate"] <= 1
        assert entry["policy"] in ("full", "drex", "self_spec")
        assert entry["self_spec_best"]["draft_exit"] in (0, 2)
        best = max(entry["measured"][n]["ratio"] for n in ("full", "drex", *(n for n in rows if "spec" in n)))
        if best < entry["margin"]:
            assert entry["policy"] == "full"
    model.exit_config.thresholds = [float("inf")] * len(model.exit_layers)  # every exit off: drex is not timed
    off = measure_policies(model, prompts, batch_sizes=[1], max_new_tokens=4, draft_exits=[2], draft_tokens=[1])
    assert set(off["1"]["measured"]) == {"full", "self_spec:2:1"}
    assert off["1"]["reason"].endswith("drex is full depth here (every exit is off on this device)")
    with pytest.raises(GenerationInputError, match="at least 3 prompts"):
        measure_policies(model, prompts[:2], batch_sizes=[3], max_new_tokens=4, draft_exits=[0], draft_tokens=[1])
    with pytest.raises(GenerationInputError, match="exit layers"):
        measure_policies(model, prompts, batch_sizes=[1], max_new_tokens=4, draft_exits=[1], draft_tokens=[1])


def _rows(full, drex, spec):
    row = lambda r: {"tokens_per_s": 100 * r, "ratio": r, "exact": 1.0, "rouge_l": 1.0}  # noqa: E731
    return {"full": row(1.0), "drex": row(drex), "self_spec:2:3": {**row(spec), "acceptance_rate": 0.7}}


def test_choose_prefers_full_unless_something_pays():
    slow = _choose(_rows(1.0, 0.8, 0.6), margin=1.05)
    assert slow["policy"] == "full"
    assert "drex does not pay here (0.80x" in slow["reason"] and "self_spec does not pay here (0.60x" in slow["reason"]
    spec = _choose(_rows(1.0, 1.1, 1.4), margin=1.05)
    assert (spec["policy"], spec["draft_exit"], spec["draft_tokens"]) == ("self_spec", 2, 3)
    drex = _choose(_rows(1.0, 1.3, 1.02), margin=1.05)
    assert drex["policy"] == "drex" and "self_spec does not pay here" in drex["reason"]
    assert _choose(_rows(1.0, 1.03, 1.04), margin=1.05)["policy"] == "full"  # inside the margin
    # lossless: drex is measured and reported, never chosen
    lossless = _choose(_rows(1.0, 1.3, 1.02), margin=1.05, lossless=True)
    assert lossless["policy"] == "full" and "drex (1.30x full depth, 100% of answers exact) is not chosen" in lossless[
        "reason"]  # fmt: skip
    assert _choose(_rows(1.0, 1.3, 1.2), margin=1.05, lossless=True)["policy"] == "self_spec"


def test_choice_for_takes_the_largest_calibrated_batch_not_above():
    choices = {"1": {"policy": "self_spec"}, "8": {"policy": "full"}, "32": {"policy": "drex"}}
    assert [choice_for(choices, b)["policy"] for b in (1, 4, 8, 20, 64)] == ["self_spec"] * 2 + ["full"] * 2 + ["drex"]
    assert choice_for(None, 3) is None


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "heads"
    _heads(seed=1).save_pretrained(out)
    return out


def _with_choice(folder, choice):
    entry = {"thresholds": [0.5, 0.5], "policy_choice": choice}
    _calibrate_by_hand(folder, [0.5, 0.5], cost_models={device_name("cpu"): entry})


def test_generate_follows_the_calibrated_choice(folder):
    _with_choice(folder, {"1": {"policy": "self_spec", "draft_exit": 2, "draft_tokens": 3}, "2": {"policy": "full"}})
    model = EarlyExitModelForCausalLM.from_pretrained(folder, base_model=make_tiny("llama"))
    one = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(one.stats, SpecStats) and one.stats.rounds > 0
    full = model.generate(torch.tensor([[5, 6, 7]]), policy="full", max_new_tokens=6)
    assert torch.equal(one.sequences, full)
    two = model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=6, return_dict_in_generate=True)
    assert isinstance(two.stats, EngineStats) and two.stats.policy == "full"
    # an explicit policy wins over the calibrated one
    drex = model.generate(torch.tensor([[5, 6, 7]]), policy="drex", max_new_tokens=6, return_dict_in_generate=True)
    assert drex.stats.policy == "drex"


def test_generate_follows_a_calibrated_choice_of_text_drafts(folder):
    """Issue 26: a choice of drafts from each row's own text (no draft exit) is followed, losslessly."""
    _with_choice(folder, {"1": {"policy": "self_spec", "draft_source": "ngram", "draft_exit": None,
                                "draft_tokens": 4}})  # fmt: skip
    model = EarlyExitModelForCausalLM.from_pretrained(folder, base_model=make_tiny("llama"))
    prompt = torch.arange(3, 99).unsqueeze(0)  # every token of the vocabulary but three: each one has a match
    out = model.generate(prompt, max_new_tokens=8, return_dict_in_generate=True)
    assert isinstance(out.stats, SpecStats) and out.stats.ngram_rounds > 0 and out.stats.draft_steps == 0
    assert torch.equal(out.sequences, model.generate(prompt, policy="full", max_new_tokens=8))


def _prefer_spec(monkeypatch):
    """Make every choice self_spec's best row (timing on a tiny model cannot be relied on to)."""
    from drex_hf.calibration import choice

    def choose(rows, margin, lossless=False):
        spec = max((n for n in rows if n.startswith("self_spec")), key=lambda n: rows[n]["ratio"])
        rows = {**rows, spec: {**rows[spec], "ratio": 10.0}}
        return real(rows, margin, lossless)

    real = choice._choose
    monkeypatch.setattr(choice, "_choose", choose)


def test_measure_policies_times_each_draft_source_and_checks_the_choice_on_other_prompts(monkeypatch):
    _prefer_spec(monkeypatch)
    model = _heads(seed=3)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 99, (n,), generator=gen) for n in (4, 6, 5, 7)]
    check = [torch.randint(1, 99, (n,), generator=gen) for n in (5, 4)]
    choices = measure_policies(model, prompts, batch_sizes=[1, 2], max_new_tokens=8, draft_exits=[2],
                               draft_tokens=[2, "adaptive"], draft_sources=("head", "ngram", "mixed"), repeats=1,
                               check_prompts=check)  # fmt: skip
    for entry in choices.values():
        spec = {n for n in entry["measured"] if n.startswith("self_spec")}
        assert spec == {f"self_spec:{w}:{k}" for w in ("2", "ngram", "ngram+2") for k in (2, "adaptive")}
        assert all(entry["measured"][n]["exact"] == 1.0 for n in spec)
        assert entry["policy"] == "self_spec"  # chosen, then timed again on the other prompts
        assert entry["checked"]["prompts"] == 2 and entry["checked"]["ratio"] > 0
        assert entry["draft_source"] in ("head", "ngram", "mixed")
    with pytest.raises(GenerationInputError, match="draft sources"):
        measure_policies(model, prompts, batch_sizes=[1], max_new_tokens=4, draft_exits=[2], draft_tokens=[1],
                         draft_sources=("lookup",))  # fmt: skip


def test_without_a_choice_generate_defaults_to_drex(folder):
    _calibrate_by_hand(folder, [0.5, 0.5], cost_models={device_name("cpu"): {"thresholds": [0.5, 0.5]}})
    model = EarlyExitModelForCausalLM.from_pretrained(folder, base_model=make_tiny("llama"))
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, return_dict_in_generate=True)
    assert out.stats.policy == "drex"


@pytest.mark.parametrize(
    "choice, field",
    [
        ([], "policy_choice"),
        ({"one": {"policy": "full"}}, "batch sizes"),
        ({"1": {"policy": "fast"}}, "policy_choice['1'].policy"),
        ({"1": {"policy": "self_spec", "draft_exit": 1, "draft_tokens": 2}}, "policy_choice['1'].draft_exit"),
        ({"1": {"policy": "self_spec", "draft_exit": 2, "draft_tokens": 0}}, "policy_choice['1'].draft_tokens"),
        (
            {"1": {"policy": "self_spec", "draft_source": "lookup", "draft_exit": 2, "draft_tokens": 2}},
            "policy_choice['1'].draft_source",
        ),
        (
            {"1": {"policy": "self_spec", "draft_source": "mixed", "draft_exit": None, "draft_tokens": 2}},
            "policy_choice['1'].draft_exit",
        ),
    ],
)
def test_a_malformed_choice_is_refused_naming_the_field(folder, choice, field):
    _with_choice(folder, choice)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        EarlyExitModelForCausalLM.from_pretrained(folder, base_model=make_tiny("llama"))
    assert json.loads((folder / "calibration.json").read_text())["cost_models"]  # left as it was
