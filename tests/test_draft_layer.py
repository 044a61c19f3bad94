"""A draft head with one decoder layer after a shallow exit (Kangaroo's shape, issue 26 scope 3):
new, it computes exactly layer e+1; in the engine it reads and writes layer e+1's own keys and
values (a model whose layers past e+1 do nothing drafts full depth's every token); greedy output
stays full depth's whatever it drafts; distillation raises its agreement; it saves, loads and is
refused when wrong."""

import json
import math

import pytest
import torch
from conftest import make_tiny
from test_self_spec import _full, _prompts
from test_spec_engine import LENGTHS_8, NEW
from test_spec_engine import _run as _run_outputs

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.draft_layer import DRAFT_LAYER_NAME, DraftLayer, read_draft_layers, write_draft_layers
from drex_hf.errors import GenerationInputError, GenerationTypeError, WeightsFileError
from drex_hf.generation.settings import DecodeSettings
from drex_hf.training.draft_layer import agreement, distill_set, draft_features, train_draft_layer

EXITS = [0, 1, 2]
KINDS = ["llama", "qwen2", "gpt2"]


def _model(kind, seed=1, idle_after=None, **overrides):
    """A tiny model with exits after layers 0..2. `idle_after`: layers past it add nothing (their
    attention and MLP outputs zeroed, biases too), so full depth is layer `idle_after`'s output."""
    if kind == "gpt2":
        overrides.setdefault("tie_word_embeddings", False)
    config = EarlyExitConfig(exit_layers=EXITS, thresholds=math.inf, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind, seed=seed, **overrides), config)
    if idle_after is not None:
        with torch.no_grad():
            for layer in model.arch.layers[idle_after + 1 :]:
                outputs = (layer.attn.c_proj, layer.mlp.c_proj) if kind == "gpt2" else (
                    layer.self_attn.o_proj, layer.mlp.down_proj)  # fmt: skip
                for linear in outputs:
                    for tensor in (linear.weight, getattr(linear, "bias", None)):
                        if tensor is not None:
                            tensor.zero_()
    return model


def _run(model, prompts, settings, draft_exit, k, **options):
    outputs, engine = _run_outputs(model, prompts, settings, draft_exit, k, **options)
    return [out.tokens for out in outputs], engine


def _hidden_after(model, ids, layer):
    out = model.base_model(ids, output_hidden_states=True)
    return out.hidden_states[layer + 1]


# ---------------------------------------------------------------- the module
@pytest.mark.parametrize("kind", KINDS)
def test_new_draft_layer_is_layer_e_plus_1_sharing_its_key_value_modules(kind):
    model = _model(kind)
    arch = model.arch
    layer = DraftLayer(arch, 0)
    for name in arch.kv_modules():
        assert layer.layer.get_submodule(name) is arch.layers[1].get_submodule(name)
    assert layer.layer.mlp is not arch.layers[1].mlp  # its own, to train
    trained = layer.trained_state()
    assert trained and not any(layer.is_shared(k) for k in trained)
    assert not any(".k_proj." in k or ".v_proj." in k or "c_attn" in k for k in trained)
    ids = _prompts([9])[0].unsqueeze(0)
    with torch.no_grad():
        out = draft_features(layer, arch, [_hidden_after(model, ids, 0)[0]])
        want = arch.final_norm(_hidden_after(model, ids, 1))  # layer 1's output, through the final norm
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- in the engine
@pytest.mark.parametrize("kind", KINDS)
def test_engine_draft_layer_reads_layer_e_plus_1_cache_every_draft_accepted(kind):
    """Layers 2 and 3 idle: full depth's token is final_norm(layer 1) — what a new draft layer after
    exit 0 drafts, if (and only if) it attends over each row's own layer-1 keys and values, prompt
    and earlier drafts alike. So every draft is accepted, at batch 3 with rows of different lengths.
    The plain exit-0 head, on the same model, drafts some wrong."""
    model = _model(kind, idle_after=1)
    prompts = _prompts([5, 9, 3])
    settings = DecodeSettings(max_new_tokens=NEW)
    want = _full(model, prompts, settings)
    layer = DraftLayer(model.arch, 0)
    tokens, engine = _run(model, prompts, settings, 0, 3, draft_layer=layer)
    assert tokens == want
    stats = engine.stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    assert engine.programs.draft_layer is layer
    for out in engine.finished.values():  # every full round emitted its 3 drafts and one more
        assert all(a == d for a, d in zip(out.accepted, out.drafted))
    plain_tokens, plain = _run(model, prompts, settings, 0, 3, draft_layer=None)
    assert plain_tokens == want and plain.programs.draft_layer is None
    assert plain.stats.accepted < plain.stats.drafted


