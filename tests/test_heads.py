import pytest
import torch
from conftest import make_tiny

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.heads import exit_confidence, margin_confidence, max_prob_confidence, saturation_confidence


def _model(head="norm", confidence="max_prob"):
    return EarlyExitModelForCausalLM.from_base(
        make_tiny("llama"), EarlyExitConfig(exit_layers=[1, 2], head=head, confidence=confidence)
    )


@pytest.mark.parametrize("head", ["shared", "norm", "adapter"])
def test_new_heads_start_as_the_final_norm_and_shared_lm_head(head):
    model = _model(head)
    arch = model.arch
    hidden = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = arch.lm_head(arch.final_norm(hidden))
        for exit_head in model.heads:
            torch.testing.assert_close(exit_head.logits(hidden), expected, rtol=0, atol=0)
            assert exit_head.lm_head is arch.lm_head  # shared, not copied


def test_heads_own_only_their_parameters():
    names = {n for n, _ in _model("adapter").heads.named_parameters()}
    assert names == {
        f"{j}.{p}"
        for j in (0, 1)
        for p in (
            "norm.weight",
            "adapter.down.weight",
            "adapter.up.weight",
            "classifier.fc1.weight",
            "classifier.fc1.bias",
            "classifier.fc2.weight",
            "classifier.fc2.bias",
        )
    }
    shared = {n for n, _ in _model("shared").heads.named_parameters()}
    assert not any("norm" in n or "lm_head" in n for n in shared)


def test_confidence_values_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    assert max_prob_confidence(logits).item() == pytest.approx(probs[0].item())
    assert margin_confidence(logits).item() == pytest.approx((probs[0] - probs[1]).item())
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert saturation_confidence(a, b).item() == pytest.approx(2**-0.5)
    assert saturation_confidence(a, -a).item() == 0.0  # clamped into [0, 1]


@pytest.mark.parametrize("measure", ["classifier", "saturation"])
def test_cheap_measures_never_touch_the_vocabulary_projection(measure):
    model = _model(confidence=measure)
    calls = []
    handle = model.arch.lm_head.register_forward_hook(lambda *a: calls.append(1))
    hidden, previous = torch.randn(4, 1, 32), torch.randn(4, 1, 32)
    with torch.no_grad():
        confidence, logits = exit_confidence(measure, model.heads[0], hidden, previous)
    handle.remove()
    assert calls == [] and logits is None
    assert confidence.shape == (4, 1) and bool(((confidence >= 0) & (confidence <= 1)).all())


@pytest.mark.parametrize("measure", ["max_prob", "margin"])
def test_logit_measures_return_the_logits_they_computed(measure):
    model = _model(confidence=measure)
    hidden = torch.randn(4, 1, 32)
    with torch.no_grad():
        confidence, logits = exit_confidence(measure, model.heads[0], hidden, hidden)
        torch.testing.assert_close(logits, model.heads[0].logits(hidden))
    assert bool(((confidence >= 0) & (confidence <= 1)).all())


def test_untrained_classifier_is_undecided():
    model = _model(confidence="classifier")
    with torch.no_grad():
        values = model.heads[0].classifier_confidence(torch.randn(6, 32))
    torch.testing.assert_close(values, torch.full((6,), 0.5))
