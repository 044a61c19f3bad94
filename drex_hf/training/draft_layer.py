"""Train a `DraftLayer` (`drex_hf.draft_layer`) by distillation on the model's own generations.

The data are full depth's greedy answers to prompts (the model's own text, as `self_spec` meets it).
The backbone runs once over them: per sequence, the hidden state after the draft exit (the layer's
input) and the final layer's top-k log-probabilities at every answer position (the teacher). Then
only the draft layer trains: its output through its norm and the shared lm_head, against the
teacher by KL on the teacher's top-k (`losses.distill_kl`), the backbone and lm_head frozen. Every
`eval_every` steps it is scored on held-out answers: how often its argmax is full depth's (what
greedy acceptance counts), beside the plain exit head's at the same exit. Those are the curves.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from drex_hf.arch import build_attention_mask
from drex_hf.draft_layer import DraftLayer
from drex_hf.errors import ConfigError
from drex_hf.training.losses import distill_kl


@dataclass
class DistillSet:
    """Per sequence: the exit's hidden states `[len, H]`, and at its answer positions (`starts`: the
    first position whose next token is an answer's) the teacher's top-k ids and log-probabilities."""

    states: list[torch.Tensor] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    top_idx: list[torch.Tensor] = field(default_factory=list)
    top_logp: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def positions(self) -> int:
        return sum(t.shape[0] for t in self.top_idx)


@torch.no_grad()
def distill_set(
    model: Any, sequences: Sequence[tuple[Sequence[int], int]], exit_layer: int, top_k: int = 64,
    progress: Callable[[int], None] | None = None,
) -> DistillSet:  # fmt: skip
    """Run the backbone once over `sequences` ((token ids, answer start) each): see `DistillSet`."""
    arch, out = model.arch, DistillSet()
    device = arch.lm_head.weight.device
    at = model.exit_layers.index(exit_layer)
    for ids, start in sequences:
        if not 0 < start < len(ids):
            raise ConfigError(f"an answer must start inside its sequence (1..{len(ids) - 1}), got {start}")
        tokens = torch.tensor([list(ids)], device=device)
        _, exits, last = model.exit_states(tokens)
        first = start - 1  # the position whose next token is the answer's first
        logp = torch.log_softmax(arch.lm_head(arch.final_norm(last[0, first:-1])).float(), dim=-1)
        values, index = logp.topk(top_k, dim=-1)
        out.states.append(exits[at][0].float().cpu())
        out.starts.append(first)
        out.top_idx.append(index.cpu())
        out.top_logp.append(values.cpu())
        if progress is not None:
            progress(1)
    return out


def _padded(arch: Any, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of exit states, right-padded into `[b, len, H]` on the model's device and dtype,
    with the mask of real positions `[b, len]`."""
    device, dtype = arch.lm_head.weight.device, arch.lm_head.weight.dtype
    length = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), length, states[0].shape[1], device=device, dtype=dtype)
    valid = torch.zeros(len(states), length, dtype=torch.bool, device=device)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s.to(device=device, dtype=dtype)
        valid[i, : s.shape[0]] = True
    return hidden, valid


def draft_features(layer: DraftLayer, arch: Any, states: list[torch.Tensor]) -> torch.Tensor:
    """What the lm_head sees from the draft layer over right-padded sequences of exit states
    `[b, len, H]` (causal attention among each sequence's own positions)."""
    hidden, valid = _padded(arch, states)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(*valid.shape)
    mask = build_attention_mask(positions, hidden.shape[1], key_valid=valid, window=arch.layer_window(layer.index),
                                dtype=hidden.dtype)  # fmt: skip
    out = arch.run_layer(layer.index, hidden, attention_mask=mask, position_ids=positions,
                         position_embeddings=arch.position_embeddings(hidden, positions), cache=None,
                         module=layer.layer)  # fmt: skip
    return layer.features(layer.mix(hidden, out))


