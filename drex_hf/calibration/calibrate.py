"""The whole `drex calibrate` run: observe, pick the exits that pay, test thresholds, save.

1. Observe: greedy full-depth continuations of held-out prompts (the deployment decoding for greedy
   generation), then one pass over prompt + continuation giving every exit's confidence and whether
   its token equals the full-depth token at that position (`Observations`).
2. Time the segments, exit checks and KV fill at several row counts on this device (`CostTable`).
3. On the learn half of the prompts, switch off the exits that cost more than they save.
4. Learn-then-Test thresholds for the exits left on (learn half fits, test half certifies).
5. Write `calibration.json` (thresholds, the guarantee, the cost constants keyed by device, fit errors,
   sample sizes, the command, the sha256 of the heads' weights file it was made for) and a plot
   beside the heads.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from drex_hf.calibration.costs import (
    CostTable,
    boundary_factor,
    choose_exits,
    expected_token_ms,
    prediction_errors,
    profile_runner,
)
from drex_hf.calibration.sequences import (
    SequenceResult,
    certify,
    check_enough_prompts,
    ordered_candidates,
)
from drex_hf.calibration.sequences import check_options as check_sequence_options
from drex_hf.calibration.thresholds import (
    CalibrationDataError,
    Observations,
    agreement_counts,
    fit_thresholds,
    learn_prompts,
    learn_then_test,
    split_by_prompt,
)
from drex_hf.calibration_file import (
    HEADS_SHA_KEY,
    OBSERVATIONS_NAME,
    PLOT_NAME,
    describe_choice,
    entry_guarantee,
    guarantee_kind,
    read_json_object,
    recorded_heads_sha256,
)
from drex_hf.config import CALIBRATION_NAME, CONFIDENCE_MEASURES, parse_threshold, thresholds_to_json
from drex_hf.errors import ConfigError
from drex_hf.generation.settings import left_padded
from drex_hf.model_card import CALIBRATION_BEGIN, CALIBRATION_END, card_name
from drex_hf.plotting import pyplot


@torch.no_grad()
def observe(
    model: Any,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    measures: list[str] | None = None,
    answers: list[list[int]] | None = None,
) -> Observations:
    """Every exit's confidence and agreement with full depth, over greedy full-depth continuations;
    confidences under the model's measure and each of `measures` (one more forward pass each).
    `answers`, when given, receives each prompt's continuation (token ids, up to and with the first
    end-of-sequence token): the full-depth answers a sequence guarantee compares drex's with."""
    if not prompts:
        raise CalibrationDataError("no prompts to calibrate on")
    device = model.heads_device
    own = model.exit_config.confidence
    extra = [m for m in dict.fromkeys(measures or []) if m != own]
    pad = 0
    confidence, agree, prompt_of = [], [], []
    others: dict[str, list[torch.Tensor]] = {m: [] for m in extra}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids, mask = left_padded(batch, pad, device)
        width = ids.shape[1]
        full = model.base_model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        new = full[:, width:]
        eos = model.base_model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        keep = torch.ones_like(new, dtype=torch.bool)
        for b in range(len(batch)):  # positions after the first end-of-sequence are padding
            ends = [t for t in range(new.shape[1]) if int(new[b, t]) in eos]
            if ends:
                keep[b, ends[0] + 1 :] = False
        full_mask = torch.cat([mask, keep.long()], dim=1)
        out = model(input_ids=full, attention_mask=full_mask, output_exit_logits=True)
        # position width-1+t predicts new token t
        at = slice(width - 1, width - 1 + new.shape[1])
        for b in range(len(batch)):
            valid = keep[b]
            conf = out.exit_confidences[:, b, at][:, valid]
            hits = torch.stack([logits[b, at].argmax(-1)[valid] == new[b][valid] for logits in out.exit_logits])
            confidence.append(conf.float().cpu())
            agree.append(hits.cpu())
            prompt_of.append(torch.full((int(valid.sum()),), start + b))
            if answers is not None:
                answers.append(new[b][valid].tolist())
        for measure in extra:  # the same tokens, scored by another measure
            model.exit_config.confidence = measure
            try:
                scored = model(input_ids=full, attention_mask=full_mask, output_exit_logits=True).exit_confidences
            finally:
                model.exit_config.confidence = own
            others[measure] += [scored[:, b, at][:, keep[b]].float().cpu() for b in range(len(batch))]
        if progress:
            progress(len(batch))
    return Observations(
        torch.cat(confidence, 1),
        torch.cat(agree, 1),
        torch.cat(prompt_of),
        own,
        {m: torch.cat(parts, 1) for m, parts in others.items()},
    )


