"""The body of `EarlyExitModelForCausalLM.generate()`: HF's arguments checked and merged, the batch
split into requests, run through an engine (`DrexEngine`, or `SpecEngine` for `self_spec`), and the
results assembled as HF's `generate` returns them. Typed against the `EarlyExitModel` Protocol: the
model class calls in here, never the other way.
"""

from __future__ import annotations

import copy
import numbers
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
    kwargs: dict[str, Any],
) -> torch.Tensor | EarlyExitGenerateOutput:
    """`model.generate(...)` with the policy resolved (see its docstring)."""
    from drex_hf.generation.engine import DrexEngine
    from drex_hf.generation.exits import ExitDistribution, ExitReplay
    from drex_hf.generation.scheduler import POLICY_NAMES

    if policy == "self_spec":
        return generate_self_spec(
            model,
            input_ids,
            attention_mask,
            thresholds=thresholds,
            seed=seed,
            exit_trace=exit_trace,
            cost_model=cost_model,
            sla_tpot_ms=sla_tpot_ms,
            graphs=graphs,
            generation_config=generation_config,
            streamer=streamer,
            return_dict_in_generate=return_dict_in_generate,
            draft_exit=draft_exit,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            kwargs=kwargs,
        )
    if draft_exit is not None or draft_tokens is not None or draft_confidence is not None:
        raise GenerationInputError(
            f"draft_exit, draft_tokens and draft_confidence apply to policy='self_spec', not {policy!r}"
        )
    if policy not in POLICY_NAMES:
        raise GenerationInputError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)} or 'self_spec'")
    if policy == "full" and (thresholds is not None or exit_trace is not None):
        raise GenerationInputError("thresholds and exit_trace do not apply to policy='full' (it never exits)")
    input_ids, prompts, settings, return_dict_in_generate = prepare_batch(
        model, input_ids, attention_mask, generation_config, kwargs, streamer, return_dict_in_generate
    )
    model.arch.check_attention_implementation()
    device = model.heads_device
    input_ids = input_ids.to(device)

    replay, distribution = None, None
    if isinstance(exit_trace, ExitDistribution):
        distribution = exit_trace
    elif exit_trace is not None:
        if not isinstance(exit_trace, (torch.Tensor, list, tuple)):
            raise GenerationInputError(
                f"exit_trace must be a [batch, tokens] tensor or list of exit layers, or an ExitDistribution; "
                f"got {type(exit_trace).__name__}"
            )
        replay = ExitReplay.from_output(exit_trace)
        replay.check(model.exit_layers, model.num_layers, len(prompts))
    seeds = request_seeds(seed, len(prompts)) if settings.do_sample else [None] * len(prompts)
    programs = (graphs, settings.has_logits_processors)
    engine = DrexEngine(
        model,
        max_batch=len(prompts),
        max_len=max(p.shape[0] for p in prompts) + settings.max_new_tokens,
        policy=policy,
        settings=settings,
        thresholds=thresholds_for(model, thresholds),
        exit_source="heads" if exit_trace is None else "trace",
        exit_distribution=distribution,
        cost_model=cached_cost_model(
            model, cost_model, policy, len(prompts), thresholds, exit_trace is not None, programs
        ),
        sla_tpot_ms=sla_tpot_ms,
        quorum=quorum,
        graphs=graphs,
        tokenizer=tokenizer,
    )
    if policy == "drex" and cost_model is None:
        model._cost_models[cost_key(model, thresholds, len(prompts), exit_trace is not None, programs)] = engine.cost
    callback = streamer_callback(streamer, prompts[0])
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            trace = replay.layers[b] if replay is not None else None
            engine.add_request(prompt.to(device), seed=seeds[b], trace=trace, callback=callback)
        results = engine.run()
    if streamer is not None:
        streamer.end()
    sequences, exit_layers = sequences_of(input_ids, results, settings.pad_token_id)
    if return_dict_in_generate:
        return EarlyExitGenerateOutput(sequences, exit_layers, engine.stats)
    return sequences


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


def generate_self_spec(
    model: EarlyExitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    thresholds: Any,
    seed: Any,
    exit_trace: Any,
    cost_model: Any,
    sla_tpot_ms: Any,
    graphs: Any,
    generation_config: Any,
    streamer: Any,
    return_dict_in_generate: bool | None,
    draft_exit: int | None,
    draft_tokens: int | str | None,
    draft_confidence: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor | EarlyExitGenerateOutput:
    """`generate(policy="self_spec")`: the batch through one `SpecEngine`; see `generate`."""
    from drex_hf.generation.spec_engine import SpecEngine

    given = {
        "thresholds": thresholds,
        "exit_trace": exit_trace,
        "cost_model": cost_model,
        "sla_tpot_ms": sla_tpot_ms,
        "graphs": graphs or None,
    }
    unused = [name for name, value in given.items() if value is not None]
    if unused:
        raise GenerationInputError(
            f"{', '.join(unused)} do not apply to policy='self_spec' (it never exits early: every token is "
            f"full depth's, verified; draft_exit, draft_tokens and draft_confidence set its drafting)"
        )
    input_ids, prompts, settings, return_dict_in_generate = prepare_batch(
        model, input_ids, attention_mask, generation_config, kwargs, streamer, return_dict_in_generate
    )
    device = model.heads_device
    input_ids = input_ids.to(device)
    seeds = request_seeds(seed, len(prompts)) if settings.do_sample else [None] * len(prompts)
    engine = SpecEngine(
        model,
        max_batch=len(prompts),
        max_len=max(p.shape[0] for p in prompts) + settings.max_new_tokens,
        draft_exit=model.exit_layers[-1] if draft_exit is None else draft_exit,
        draft_tokens=4 if draft_tokens is None else draft_tokens,
        draft_confidence=draft_confidence,
        settings=settings,
    )
    callback = streamer_callback(streamer, prompts[0])
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            engine.add_request(prompt.to(device), seed=seeds[b], callback=callback)
        results = engine.run()
    if streamer is not None:
        streamer.end()
    sequences, exit_layers = sequences_of(input_ids, results, settings.pad_token_id)
    if return_dict_in_generate:
        return EarlyExitGenerateOutput(sequences, exit_layers, engine.stats)
    return sequences


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


def sequences_of(input_ids: torch.Tensor, results: dict[int, Any], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s outputs from an engine's results by request id (0..batch-1): the prompts followed by
    each row's tokens, `pad` after its end, and each token's exit layer (-1 after the end)."""
    count, device = input_ids.shape[0], input_ids.device
    steps = max(len(r.tokens) for r in results.values())
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
