"""Training data: sources -> documents -> deterministic train/eval split by document -> token samples.

A `Sample` is a token sequence of at most `block_size` tokens and the first position whose
prediction is trained and evaluated (`loss_start`): 0 for human text, the last prompt token for
self-distillation samples, so only the model's own continuation is learned. Human text is cut into
blocks per document; documents never straddle the train/eval split.

Self-distillation data are greedy continuations by the base model of a drawn prompt set, generated
in batches and cached as JSON lines under the run folder (resumable: finished batches are kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drex_hf.errors import ConfigError
from drex_hf.training.prompts import draw_prompts, shakespeare_files, strip_gutenberg
from drex_hf.training.recipe import Recipe, SourceSection

logger = logging.getLogger(__name__)


@dataclass
class Document:
    name: str
    text: str | None = None
    prompt_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    prompt_set: str | None = None


@dataclass
class Sample:
    input_ids: list[int]
    loss_start: int
    document: str
    source: int

    @property
    def positions(self) -> int:
        """Positions with a next token to predict: loss_start .. len - 2."""
        return max(0, len(self.input_ids) - 1 - self.loss_start)


@dataclass
class DataSplits:
    """Train samples, and eval samples per group ('human', 'self')."""

    train: list[Sample]
    eval: dict[str, list[Sample]]
    description: list[str]


def source_group(src: SourceSection) -> str:
    return "self" if src.kind == "self_distill" else "human"


def describe_source(src: SourceSection) -> str:
    if src.kind in ("text", "jsonl"):
        where = src.paths[0] + (f" (+{len(src.paths) - 1} more)" if len(src.paths) > 1 else "")
    elif src.kind == "datasets":
        where = src.path or f"{src.name}[{src.split}]"
    elif src.kind == "self_distill":
        where = f"{src.num_prompts} prompts from {', '.join(Path(p).name for p in src.prompts)}"
    else:
        where = "plays" + (" + First Folio" if src.folio else "")
    return f"{src.kind}: {where} (use: {src.use})"


# ---------------------------------------------------------------------- human text
def read_documents(src: SourceSection, where: str) -> list[Document]:
    """Documents of a text/jsonl/datasets/shakespeare source; an empty source is an error."""
    docs: list[Document] = []
    if src.kind == "text":
        seen: set[Path] = set()
        for raw in src.paths:
            path = Path(raw)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if file.resolve() in seen:  # reached through a folder and a glob: one document
                    continue
                seen.add(file.resolve())
                text = _read_text(file)
                if text.strip():
                    docs.append(Document(name=str(file), text=text))
    elif src.kind == "jsonl":
        for raw in src.paths:
            for number, line in enumerate(_read_text(Path(raw)).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{raw}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(src.text_field), str):
                    raise ConfigError(f"{raw}:{number}: expected an object with a text field {src.text_field!r}")
                if record[src.text_field].strip():
                    docs.append(Document(name=f"{raw}:{number}", text=record[src.text_field]))
    elif src.kind == "datasets":
        docs = _dataset_documents(src, where)
    elif src.kind == "shakespeare":
        for file in shakespeare_files(src.folio):
            docs.append(Document(name=file.stem, text=strip_gutenberg(_read_text(file))))
    if not docs:
        raise ConfigError(f"recipe {where} ({describe_source(src)}) has no text: empty data")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None


def _dataset_documents(src: SourceSection, where: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"recipe {where} is a `datasets` source: pip install datasets (drex-hf[train])") from None
    if src.path:
        data: Any = datasets.load_from_disk(src.path)
        if isinstance(data, datasets.DatasetDict):
            if src.split not in data:
                raise ConfigError(f"recipe {where}: {src.path} has splits {list(data)}, not {src.split!r}")
            data = data[src.split]
        label = src.path
    else:
        try:
            data = datasets.load_dataset(src.name, split=src.split)
        except Exception as err:  # offline, unknown name or split: one clear line instead of a hub traceback
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"recipe {where}: cannot load dataset {src.name!r} split {src.split!r}: {first}"
            ) from None
        label = src.name
    if src.text_field not in data.column_names:
        raise ConfigError(f"recipe {where}: dataset {label} has columns {data.column_names}, not {src.text_field!r}")
    return [
        Document(name=f"{label}:{i}", text=text)
        for i, text in enumerate(data[src.text_field])
        if isinstance(text, str) and text.strip()
    ]


def split_documents(docs: list[Document], use: str, fraction: float, seed: int, where: str) -> tuple[list, list]:
    """(train, eval) documents; `both` holds out round(fraction * n) documents (at least one each side)."""
    if use == "train":
        return docs, []
    if use == "eval":
        return [], docs
    if len(docs) < 2:
        raise ConfigError(f"recipe {where} has {len(docs)} document; splitting train/eval by document needs at least 2")
    order = sorted(docs, key=lambda d: d.name)
    random.Random(f"split-{seed}-{where}").shuffle(order)
    n_eval = min(len(order) - 1, max(1, round(fraction * len(order))))
    return order[n_eval:], order[:n_eval]


def human_samples(docs: list[Document], tokenizer: Any, block_size: int, source: int) -> list[list[Sample]]:
    """Per document, its blocks of `block_size` tokens (documents end with eos when the tokenizer has one)."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"] + eos
        blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
        out.append([Sample(b, 0, doc.name, source) for b in blocks if len(b) >= 2])
    return out