def _eos_ids(model: Any) -> set[int]:
    eos = model.base_model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def drex_answers(
    model: Any,
    prompts: list[torch.Tensor],
    thresholds: list[float],
    max_new_tokens: int,
    *,
    measure: str | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """drex's greedy answers to `prompts` under `thresholds` (scored by `measure`, default the heads'
    own), batched through `model.generate`: per prompt its token ids up to and with the first
    end-of-sequence token, and the exit index each token left at (`len(thresholds)` = full depth)."""
    own = model.exit_config.confidence
    index = {layer: j for j, layer in enumerate(model.exit_layers)}
    eos, pad, full = _eos_ids(model), 0, len(model.exit_layers)
    answers, exits = [], []
    model.exit_config.confidence = measure or own
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids, mask = left_padded(batch, pad, model.heads_device)
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                policy="drex",
                thresholds=list(thresholds),
                return_dict_in_generate=True,
            )
            new, layers = out.sequences[:, ids.shape[1] :].tolist(), out.exit_layers.tolist()
            for tokens, taken in zip(new, layers):
                ends = [t for t, token in enumerate(tokens) if token in eos]
                length = ends[0] + 1 if ends else len([layer for layer in taken if layer >= 0])
                answers.append(tokens[:length])
                exits.append([index.get(layer, full) for layer in taken[:length]])
            if progress:
                progress(len(batch))
    finally:
        model.exit_config.confidence = own
    return answers, exits


def certify_sequences(
    model: Any,
    obs: Observations,
    prompts: list[torch.Tensor],
    references: list[list[int]],
    *,
    metric: str,
    target: float,
    delta: float,
    bound: str | None,
    seed: int,
    max_new_tokens: int,
    enabled: list[bool] | None = None,
    cache: dict | None = None,
    progress: Callable[[str, int], None] | None = None,
    label: str = "guarantee",
) -> SequenceResult:
    """The sequence guarantee (`drex_hf.calibration.sequences`) for `obs`'s measure: candidates fitted
    on the learn prompts (the split `learn_then_test` makes with `seed`), drex's answers generated
    on the test prompts, candidate by candidate, until the first that fails. `cache` (shared between
    calls) keeps answers already generated for a (measure, thresholds) pair."""
    ids = torch.arange(len(prompts))
    if not torch.equal(obs.prompt.unique(), ids):
        raise CalibrationDataError(f"the observations cover other prompts than the {len(prompts)} given")
    learn_ids = learn_prompts(ids, 0.5, seed)
    test_ids = [i for i in range(len(prompts)) if i not in set(learn_ids.tolist())]
    learn = obs.subset(torch.isin(obs.prompt, learn_ids))
    ordered = ordered_candidates(learn, enabled)
    test_prompts = [prompts[i] for i in test_ids]
    cache = {} if cache is None else cache
    if progress:
        progress(f"certify:{label}", (len(ordered) - 1) * len(test_ids))

    def answers_for(thresholds: list[float]) -> tuple[list[list[int]], list[list[int]]]:
        key = (obs.measure, tuple(thresholds))
        if key not in cache:
            tick = (lambda n: progress("certify", n)) if progress else None
            cache[key] = drex_answers(
                model, test_prompts, thresholds, max_new_tokens, measure=obs.measure, progress=tick
            )
        elif progress:
            progress("certify", len(test_ids))
        return cache[key]

    return certify(
        ordered,
        answers_for,
        [references[i] for i in test_ids],
        metric,
        target,
        delta,
        bound=bound,
        learn_prompts=len(learn_ids),
    )


def _merge(costs: CostTable, enabled: list[bool]) -> CostTable:
    """The cost table of the segmentation with only the enabled exits: disabled exits' segments join
    the next one, and their checks and fills disappear."""
    layers, check, fill, regroup, context, run, gather, per_position = [], [], [], [], [], None, 0.0, 0.0
    for s, times in enumerate(costs.layers_ms):
        run = times if run is None else [a + b for a, b in zip(run, times)]
        gather += costs.regroup_ms[s] if costs.regroup_ms else 0.0
        per_position += costs.context_ms[s] if costs.context_ms else 0.0
        if s == len(costs.layers_ms) - 1 or enabled[s]:
            layers.append(run)
            regroup.append(gather)
            context.append(per_position)
            run, gather, per_position = None, 0.0, 0.0
            if s < len(costs.check_ms):
                check.append(costs.check_ms[s])
                fill.append(costs.fill_ms[s])
    return CostTable(
        costs.rows,
        layers,
        check,
        fill,
        regroup if costs.regroup_ms else None,
        costs.project_ms,
        context if costs.context_ms else None,
    )


