"""A prompt's own log-probabilities at full depth: what OpenAI's `echo` with `logprobs` returns for
the prompt's tokens (lm-evaluation-harness's loglikelihood requests read them).

The prompt is not decoded, so no exit chose its tokens: each token's logprob is full depth's, from
one forward pass of the base model (HF's own `forward` and a float32 log-softmax, so it equals
what HF computes for the same tokens), taken `CHUNK` positions of logits at a time.
"""

from __future__ import annotations

import torch

from drex_hf.generation.protocol import EarlyExitModel
from drex_hf.generation.runner import logprob_rows
from drex_hf.generation.state import TokenLogprob

CHUNK = 256  # positions of vocabulary logits held at once


@torch.no_grad()
def prompt_logprobs(model: EarlyExitModel, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Per prompt token, its `TokenLogprob` given the tokens before it at full depth, with the `top`
    most likely tokens there; None for the first token (nothing precedes it)."""
    if len(ids) < 2:
        return [None] * len(ids)
    base = model.base_model
    inputs = torch.tensor([ids], dtype=torch.long, device=model.heads_device)
    hidden = base.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state[0]
    head = base.get_output_embeddings()
    targets = inputs[0, 1:]
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        rows = logprob_rows(head(hidden[start:end]).float(), targets[start:end], top).tolist()
        out.extend(TokenLogprob.from_row(row, top) for row in rows)
    return out
