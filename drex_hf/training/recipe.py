"""Training recipes: YAML (read with `safe_load`) -> a validated `Recipe`, with `--set key=value` overrides.

Every key is documented in `recipes/README.md` and in the dataclasses below. Unknown keys, wrong
types, missing files and impossible values raise `ConfigError` naming the key, before any model is
loaded or any data is read. Checks that need the base model (layer range) run in `check_against`.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drex_hf.config import CONFIDENCE_MEASURES, HEAD_TYPES, EarlyExitConfig
from drex_hf.errors import ConfigError

SOURCE_KINDS = ("text", "jsonl", "datasets", "shakespeare", "self_distill")
SOURCE_USES = ("both", "train", "eval")
PROMPT_SETS = ("chat", "shakespeare", "kjv")


@dataclass
class ModelSection:
    """base: hub id, folder or .gguf of the base model. dtype: auto (float32 on CPU, bfloat16 on
    CUDA) | float32 | bfloat16. device: auto (cuda if available) | cpu | cuda[:N]."""

    base: str = ""
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass
class HeadsSection:
    """The exit heads to train (see EarlyExitConfig). thresholds: written into the saved config when
    `eval.ship_target` is null; otherwise the thresholds fitted for that agreement target are used."""

    exit_layers: list[int] = field(default_factory=list)
    head: str = "adapter"
    adapter_rank: int = 32
    confidence: str = "max_prob"
    classifier_hidden: int = 64
    thresholds: Any = 0.9


@dataclass
class SourceSection:
    """One data source.

    kind: text (files/folders/globs in `paths`, one document per file), jsonl (`paths`, one document per
    line, text in `text_field`), datasets (`path` saved with save_to_disk, or hub `name` + `split`, text in
    `text_field`), shakespeare (the `shakespeare` package's plays; `folio` adds the First Folio spellings),
    self_distill (greedy continuations by the base model itself of `prompts`: named sets chat /
    shakespeare / kjv or prompt files, `num_prompts` drawn with `seed`, `max_new_tokens` each,
    generated `batch_size` at a time and cached under the run folder).
    use: both (split into train/eval by document), train (all train), eval (all held out).
    max_tokens: cap on loss positions taken from this source per split (null: no cap).
    """

    kind: str = ""
    name: str | None = None
    use: str = "both"
    paths: list[str] = field(default_factory=list)
    path: str | None = None
    split: str = "train"
    text_field: str = "text"
    folio: bool = False
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 64
    max_new_tokens: int = 128
    batch_size: int = 16
    chat_template: bool = True
    max_tokens: int | None = None


@dataclass
class DataSection:
    """block_size: tokens per training sequence (documents are cut into blocks). eval_fraction: share of
    each `both` source's documents held out (at least one document each side). seed: the split and
    the prompt draw."""

    sources: list[SourceSection] = field(default_factory=list)
    block_size: int = 256
    eval_fraction: float = 0.1
    seed: int = 0


@dataclass
class LossSection:
    """Per exit: kl_weight * KL(teacher || exit) + ce_weight * CE(next token), times exit_weights[j]
    (null: all 1). teacher_top_k: keep the final layer's top-k probabilities (renormalised) as the
    teacher; 0 = the whole vocabulary. classifier_weight: BCE of the confidence classifier on
    'this exit's top token equals the final layer's'."""

    kl_weight: float = 1.0
    ce_weight: float = 0.1
    exit_weights: list[float] | None = None
    teacher_top_k: int = 64
    classifier_weight: float = 1.0


@dataclass
class OptimSection:
    """AdamW. steps: optimiser steps; batch_tokens: loss positions per micro-batch (frozen backbone) or
    sequences per micro-batch = max(1, batch_tokens // block_size) (LoRA); grad_accum micro-batches per
    step; lr warms up linearly for warmup_steps then decays by cosine to min_lr_ratio * lr."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    steps: int = 200
    batch_tokens: int = 1024
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0


@dataclass
class LoraSection:
    """Joint training: a LoRA (peft) on the backbone, trained with the early-exit loss at every exit.
    layer_dropout: LayerSkip-style skip probability of the deepest layer (scaled linearly from 0 at
    layer 0); anchor_weight: KL of the adapted final layer to the original model's top-k distribution,
    so the final layer does not drift."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layer_dropout: float = 0.0
    anchor_weight: float = 1.0


@dataclass
class EvalSection:
    """targets: agreement targets for the thresholds/speed-up table. max_tokens: cap on evaluated
    positions per eval set. ship_target: the target whose fitted thresholds go into the saved config
    (null: keep heads.thresholds). reference: optional published figures to print beside ours in the
    card: {label, agreement_self, agreement_human, speedup_self} (lists per exit / per target)."""

    targets: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99])
    max_tokens: int | None = 20000
    ship_target: float | None = 0.95
    reference: Any = None


@dataclass
class TrainSection:
    """output_dir: the heads folder written at the end (atomically). run_dir: caches, checkpoints, logs
    (default: <output_dir>.run). checkpoint_every: steps between checkpoints (0: only at the end).
    cache_dir: where self-distillation data and backbone features are cached (default: run_dir), so
    recipes that differ only in training can share them. init_heads: a saved heads folder (same exits and
    head shapes) to start from instead of new heads."""

    output_dir: str = ""
    run_dir: str | None = None
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    cache_batch_size: int = 8
    cache_dir: str | None = None
    init_heads: str | None = None


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)
    source_file: str | None = None

    # ------------------------------------------------------------------ derived
    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir).expanduser()

    @property
    def run_dir(self) -> Path:
        if self.train.run_dir:
            return Path(self.train.run_dir).expanduser()
        return self.output_dir.with_name(self.output_dir.name + ".run")

    @property
    def cache_dir(self) -> Path:
        return Path(self.train.cache_dir).expanduser() if self.train.cache_dir else self.run_dir

    def exit_config(self) -> EarlyExitConfig:
        h = self.heads
        return EarlyExitConfig(
            exit_layers=list(h.exit_layers),
            head=h.head,
            adapter_rank=h.adapter_rank,
            confidence=h.confidence,
            classifier_hidden=h.classifier_hidden,
            thresholds=copy.deepcopy(h.thresholds),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file")
        return data

    def check_against(self, num_layers: int) -> None:
        """Checks that need the base model: exit layers in range."""
        try:
            self.exit_config().validate_for_base(num_layers)
        except ConfigError as err:
            raise ConfigError(f"recipe heads.exit_layers: {err}") from None


# ---------------------------------------------------------------------- loading
def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides (values parsed as YAML), validate."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; name a YAML recipe file in it")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path} is not a UTF-8 text file (byte {err.start} is not text)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    return recipe_from_dict(data, base_dir=path.parent, source_file=str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """`optim.lr=3e-4`, `data.sources.0.num_prompts=8`: set one key (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {where} needs a list index 0..{len(node) - 1}, got {part!r}")
    return int(part)


def recipe_from_dict(data: dict[str, Any], base_dir: str | os.PathLike = ".", source_file: str | None = None) -> Recipe:
    """Build and validate a recipe from a mapping; relative paths are resolved against `base_dir`'s
    repository root rules: a path is taken relative to the current directory if it exists there,
    else relative to `base_dir`."""
    recipe = _build(Recipe, {k: v for k, v in data.items()}, "")
    recipe.source_file = source_file
    _validate(recipe, Path(base_dir))
    return recipe


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {[_join(where, u) for u in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _join(where, name))
    return cls(**kwargs)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"recipe {where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"recipe {where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"recipe {where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"recipe {where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"recipe {where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"recipe {where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"recipe {where}: unsupported value {value!r}")


def resolve_path(raw: str, base_dir: Path) -> Path:
    """A recipe path: as given if it exists from the current directory, else relative to the recipe's folder."""
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists() or any(ch in raw for ch in "*?["):
        return path.absolute() if path.exists() else path
    beside = base_dir / path
    return beside.absolute() if beside.exists() else path


def _validate(recipe: Recipe, base_dir: Path) -> None:
    if not recipe.model.base:
        raise ConfigError("recipe model.base is missing: name the base model (hub id, folder or .gguf)")
    if recipe.model.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"recipe model.dtype: choose auto, float32 or bfloat16, got {recipe.model.dtype!r}")
    h = recipe.heads
    if h.head not in HEAD_TYPES:
        raise ConfigError(f"recipe heads.head: unknown head {h.head!r}; choose one of {', '.join(HEAD_TYPES)}")
    if h.confidence not in CONFIDENCE_MEASURES:
        raise ConfigError(
            f"recipe heads.confidence: unknown measure {h.confidence!r}; choose one of {CONFIDENCE_MEASURES}"
        )
    try:
        recipe.exit_config()
    except ConfigError as err:
        raise ConfigError(f"recipe heads: {err}") from None

    d = recipe.data
    if not d.sources:
        raise ConfigError("recipe data.sources is empty: name at least one data source")
    if d.block_size < 8:
        raise ConfigError(f"recipe data.block_size must be at least 8, got {d.block_size}")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"recipe data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    uses = set()
    for i, src in enumerate(d.sources):
        _validate_source(src, f"data.sources.{i}", base_dir)
        uses.add(src.use)
    if not uses & {"both", "train"}:
        raise ConfigError("recipe data.sources: no source is used for training (use: both or train)")

    lo = recipe.loss
    if lo.kl_weight < 0 or lo.ce_weight < 0 or lo.classifier_weight < 0:
        raise ConfigError("recipe loss weights must be >= 0")
    if lo.kl_weight == 0 and lo.ce_weight == 0:
        raise ConfigError("recipe loss: kl_weight and ce_weight are both 0; the heads would learn nothing")
    if lo.teacher_top_k < 0:
        raise ConfigError(f"recipe loss.teacher_top_k must be >= 0, got {lo.teacher_top_k}")
    if lo.exit_weights is not None:
        if len(lo.exit_weights) != len(h.exit_layers):
            raise ConfigError(
                f"recipe loss.exit_weights has {len(lo.exit_weights)} values for {len(h.exit_layers)} exits"
            )
        if any(w < 0 for w in lo.exit_weights):
            raise ConfigError("recipe loss.exit_weights must be >= 0")

    o = recipe.optim
    for name in ("steps", "batch_tokens", "grad_accum"):
        if getattr(o, name) < 1:
            raise ConfigError(f"recipe optim.{name} must be >= 1, got {getattr(o, name)}")
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("recipe optim: lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")

    la = recipe.lora
    if la.enabled:
        if la.rank < 1:
            raise ConfigError(f"recipe lora.rank must be >= 1, got {la.rank}")
        if not 0 <= la.layer_dropout < 1:
            raise ConfigError(f"recipe lora.layer_dropout must be in [0, 1), got {la.layer_dropout}")
        if not la.target_modules:
            raise ConfigError("recipe lora.target_modules is empty")

    e = recipe.eval
    if e.max_tokens is not None and e.max_tokens < 1:
        raise ConfigError(f"recipe eval.max_tokens must be >= 1 or null, got {e.max_tokens}")
    if e.reference is not None:
        ref = e.reference
        rows = ref.get("rows") if isinstance(ref, dict) else None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict)
            and r.get("group") in ("self", "human")
            and r.get("kind") in ("agreement", "speedup")
            and isinstance(r.get("values"), list)
            for r in rows
        ):
            raise ConfigError(
                "recipe eval.reference must be {label, note, rows: [{group: self|human, kind: agreement|speedup, "
                "values: [...], label}]}"
            )
    if not e.targets or any(not 0 < t < 1 for t in e.targets):
        raise ConfigError(f"recipe eval.targets must be agreement rates in (0, 1), got {e.targets}")
    if e.ship_target is not None and e.ship_target not in e.targets:
        raise ConfigError(f"recipe eval.ship_target {e.ship_target} is not one of eval.targets {e.targets}")

    t = recipe.train
    if t.init_heads is not None:
        folder = resolve_path(t.init_heads, base_dir)
        if not (folder / "exit_heads.safetensors").is_file() or not (folder / "exit_config.json").is_file():
            raise ConfigError(f"recipe train.init_heads: {t.init_heads} is not a saved exit-heads folder")
        saved = EarlyExitConfig.from_json_file(folder / "exit_config.json")
        ours = recipe.exit_config()
        for name in ("exit_layers", "head", "adapter_rank", "classifier_hidden"):
            if getattr(saved, name) != getattr(ours, name):
                raise ConfigError(
                    f"recipe train.init_heads: {t.init_heads} has {name}={getattr(saved, name)}, "
                    f"the recipe's heads have {getattr(ours, name)}"
                )
        t.init_heads = str(folder)
    if not t.output_dir:
        raise ConfigError("recipe train.output_dir is missing: where should the heads be written?")
    if t.checkpoint_every < 0 or t.log_every < 1 or t.cache_batch_size < 1:
        raise ConfigError("recipe train: checkpoint_every >= 0, log_every >= 1, cache_batch_size >= 1")


def _validate_source(src: SourceSection, where: str, base_dir: Path) -> None:
    if src.kind not in SOURCE_KINDS:
        raise ConfigError(f"recipe {where}.kind: unknown source kind {src.kind!r}; choose one of {SOURCE_KINDS}")
    if src.use not in SOURCE_USES:
        raise ConfigError(f"recipe {where}.use: choose one of {SOURCE_USES}, got {src.use!r}")
    if src.max_tokens is not None and src.max_tokens < 1:
        raise ConfigError(f"recipe {where}.max_tokens must be >= 1 or null")
    if src.kind in ("text", "jsonl"):
        if not src.paths:
            raise ConfigError(f"recipe {where}: a {src.kind} source needs `paths`")
        resolved = []
        for raw in src.paths:
            path = resolve_path(raw, base_dir)
            if any(ch in raw for ch in "*?["):
                matches = sorted(glob.glob(os.path.expanduser(raw))) or sorted(glob.glob(str(base_dir / raw)))
                if not matches:
                    raise ConfigError(f"recipe {where}.paths: no file matches {raw!r}")
                resolved.extend(str(Path(m).absolute()) for m in matches)
            elif not path.exists():
                raise ConfigError(f"recipe {where}.paths: file not found: {raw}")
            else:
                resolved.append(str(path))
        src.paths = list(dict.fromkeys(resolved))  # a file named twice is one document, not a leak across the split
    elif src.kind == "datasets":
        if not src.path and not src.name:
            raise ConfigError(f"recipe {where}: a datasets source needs `path` (save_to_disk folder) or hub `name`")
        if src.path:
            path = resolve_path(src.path, base_dir)
            if not path.is_dir():
                raise ConfigError(f"recipe {where}.path: dataset folder not found: {src.path}")
            src.path = str(path)
    elif src.kind == "self_distill":
        if not src.prompts:
            raise ConfigError(
                f"recipe {where}: a self_distill source needs `prompts` ({', '.join(PROMPT_SETS)} or files)"
            )
        resolved = []
        for raw in src.prompts:
            if raw in PROMPT_SETS:
                resolved.append(raw)
                continue
            path = resolve_path(raw, base_dir)
            if not path.is_file():
                raise ConfigError(
                    f"recipe {where}.prompts: {raw!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file"
                )
            resolved.append(str(path))
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"recipe {where}.prompts names a prompt set or file twice: {src.prompts}")
        src.prompts = resolved
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(src, name) < 1:
                raise ConfigError(f"recipe {where}.{name} must be >= 1, got {getattr(src, name)}")