def check_options(
    rows: list[int],
    holdout_rows: list[int],
    decision_rows: int,
    context: int,
    long_context: int | None,
    options: bool = False,
) -> None:
    """Refuse, before anything is observed or timed, settings the run could not use: row counts
    below 1, a decision batch above the largest timed row count (its cost would be a guess), a
    second timing context not longer than the first. `options`: name them as the CLI's options."""

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if options else key

    for key, counts in (("rows", rows), ("holdout_rows", holdout_rows)):
        if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise CalibrationDataError(f"{name(key)} must be positive row counts, got {counts}")
    if isinstance(decision_rows, bool) or not isinstance(decision_rows, int) or decision_rows < 1:
        raise CalibrationDataError(f"{name('decision_rows')} must be a positive row count, got {decision_rows!r}")
    if decision_rows > max(rows):
        raise CalibrationDataError(
            f"{name('decision_rows')} {decision_rows} is above the largest timed row count in {name('rows')} "
            f"{','.join(map(str, rows))}: exits are chosen on the timings at {decision_rows} rows; add "
            f"{decision_rows} to {name('rows')} or lower {name('decision_rows')}"
        )
    if context < 1:
        raise CalibrationDataError(f"{name('context')} must be a positive number of cached positions, got {context}")
    if long_context is not None and long_context <= context:
        raise CalibrationDataError(
            f"{name('long_context')} {long_context} must exceed {name('context')} {context}: the second timing "
            "gives attention's per-position cost"
        )