def self_samples(docs: list[Document], block_size: int, source: int) -> list[list[Sample]]:
    out = []
    for doc in docs:
        prompt = list(doc.prompt_ids or [])
        cont = list(doc.continuation_ids or [])
        if not cont:
            out.append([])
            continue
        keep_prompt = max(1, min(len(prompt), block_size - 1 - min(len(cont), block_size - 1)))
        prompt = prompt[-keep_prompt:]
        ids = (prompt + cont)[:block_size]
        out.append([Sample(ids, len(prompt) - 1, doc.name, source)])
    return out


def take_tokens(per_doc: list[list[Sample]], cap: int | None) -> list[Sample]:
    """Blocks interleaved across documents (round robin) until `cap` loss positions are reached."""
    out: list[Sample] = []
    total = 0
    depth = max((len(b) for b in per_doc), default=0)
    for i in range(depth):
        for blocks in per_doc:
            if i < len(blocks):
                out.append(blocks[i])
                total += blocks[i].positions
                if cap is not None and total >= cap:
                    return out
    return out


# ---------------------------------------------------------------------- self-distillation
def self_distill_documents(
    src: SourceSection,
    model: Any,
    tokenizer: Any,
    cache_dir: Path,
    seed: int,
    base_identity: str,
    device: torch.device,
    progress: bool = True,
) -> list[Document]:
    """Greedy continuations of drawn prompts by the base model, cached under `cache_dir`.

    The cache file's name hashes everything that determines the result (base identity, prompts,
    generation settings); finished batches are appended as they complete, so a killed run resumes.
    """
    from tqdm.auto import tqdm

    drawn = draw_prompts(list(src.prompts), src.num_prompts, seed)
    if not drawn:
        raise ConfigError(f"self_distill source ({describe_source(src)}) drew no prompts: empty data")
    use_chat = bool(src.chat_template and getattr(tokenizer, "chat_template", None))
    texts = []
    for set_name, prompt in drawn:
        if use_chat and set_name not in ("shakespeare", "kjv"):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        texts.append(prompt)
    key = hashlib.sha256(
        json.dumps(
            {
                "base": base_identity,
                "prompts": texts,
                "max_new_tokens": src.max_new_tokens,
                "batch_size": src.batch_size,
                "dtype": str(next(model.parameters()).dtype),
                "device": device.type,
                "version": 1,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"self-distill-{key}.jsonl"
    partial = cache_dir / f"self-distill-{key}.partial.jsonl"
    if final.is_file():
        records = [json.loads(line) for line in final.read_text(encoding="utf-8").splitlines()]
        logger.info("self-distillation data: %d continuations from cache %s", len(records), final)
    else:
        records = []
        if partial.is_file():  # keep whole batches only: a line cut by a kill is dropped with its batch
            lines = partial.read_text(encoding="utf-8").splitlines()
            good = []
            for line in lines:
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            records = good[: len(good) - len(good) % src.batch_size]
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))  # similar lengths batch together
        batches = [order[i : i + src.batch_size] for i in range(0, len(order), src.batch_size)]
        done = len(records) // src.batch_size
        with open(partial, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            bar = tqdm(total=len(batches), initial=done, desc="self-distillation", unit="batch", disable=not progress)
            for batch in batches[done:]:
                for record in _generate_batch(model, tokenizer, [texts[i] for i in batch], src, device):
                    records.append(record)
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
                bar.update(1)
            bar.close()
        os.replace(partial, final)
        # records are in batch order; put them back in draw order
    by_prompt = {r["prompt"]: r for r in records}
    docs = []
    for (set_name, _), text in zip(drawn, texts):
        r = by_prompt[text]
        docs.append(
            Document(
                name=f"{set_name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}",
                prompt_ids=r["prompt_ids"],
                continuation_ids=r["continuation_ids"],
                prompt_set=set_name,
            )
        )
    return docs


@torch.no_grad()
def _generate_batch(model: Any, tokenizer: Any, texts: list[str], src: SourceSection, device: torch.device) -> list:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=src.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    records = []
    for row, text in enumerate(texts):
        prompt = ids[row][mask[row].bool()].tolist()
        cont = []
        for token in out[row, ids.shape[1] :].tolist():
            cont.append(token)
            if token in eos_ids:
                break
        records.append({"prompt": text, "prompt_ids": prompt, "continuation_ids": cont})
    return records


# ---------------------------------------------------------------------- all sources
def build_splits(
    recipe: Recipe,
    tokenizer: Any,
    model: Any = None,
    base_identity: str = "",
    device: torch.device | None = None,
    progress: bool = True,
) -> DataSplits:
    """Read every source, split by document, tokenise; raise ConfigError on empty data."""
    d = recipe.data
    train: list[Sample] = []
    evals: dict[str, list[Sample]] = {}
    description = []
    for i, src in enumerate(d.sources):
        where = f"data.sources.{i}"
        if src.kind == "self_distill":
            if model is None:
                raise ConfigError(f"recipe {where}: self-distillation needs the base model")
            docs = self_distill_documents(
                src,
                model,
                tokenizer,
                recipe.cache_dir / "data",
                d.seed + i,
                base_identity,
                device or torch.device("cpu"),
                progress,
            )
        else:
            docs = read_documents(src, where)
        train_docs, eval_docs = split_documents(docs, src.use, d.eval_fraction, d.seed, where)

        def samples(part: list[Document], src: SourceSection = src, i: int = i) -> list[list[Sample]]:
            if src.kind == "self_distill":
                return self_samples(part, d.block_size, i)
            return human_samples(part, tokenizer, d.block_size, i)

        tr = take_tokens(samples(train_docs), src.max_tokens) if train_docs else []
        ev = take_tokens(samples(eval_docs), src.max_tokens) if eval_docs else []
        if train_docs and not any(s.positions for s in tr):
            raise ConfigError(f"recipe {where} ({describe_source(src)}) gives no training tokens: empty data")
        train.extend(tr)
        evals.setdefault(source_group(src), []).extend(ev)
        description.append(
            f"{describe_source(src)}: {len(train_docs)} train / {len(eval_docs)} eval documents, "
            f"{sum(s.positions for s in tr)} train / {sum(s.positions for s in ev)} eval positions"
        )
    if not train:
        raise ConfigError("the recipe's data give no training tokens: empty data")
    return DataSplits(train=train, eval={k: v for k, v in evals.items() if v}, description=description)