def _answer_rows(data: DistillSet, rows: Sequence[int], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The answer positions' features, with their teachers' top-k, stacked over `rows`."""
    picked, idx, logp = [], [], []
    for b, i in enumerate(rows):
        n = data.top_idx[i].shape[0]
        picked.append(features[b, data.starts[i] : data.starts[i] + n])
        idx.append(data.top_idx[i])
        logp.append(data.top_logp[i])
    device = features.device
    return torch.cat(picked), torch.cat(idx).to(device), torch.cat(logp).to(device)


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine down to 0.1 at the last step."""
    if step <= warmup:
        return step / max(warmup, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@torch.no_grad()
def agreement(model: Any, layer: DraftLayer | None, data: DistillSet, exit_layer: int, batch: int = 8) -> dict:
    """On `data`: how often the draft layer's argmax (None: the plain exit head's) is full depth's,
    and its KL to the teacher's top-k."""
    arch = model.arch
    head = model.heads[model.exit_layers.index(exit_layer)]
    agree = total = 0
    kl = 0.0
    for lo in range(0, len(data), batch):
        rows = list(range(lo, min(lo + batch, len(data))))
        states = [data.states[i] for i in rows]
        features = draft_features(layer, arch, states) if layer is not None else head.features(_padded(arch, states)[0])
        x, idx, logp = _answer_rows(data, rows, features)
        logits = arch.lm_head(x).float()
        agree += int((logits.argmax(-1) == idx[:, 0]).sum())
        total += x.shape[0]
        kl += float(distill_kl(logits, idx, logp)) * x.shape[0]
    return {"agreement": agree / max(total, 1), "kl": kl / max(total, 1), "positions": total}


def train_draft_layer(
    model: Any, train: DistillSet, held_out: DistillSet, exit_layer: int, *, steps: int, batch: int = 8,
    lr: float = 3e-4, warmup: int = 10, eval_every: int = 25, seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> tuple[DraftLayer, dict[str, Any]]:  # fmt: skip
    """A new draft layer after `exit_layer`, trained `steps` AdamW steps on `train` (batches of
    `batch` sequences, cosine to a tenth of `lr` after `warmup`); the curves: per eval point the
    step, the training loss since the last point and the held-out agreement and KL, with the plain
    exit head's held-out agreement as the baseline."""
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("eval_every", eval_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not len(train) or not len(held_out):
        raise ConfigError("distilling a draft layer needs training and held-out answers")
    base = [p for p in model.parameters() if p.requires_grad]
    for p in base:  # the backbone and lm_head stay frozen (and cost no gradients)
        p.requires_grad_(False)
    try:
        return _train(model, train, held_out, exit_layer, steps, batch, lr, warmup, eval_every, seed, progress)
    finally:
        for p in base:
            p.requires_grad_(True)


def _train(
    model: Any, train: DistillSet, held_out: DistillSet, exit_layer: int, steps: int, batch: int, lr: float,
    warmup: int, eval_every: int, seed: int, progress: Callable[[dict], None] | None,
) -> tuple[DraftLayer, dict[str, Any]]:  # fmt: skip
    arch = model.arch
    head = model.heads[model.exit_layers.index(exit_layer)]
    layer = DraftLayer(arch, exit_layer, head=head, gate=0.0)  # where it starts: the exit head's own drafts
    layer.to(device=arch.lm_head.weight.device, dtype=arch.lm_head.weight.dtype)
    layer.train()
    params = [p for name, p in layer.named_parameters() if not layer.is_shared(name)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    curves: dict[str, Any] = {
        "exit_layer": exit_layer, "steps": [], "train_loss": [], "agreement": [], "kl": [],
        "head_agreement": agreement(model, None, held_out, exit_layer)["agreement"],
        "train_sequences": len(train), "train_positions": train.positions,
        "held_out_sequences": len(held_out), "held_out_positions": held_out.positions,
    }  # fmt: skip
    first = agreement(model, layer, held_out, exit_layer)
    curves["steps"].append(0)
    curves["train_loss"].append(None)
    curves["agreement"].append(first["agreement"])
    curves["kl"].append(first["kl"])
    window: list[float] = []
    for step in range(1, steps + 1):
        if len(order) < batch:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        rows, order = order[:batch], order[batch:]
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(step, steps, warmup)
        features = draft_features(layer, arch, [train.states[i] for i in rows])
        x, idx, logp = _answer_rows(train, rows, features)
        loss = distill_kl(arch.lm_head(x), idx, logp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(loss.item())
        if step % eval_every == 0 or step == steps:
            layer.eval()
            scored = agreement(model, layer, held_out, exit_layer)
            layer.train()
            curves["steps"].append(step)
            curves["train_loss"].append(sum(window) / len(window))
            curves["agreement"].append(scored["agreement"])
            curves["kl"].append(scored["kl"])
            window = []
            if progress is not None:
                progress({"step": step, **scored})
    for p in params:
        p.requires_grad_(False)
    return layer.eval(), curves