def calibrate(
    model: Any,
    prompts: list[torch.Tensor],
    *,
    target: float = 0.95,
    delta: float = 0.1,
    bound: str | None = None,
    max_new_tokens: int = 48,
    rows: list[int] | None = None,
    holdout_rows: list[int] | None = None,
    decision_rows: int = 8,
    context: int = 128,
    long_context: int | None = None,
    repeats: int = 5,
    seed: int = 0,
    command: str = "",
    progress: Callable[[str, int], None] | None = None,
    observations: Observations | None = None,
    measures: list[str] | None = None,
    min_speedup: float = 1.05,
    metric: str | None = None,
    sequence_target: float = 0.9,
) -> dict:
    """Run steps 1-4 of the module docstring; returns what `calibration.json` holds, and the
    observations under the key "observations_data" (`save` writes them beside it).

    `measures`: the confidence measures to compare (default: every one the heads have — all four;
    the heads' own is always included). Per device, the measure with the fastest expected token at
    `decision_rows` is chosen, with its own exits that pay and its own tested thresholds. Exits stay
    on only if they promise `min_speedup` over a real full-depth step: the promise leaves out the
    engine's per-step bookkeeping and assumes the held-out text's exit rates, so a bare 1.0 would
    let a model run slower than full depth.

    With `observations` (from an earlier run's `Observations.load`), step 1 is skipped and `prompts`
    may be empty: only this device is profiled. Timings depend on shapes, not weights, so a device
    can be profiled on a model of the same shapes whose base weights are random.

    With `metric` ("rouge_l" or "exact"), step 4 certifies whole answers instead of tokens
    (`drex_hf.calibration.sequences`): the guarantee and this device's thresholds are the loosest
    whose drex greedy answers on the test prompts score, in expectation, >= `sequence_target` against
    the full-depth answers with probability >= 1 - delta; `target` is then only the token agreement of
    the learn-half fits that decide which exits pay here. `bound` defaults to binomial (for tokens and
    exact) or hoeffding_bentkus (rouge_l).

    `progress(stage, n)`: n more units of "observe", "profile" or "certify" done;
    `progress("certify:<what>", n)` opens the certification of <what> with at most n answers."""
    from drex_hf.device import device_name
    from drex_hf.generation.engine import DrexEngine

    command = command or " ".join(sys.argv)
    rows = sorted(set(rows or [1, 2, 4, 8, 16, 32]))  # the cost table interpolates between ascending counts
    holdout_rows = holdout_rows or [3, 6, 12, 24]
    check_options(rows, holdout_rows, decision_rows, context, long_context)
    references: list[list[int]] | None = None
    if metric is None:
        bound = bound or "binomial"
    else:  # refused before anything is generated: what the test could never pass
        bound = check_sequence_options(metric, sequence_target, delta, bound)
        if observations is not None:
            raise CalibrationDataError(
                "a sequence guarantee generates drex's answers to the prompts: it needs the prompts, not saved "
                "observations"
            )
        if len(prompts) < 2:
            raise CalibrationDataError("need at least 2 prompts: learn and test are split by prompt")
        tested = len(prompts) - len(learn_prompts(torch.arange(len(prompts)), 0.5, seed))
        check_enough_prompts(tested, metric, sequence_target, delta, bound, len(prompts))
        references = []
    started = time.time()
    if observations is None:
        obs = observe(
            model,
            prompts,
            max_new_tokens,
            progress=(lambda n: progress("observe", n)) if progress else None,
            measures=list(CONFIDENCE_MEASURES) if measures is None else measures,
            answers=references,
        )
    else:
        if observations.confidence.shape[0] != len(model.exit_layers):
            raise CalibrationDataError(
                f"the saved observations cover {observations.confidence.shape[0]} exits, the model has "
                f"{len(model.exit_layers)}"
            )
        obs = observations
    if measures is not None:
        unknown = sorted(set(measures) - set(obs.measures))
        if unknown:
            raise CalibrationDataError(f"measures {unknown} were not observed (have: {', '.join(obs.measures)})")

    exits = list(model.exit_layers)
    long_context = long_context or 4 * context
    holdout_context = (context + long_context) // 2  # the fit's error is also checked between the two
    engine = DrexEngine(
        model, max_batch=max(rows + holdout_rows), max_len=long_context + 1, thresholds=[0.5] * len(exits)
    )
    timer = profile_runner(engine.runner, context, repeats)
    tick = (lambda: progress("profile", 1)) if progress else None
    costs = CostTable.measure(
        timer,
        len(exits) + 1,
        rows,
        progress=tick,
        regroup=True,
        project=True,
        long_context=long_context,
        reference_context=context,
    )
    device = device_name(model.heads_device)

    own = model.exit_config.confidence
    full_ms = expected_token_ms(costs, [0.0] * len(exits), [False] * len(exits), decision_rows)
    # the real full-depth step (all layers as one segment: no boundaries, no checks) is what the exits
    # must beat; the sum of the segments also pays each boundary, measured here against one segment
    whole = DrexEngine(model, max_batch=decision_rows, max_len=context + 1, thresholds=[math.inf] * len(exits))
    factor = boundary_factor(whole.runner, engine.runner, decision_rows, context)
    full_step_ms = full_ms * factor
    del whole
    options = {}
    compared = [m for m in obs.measures if measures is None or m in measures or m == obs.measure]
    for measure in compared:  # each measure the heads were observed with: its own checks' cost
        table = costs
        if measure != own:
            table = costs.with_checks([[timer(f"check:{measure}", s, n) for n in rows] for s in range(len(exits))])
        options[measure] = _exits_for(
            obs.with_measure(measure), table, target, delta, bound, seed, decision_rows, full_step_ms, min_speedup
        )
    # the fastest expected token on the learn half wins; the heads' own measure on a tie (e.g. when no
    # exit pays at all)
    chosen = min(options, key=lambda m: (options[m]["learn_token_ms"], m != own))
    pick = options[chosen]
    # the guarantee for any device: the heads' own measure, every exit may open
    result, enabled, steps, costs, token_ms = (
        pick["result"],
        pick["enabled"],
        pick["steps"],
        pick["costs"],
        pick["token_ms"],
    )
    thresholds, test_agreement, fractions = result.thresholds, result.test_agreement, result.exit_fractions
    if metric is None:
        guarantee = {
            "kind": "token_agreement",
            **learn_then_test(obs.with_measure(own), target, delta, bound=bound, seed=seed).to_dict(),
        }
        certified = {"kind": "token_agreement", "target_agreement": target, "delta": delta, "bound": bound}
    else:
        assert references is not None
        answers: dict = {}  # answers already generated, shared by the two certifications
        certify_with = dict(
            metric=metric,
            target=sequence_target,
            delta=delta,
            bound=bound,
            seed=seed,
            max_new_tokens=max_new_tokens,
            cache=answers,
            progress=progress,
        )
        # the guarantee for any device: the heads' own measure, every exit may open
        guarantee = certify_sequences(model, obs.with_measure(own), prompts, references, **certify_with).to_dict()
        here = certify_sequences(
            model, obs.with_measure(chosen), prompts, references, enabled=enabled, label=device, **certify_with
        )
        thresholds, fractions = here.thresholds, here.exit_fractions
        _, test = split_by_prompt(obs.with_measure(chosen), 0.5, seed)
        agreeing, n, _ = agreement_counts(test, thresholds)
        test_agreement = agreeing / n  # teacher-forced, for comparison with token calibrations
        certified = {k: v for k, v in here.to_dict().items() if k != "thresholds"}
        token_ms = expected_token_ms(costs, fractions, [math.isfinite(t) for t in thresholds], decision_rows)
    on = [math.isfinite(t) for t in thresholds]
    merged = _merge(costs, on)
    model_costs = merged.cost_model(context, device)
    merged_timer = _merged_timer(timer, on, None if chosen == own else chosen)
    errors = prediction_errors(model_costs, merged_timer, holdout_rows, [holdout_context])
    measures = {  # compared at token level: which measure's checks pay is decided on tokens
        m: {
            "guarantee": "token_agreement",
            "exits_paying": o["enabled"],
            "thresholds": thresholds_to_json(o["result"].thresholds),
            "test_agreement": o["result"].test_agreement,
            "exit_fractions": o["result"].exit_fractions,
            "check_ms": o["costs"].check_ms,
            "expected_speedup": full_step_ms / o["token_ms"] if o["token_ms"] > 0 else None,
            "learn_expected_speedup": full_step_ms / o["learn_token_ms"] if o["learn_token_ms"] > 0 else None,
            "exit_choice": o["steps"],
        }
        for m, o in options.items()
    }
    ends = [e for e, o in zip(exits, on) if o]
    starts = [0, *(e + 1 for e in ends)]
    stops = [*ends, model.arch.num_layers - 1]
    return {
        "format": 1,
        "command": command,
        "observed_by": None if observations is not None else command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1),
        "timing": f"median of {repeats} synchronised runs after a warm-up, {context} cached positions "
        f"({long_context} for the per-position cost; the fit is checked at {holdout_context} too)",
        "exit_layers": exits,
        HEADS_SHA_KEY: model.exit_config.weights_sha256,  # the heads as loaded (their file was checked)
        "confidence": model.exit_config.confidence,
        "observations": {
            "prompts": len(prompts) if observations is None else int(obs.prompt.unique().numel()),
            "tokens": obs.tokens,
            "max_new_tokens": max_new_tokens if observations is None else None,
            "reused": observations is not None,
        },
        "observations_data": obs,
        "guarantee": guarantee,
        "curves": curves(obs.with_measure(own)),
        "curves_by_measure": {m: curves(obs.with_measure(m)) for m in compared},
        "cost_models": {
            device: {
                **model_costs.to_dict(),
                "segments": [[a, b] for a, b in zip(starts, stops)],
                "thresholds": thresholds_to_json(thresholds),
                "guarantee": certified,
                "test_agreement": test_agreement,
                "exit_fractions": fractions,
                "exits_enabled": on,
                "exits_paying": enabled,
                "exit_choice": steps,
                "confidence": chosen,
                "measures": measures,
                "profile": costs.to_dict(),
                "prediction_error": errors,
                "decision_rows": decision_rows,
                "made_by": command,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "dtype": str(model.arch.lm_head.weight.dtype).removeprefix("torch."),
                "expected_token_ms": token_ms,
                "full_depth_token_ms": full_step_ms,
                "segmented_full_depth_token_ms": full_ms,
                "boundary_factor": factor,
                "min_speedup": min_speedup,
                "expected_speedup": full_step_ms / token_ms if token_ms > 0 else None,
            }
        },
    }


