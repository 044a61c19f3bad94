"""`drex train`: train exit heads from a recipe with accelerate; checkpoint, resume, evaluate, publish.

Frozen backbone (the default): the backbone runs once over the data (`features.py`), then the heads
train on the cached exit hidden states and the teacher's top-k. Joint training (`lora.enabled`): a
LoRA on the backbone is trained with the heads, so the backbone runs every step (optionally with
LayerSkip-style layer dropout), anchored to the original final layer by KL.

Determinism: the data order is a pure function of (seed, step), LoRA dropout and layer dropout are
seeded per step, and checkpoints hold the trainable tensors, the optimizer state and the step, so a
killed run resumed with `--resume` ends with the same heads as an uninterrupted one (CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drex_hf.errors import ConfigError, WeightsFileError
from drex_hf.fileio import check_output_folder, removed_if_left_empty, sha256_file, staged_folder
from drex_hf.training.data import DataSplits, Sample, build_splits
from drex_hf.training.features import Features, cached_features, compute_features, pad_samples
from drex_hf.training.losses import classifier_loss, distill_kl, full_kl
from drex_hf.training.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
CKPT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    total_seconds: float
    results: dict[str, Any]


class StopTraining(Exception):
    """Raised by `stop_after` (tests simulate a kill with it)."""


# ---------------------------------------------------------------------- the loss module
class ExitLoss(nn.Module):
    """Loss of all exits for one micro-batch; a module so accelerate/DDP can wrap it."""

    def __init__(self, model: nn.Module, recipe: Recipe, lora: bool) -> None:
        super().__init__()
        self.heads = model.heads
        if lora:
            self.base = model.base_model  # registered so DDP syncs the LoRA parameters
        self._model = (model,)
        lo = recipe.loss
        self.kl_weight, self.ce_weight, self.cls_weight = lo.kl_weight, lo.ce_weight, lo.classifier_weight
        self.exit_weights = lo.exit_weights or [1.0] * len(model.exit_layers)
        self.anchor_weight = recipe.lora.anchor_weight

    def exit_losses(
        self,
        exit_hidden: list[torch.Tensor],
        top_idx: torch.Tensor,
        top_logp: torch.Tensor,
        final: torch.Tensor,
        teacher_top1: torch.Tensor,
        next_token: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, list[float]]]:
        model = self._model[0]
        lm_head = model.arch.lm_head
        total = torch.zeros((), device=next_token.device)
        stats: dict[str, list[float]] = {"loss": [], "agree": []}
        teacher_logits = None
        if top_idx.shape[-1] == 0:
            with torch.no_grad():
                teacher_logits = lm_head(final.to(lm_head.weight.dtype)).float()
        for j, (head, hidden) in enumerate(zip(self.heads, exit_hidden)):
            feats = head.features(hidden)
            logits = lm_head(feats).float()
            kl = distill_kl(logits, top_idx, top_logp) if teacher_logits is None else full_kl(logits, teacher_logits)
            ce = nn.functional.cross_entropy(logits, next_token)
            agrees = (logits.argmax(-1) == teacher_top1).float()
            cls = classifier_loss(head.classifier(feats.detach()), agrees)
            exit_loss = self.kl_weight * kl + self.ce_weight * ce
            if exit_loss.requires_grad:  # a `shared` head has nothing to learn but its classifier
                total = total + self.exit_weights[j] * exit_loss
            total = total + self.cls_weight * cls
            stats["loss"].append(float(exit_loss.detach()))
            stats["agree"].append(float(agrees.mean()))
        return total, stats

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        if "states" in batch:  # frozen backbone: cached states
            states = batch["states"]
            hidden = [states[:, j + 1] for j in range(states.shape[1] - 1)]
            return self.exit_losses(
                hidden, batch["top_idx"], batch["top_logp"], batch["final"], batch["teacher_top1"], batch["next_token"]
            )
        model = self._model[0]
        _, exits, last = model.exit_states(batch["input_ids"], batch["attention_mask"], skip_layers=batch["skip"])
        r, c = batch["rows"], batch["cols"]
        total, stats = self.exit_losses(
            [h[r, c] for h in exits],
            batch["top_idx"],
            batch["top_logp"],
            batch["final"],
            batch["teacher_top1"],
            batch["next_token"],
        )
        final_logits = model.arch.lm_head(model.arch.final_norm(last[r, c])).float()
        if batch["top_idx"].shape[-1]:
            anchor = distill_kl(final_logits, batch["top_idx"], batch["top_logp"])
        else:
            anchor = full_kl(final_logits, model.arch.lm_head(batch["final"]).float())
        stats["anchor"] = [float(anchor.detach())]
        return total + self.anchor_weight * anchor, stats


# ---------------------------------------------------------------------- batches
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, per_batch: int, seed: int, number: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Items of global micro-batch `number`: epochs are seeded permutations, the last partial batch dropped."""
    per_batch = min(per_batch, n)
    per_epoch = max(1, n // per_batch)
    epoch, within = divmod(number, per_epoch)
    order = _epoch_order(n, seed, epoch)
    return order[within * per_batch : (within + 1) * per_batch][rank::world]


def frozen_batch(features: Features, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "states": features.states[rows].to(device),
        "final": features.final[rows].to(device),
        "top_idx": features.top_idx[rows].to(device),
        "top_logp": features.top_logp[rows].to(device),
        "teacher_top1": features.teacher_top1[rows].to(device),
        "next_token": features.next_token[rows].to(device),
    }


def lora_batch(
    samples: list[Sample], features: Features, picks: torch.Tensor, skip: frozenset[int], device: torch.device
) -> dict[str, Any]:
    chosen = [samples[int(i)] for i in picks]
    ids, mask, rows, cols = pad_samples(chosen)
    offsets = features.sample_offsets
    feat_rows = [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in picks.tolist()]
    out = frozen_batch(features, torch.cat(feat_rows), device)
    del out["states"]
    out.update(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        rows=rows.to(device),
        cols=cols.to(device),
        skip=skip,
    )
    return out


def layer_skips(num_layers: int, rate: float, seed: int, number: int) -> frozenset[int]:
    """LayerSkip-style dropout: layer l is skipped with probability rate * l / (L - 1)."""
    if rate <= 0:
        return frozenset()
    gen = torch.Generator().manual_seed(seed * 7_919 + number)
    draws = torch.rand(num_layers, generator=gen)
    return frozenset(i for i in range(num_layers) if draws[i] < rate * i / max(1, num_layers - 1))


def lr_at(step: int, recipe: Recipe) -> float:
    o = recipe.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------- checkpoints
def recipe_hash(recipe: Recipe) -> str:
    data = recipe.to_dict()
    for key in ("checkpoint_every", "log_every", "output_dir", "run_dir", "cache_dir"):
        data["train"].pop(key, None)
    data["eval"] = None  # evaluation settings do not change training
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if p.requires_grad} | {
        f"heads.{k}": v.detach().to("cpu").clone() for k, v in model.heads.state_dict().items()
    }


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    target = run_dir / CHECKPOINT
    with staged_folder(target, order=CKPT_FILES) as tmp:
        save_file(trainable_state(model), str(tmp / CKPT_FILES[0]))
        opt = optimizer.state_dict()
        tensors = {}
        for idx, values in opt["state"].items():
            for name, value in values.items():
                tensors[f"{idx}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).to("cpu")
        save_file(tensors, str(tmp / CKPT_FILES[1]))
        state = dict(
            state,
            param_groups=opt["param_groups"],
            sha256={name: sha256_file(tmp / name) for name in CKPT_FILES[:2]},  # the three files belong together
        )
        (tmp / CKPT_FILES[2]).write_text(json.dumps(state, indent=1), encoding="utf-8")


def checkpoint_state(run_dir: Path, expected_hash: str) -> dict:
    """The state of `run_dir`'s checkpoint, if it is complete, made by the recipe of `expected_hash`
    and its files belong together; else a `ConfigError` / `WeightsFileError` saying which."""
    folder = run_dir / CHECKPOINT
    missing = [name for name in CKPT_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"--resume: no complete checkpoint in {folder} (missing {', '.join(missing)})")
    state = json.loads((folder / CKPT_FILES[2]).read_text(encoding="utf-8"))
    if state.get("recipe_hash") != expected_hash:
        raise ConfigError(
            f"--resume: the checkpoint in {folder} was made by a different recipe (hash {state.get('recipe_hash')}, "
            f"this recipe {expected_hash}); start without --resume or restore the recipe"
        )
    for name, digest in state.get("sha256", {}).items():
        if sha256_file(folder / name) != digest:
            raise WeightsFileError(
                f"checkpoint in {folder} is inconsistent: {name} does not match state.json (a save was interrupted); "
                "start without --resume"
            )
    return state


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, expected_hash: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = checkpoint_state(run_dir, expected_hash)
    folder = run_dir / CHECKPOINT
    try:
        params = load_file(str(folder / CKPT_FILES[0]))
        opt_tensors = load_file(str(folder / CKPT_FILES[1]))
    except (SafetensorError, OSError) as err:
        raise WeightsFileError(f"checkpoint in {folder} is unreadable: {err}") from None
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            if name.startswith("heads."):
                continue
            named[name].copy_(value)
    model.heads.load_state_dict({k.removeprefix("heads."): v for k, v in params.items() if k.startswith("heads.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


# ---------------------------------------------------------------------- main entry
def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    log: Any = print,
) -> TrainResult:
    """Run a recipe end to end; returns where the heads went and the evaluation results.

    Checked before anything loads: the output, run and cache folders can be written, and with
    `resume` the run folder holds a complete checkpoint of this recipe. Folders this call creates
    are removed again if it fails while they are still empty (a refused recipe leaves nothing)."""
    check_output_folder(recipe.output_dir, "recipe train.output_dir", beside=True)
    check_output_folder(recipe.run_dir, "recipe train.run_dir")
    check_output_folder(recipe.cache_dir, "recipe train.cache_dir")
    if resume:
        checkpoint_state(recipe.run_dir, recipe_hash(recipe))
    with removed_if_left_empty([recipe.run_dir, recipe.cache_dir]):
        return _train(recipe, resume=resume, progress=progress, stop_after=stop_after, log=log)


def _train(recipe: Recipe, *, resume: bool, progress: bool, stop_after: int | None, log: Any) -> TrainResult:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from drex_hf.hub import load_tokenizer
    from drex_hf.modeling import EarlyExitModelForCausalLM
    from drex_hf.training.evaluate import evaluate_and_publish, final_perplexity

    began = time.perf_counter()
    seed = recipe.train.seed
    random.seed(seed)
    torch.manual_seed(seed)
    want_cuda = recipe.model.device not in ("cpu",) and torch.cuda.is_available()
    if recipe.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"recipe model.device is {recipe.model.device!r} but CUDA is not available here")
    bf16 = want_cuda and recipe.model.dtype in ("auto", "bfloat16")
    if want_cuda and recipe.model.device.startswith("cuda:"):
        index = recipe.model.device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"recipe model.device {recipe.model.device!r}: "
                f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(int(index))
    from accelerate.utils import DistributedDataParallelKwargs

    acc = Accelerator(
        cpu=not want_cuda,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=recipe.optim.grad_accum,
        # LoRA layers of skipped layers get no gradient in a step with layer dropout
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.lora.layer_dropout > 0)],
    )
    device = acc.device
    if recipe.model.dtype == "bfloat16" and not want_cuda:
        raise ConfigError("recipe model.dtype bfloat16 needs a CUDA device; CPU training runs in float32")
    dtype = torch.bfloat16 if bf16 else torch.float32
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"recipe  {recipe.source_file or '(in memory)'} -> {recipe.output_dir} (run folder {run_dir})")
    log(f"device  {device} ({'bf16 autocast' if bf16 else 'float32'}), {acc.num_processes} process(es)")

    config = recipe.exit_config()
    try:
        model = EarlyExitModelForCausalLM.from_base(
            recipe.model.base, config, revision=recipe.model.revision, dtype=dtype, device=device
        )
    except ConfigError as err:
        raise ConfigError(f"recipe heads.exit_layers: {err}") from None
    if recipe.train.init_heads:  # start from saved heads (e.g. joint LoRA on top of frozen-backbone heads)
        from drex_hf.modeling import WEIGHTS_NAME, _read_heads_file

        folder = Path(recipe.train.init_heads)
        saved = json.loads((folder / "exit_config.json").read_text(encoding="utf-8"))
        state = _read_heads_file(folder / WEIGHTS_NAME, saved.get("weights_sha256"))
        model._load_heads_state(state, folder / WEIGHTS_NAME)
        log(f"heads   starting from {folder}")
    model.base_model.requires_grad_(False)
    model.base_model.eval()
    model.heads.float()
    source = model.base_source
    log(f"base    {source.name} ({source.kind}: {source.path}), {model.num_layers} layers; exits {model.exit_layers}")
    tokenizer = load_tokenizer(source)
    identity = json.dumps(
        [source.name, str(source.path) if source.kind == "local" else None, source.gguf_sha256, recipe.model.revision],
    )

    feats_dir = recipe.cache_dir / "features"
    # float32 on CPU is the reference; features computed any other way are cached under their own key
    numerics = {} if (dtype, device.type) == (torch.float32, "cpu") else {"dtype": str(dtype), "device": device.type}
    common = dict(batch_size=recipe.train.cache_batch_size, identity={"base": identity, **numerics}, progress=progress)
    with acc.main_process_first():  # the main process generates and caches; the others then read the caches
        splits: DataSplits = build_splits(recipe, tokenizer, model.base_model, identity, device, progress)
        train_feats = cached_features(
            model, splits.train, feats_dir, "train", top_k=recipe.loss.teacher_top_k, **common
        )
        eval_feats = {}
        for group, samples in splits.eval.items():
            eval_feats[group] = cached_features(
                model, _cap(samples, recipe.eval.max_tokens), feats_dir, f"eval-{group}", top_k=0, **common
            )
    for line in splits.description:
        log(f"data    {line}")
    log(
        f"tokens  {len(train_feats)} train positions; eval " + ", ".join(f"{g} {len(f)}" for g, f in eval_feats.items())
    )

    lora = recipe.lora.enabled
    if lora:
        from drex_hf.lora import add_lora

        add_lora(model, recipe.lora.rank, recipe.lora.alpha, recipe.lora.target_modules, recipe.lora.dropout)
        model.base_model.train()  # LoRA dropout on; the base has no other dropout in eval-equivalent configs
    loss_module = ExitLoss(model, recipe, lora)
    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    loss_module, optimizer = acc.prepare(loss_module, optimizer)
    raw_optimizer = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    o = recipe.optim
    rhash = recipe_hash(recipe)
    step = 0
    history: list[dict[str, Any]] = []
    window: list[dict[str, list[float]]] = []
    train_seconds = 0.0
    if resume:
        state = load_checkpoint(run_dir, model, raw_optimizer, rhash)
        step, history, train_seconds = state["step"], state.get("history", []), state.get("train_seconds", 0.0)
        window = state.get("window", [])
        log(f"resume  from step {step} of {o.steps} ({run_dir / CHECKPOINT})")
    elif (run_dir / CHECKPOINT).exists():
        log(f"note    {run_dir / CHECKPOINT} exists; starting over (use --resume to continue it)")
    if acc.is_main_process:  # the log holds exactly the history up to where training (re)starts
        (run_dir / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history), encoding="utf-8")

    per_micro = o.batch_tokens if not lora else max(1, o.batch_tokens // recipe.data.block_size)
    n_items = len(train_feats) if not lora else len(splits.train)
    bar = tqdm(total=o.steps, initial=step, desc="train", unit="step", disable=not progress or not acc.is_main_process)
    while step < o.steps:
        tick = time.perf_counter()
        for group in raw_optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        torch.manual_seed(seed * 1_000_003 + step)  # LoRA dropout: a function of the step
        for micro in range(o.grad_accum):
            number = step * o.grad_accum + micro
            picks = batch_indices(n_items, per_micro, seed, number, acc.process_index, acc.num_processes)
            if lora:
                skip = layer_skips(model.num_layers, recipe.lora.layer_dropout, seed, number)
                batch = lora_batch(splits.train, train_feats, picks, skip, device)
            else:
                batch = frozen_batch(train_feats, picks, device)
            with acc.accumulate(loss_module), acc.autocast():
                loss, stats = loss_module(batch)
                acc.backward(loss)
                if acc.sync_gradients and o.max_grad_norm:
                    acc.clip_grad_norm_(params, o.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window.append(stats)
        step += 1
        train_seconds += time.perf_counter() - tick
        bar.update(1)
        if step % recipe.train.log_every == 0 or step == o.steps:
            entry = _summarise(window, step, lr_at(step - 1, recipe))
            history.append(entry)
            window = []
            bar.set_postfix_str(
                f"loss {entry['loss']:.3f} agree " + "/".join(f"{100 * a:.0f}" for a in entry["agree"]), refresh=False
            )
            if acc.is_main_process:
                with open(run_dir / "train_log.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
        every = recipe.train.checkpoint_every
        if (every and step % every == 0) or step == o.steps:
            if acc.is_main_process:
                save_checkpoint(
                    run_dir,
                    model,
                    raw_optimizer,
                    {
                        "step": step,
                        "recipe_hash": rhash,
                        "history": history,
                        "window": window,
                        "train_seconds": train_seconds,
                    },
                )
        if stop_after is not None and step >= stop_after:
            bar.close()
            raise StopTraining(f"stopped after step {step}")
    bar.close()
    acc.wait_for_everyone()
    drift = None
    if lora:  # the backbone changed: evaluate on its new states, and measure how far its final layer moved
        model.base_model.eval()
        drift, adapted = {}, {}
        for group, old in eval_feats.items():
            samples = _cap(splits.eval[group], recipe.eval.max_tokens)
            new = compute_features(
                model,
                samples,
                top_k=0,
                batch_size=recipe.train.cache_batch_size,
                desc=f"eval-{group} (adapted)",
                progress=progress,
            )
            adapted[group] = new
            drift[group] = {
                "final_argmax_changed": float((new.teacher_top1 != old.teacher_top1).float().mean()),
                "final_perplexity_original": final_perplexity(model, old),
                "final_perplexity_adapted": final_perplexity(model, new),
            }
        eval_feats = adapted
    results = {}
    if acc.is_main_process:
        results = evaluate_and_publish(
            model,
            recipe,
            eval_feats,
            history=history,
            train_seconds=train_seconds,
            total_seconds=time.perf_counter() - began,
            data_description=splits.description,
            train_positions=len(train_feats),
            lora_drift=drift,
            log=log,
        )
    return TrainResult(recipe.output_dir, step, train_seconds, time.perf_counter() - began, results)


def _cap(samples: list[Sample], cap: int | None) -> list[Sample]:
    if cap is None:
        return samples
    out, total = [], 0
    for s in samples:
        if total >= cap:
            break
        out.append(s)
        total += s.positions
    return out


def _summarise(window: list[dict[str, list[float]]], step: int, lr: float) -> dict[str, Any]:
    exits = len(window[0]["loss"])
    mean = lambda key, j: sum(w[key][j] for w in window) / len(window)  # noqa: E731
    entry = {
        "step": step,
        "lr": lr,
        "exit_loss": [mean("loss", j) for j in range(exits)],
        "agree": [mean("agree", j) for j in range(exits)],
    }
    entry["loss"] = sum(entry["exit_loss"]) / exits
    if "anchor" in window[0]:
        entry["anchor"] = mean("anchor", 0)
    return entry


__all__ = ["StopTraining", "TrainResult", "train"]
