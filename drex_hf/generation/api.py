"""The body of `EarlyExitModelForCausalLM.generate()`: HF's arguments checked and merged, the batch
split into requests, run through an engine (`DrexEngine`, or `SpecEngine` for `self_spec`), and the
results assembled as HF's `generate` returns them. Typed against the `EarlyExitModel` Protocol: the
model class calls in here, never the other way.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from drex_hf.errors import GenerationInputError, GenerationTypeError
from drex_hf.generation.protocol import EarlyExitModel


@dataclass
class EarlyExitGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` output.

    `sequences`: prompts (as given, padding included) followed by the new tokens, `pad_token_id`
    after a row's end. `exit_layers [batch, new_tokens]`: the decoder layer each new token left at
    (L-1 = full depth), -1 after a row's end.
    """

    sequences: torch.Tensor | None = None
    exit_layers: torch.Tensor | None = None
    stats: Any = None


@torch.no_grad()
def generate(
    model: EarlyExitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    policy: str,
    thresholds: float | list[float] | None = None,
    seed: int | list[int] | None = None,
    exit_trace: Any = None,
    cost_model: Any = None,
    sla_tpot_ms: float | None = None,
    quorum: float = 0.5,
    graphs: bool | None = None,
    generation_config: Any = None,
    streamer: Any = None,
    return_dict_in_generate: bool | None = None,
    tokenizer: Any = None,
    draft_exit: int | None = None,
    draft_tokens: int | str | None = None,
    draft_confidence: float | None = None,
    draft_source: str | None = None,
    kwargs: dict[str, Any],
) -> torch.Tensor | EarlyExitGenerateOutput:
    """`model.generate(...)` with the policy resolved (see its docstring): the batch through an engine
    — reused from an earlier call with the same options (`engines`), its graphs and cost model with
    it — and the results as HF's `generate` returns them."""
    spec = policy == "self_spec"
    _check_policy_options(policy, thresholds, exit_trace, cost_model, sla_tpot_ms, graphs, draft_exit,
                          draft_tokens, draft_confidence, draft_source)  # fmt: skip
    input_ids, prompts, settings, return_dict_in_generate = prepare_batch(
        model, input_ids, attention_mask, generation_config, kwargs, streamer, return_dict_in_generate
    )
    model.arch.check_attention_implementation()
    replay, distribution = _trace(model, exit_trace, len(prompts))
    input_ids = input_ids.to(model.heads_device)
    seeds = request_seeds(seed, len(prompts)) if settings.do_sample else [None] * len(prompts)
    max_len = max(p.shape[0] for p in prompts) + settings.max_new_tokens
    if spec:
        from drex_hf.generation.spec.engine import model_drafting

        source = draft_source or "head"
        if draft_exit is None and source != "ngram":
            draft_exit = model.exit_layers[-1]
        k = 4 if draft_tokens is None else draft_tokens
        options = dict(draft_exit=draft_exit, draft_tokens=k, draft_confidence=draft_confidence, draft_source=source,
                       graphs=graphs, **model_drafting(model, k, source))  # fmt: skip
    else:
        programs = (graphs, settings.has_logits_processors)
        options = dict(
            policy=policy, thresholds=thresholds_for(model, thresholds), quorum=quorum, graphs=graphs,
            exit_source="heads" if exit_trace is None else "trace", exit_distribution=distribution,
            cost_model=cost_model, sla_tpot_ms=sla_tpot_ms, tokenizer=tokenizer,
        )  # fmt: skip

        def resolved(options: dict) -> dict:  # a new engine's cost model: calibrated, or measured once before
            cost = cached_cost_model(model, cost_model, policy, len(prompts), thresholds, exit_trace is not None,
                                     programs)  # fmt: skip
            return options | {"cost_model": cost}

    engine = engines.get(model, spec, len(prompts), max_len, settings, options, None if spec else resolved)
    if policy == "drex" and cost_model is None:
        model._cost_models[cost_key(model, thresholds, len(prompts), exit_trace is not None, programs)] = engine.cost
    callback = streamer_callback(streamer, prompts[0])
    ids = []
    for b, prompt in enumerate(prompts):
        extra = {} if spec else {"trace": replay.layers[b] if replay is not None else None}
        ids.append(engine.add_request(prompt.to(model.heads_device), max_new_tokens=settings.max_new_tokens,
                                      seed=seeds[b], callback=callback, **extra))  # fmt: skip
    finished = engine.run()
    if streamer is not None:
        streamer.end()
    sequences, exit_layers = sequences_of(input_ids, [finished[i] for i in ids], settings.pad_token_id)
    if return_dict_in_generate:
        return EarlyExitGenerateOutput(sequences, exit_layers, engine.stats)
    return sequences


