"""The backbone's outputs, computed once: exit hidden states and the teacher's top-k.

With a frozen backbone the heads see the same inputs every epoch, so one pass over the data stores,
for every trained/evaluated position: the embeddings and the hidden state after each exit layer
(`states [N, exits + 1, H]`), the final layer's normed hidden state (`final [N, H]`), the final
layer's top-k token ids and log-probabilities, its argmax and the next token. The cache lives in
the run folder (safetensors), keyed by a hash of everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from drex_hf.training.data import Sample

logger = logging.getLogger(__name__)


@dataclass
class Features:
    states: torch.Tensor  # [N, k+1, H]: embeddings, then the hidden state after each exit layer
    final: torch.Tensor  # [N, H] the final layer's normed hidden state (what the lm_head sees)
    top_idx: torch.Tensor  # [N, K] the teacher's top-k token ids (K = 0: whole-vocabulary teacher)
    top_logp: torch.Tensor  # [N, K] their log-probabilities under the full softmax
    teacher_top1: torch.Tensor  # [N] the final layer's argmax
    next_token: torch.Tensor  # [N]
    document: torch.Tensor  # [N] index into `documents`
    sample_offsets: torch.Tensor  # [S + 1] rows of sample i are offsets[i]:offsets[i+1]
    documents: list[str]

    def __len__(self) -> int:
        return int(self.next_token.shape[0])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {
            name: getattr(self, name).contiguous()
            for name in ("states", "final", "top_idx", "top_logp", "teacher_top1", "next_token", "document")
        }
        tensors["sample_offsets"] = self.sample_offsets.contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"documents": json.dumps(self.documents)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Features:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            documents = json.loads(handle.metadata()["documents"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return cls(documents=documents, **tensors)


def samples_key(samples: list[Sample], extra: dict) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for s in samples:
        digest.update(json.dumps([s.input_ids, s.loss_start, s.document]).encode())
    return digest.hexdigest()[:16]


def pad_samples(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and (row, column) of every loss position, in sample order."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols = [], []
    for b, s in enumerate(samples):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[b, : len(s.input_ids)] = 1
        pos = torch.arange(s.loss_start, len(s.input_ids) - 1)
        rows.append(torch.full_like(pos, b))
        cols.append(pos)
    return ids, mask, torch.cat(rows), torch.cat(cols)


@torch.no_grad()
def compute_features(
    model: torch.nn.Module,
    samples: list[Sample],
    *,
    top_k: int,
    batch_size: int,
    desc: str = "features",
    progress: bool = True,
) -> Features:
    """Run the backbone over `samples` (right-padded batches) and keep the loss positions' outputs."""
    from tqdm.auto import tqdm

    arch = model.arch
    device = arch.lm_head.weight.device
    documents = sorted({s.document for s in samples})
    doc_index = {name: i for i, name in enumerate(documents)}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("states", "final", "idx", "logp", "top1", "next", "doc")}
    offsets = [0]
    bar = tqdm(total=sum(s.positions for s in samples), desc=desc, unit="tok", disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        ids, mask, r, c = pad_samples(batch)
        embeddings, exits, last = model.exit_states(ids.to(device), mask.to(device))
        nxt = []
        for s in batch:
            nxt.append(torch.tensor(s.input_ids[s.loss_start + 1 :]))
            parts["doc"].append(torch.full((s.positions,), doc_index[s.document], dtype=torch.long))
            offsets.append(offsets[-1] + s.positions)
        r, c = r.to(device), c.to(device)
        stacked = torch.stack([embeddings[r, c]] + [h[r, c] for h in exits], dim=1)
        parts["states"].append(stacked.float().cpu())
        final = arch.final_norm(last[r, c])
        parts["final"].append(final.float().cpu())
        for chunk in final.split(1024):
            logp = torch.log_softmax(arch.lm_head(chunk).float(), dim=-1)
            parts["top1"].append(logp.argmax(-1).cpu())
            if top_k:
                values, index = logp.topk(top_k, dim=-1)
                parts["idx"].append(index.cpu())
                parts["logp"].append(values.cpu())
        parts["next"].append(torch.cat(nxt))
        bar.update(len(r))
    bar.close()
    n = offsets[-1]
    hidden = arch.hidden_size
    return Features(
        states=torch.cat(parts["states"]) if n else torch.zeros(0, len(model.exit_layers) + 1, hidden),
        final=torch.cat(parts["final"]) if n else torch.zeros(0, hidden),
        top_idx=torch.cat(parts["idx"]) if top_k and n else torch.zeros(n, 0, dtype=torch.long),
        top_logp=torch.cat(parts["logp"]) if top_k and n else torch.zeros(n, 0),
        teacher_top1=torch.cat(parts["top1"]) if n else torch.zeros(0, dtype=torch.long),
        next_token=torch.cat(parts["next"]) if n else torch.zeros(0, dtype=torch.long),
        document=torch.cat(parts["doc"]) if n else torch.zeros(0, dtype=torch.long),
        sample_offsets=torch.tensor(offsets),
        documents=documents,
    )


def cached_features(
    model: torch.nn.Module,
    samples: list[Sample],
    folder: Path,
    name: str,
    *,
    top_k: int,
    batch_size: int,
    identity: dict,
    progress: bool = True,
) -> Features:
    """`compute_features`, stored as `folder/name-KEY.safetensors` and reused when KEY matches."""
    key = samples_key(samples, {"top_k": top_k, "exit_layers": list(model.exit_layers), **identity})
    path = folder / f"{name}-{key}.safetensors"
    if path.is_file():
        logger.info("%s: backbone outputs from cache %s", name, path)
        return Features.load(path)
    folder.mkdir(parents=True, exist_ok=True)
    features = compute_features(model, samples, top_k=top_k, batch_size=batch_size, desc=name, progress=progress)
    features.save(path)
    return features