@pytest.mark.parametrize("kind", KINDS)
def test_gate_zero_on_the_exit_head_drafts_what_the_exit_head_drafts(kind):
    """Where distillation starts: gate 0 and a copy of the exit head draft the exit head's drafts, so
    every round accepts what the plain head's accepts."""
    model = _model(kind)
    prompts = _prompts([5, 9, 3])
    settings = DecodeSettings(max_new_tokens=NEW)
    start = DraftLayer(model.arch, 1, head=model.heads[1], gate=0.0)
    assert start.head is not model.heads[1] and start.head.lm_head is model.arch.lm_head
    tokens, engine = _run(model, prompts, settings, 1, 3, draft_layer=start)
    plain_tokens, plain = _run(model, prompts, settings, 1, 3, draft_layer=None)
    assert tokens == plain_tokens == _full(model, prompts, settings)
    assert 0 < plain.stats.accepted < plain.stats.drafted
    for i in range(len(prompts)):
        assert engine.finished[i].accepted == plain.finished[i].accepted
        assert engine.finished[i].drafted == plain.finished[i].drafted


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["head", "mixed"])
def test_greedy_equals_full_depth_with_an_untrained_draft_layer(kind, source):
    """Whatever a draft layer drafts (here layer 1 of an ordinary model, a poor draft), the tokens are
    full depth's: batches 1 / 3 / 8, rows ending at eos mid-run."""
    model = _model(kind)
    everything = _prompts(LENGTHS_8)
    want = _full(model, everything, DecodeSettings(max_new_tokens=NEW))
    eos = tuple(sorted({tokens[5] for tokens in want[:3]}))
    ended = DecodeSettings(max_new_tokens=NEW, eos_token_ids=eos)
    want_ended = _full(model, everything, ended)
    layer = DraftLayer(model.arch, 1)
    for batch in (1, 3, 8):
        for prompts, settings, expect in ((everything[:batch], ended, want_ended[:batch]),):
            tokens, engine = _run(model, prompts, settings, 1, 2, draft_layer=layer, draft_source=source)
            assert tokens == expect, (kind, source, batch)
            assert engine.stats.drafted > 0
    assert any(len(t) < NEW for t in want_ended[:3])  # some rows did end at eos


def test_draft_layer_option_is_checked():
    model = _model("llama")
    prompts = _prompts([5])
    settings = DecodeSettings(max_new_tokens=4)
    with pytest.raises(GenerationInputError, match="follows exit 1, but drafts come from exit 0"):
        _run(model, prompts, settings, 0, 2, draft_layer=DraftLayer(model.arch, 1))
    with pytest.raises(GenerationTypeError, match="draft_layer must be"):
        _run(model, prompts, settings, 0, 2, draft_layer="layer")
    other = _model("llama", seed=2)
    with pytest.raises(GenerationInputError, match="built on another model"):
        _run(model, prompts, settings, 0, 2, draft_layer=DraftLayer(other.arch, 0))
    with pytest.raises(GenerationInputError, match=r"in \[0, 3\)"):
        DraftLayer(model.arch, 3)
    _, engine = _run(model, prompts, settings, None, 2, draft_layer=DraftLayer(model.arch, 0), draft_source="ngram")
    assert engine.programs.draft_layer is None  # n-gram drafts never run a head


