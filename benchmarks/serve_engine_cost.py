"""What the server's engine options cost: a `DrexEngine` as `drex serve` builds it (each request's own
sampling with presence/frequency penalties over its generated tokens, and each token's logprob with
the top `--max-logprobs`) against the same engine without them (engine-wide greedy settings, no
logprobs), on the same prompts, stepped in turn in one process, with repeats.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_engine_cost.py --batch 8 --max-new-tokens 32 --repeats 3

Prints each repeat's tokens/s and the ratio, and writes JSON with --out. Both engines are greedy and
give the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "model_cards" / "smollm2-135m-drex"), help="exit-heads folder")
    parser.add_argument("--policy", default="full", help="engine policy (default: full)")
    parser.add_argument("--batch", type=int, default=8, help="requests at once (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    parser.add_argument("--max-logprobs", type=int, default=20, help="top logprobs kept per token (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument(
        "--full-warps",
        action="store_true",
        help="the server engine runs every row's top-k/top-p sorts and penalties even where no row asks "
        "(as before the eager CPU picker skipped them)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from drex_hf.cli.serve import load
    from drex_hf.generation.engine import DrexEngine
    from drex_hf.generation.sampling import RequestSampling
    from drex_hf.generation.settings import DecodeSettings

    model, tokenizer, _ = load(args.model)
    chat = (ROOT / "benchmarks" / "prompts" / "heldout-chat.txt").read_text().splitlines()
    prompts = [tokenizer(line)["input_ids"] for line in chat if line.strip()][: args.batch]
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens)
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + 1
    engines = {
        "plain": DrexEngine(model, max_batch=args.batch, max_len=max_len, policy=args.policy, settings=settings),
        "server": DrexEngine(model, max_batch=args.batch, max_len=max_len, policy=args.policy, settings=settings,
                             per_request_sampling=True, logprobs=args.max_logprobs),
    }  # fmt: skip
    if args.full_warps:
        engines["server"].runner.picker.skip = False

    def run(name: str) -> tuple[float, list[list[int]]]:
        engine = engines[name]
        extra = {"sampling": RequestSampling(0.0), "logprobs": args.max_logprobs} if name == "server" else {}
        ids = [engine.add_request(torch.tensor(p), max_new_tokens=args.max_new_tokens, **extra) for p in prompts]
        start = time.perf_counter()
        done = engine.run()
        elapsed = time.perf_counter() - start
        tokens = [done[i].tokens for i in ids]
        return sum(len(t) for t in tokens) / elapsed, tokens

    for name in engines:  # warm-up (and the CPU's cheapest-row tables)
        run(name)
    rows = []
    for repeat in range(args.repeats):
        plain, plain_tokens = run("plain")
        server, server_tokens = run("server")
        assert plain_tokens == server_tokens, "the two engines gave different tokens"
        rows.append({"repeat": repeat, "plain_tok_s": plain, "server_tok_s": server, "ratio": server / plain})
        print(
            f"repeat {repeat}: plain {plain:.1f} tok/s, server options {server:.1f} tok/s, ratio {server / plain:.3f}",
            flush=True,
        )
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio (server options / plain): {ratio:.3f} at batch {args.batch}, policy {args.policy}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "median_ratio": ratio}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