def _check_policy_options(
    policy: str, thresholds: Any, exit_trace: Any, cost_model: Any, sla_tpot_ms: Any, graphs: Any,
    draft_exit: Any, draft_tokens: Any, draft_confidence: Any, draft_source: Any = None,
) -> None:  # fmt: skip
    """Refuse options that do not apply to `policy`, naming them."""
    from drex_hf.generation.scheduler import POLICY_NAMES

    if policy == "self_spec":
        given = {"thresholds": thresholds, "exit_trace": exit_trace, "cost_model": cost_model,
                 "sla_tpot_ms": sla_tpot_ms}  # fmt: skip
        unused = [name for name, value in given.items() if value is not None]
        if unused:
            raise GenerationInputError(
                f"{', '.join(unused)} do not apply to policy='self_spec' (it never exits early: every token is "
                f"full depth's, verified; draft_source, draft_exit, draft_tokens and draft_confidence set its "
                f"drafting)"
            )
        return
    if any(v is not None for v in (draft_exit, draft_tokens, draft_confidence, draft_source)):
        raise GenerationInputError(
            f"draft_source, draft_exit, draft_tokens and draft_confidence apply to policy='self_spec', not {policy!r}"
        )
    if policy not in POLICY_NAMES:
        raise GenerationInputError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)} or 'self_spec'")
    if policy == "full" and (thresholds is not None or exit_trace is not None):
        raise GenerationInputError("thresholds and exit_trace do not apply to policy='full' (it never exits)")


def _trace(model: EarlyExitModel, exit_trace: Any, batch: int) -> tuple[Any, Any]:
    """(replayed rows, exit distribution) of `generate`'s `exit_trace`, checked."""
    from drex_hf.generation.exits import ExitDistribution, ExitReplay

    if exit_trace is None:
        return None, None
    if isinstance(exit_trace, ExitDistribution):
        return None, exit_trace
    if not isinstance(exit_trace, (torch.Tensor, list, tuple)):
        raise GenerationInputError(
            f"exit_trace must be a [batch, tokens] tensor or list of exit layers, or an ExitDistribution; "
            f"got {type(exit_trace).__name__}"
        )
    replay = ExitReplay.from_output(exit_trace)
    replay.check(model.exit_layers, model.num_layers, batch)
    return replay, None