def _exits_for(
    obs: Observations,
    costs: CostTable,
    target: float,
    delta: float,
    bound: str,
    seed: int,
    rows: int,
    full_ms: float | None = None,
    min_speedup: float = 1.0,
) -> dict:
    """For one confidence measure: switch off the exits that do not pay (on the learn half's fitted
    thresholds and exit fractions), then Learn-then-Test thresholds for those left on. With
    `full_ms` (a real full-depth step per row, one segment), every exit is switched off unless the
    learn half's expected token beats it by `min_speedup`."""
    learn, _ = split_by_prompt(obs, 0.5, seed)  # the same split learn_then_test makes with this seed
    fitted = fit_thresholds(learn.confidence, learn.agree, target)  # per exit, on the learn half

    def fractions_for(enabled: list[bool]) -> list[float]:
        thresholds = [t if on else math.inf for t, on in zip(fitted, enabled)]
        _, n, counts = agreement_counts(learn, thresholds)
        return [c / n for c in counts]

    enabled, steps = choose_exits(costs, fractions_for, rows)
    # the measure is chosen on the learn half alone, so the test half certifies one choice made
    # without it (choosing by the test half's exit fractions would be a selection among four tests)
    learn_ms = expected_token_ms(costs, fractions_for(enabled), enabled, rows)
    if full_ms is not None and any(enabled) and full_ms / learn_ms < min_speedup:
        reason = f"{full_ms / learn_ms:.3f}x < {min_speedup}x full depth"
        steps.append({"enabled": [False] * len(enabled), "reason": reason})
        enabled = [False] * len(enabled)
        learn_ms = expected_token_ms(costs, fractions_for(enabled), enabled, rows)
    result = learn_then_test(obs, target, delta, bound=bound, seed=seed, enabled=enabled)
    on = [math.isfinite(t) for t in result.thresholds]
    token_ms = expected_token_ms(costs, result.exit_fractions, on, rows)
    return {
        "enabled": enabled,
        "steps": steps,
        "result": result,
        "costs": costs,
        "learn_token_ms": learn_ms,
        "token_ms": token_ms,
    }