# ---------------------------------------------------------------- distillation, saving, loading
def _answers(model, count, new=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(count):
        prompt = torch.randint(3, 99, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        answer = _full(model, [prompt], DecodeSettings(max_new_tokens=new))[0]
        sequences.append((prompt.tolist() + answer, prompt.shape[0]))
    return sequences


def test_distillation_raises_agreement_and_records_curves():
    model = _model("llama")
    sequences = _answers(model, 48)
    train, held_out = distill_set(model, sequences[:36], 0, top_k=16), distill_set(model, sequences[36:], 0, top_k=16)
    assert held_out.positions == sum(len(ids) - start for ids, start in sequences[36:])
    layer, curves = train_draft_layer(model, train, held_out, 0, steps=100, batch=6, lr=1e-3, eval_every=20)
    assert curves["steps"] == [0, 20, 40, 60, 80, 100]
    assert curves["agreement"][-1] > curves["agreement"][0]
    assert all(a > b for a, b in zip(curves["kl"], curves["kl"][1:]))  # held-out KL falls at every point
    assert curves["train_loss"][-1] < curves["train_loss"][1]
    assert curves["agreement"][-1] == pytest.approx(agreement(model, layer, held_out, 0)["agreement"])
    assert 0 <= curves["head_agreement"] <= 1
    assert all(p.requires_grad for p in model.base_model.parameters())  # left as it found them
    assert not any(p.requires_grad for name, p in layer.named_parameters() if not layer.is_shared(name))


def test_draft_layers_save_load_and_drive_the_engine_by_default(tmp_path):
    model = _model("llama", idle_after=1)
    model.save_pretrained(tmp_path)
    layer = DraftLayer(model.arch, 0)
    on_head = DraftLayer(model.arch, 2, head=model.heads[2], gate=0.25)
    with torch.no_grad():
        layer.layer.mlp.up_proj.weight.mul_(1.5)  # something besides the copy, to see it come back
        on_head.head.norm.weight.mul_(2.0)
    write_draft_layers(tmp_path / DRAFT_LAYER_NAME, {0: layer, 2: on_head}, model.arch.num_layers)
    loaded = EarlyExitModelForCausalLM.from_pretrained(tmp_path, base_model=model.base_model)
    assert set(loaded.draft_layers) == {0, 2}
    back = loaded.draft_layers[0]
    torch.testing.assert_close(back.layer.mlp.up_proj.weight, layer.layer.mlp.up_proj.weight)
    assert back.layer.self_attn.k_proj is loaded.arch.layers[1].self_attn.k_proj
    back2 = loaded.draft_layers[2]
    assert back2.head is not None and back2.norm is None and float(back2.gate) == 0.25
    torch.testing.assert_close(back2.head.norm.weight, on_head.head.norm.weight)
    assert not torch.equal(back2.head.norm.weight, loaded.heads[2].norm.weight)  # its own copy, trained apart
    prompts = _prompts([5, 9])
    settings = DecodeSettings(max_new_tokens=NEW)
    tokens, engine = _run(loaded, prompts, settings, 0, 2)  # draft_layer "auto": the folder's
    assert engine.programs.draft_layer is back
    assert tokens == _full(model, prompts, settings)
    assert _run(loaded, prompts, settings, 1, 2)[1].programs.draft_layer is None  # none after exit 1
    assert _run(loaded, prompts, settings, 2, 2)[1].programs.draft_layer is back2
    loaded.to(torch.bfloat16)  # moved after loading: the draft layers (not submodules) follow at the next engine
    tokens, engine = _run(loaded, prompts, settings, 0, 2)
    assert back.gate.dtype == torch.bfloat16 and back.layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert engine.programs.draft_layer is back and [len(t) for t in tokens] == [NEW, NEW] and engine.stats.drafted


def test_a_wrong_draft_layer_file_is_refused(tmp_path):
    model = _model("llama")
    path = tmp_path / DRAFT_LAYER_NAME
    write_draft_layers(path, {0: DraftLayer(model.arch, 0)}, 5)
    with pytest.raises(WeightsFileError, match="made for a base with 5 layers"):
        read_draft_layers(path, model.arch)
    path.write_bytes(b"not safetensors")
    with pytest.raises(WeightsFileError, match="not a readable safetensors file"):
        read_draft_layers(path, model.arch)
    wider = _model("llama", intermediate_size=48)
    write_draft_layers(path, {0: DraftLayer(wider.arch, 0)}, 4)
    with pytest.raises(WeightsFileError, match="does not match this base"):
        read_draft_layers(path, model.arch)


# ---------------------------------------------------------------- drex distill
def test_drex_distill_writes_the_layer_and_its_curves_and_keeps_other_exits(tmp_path, tiny_base_dir, capsys):
    from drex_hf.cli.main import main

    config = EarlyExitConfig(exit_layers=[1, 2], thresholds=math.inf, head="norm")
    heads = tmp_path / "heads"
    EarlyExitModelForCausalLM.from_base(str(tiny_base_dir), config).save_pretrained(heads)
    gen = torch.Generator().manual_seed(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(f"w{int(i)}" for i in torch.randint(3, 99, (5,), generator=gen))
                                 for _ in range(8)) + "\n")  # fmt: skip
    args = ["distill", str(heads), "--prompts", str(prompts), "--prompt-count", "8", "--held-out", "0.25",
            "--max-new-tokens", "8", "--steps", "4", "--eval-every", "2", "--batch", "3", "--no-progress"]  # fmt: skip
    assert main([*args, "--exit", "1"]) == 0
    out = capsys.readouterr().out
    assert "draft_layer.safetensors (exits [1])" in out and "held-out agreement with full depth at exit 1" in out
    curves = json.loads((heads / "draft_layer_curves.json").read_text())
    assert curves["1"]["steps"] == [0, 2, 4] and curves["1"]["held_out_sequences"] == 2
    assert curves["1"]["train_sequences"] == 6 and len(curves["1"]["agreement"]) == 3
    assert curves["1"]["agreement"][0] == pytest.approx(curves["1"]["head_agreement"])  # gate 0: the head's drafts
    assert (heads / "draft_layer_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--exit", "2"]) == 0  # a second exit's layer joins the first's
    assert "(exits [1, 2])" in capsys.readouterr().out
    model = EarlyExitModelForCausalLM.from_pretrained(heads)
    assert set(model.draft_layers) == {1, 2} and all(layer.head is not None for layer in model.draft_layers.values())
    assert set(json.loads((heads / "draft_layer_curves.json").read_text())) == {"1", "2"}
    # refused, one line, nothing written
    before = (heads / DRAFT_LAYER_NAME).read_bytes()
    assert main([*args, "--exit", "0"]) == 2
    assert "--exit 0 is not one of the model's exits [1, 2]" in capsys.readouterr().err
    assert main([*args, "--exit", "1", "--held-out", "1.5"]) == 2
    assert "--held-out must be in (0, 1)" in capsys.readouterr().err
    assert main(["distill", str(tmp_path), "--exit", "1"]) == 2
    assert "not an exit-heads folder" in capsys.readouterr().err
    assert (heads / DRAFT_LAYER_NAME).read_bytes() == before