class EngineCache:
    """Engines `generate()` built, kept for the next call with the same options (its store, captured
    graphs and cost model with it), per model, the most recently used first. At most `size` per
    model: a new one beyond that releases the least recently used one before it is built (its store
    and graph pool go before the new ones are allocated). `release(model)` drops them all."""

    attribute = "_drex_engines"  # kept on the model itself, so they go when it goes

    def __init__(self, size: int = 2) -> None:
        self.size = size

    def _of(self, model: Any) -> collections.OrderedDict:
        cached = getattr(model, self.attribute, None)
        if cached is None:
            cached = collections.OrderedDict()
            setattr(model, self.attribute, cached)
        return cached

    def get(
        self, model: Any, spec: bool, batch: int, max_len: int, settings: Any, options: dict, resolve: Any = None
    ) -> Any:
        """An idle engine for `batch` rows of up to `max_len` positions with these settings and
        options: a cached one, or a new one (`max_len` rounded up to a multiple of 64, so that calls
        with slightly different lengths share it; `resolve(options)` completes a new one's options)."""
        key = _engine_key(spec, batch, settings, options)
        cached = self._of(model)
        engine = cached.get(key)
        if engine is not None and engine.store.max_len >= min(max_len, _limit(model, max_len)) and not engine.active:
            cached.move_to_end(key, last=False)
            engine.reset_stats()
            return engine
        cached.pop(key, None)
        while len(cached) >= self.size:
            _release_engine(cached.popitem()[1])
        built = resolve(options) if resolve is not None else options
        engine = _new_engine(model, spec, batch, -(-max_len // 64) * 64, settings, built)
        cached[key] = engine
        cached.move_to_end(key, last=False)
        return engine

    def release(self, model: Any) -> int:
        """Drop every engine kept for `model` (their stores and graphs); returns how many there were."""
        cached = self._of(model)
        count = len(cached)
        while cached:
            _release_engine(cached.popitem()[1])
        return count

    def held(self, model: Any) -> list[Any]:
        """The engines kept for `model`, the most recently used first."""
        return list(self._of(model).values())


def _engine_key(spec: bool, batch: int, settings: Any, options: dict) -> tuple:
    fields = dataclasses.asdict(settings)
    fields.pop("max_new_tokens")  # each request names its own
    named = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
    return spec, batch, tuple(sorted((k, repr(v)) for k, v in fields.items())), named


def _frozen(value: Any) -> Any:
    """A key for an option: lists as tuples, unhashable objects (a cost model, a tokenizer) by identity."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, torch.Tensor):  # a draft vocabulary: by identity (== on tensors is elementwise)
        return ("id", id(value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _limit(model: Any, max_len: int) -> int:
    limit = model.arch.position_limit
    return max_len if limit is None else limit


def _new_engine(model: Any, spec: bool, batch: int, max_len: int, settings: Any, options: dict) -> Any:
    if spec:
        from drex_hf.generation.spec.engine import SpecEngine

        return SpecEngine(model, max_batch=batch, max_len=max_len, settings=settings, **options)
    from drex_hf.generation.engine import DrexEngine

    return DrexEngine(model, max_batch=batch, max_len=max_len, settings=settings, **options)


def _release_engine(engine: Any) -> None:
    engine.release()
    device = torch.device(engine.model.heads_device)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()


engines = EngineCache()


def release_engines(model: EarlyExitModel) -> int:
    """Release the engines `generate()` keeps for `model` (their KV stores and captured graphs)."""
    return engines.release(model)


def prepare_batch(
    model: EarlyExitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    generation_config: Any,
    kwargs: dict[str, Any],
    streamer: Any,
    return_dict_in_generate: bool | None,
) -> tuple[torch.Tensor, list[torch.Tensor], Any, bool]:
    """`generate`'s inputs checked and split: (input ids, one unpadded prompt per row, the decode
    settings, whether to return a dict)."""
    from drex_hf.generation.settings import (
        check_positions,
        check_token_batch,
        infer_attention_mask,
        merge_generation_config,
        settings_from_config,
        split_prompts,
    )

    input_ids, attention_mask = check_token_batch(input_ids, attention_mask, model.arch.input_vocab_size)
    gen_config = merge_generation_config(model.base_model, generation_config, kwargs)
    settings = settings_from_config(gen_config, input_ids.shape[1])
    attention_mask = infer_attention_mask(input_ids, settings, attention_mask)
    _, prompts = split_prompts(input_ids, attention_mask)
    check_positions(model.arch, [p.shape[0] for p in prompts], settings.max_new_tokens)
    if streamer is not None and len(prompts) > 1:
        raise GenerationInputError(f"streamer supports a batch of 1 prompt, got {len(prompts)}")
    if return_dict_in_generate is None:
        return_dict_in_generate = bool(gen_config.return_dict_in_generate)
    return input_ids, prompts, settings, return_dict_in_generate


def cost_key(model: EarlyExitModel, thresholds: Any, batch: int, trace: bool, programs: tuple = ()) -> tuple:
    """The segments a drex engine will run (a trace checks every exit point), the batch, the device,
    and how its programs run (`programs`: graphs or not, logits processors or not: each times
    differently, so a cost model measured one way is not reused the other)."""
    from drex_hf.generation.engine import segment_boundaries

    ends = segment_boundaries(
        model.exit_layers, thresholds_for(model, thresholds), "drex", "trace" if trace else "heads"
    )
    return (tuple(ends), batch, str(model.heads_device), *programs)


def cached_cost_model(
    model: EarlyExitModel, given: Any, policy: str, batch: int, thresholds: Any, trace: bool, programs: tuple = ()
) -> Any:
    """This device's calibrated constants when they were made for these segments, else a cost
    model measured once per (segments, batch size, device) and reused by later calls."""
    if given is not None or policy != "drex":
        return given
    key = cost_key(model, thresholds, batch, trace, programs)
    if model.calibration_path is not None and key not in model._cost_models:
        from drex_hf.device import device_name
        from drex_hf.generation.scheduler import CostModel

        ends = list(key[0])
        segments = [[a, b] for a, b in zip([0, *(e + 1 for e in ends)], [*ends, model.arch.num_layers - 1])]
        try:
            model._cost_models[key] = CostModel.from_file(
                model.calibration_path, device_name(model.heads_device), segments
            )
        except GenerationInputError:
            pass  # other thresholds than calibrated: other segments; measure at start-up
    return model._cost_models.get(key)


def thresholds_for(model: EarlyExitModel, override: float | list[float] | None) -> list[float]:
    if override is None:
        return model.exit_config.threshold_list()
    probe = copy.deepcopy(model.exit_config)
    probe.thresholds = override
    probe._validate()
    return probe.threshold_list()


def full_depth_layers(new: torch.Tensor, eos_ids: tuple[int, ...], last_layer: int) -> torch.Tensor:
    """Exit layers of a full-depth run: L-1 up to and including each row's first eos, -1 after."""
    layers = torch.full(new.shape, last_layer, dtype=torch.long, device=new.device)
    if eos_ids:
        is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
        after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        layers[after] = -1
    return layers


def streamer_callback(streamer: Any, prompt: torch.Tensor) -> Any:
    """An engine token callback feeding `streamer` (HF's streamer protocol), after putting the prompt
    into it; None without a streamer."""
    if streamer is None:
        return None
    streamer.put(prompt.unsqueeze(0).cpu())

    def callback(request_id: int, token: int, layer: int) -> None:
        streamer.put(torch.tensor([token]))

    return callback


def sequences_of(input_ids: torch.Tensor, results: Sequence[Any], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s outputs from an engine's results, one per row: the prompts followed by each row's
    tokens, `pad` after its end, and each token's exit layer (-1 after the end)."""
    count, device = input_ids.shape[0], input_ids.device
    steps = max(len(r.tokens) for r in results)
    new = torch.full((count, steps), pad, dtype=input_ids.dtype, device=device)
    exit_layers = torch.full((count, steps), -1, dtype=torch.long, device=device)
    for b in range(count):
        result = results[b]
        new[b, : len(result.tokens)] = torch.tensor(result.tokens, dtype=input_ids.dtype)
        exit_layers[b, : len(result.tokens)] = torch.tensor(result.exit_layers)
    return torch.cat([input_ids, new], dim=1), exit_layers


def request_seeds(seed: int | list[int] | None, count: int) -> list[int]:
    """One seed per request, each an integer in [0, 2**64) (`sampling.check_seed`)."""
    from drex_hf.seeds import SEED_LIMIT, check_seed

    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        first = check_seed(seed)
        if first + count > SEED_LIMIT:
            raise GenerationInputError(
                f"seed={first} gives prompt {count - 1} the seed {first} + {count - 1}, which is 2**64 or more: "
                f"with {count} prompts an int seed must be at most 2**64 - {count} (or give one seed per prompt)"
            )
        return [first + i for i in range(count)]
    if not isinstance(seed, (list, tuple)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seed
    ):
        raise GenerationTypeError(f"seed must be an integer or a list of integers, one per prompt; got {seed!r}")
    if len(seed) != count:
        raise GenerationInputError(f"seed has {len(seed)} values for {count} prompts")
    return [check_seed(s) for s in seed]