def curves(obs: Observations, grid: int = 21) -> list[dict]:
    """Per exit, over thresholds 0, 0.05, ..., 1: the share of tokens whose confidence passes and the
    agreement among them (for the plot and the card)."""
    out = []
    for j in range(obs.confidence.shape[0]):
        points = []
        for i in range(grid):
            tau = i / (grid - 1)
            passing = obs.confidence[j] >= tau
            share = float(passing.float().mean())
            agreement = float(obs.agree[j][passing].float().mean()) if passing.any() else None
            points.append({"threshold": tau, "passing": share, "agreement": agreement})
        out.append({"exit": j, "points": points})
    return out


def plot(calibration: dict, device: str) -> bytes | None:
    """Agreement vs threshold per exit, exit fractions, and measured vs predicted step time (PNG);
    None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    import io

    entry = calibration["cost_models"][device]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    target = calibration["guarantee"].get("target_agreement")  # a token agreement; a sequence guarantee has none
    measure = entry.get("confidence", calibration["confidence"])
    by_measure = calibration.get("curves_by_measure", {})
    for curve, layer in zip(by_measure.get(measure, calibration["curves"]), calibration["exit_layers"]):
        pts = [p for p in curve["points"] if p["agreement"] is not None]
        axes[0].plot([p["threshold"] for p in pts], [p["agreement"] for p in pts], marker=".", label=f"exit {layer}")
    if target is not None:
        axes[0].axhline(target, color="grey", linestyle="--", label=f"target {target}")
    axes[0].set(xlabel=f"{measure} threshold", ylabel="agreement of passing tokens", title="Agreement vs threshold")
    axes[0].legend(fontsize=8)
    fractions = entry["exit_fractions"]
    labels = [str(layer) for layer in calibration["exit_layers"]] + ["full"]
    axes[1].bar(labels, [*fractions, 1 - sum(fractions)])
    axes[1].set(xlabel="exit layer", ylabel="share of test tokens", title=f"Where tokens leave on {device}")
    profile, table = entry["profile"], entry["table_ms"]
    for s, times in enumerate(table):
        axes[2].plot(entry["rows"], times, marker="o", label=f"segment {s} measured")
    axes[2].set(xlabel="rows", ylabel="ms per step", title=f"Segment time on {device}")
    err = entry["prediction_error"]
    axes[2].text(
        0.02, 0.95, f"held-out rows {err['rows']}: median error {err['median']:.0%}, p95 {err['p95']:.0%}",
        transform=axes[2].transAxes, fontsize=8, va="top",
    )  # fmt: skip
    axes[2].legend(fontsize=8)
    del profile
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _merged_timer(timer: Callable, on: list[bool], measure: str | None = None) -> Callable:
    """A timer over the merged segmentation, built from the per-segment timer (checks with `measure`)."""
    groups, current = [], []
    for s in range(len(on) + 1):
        current.append(s)
        if s == len(on) or on[s]:
            groups.append(current)
            current = []

    def merged(kind: str, index: int, n: int, *context: int) -> float:
        group = groups[index]
        if kind == "layers":
            return sum(timer("layers", s, n, *context) for s in group)
        if kind == "check" and measure is not None:
            kind = f"check:{measure}"
        return timer(kind, group[-1], n, *context)

    return merged


def shown_thresholds(values: list) -> str:
    """'inf, 0.996' for thresholds given as floats or in their JSON form ("inf")."""
    return ", ".join("inf" if t == math.inf else f"{t:.3f}" for t in map(parse_threshold, values))


def _fractions_text(fractions: list[float]) -> str:
    return ", ".join(f"{f:.1%}" for f in fractions)


def guarantee_paragraph(g: dict, layers: list[int], max_new_tokens: int | None) -> str:
    """The card's statement of the file's device-independent guarantee, by its kind."""
    thresholds = shown_thresholds(g["thresholds"])
    if guarantee_kind(g) == "token_agreement":
        return (
            f"**Guarantee (token agreement).** With thresholds {thresholds} at exits {layers}, tokens agree with "
            f"full depth at ≥ {g['target_agreement']} with probability ≥ {1 - g['delta']:.2f} (Learn-then-Test, "
            f"{g['bound']} bound; test agreement {g['test_agreement']:.4f}; exits "
            f"{_fractions_text(g['exit_fractions'])})."
        )
    answers = f"{max_new_tokens}-token " if max_new_tokens else ""
    metric = {"rouge_l": "ROUGE-L F1 (on token ids)", "exact": "exact-match rate"}.get(g["metric"], g["metric"])
    stated = (
        f"**Guarantee (sequence, {g['metric']}).** On new prompts from the held-out text's source, drex's greedy "
        f"{answers}answers score a mean {metric} ≥ {g['target']} against full depth's greedy answers, with "
        f"probability ≥ {1 - g['delta']:.2f} (Learn-then-Test over prompts, {g['bound']} bound; {g['learn_prompts']} "
        f"learn and {g['prompts']} test prompts)."
    )
    if not any(math.isfinite(t) for t in map(parse_threshold, g["thresholds"])):
        first = next((c for c in g.get("tested", []) if not c["rejected"]), None)
        why = f" (the first candidate with exits scored {first['mean_score']:.4f})" if first else ""
        return f"{stated} No threshold vector with an exit passed{why}: every exit is off, tokens leave at full depth."
    return (
        f"{stated} Thresholds {thresholds} at exits {layers}; on the test prompts their answers scored "
        f"{g['mean_score']:.4f} and {g['exiting']:.1%} of their tokens left early (exits "
        f"{_fractions_text(g['exit_fractions'])})."
    )


def guarantee_cell(g: dict) -> str:
    """A device entry's guarantee in a few words (the card's table, the CLI summary)."""
    if guarantee_kind(g) == "sequence":
        return (
            f"{g['metric']} ≥ {g['target']} (test mean {g['mean_score']:.4f}, {g['prompts']} prompts, δ {g['delta']})"
        )
    if "target_agreement" in g:
        return f"token agreement ≥ {g['target_agreement']} (δ {g['delta']})"
    return "token agreement"


def card_section(calibration: dict) -> str:
    """The model card's calibration section: the guarantee (saying which kind), and per device the
    exits used, the guarantee those thresholds carry, and the fit."""

    g, obs = calibration["guarantee"], calibration["observations"]
    layers = calibration["exit_layers"]
    observed_by = calibration.get("observed_by") or calibration["command"]
    split = (
        f", split by prompt into {g['learn_tokens']} learn and {g['test_tokens']} test tokens"
        if guarantee_kind(g) == "token_agreement"
        else ""
    )
    lines = [
        CALIBRATION_BEGIN,
        "## Calibration (`drex calibrate`)",
        "",
        f"Observed by `{observed_by}`: {obs['tokens']} greedy full-depth tokens from {obs['prompts']} held-out "
        f"prompts{split}.",
        "",
        guarantee_paragraph(g, layers, obs.get("max_new_tokens"))
        + " These apply on a device without its own entry below.",
        "",
        "| device | measure | exits that pay | thresholds used | guarantee | expected speed-up "
        "| cost fit error (median / p95) | timed by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for device, entry in calibration["cost_models"].items():
        paying = [str(e) for e, p in zip(layers, entry["exits_paying"]) if p] or ["none"]
        err, speed = entry["prediction_error"], entry.get("expected_speedup")
        lines.append(
            f"| {device} | {entry.get('confidence', calibration['confidence'])} | {', '.join(paying)} | "
            f"{shown_thresholds(entry['thresholds'])} | {guarantee_cell(entry_guarantee(entry, calibration))} | "
            f"{'n/a' if speed is None else f'{speed:.2f}x'} at {entry['decision_rows']} rows | "
            f"{err['median']:.1%} / {err['p95']:.1%} | `{entry.get('made_by', calibration['command'])}` |"
        )
    for device, entry in calibration["cost_models"].items():
        for batch, choice in (entry.get("policy_choice") or {}).items():
            policy = describe_choice(choice)
            lines.append(f"\nOn {device} at batch {batch}, `generate()` uses **{policy}**: {choice['reason']}.")
    lines += ["", "![calibration](calibration.png)", CALIBRATION_END]
    return "\n".join(lines) + "\n"


def with_card_section(card: str, calibration: dict) -> str:
    """`card` with its calibration section replaced (or appended)."""
    section = card_section(calibration)
    if CALIBRATION_BEGIN in card and CALIBRATION_END in card:
        head, rest = card.split(CALIBRATION_BEGIN, 1)
        return head + section + rest.split(CALIBRATION_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def save(calibration: dict, folder: Path, plot: bytes | None) -> None:
    """Write calibration.json (keeping other devices' entries already there when they were made for
    the same heads), the plot, and the card's calibration section beside the heads; all appear
    together or not at all. The file records the sha256 of the heads' weights file; a calibration
    made for heads with another sha256 than the folder's now is refused."""
    from drex_hf.fileio import sha256_file, staged_folder
    from drex_hf.modeling import WEIGHTS_NAME

    calibration = dict(calibration)
    obs = calibration.pop("observations_data", None)
    weights = folder / WEIGHTS_NAME
    current = sha256_file(weights) if weights.is_file() else None
    made_for = calibration.get(HEADS_SHA_KEY)
    if made_for is not None and current is not None and made_for != current:
        raise ConfigError(
            f"{folder}: this calibration was made for heads with {HEADS_SHA_KEY} {made_for[:16]}..., but "
            f"{weights} now has {current[:16]}... (saved again while calibrating?); run drex calibrate again"
        )
    calibration[HEADS_SHA_KEY] = made_for or current
    path = folder / CALIBRATION_NAME
    old = read_json_object(path) if path.is_file() else None
    if old is not None:
        try:
            same_heads = old.get("exit_layers") == calibration["exit_layers"] and (
                recorded_heads_sha256(old) == calibration[HEADS_SHA_KEY] or old.get(HEADS_SHA_KEY) is None
            )  # an older file records no sha256: it stayed beside these heads, so it was made for them
            if not same_heads:
                raise ValueError("made for other heads")
            others = {k: v for k, v in old.get("cost_models", {}).items() if k not in calibration["cost_models"]}
            # an entry kept from the old file keeps saying what its thresholds were tested for, even
            # if this run's guarantee is of another kind (older entries took the file's own)
            others = {k: {**v, "guarantee": entry_guarantee(v, old)} for k, v in others.items()}
            calibration["cost_models"] = {**others, **calibration["cost_models"]}
            old_guarantee = old.get("guarantee")
            if isinstance(old_guarantee, dict):  # older files name no kind: theirs is token agreement
                old_guarantee = {"kind": guarantee_kind(old_guarantee), **old_guarantee}
            if calibration.get("observed_by") is None and old_guarantee == calibration["guarantee"]:
                # the observations were reused: keep saying where they came from
                calibration["observed_by"] = old.get("observed_by") or old.get("command")
                calibration["observations"] = {**old.get("observations", {}), "reused": True}
        except (ValueError, AttributeError):
            pass  # made for other heads, or with fields of other shapes: replaced (as an unreadable one is)
    card = folder / card_name(folder)  # ours: never a README.md the user wrote
    with staged_folder(folder, order=[CALIBRATION_NAME]) as tmp:
        if obs is not None:
            obs.save(tmp / OBSERVATIONS_NAME)
        if plot is not None:
            (tmp / PLOT_NAME).write_bytes(plot)
        if card.is_file():
            (tmp / card.name).write_text(with_card_section(card.read_text(), calibration))
        (tmp / CALIBRATION_NAME).write_text(json.dumps(calibration, indent=2) + "\n")
