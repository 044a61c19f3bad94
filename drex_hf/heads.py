"""Exit heads and confidence measures.

An exit head turns the hidden state after an exit layer into logits: its own norm (or the base's
final norm), an optional zero-initialised low-rank adapter, then the base's shared, frozen lm_head.
Each head also owns a tiny confidence classifier. The confidence functions here are what the
decoders call at every exit point; `classifier` and `saturation` need no vocabulary projection.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from drex_hf.config import EarlyExitConfig
from drex_hf.kernels import logit_confidence


class LowRankAdapter(nn.Module):
    """x + up(down(x)); `up` starts at zero so a new adapter is the identity."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.normal_(self.down.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class ConfidenceClassifier(nn.Module):
    """A tiny MLP: P(this exit's token is right) from the normed hidden state, no vocab projection."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)
        nn.init.zeros_(self.fc2.weight)  # untrained: 0.5 everywhere, no accidental confidence
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(features)))).squeeze(-1)


class ExitHead(nn.Module):
    """Hidden state after an exit layer -> logits through the base's shared lm_head.

    The final norm (for `shared`) and the lm_head are held by reference, not registered as
    submodules, so they are never saved with the heads and never duplicated in memory.
    """

    def __init__(self, config: EarlyExitConfig, final_norm: nn.Module, lm_head: nn.Module, hidden_size: int) -> None:
        super().__init__()
        kind = config.head
        self._shared = (final_norm, lm_head)
        self.norm = copy.deepcopy(final_norm) if kind in ("norm", "adapter") else None
        self.adapter = LowRankAdapter(hidden_size, config.adapter_rank) if kind == "adapter" else None
        self.classifier = ConfidenceClassifier(hidden_size, config.classifier_hidden)
        if self.norm is not None:
            self.norm.requires_grad_(True)

    @property
    def lm_head(self) -> nn.Module:
        return self._shared[1]

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the lm_head sees: normed (and adapted) hidden state."""
        norm = self.norm if self.norm is not None else self._shared[0]
        x = norm(hidden)
        if self.adapter is not None:
            x = self.adapter(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(hidden))

    def classifier_confidence(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(hidden))


def _logit_confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max prob, margin) in float32 over the last dimension. Without gradients this runs the
    `logit_confidence` kernel (no softmax materialised on a GPU); with them, autograd's softmax."""
    if logits.requires_grad and torch.is_grad_enabled():
        top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return top[..., 0], top[..., 0] - top[..., 1]
    max_prob, margin = logit_confidence(logits.reshape(-1, logits.shape[-1]))
    return max_prob.view(logits.shape[:-1]), margin.view(logits.shape[:-1])


def max_prob_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability, computed in float32."""
    return _logit_confidences(logits)[0]


def margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability, computed in float32."""
    return _logit_confidences(logits)[1]


def saturation_confidence(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine between this exit's hidden state and the previous exit's (CALM's state saturation).

    Negative cosines are clamped to 0 so the value lies in [0, 1] like every confidence.
    """
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1).clamp(min=0.0)


def exit_confidence(
    measure: str,
    head: ExitHead,
    hidden: torch.Tensor,
    previous_hidden: torch.Tensor,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Confidence of `measure` at one exit point, and the logits if computing it needed them.

    `hidden` is the raw hidden state after the exit layer, `previous_hidden` the one after the
    previous exit (the embeddings for the first exit). Logits are computed only for `max_prob` and
    `margin`, or reused when given.
    """
    if measure == "classifier":
        return head.classifier_confidence(hidden), logits
    if measure == "saturation":
        return saturation_confidence(hidden, previous_hidden), logits
    if logits is None:
        logits = head.logits(hidden)
    if measure == "max_prob":
        return max_prob_confidence(logits), logits
    if measure == "margin":
        return margin_confidence(logits), logits
    raise ValueError(f"unknown confidence measure {measure!r}")
