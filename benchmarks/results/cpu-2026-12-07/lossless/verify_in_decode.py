"""Where a self_spec decode at batch 1 spends its time: every verify pass timed, by positions, by
wrapping `SpecPrograms.run` while 6 held-out prompts (3 chat, 3 prose) decode up to 64 tokens, beside
the full-depth engine on the same prompts, twice each. Run from the repository root:

    python benchmarks/results/cpu-2026-12-07/lossless/verify_in_decode.py
"""

from __future__ import annotations

import time
from typing import Any

import torch

from drex_hf import EarlyExitModelForCausalLM
from drex_hf.cli.common import encode_prompts, tokenizer_for
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine, model_drafting
from drex_hf.training.prompts import read_prompt_file


def main() -> None:
    model = EarlyExitModelForCausalLM.from_pretrained("model_cards/smollm2-135m-drex").eval()
    tok = tokenizer_for(model)
    texts = read_prompt_file("benchmarks/prompts/heldout-chat.txt")[:3]
    texts += read_prompt_file("benchmarks/prompts/heldout-prose.jsonl")[:3]
    batch = encode_prompts(tok, texts, "auto", torch.device("cpu"))
    prompts = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    eos = (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)
    settings = DecodeSettings(max_new_tokens=64, eos_token_ids=eos)
    spec = SpecEngine(model, max_batch=1, max_len=400, draft_tokens=4, draft_source="ngram", settings=settings,
                      **model_drafting(model))  # fmt: skip
    full = DrexEngine(model, max_batch=1, max_len=400, policy="full", settings=settings)
    by_q: dict[int, list[float]] = {}
    run = spec.programs.run

    def timed(kind: str, columns: list, drafts: Any = None) -> Any:
        start = time.perf_counter()
        out = run(kind, columns, drafts)
        by_q.setdefault(len(drafts[0]) + 1 if drafts else 0, []).append(time.perf_counter() - start)
        return out

    spec.programs.run = timed
    with torch.no_grad():
        for repeat in range(2):
            for name, engine in (("full", full), ("self_spec@ngram/4", spec)):
                by_q.clear()
                engine.reset_stats()
                for prompt in prompts:
                    engine.add_request(prompt)
                    engine.run()
                stats = engine.stats
                decode = stats.wall_s - stats.prefill_s
                line = f"repeat {repeat} {name}: {stats.decoded_tokens / decode:.1f} tokens/s"
                if by_q:
                    passes = {q: f"{len(t)} x {1000 * sum(t) / len(t):.1f} ms" for q, t in sorted(by_q.items())}
                    line += f", {stats.rounds} rounds, verify passes by positions: {passes}"
                    line += f", in passes {sum(map(sum, by_q.values())):.2f} of {decode:.2f} s"
                print(line)


if __name__ == "__main__":
    main()
