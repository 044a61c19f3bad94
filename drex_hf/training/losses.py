"""Per-exit losses: KL to the final layer's distribution (top-k or whole vocabulary) plus
cross-entropy to the next token, and the confidence classifier's BCE target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) with the teacher's top-k renormalised to a distribution.

    `top_idx`/`top_logp` [n, K]: the teacher's top-k ids and log-probabilities under its full softmax.
    """
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(top_logp.float(), dim=-1)  # renormalise the top-k
    return (teacher.exp() * (teacher - logp.gather(-1, top_idx))).sum(-1).mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the whole vocabulary."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - logp)).sum(-1).mean()


def classifier_loss(confidence: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """BCE of the classifier's probability against 'this exit's argmax is the final layer's'."""
    # binary_cross_entropy refuses to run under CUDA autocast; the probabilities are float32 anyway
    with torch.autocast(device_type=confidence.device.type, enabled=False):
        return F.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), agrees.float())
