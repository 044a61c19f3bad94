"""The rebatching engine (DESIGN.md §5): its invariants against the reference decoder, the batch-wide
baselines' counts, continuous batching, trace exits, the scheduler's decisions and clear errors."""

import json
import math
import random

import pytest
import torch
from conftest import VOCAB, assert_every_exit_taken, covering_thresholds, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.kv_store import EngineFullError
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.scheduler import CostModel, DrexPolicy, RandomPolicy, SchedulerView
from drex_hf.generation.settings import DecodeSettings

EXITS = (0, 1, 2)
LENGTHS = {1: [6], 3: [5, 9, 3], 8: [5, 9, 3, 12, 1, 7, 4, 10]}
SAMPLING = dict(do_sample=True, temperature=2.0, top_k=50, top_p=0.95)


def _model(kind, confidence="max_prob", seed=0):
    config = EarlyExitConfig(exit_layers=list(EXITS), thresholds=math.inf, confidence=confidence, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind, seed=seed), config)
    if confidence == "classifier":  # an untrained classifier says 0.5 everywhere; give it an opinion
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    return model


def _prompts(lengths, seed=0):
    ids, mask = padded_batch(lengths, seed=seed)
    return ids, mask, [ids[b, mask[b].bool()] for b in range(len(lengths))]


def _thresholds(model, prompts, quantiles=(0.7, 0.4, 0.2), new=10):
    """Per-exit thresholds that send tokens out at every exit point, each placed midway between two
    confidences seen while decoding (a first run with thresholds of 1.0 records them), so that float
    noise of ~1e-6 between batch shapes cannot flip a decision."""
    runs = generate_reference(model, prompts, DecodeSettings(max_new_tokens=new), [1.0] * len(EXITS))
    out = []
    for e, quantile in zip(model.exit_layers, quantiles):
        values = sorted(v for r in runs for checks in r.checks for layer, v in checks if layer == e)
        i = min(len(values) - 2, int(quantile * len(values)))
        gaps = [(values[j + 1] - values[j], j) for j in range(max(0, i - 3), min(len(values) - 1, i + 4))]
        _, j = max(gaps)
        out.append((values[j] + values[j + 1]) / 2)
    return out


def _engine_run(model, prompts, settings, thresholds, *, policy="drex", seeds=None, **engine_kwargs):
    width = max(p.shape[0] for p in prompts) + settings.max_new_tokens
    engine = DrexEngine(
        model, max_batch=len(prompts), max_len=width, policy=policy, settings=settings, thresholds=thresholds,
        **engine_kwargs,
    )  # fmt: skip
    with torch.no_grad():
        ids = [engine.add_request(p, seed=None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        results = engine.run()
    return [results[i] for i in ids], engine.stats


def _assert_same_as_reference(results, reference):
    for i, (got, want) in enumerate(zip(results, reference)):
        assert got.tokens == want.tokens, f"request {i}: tokens differ"
        assert got.exit_layers == want.exit_layers, f"request {i}: exit layers differ"


# ---------------------------------------------------------------- invariant 1: batch independence
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_batch_independence_greedy_and_sampling_equal_the_reference_decoder(kind, batch):
    model = _model(kind)
    _, _, prompts = _prompts(LENGTHS[batch])
    new = {1: 24, 3: 16, 8: 12}[batch]  # a lone request needs more tokens to leave at every exit point
    runs = [
        (DecodeSettings(max_new_tokens=new), None),
        (DecodeSettings(max_new_tokens=new, **SAMPLING), [100 + i for i in range(batch)]),
    ]
    for settings, seeds in runs:  # thresholds found for each: sampled tokens have other confidences
        thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, seeds)])
        constant = CostModel.constant(4)
        results, stats = _engine_run(model, prompts, settings, thresholds, seeds=seeds, cost_model=constant)
        _assert_same_as_reference(results, reference)
        assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)


@pytest.mark.parametrize("confidence", ["margin", "saturation", "classifier"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_every_confidence_measure_is_batch_independent(kind, confidence):
    model = _model(kind, confidence)
    _, _, prompts = _prompts(LENGTHS[8])
    settings = DecodeSettings(max_new_tokens=12)
    # saturation: an unchecked exit point in the middle, whose state must still be the "previous"
    unchecked = (1,) if confidence == "saturation" else ()
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, None)], unchecked)
    segments = 3 if confidence == "saturation" else 4
    results, _ = _engine_run(model, prompts, settings, thresholds, cost_model=CostModel.constant(segments))
    _assert_same_as_reference(results, reference)
    assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)


# ---------------------------------------------------------------- invariant 4: scheduling never changes output
def _watch_fills(engine):
    """Record every early exit (slot, position, layer) and every KV fill (slot, position, first layer)
    the device programs make (the CPU's tensors are read as they run). Returns the fills that do not
    match an exit one to one: a fill from elsewhere than the layer after the exit, a position filled
    twice, a fill with no exit."""
    exits, fills = {}, []
    programs = engine.runner.programs
    leave, fill = programs.leave, programs.fill

    def watched_leave(s, rows, confidence):
        out, own = leave(s, rows, confidence)
        for slot, pos in zip(rows.slots[out].tolist(), rows.positions[out].tolist()):
            exits[(slot, pos)] = programs.boundaries[s]
        return out, own

    def watched_fill(rows, layers_from):
        first = programs.state.fill_from.index_select(0, rows.slots) + 1
        live = rows.valid
        fills.extend(zip(rows.slots[live].tolist(), rows.positions[live].tolist(), first[live].tolist()))
        return fill(rows, layers_from)

    programs.leave, programs.fill = watched_leave, watched_fill

    def wrong():
        seen = [(slot, pos) for slot, pos, _ in fills]
        twice = [f for f in fills if seen.count(f[:2]) > 1]
        return twice + [(slot, pos, first) for slot, pos, first in fills if exits.get((slot, pos), -9) + 1 != first]

    return wrong, fills


def _watch_partial_takes(engine):
    """Count the decisions that took only part of a buffer, and those that ran a shallower buffer
    while a deeper one waited: what random decisions must really do."""
    counts = {"partial": 0, "shallower": 0}
    pick = engine.policy.pick

    def watched(view):
        decision = pick(view)
        counts["partial"] += decision.rows < view.counts[decision.segment]
        counts["shallower"] += decision.segment < max(s for s, n in enumerate(view.counts) if n)
        return decision

    engine.policy.pick = watched
    return counts


@pytest.mark.parametrize(
    "kind,confidence,defer",
    [("llama", "classifier", True), ("llama", "classifier", False), ("gpt2", "max_prob", True),
     ("mistral", "saturation", True)],
)  # fmt: skip
def test_random_legal_decisions_give_the_reference_tokens(kind, confidence, defer):
    model = _model(kind, confidence)
    _, _, prompts = _prompts(LENGTHS[8])
    thresholds = _thresholds(model, prompts)
    settings = DecodeSettings(max_new_tokens=10, **SAMPLING)
    seeds = list(range(8))
    reference = generate_reference(model, prompts, settings, thresholds, seeds)
    partial = shallower = filled = 0
    for seed in range(4):
        engine = DrexEngine(
            model, max_batch=8, max_len=24, policy=RandomPolicy(num_segments=4, seed=seed), settings=settings,
            thresholds=thresholds, defer_projection=defer,
        )  # fmt: skip
        wrong, fills = _watch_fills(engine)
        takes = _watch_partial_takes(engine)
        with torch.no_grad():
            ids = [engine.add_request(p, seed=s) for p, s in zip(prompts, seeds)]
            results = engine.run()
        _assert_same_as_reference([results[i] for i in ids], reference)
        assert wrong() == []  # each exited token filled once, by the product, from the layer after its exit
        partial, shallower, filled = partial + takes["partial"], shallower + takes["shallower"], filled + len(fills)
    assert partial > 0 and shallower > 0 and filled > 0  # the decisions really split buffers and reordered rows


def _device_state(engine):
    return {name: t.clone() for name, t in vars(engine.runner.state).items() if isinstance(t, torch.Tensor)}


def test_illegal_decisions_are_refused_before_they_touch_state():
    from drex_hf.generation.scheduler import Decision, Policy

    class Scripted(Policy):
        def __init__(self, decision):
            super().__init__(num_segments=4)
            self.decision = decision

        def pick(self, view):
            return self.decision

    model = _model("llama")
    _, _, prompts = _prompts([3, 4, 5, 6])
    for decision, message in (
        (Decision(1, 1), "chose 1 rows of segment 1, where 0 wait"),
        (Decision(0, 0), "chose 0 rows of segment 0, where 4 wait"),
        (Decision(0, 5), "chose 5 rows of segment 0, where 4 wait"),
        (Decision(7, 1), "chose 1 rows of segment 7"),
    ):
        engine = DrexEngine(model, max_batch=4, max_len=16, policy=Scripted(decision), thresholds=[0.5] * 3)
        for p in prompts:
            engine.add_request(p, max_new_tokens=4)
        engine.step()  # the prefill's launch
        before = _device_state(engine)
        with pytest.raises(RuntimeError, match=message):
            engine.step()
        after = _device_state(engine)
        assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(GenerationInputError, match="built for 3 segments; this engine has 4"):
        DrexEngine(model, max_batch=2, max_len=8, policy=RandomPolicy(num_segments=3), thresholds=[0.5] * 3)


# ---------------------------------------------------------------- invariant 2 and the baselines' counts
def _replayed(model, prompts, settings, policy, trace):
    width = max(p.shape[0] for p in prompts) + settings.max_new_tokens
    engine = DrexEngine(
        model, max_batch=len(prompts), max_len=width, policy=policy, settings=settings, exit_source="trace"
    )
    with torch.no_grad():
        for p, row in zip(prompts, trace):
            engine.add_request(p, trace=row)
        results = engine.run()
    return [results[i] for i in range(len(prompts))], engine.stats


def test_involuntary_and_missed_exits_are_counted_exactly():
    """A replayed trace gives every token's own exit layer; the batch-wide policies then exit earlier
    (involuntary) or later (missed) and must count exactly those tokens; drex counts none."""
    model = _model("llama")
    _, _, prompts = _prompts(LENGTHS[8])
    settings = DecodeSettings(max_new_tokens=16)
    rng = random.Random(0)
    trace = [[3] + [rng.choice([0, 0, 0, 1, 2, 3]) for _ in range(15)] for _ in prompts]
    for policy in ("drex", "batch_all", "batch_majority"):
        results, stats = _replayed(model, prompts, settings, policy, trace)
        early = sum(got < want for r, row in zip(results, trace) for got, want in zip(r.exit_layers[1:], row[1:]))
        late = sum(got > want for r, row in zip(results, trace) for got, want in zip(r.exit_layers[1:], row[1:]))
        assert stats.involuntary_exits == early and stats.missed_exits == late, policy
        assert stats.tokens == sum(stats.exits_per_layer.values()) == 8 * 16
        assert stats.min_layer_rows == sum(e + 1 for r in results for e in r.exit_layers[1:])
        if policy == "drex":
            assert early == late == 0
            assert [r.exit_layers for r in results] == trace
        elif policy == "batch_all":
            assert early == 0 and late > 0
        else:
            assert early > 0


def test_heads_under_batch_majority_report_involuntary_exits_and_drex_none():
    model = _model("qwen2")
    _, _, prompts = _prompts(LENGTHS[8])
    thresholds = _thresholds(model, prompts, quantiles=(0.5, 0.5, 0.5))
    settings = DecodeSettings(max_new_tokens=10)
    _, drex = _engine_run(model, prompts, settings, thresholds)
    _, majority = _engine_run(model, prompts, settings, thresholds, policy="batch_majority", quorum=0.5)
    _, every = _engine_run(model, prompts, settings, thresholds, policy="batch_all")
    assert drex.involuntary_exits == 0 and drex.missed_exits == 0
    assert majority.involuntary_exits > 0
    assert every.missed_exits > 0 and every.involuntary_exits == 0


# ---------------------------------------------------------------- invariant 3 through the engine
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_policy_engine_equals_hf_greedy_generate_per_prompt(kind):
    model = _model(kind)
    _, _, prompts = _prompts(LENGTHS[3])
    settings = DecodeSettings(max_new_tokens=10)
    for policy, thresholds in (("full", [0.0] * 3), ("drex", [math.inf] * 3)):
        results, _ = _engine_run(model, prompts, settings, thresholds, policy=policy)
        for prompt, result in zip(prompts, results):
            hf = model.base_model.generate(prompt.unsqueeze(0), max_new_tokens=10, do_sample=False, eos_token_id=None)
            assert result.tokens == hf[0, prompt.shape[0] :].tolist()


# ---------------------------------------------------------------- continuous batching
@pytest.mark.parametrize("policy", ["drex", "random"])
def test_continuous_batching_200_requests_all_finish_identical_to_reference(policy):
    model = _model("llama", "classifier")  # exits' vocabulary projections are deferred: eos is seen late
    _, _, calib = _prompts(LENGTHS[8], seed=3)
    thresholds = _thresholds(model, calib)
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    requests = []
    for i in range(200):
        length, new = rng.randint(1, 20), rng.randint(1, 12)
        prompt = torch.randint(3, VOCAB, (length,), generator=gen)
        requests.append((rng.randint(0, 600), prompt, new, 1000 + i))  # arrival step, prompt, tokens, seed
    requests.sort(key=lambda r: r[0])
    settings = DecodeSettings(max_new_tokens=12, eos_token_ids=(5,), **SAMPLING)
    chosen = RandomPolicy(num_segments=4, seed=3) if policy == "random" else "drex"
    engine = DrexEngine(model, max_batch=8, max_len=32, policy=chosen, settings=settings, thresholds=thresholds)
    ids, waiting, step = {}, list(requests), 0
    with torch.no_grad():
        while waiting or engine.active:
            while waiting and waiting[0][0] <= step and engine.has_free_slot:
                _, prompt, new, seed = waiting.pop(0)
                ids[engine.add_request(prompt, max_new_tokens=new, seed=seed)] = (prompt, new, seed)
            engine.step()
            step += 1
            assert step < 20000
    assert len(ids) == 200 and sorted(engine.finished) == sorted(ids)
    stopped_by_eos = 0
    for rid, (prompt, new, seed) in ids.items():
        one = DecodeSettings(max_new_tokens=new, eos_token_ids=(5,), **SAMPLING)
        (want,) = generate_reference(model, [prompt], one, thresholds, [seed])
        got = engine.finished[rid]
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), rid
        stopped_by_eos += len(got.tokens) < new
    assert stopped_by_eos > 0 and engine.stats.prefill_steps > 20


# ---------------------------------------------------------------- trace exits
def test_a_replayed_trace_reproduces_a_recorded_run():
    model = _model("llama")
    ids, mask, prompts = _prompts(LENGTHS[3])
    model.exit_config.thresholds = _thresholds(model, prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True)
    recorded = model.generate(ids, **kwargs)
    assert len(set(recorded.exit_layers[:, 1:].flatten().tolist())) >= 3
    replay = model.generate(ids, exit_trace=recorded.exit_layers, **kwargs)
    assert torch.equal(replay.exit_layers, recorded.exit_layers)
    assert torch.equal(replay.sequences, recorded.sequences)  # same exits, so the heads give the same tokens


def test_a_drawn_trace_is_seeded_per_request_and_follows_its_distribution():
    model = _model("gpt2")
    ids, mask, prompts = _prompts(LENGTHS[8])
    dist = ExitDistribution((0.2, 0.25, 0.2, 0.35), seed=5)
    kwargs = dict(max_new_tokens=40, eos_token_id=None, exit_trace=dist, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    alone = model.generate(prompts[3].unsqueeze(0), **kwargs)  # request 0 of its own batch
    first = model.generate(prompts[0].unsqueeze(0), **kwargs)
    assert torch.equal(batch.exit_layers[0], first.exit_layers[0])
    assert not torch.equal(alone.exit_layers[0], batch.exit_layers[3])  # seeds differ per request index
    layers = batch.exit_layers[:, 1:].flatten()
    shares = [float((layers == e).float().mean()) for e in (0, 1, 2, 3)]
    for share, p in zip(shares, dist.probabilities):
        assert abs(share - p) < 0.08, shares  # 312 draws: a standard error of at most 0.03
    assert math.isclose(dist.mean_layers([0, 1, 2], 4), 0.2 * 1 + 0.25 * 2 + 0.2 * 3 + 0.35 * 4)


# ---------------------------------------------------------------- KV fill
@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_kv_fill_equals_each_layers_own_projection(kind, folded):
    """Rows that left at different exits are filled in one product, each only for the layers it skipped."""
    from drex_hf.generation.programs import Rows

    model = _model(kind)
    engine = DrexEngine(model, max_batch=3, max_len=8, thresholds=[0.5] * 3, cost_model=CostModel.constant(4))
    runner, arch = engine.runner, model.arch
    assert runner._fill_weights is None  # built at the first fill, not before
    programs = runner.programs
    if not folded:
        programs.fill_weights = None  # the layer-by-layer path
    x = torch.randn(3, arch.hidden_size)
    state = runner.state
    state.hidden[:3] = x  # an exited row's hidden state stays in its slot until its fill
    positions, exits = [2, 5, 7], [0, 1, 0]
    state.fill_from[:3] = torch.tensor(exits)
    slots = torch.arange(3)
    with torch.no_grad():
        programs.fill(Rows(slots, slots, torch.ones(3, dtype=torch.bool), torch.tensor(positions)), 1)
        assert (runner._fill_weights is not None) == folded  # every supported architecture folds its norms
        if folded:
            weight = runner._fill_weights[0]
            assert weight.dtype == next(model.base_model.parameters()).dtype  # built in the model's dtype
        rotary = arch.position_embeddings(x.unsqueeze(1), torch.tensor(positions).unsqueeze(1))
        for layer in (1, 2, 3):
            keys, values = arch.kv_projection(layer, x.unsqueeze(1), rotary)
            for row, pos in enumerate(positions):
                got_k, got_v = engine.store.keys(layer)[row, :, pos], engine.store.values(layer)[row, :, pos]
                if layer <= exits[row]:  # computed by the layer itself, never overwritten by a fill
                    assert got_k.abs().sum() == 0 and got_v.abs().sum() == 0
                    continue
                close = dict(rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_k, keys[row, :, 0], **close)
                torch.testing.assert_close(got_v, values[row, :, 0], **close)
        assert engine.store.keys(0).abs().sum() == 0


def test_fill_weights_are_built_only_by_engines_that_fill():
    model = _model("llama")
    full = DrexEngine(model, max_batch=2, max_len=8, policy="full")
    spec_like = DrexEngine(model, max_batch=2, max_len=8, thresholds=[math.inf] * 3)  # no exit point checked
    for engine in (full, spec_like):
        assert engine.runner.programs.fill_weights is None and engine.runner._fill_weights is None
        with torch.no_grad():
            engine.add_request(torch.tensor([3, 4]), max_new_tokens=3)
            engine.run()
        assert engine.runner._fill_weights is None


# ---------------------------------------------------------------- the scheduler, without tensors
def _view(counts, waited=None, ages=None, buckets=None):
    return SchedulerView(list(counts), waited or [0] * len(counts), ages, context=128, buckets=buckets)


def test_drex_runs_deepest_first_unless_a_shallower_buffer_is_far_more_efficient():
    cost = CostModel([10.0] * 3, [1.0] * 3, [0.0] * 3)
    assert DrexPolicy(3, cost).pick(_view([5, 4, 0])).segment == 1
    assert DrexPolicy(3, cost).pick(_view([15, 0, 1])).segment == 2  # deepest-first
    assert DrexPolicy(3, cost, slack=0.75).pick(_view([15, 0, 1])).segment == 0
    # ... but a buffer whose oldest row has waited too long, or is about to break the SLA, goes first
    assert DrexPolicy(3, cost, slack=0.75).pick(_view([15, 0, 1], waited=[0, 0, 12])).segment == 2
    sla = DrexPolicy(3, cost, sla_tpot_ms=50.0, slack=0.75)
    assert sla.pick(_view([15, 0, 1], ages=[0.0, 0.0, 40.0])).segment == 2
    assert sla.pick(_view([15, 0, 1], ages=[0.0, 0.0, 1.0])).segment == 0


def test_cost_model_from_a_calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    entry = {"segments": [[0, 1], [2, 3]], "a_ms": [1, 2], "b_ms": [0.1, 0.2], "regroup_ms": [0.01, 0.02]}
    path.write_text(json.dumps({"cost_models": {"cpu:test": entry}}))
    cost = CostModel.from_file(path, "cpu:test", [[0, 1], [2, 3]])
    assert cost.segment_ms(1, 10) == pytest.approx(4.0) and "calibration file" in cost.source
    with pytest.raises(GenerationInputError, match="no cost constants for device 'cuda:H100'"):
        CostModel.from_file(path, "cuda:H100", [[0, 1], [2, 3]])
    with pytest.raises(GenerationInputError, match="calibrated for segments"):
        CostModel.from_file(path, "cpu:test", [[0, 3]])
    with pytest.raises(GenerationInputError, match="does not exist"):
        CostModel.from_file(tmp_path / "missing.json", "cpu:test", [[0, 3]])


def test_start_up_measurement_is_stated_and_sane():
    model = _model("llama")
    model.exit_config.thresholds = [0.9, math.inf, 0.9]
    engine = DrexEngine(model, max_batch=4, max_len=16)
    assert engine.cost.source.startswith("measured at start-up on cpu")
    assert engine.describe()["segments"] == [[0, 0], [1, 2], [3, 3]]
    assert len(engine.cost.table_ms) == 3 and engine.cost.rows == [1, 2, 4]
    assert engine.stats.cost_source == engine.cost.source
    assert engine.store.free_slots == 4


# ---------------------------------------------------------------- clear errors at add_request
def test_bad_requests_are_refused_before_any_work():
    model = _model("llama")
    engine = DrexEngine(model, max_batch=2, max_len=10, settings=DecodeSettings(max_new_tokens=4))
    with pytest.raises(GenerationInputError, match="needs 12 cache positions but a slot holds max_len=10"):
        engine.add_request(torch.arange(3, 12))
    with pytest.raises(GenerationInputError, match="empty prompt"):
        engine.add_request(torch.tensor([], dtype=torch.long))
    with pytest.raises(GenerationInputError, match="outside the model's vocabulary 0..98"):
        engine.add_request(torch.tensor([3, 120]))
    with pytest.raises(GenerationInputError, match=r"1-D\), got shape \(2, 2\)"):
        engine.add_request([[3, 4], [5, 6]])
    with pytest.raises(GenerationInputError, match="integer token ids, got dtype torch.float32"):
        engine.add_request(torch.tensor([3.9, 4.2]))
    with pytest.raises(GenerationInputError, match="max_new_tokens must be a positive integer, got 0.5"):
        engine.add_request(torch.tensor([3]), max_new_tokens=0.5)
    with pytest.raises(GenerationInputError, match="needs an engine built with exit_source='trace'"):
        engine.add_request(torch.tensor([3]), trace=[3, 3])
    engine.add_request(torch.tensor([3, 4]))
    engine.add_request(torch.tensor([5]))
    with pytest.raises(EngineFullError, match="all 2 slots hold running requests"):
        engine.add_request(torch.tensor([6]))
    assert len(engine.run()) == 2 and engine.has_free_slot
    with pytest.raises(GenerationInputError, match="unknown policy 'fastest'"):
        DrexEngine(model, max_batch=2, max_len=10, policy="fastest")
    with pytest.raises(GenerationInputError, match="needs 4"):
        DrexEngine(model, max_batch=2, max_len=10, exit_source="trace", exit_distribution=ExitDistribution((0.5, 0.5)))
    with pytest.raises(GenerationInputError, match="summing to 1"):
        ExitDistribution((0.5, 0.6, 0.0, 0.0))
    trace_engine = DrexEngine(model, max_batch=2, max_len=10, exit_source="trace")
    with pytest.raises(GenerationInputError, match="needs a trace per request"):
        trace_engine.add_request(torch.tensor([3]), max_new_tokens=2)
    with pytest.raises(GenerationInputError, match=r"holds layer\(s\) \[5\]"):
        trace_engine.add_request(torch.tensor([3]), max_new_tokens=2, trace=[3, 5])
    with pytest.raises(GenerationInputError, match="sla_tpot_ms applies to policy 'drex'"):
        DrexEngine(model, max_batch=2, max_len=10, policy="batch_all", sla_tpot_ms=5.0)
    with pytest.raises(GenerationInputError, match="constants for 2 segments; this engine runs 4"):
        DrexEngine(model, max_batch=2, max_len=10, thresholds=[0.5] * 3, cost_model=CostModel.constant(2))
    with pytest.raises(GenerationInputError, match="quorum"):
        DrexEngine(model, max_batch=2, max_len=10, policy="batch_majority", quorum=0.3)


def test_cost_model_table_is_interpolated_and_the_line_fits_it():
    from drex_hf.generation.profile import fit_line, row_counts

    assert row_counts(1) == [1] and row_counts(8) == [1, 2, 4, 8] and row_counts(12) == [1, 2, 4, 8, 12]
    from drex_hf.generation.plan import row_buckets  # at buckets: the powers of two among them, and the largest

    assert row_counts(256, row_buckets(256, True)) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert row_counts(6, [1, 2, 4, 6]) == [1, 2, 4, 6] and row_counts(20, row_buckets(20, True)) == [1, 2, 4, 8, 16, 20]
    a, b = fit_line([1, 2, 4, 8], [3.0, 4.0, 6.0, 10.0])
    assert (a, b) == (pytest.approx(2.0), pytest.approx(1.0))
    # 2-7 rows as slow as 8: what the 2-core CPU's matrix products do
    table = [[1.0, 5.0, 5.0, 6.0]] * 3
    cost = CostModel([2.0] * 3, [1.0] * 3, [0.1] * 3, rows=[1, 2, 4, 8], table_ms=table)
    assert cost.segment_ms(0, 1) == 1.0 and cost.segment_ms(0, 3) == 5.0
    assert cost.segment_ms(0, 6) == pytest.approx(5.5) and cost.segment_ms(0, 16) == pytest.approx(8.0)


def test_eager_attention_engine_equals_the_reference_decoder():
    config = EarlyExitConfig(exit_layers=list(EXITS), thresholds=math.inf, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny("llama", attn_implementation="eager"), config)
    _, _, prompts = _prompts(LENGTHS[8])
    thresholds = _thresholds(model, prompts)
    settings = DecodeSettings(max_new_tokens=10)
    reference = generate_reference(model, prompts, settings, thresholds)
    results, _ = _engine_run(model, prompts, settings, thresholds)
    _assert_same_as_reference(results, reference)


def test_a_tight_sla_reorders_steps_but_never_changes_tokens():
    model = _model("qwen2", "classifier")
    _, _, prompts = _prompts(LENGTHS[8])
    thresholds = _thresholds(model, prompts)
    settings = DecodeSettings(max_new_tokens=10)
    reference = generate_reference(model, prompts, settings, thresholds)
    cost = CostModel.constant(4)
    relaxed, relaxed_stats = _engine_run(model, prompts, settings, thresholds, cost_model=cost)
    tight, tight_stats = _engine_run(model, prompts, settings, thresholds, cost_model=cost, sla_tpot_ms=1e-3)
    _assert_same_as_reference(relaxed, reference)
    _assert_same_as_reference(tight, reference)
    assert relaxed_stats.step_segments != tight_stats.step_segments  # the SLA really reordered the steps
    with pytest.raises(GenerationInputError, match="sla_tpot_ms must be positive"):
        DrexEngine(model, max_batch=2, max_len=8, sla_tpot_ms=0)


def test_generate_measures_a_cost_model_per_segmentation():
    """generate() reuses the cost model it measured, but only for the same segments: a trace checks
    every exit point even where the heads' threshold is +inf."""
    model = _model("llama")
    ids, mask, _ = _prompts(LENGTHS[3])
    kwargs = dict(attention_mask=mask, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    heads = model.generate(ids, thresholds=[0.5, math.inf, 0.5], **kwargs)
    traced = model.generate(ids, exit_trace=ExitDistribution((0.25,) * 4), **kwargs)
    again = model.generate(ids, thresholds=[0.5, math.inf, 0.5], **kwargs)
    assert len(model._cost_models) == 2
    assert heads.stats.cost_source == again.stats.cost_source and torch.equal(heads.sequences, again.sequences)
    assert set(traced.exit_layers[:, 1:].flatten().tolist()) <= {0, 1, 2, 3}
    # programs with logits processors time differently: their cost model is measured apart
    model.generate(ids, thresholds=[0.5, math.inf, 0.5], repetition_penalty=1.2, **kwargs)
    assert len(model._cost_models) == 3


# ---------------------------------------------------------------- invariant 1 with the Triton kernels
# The whole set of batch-independence tests also passes with DREX_KERNELS=triton (README, "Kernels");
# here one case per architecture keeps the interpreter's cost to about a minute.
@pytest.mark.parametrize(
    ("kind", "batch", "confidence"),
    [("llama", 8, "max_prob"), ("gpt2", 3, "max_prob"), ("mistral", 8, "margin"), ("qwen2", 3, "saturation")],
)
def test_batch_independence_with_triton_kernels_under_the_interpreter(kind, batch, confidence, monkeypatch):
    import warnings

    from drex_hf.generation import attention
    from drex_hf.kernels import dispatch

    monkeypatch.setenv("DREX_KERNELS", "triton")
    dispatch.reset()
    assert dispatch.backend("cpu") == "triton", "the Triton interpreter is off: this would test torch"
    calls = []
    kernel = attention.indexed_decode_attention
    monkeypatch.setattr(attention, "indexed_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = _model(kind, confidence)
    _, _, prompts = _prompts(LENGTHS[batch])
    settings = DecodeSettings(max_new_tokens=8 if batch == 8 else 12)
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, None)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch warns: make it fail
        results, _ = _engine_run(model, prompts, settings, thresholds, cost_model=CostModel.constant(4))
    _assert_same_as_reference(results, reference)
    assert dispatch.broken() == {}
    assert calls, "decode segments did not attend through the indexed kernel"
    assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)  # and so KV fill ran


def test_at_row_buckets_drex_weighs_padding_against_running_the_bucket_below():
    """Programs run at 1, 2, 4, 8 rows: 5 waiting rows pay for 8. Where a step costs in proportion to
    its rows, 4 now and 1 later (4 + 1 ms) beats 8 ms; where it is flat, padding up to 8 is cheaper."""
    rows = [1, 2, 4, 8]
    waiting = _view([0, 5], buckets=rows)
    proportional = CostModel([0.0] * 2, [1.0] * 2, [0.0] * 2, rows=rows, table_ms=[[1, 2, 4, 8]] * 2, buckets=rows)
    flat = CostModel([5.0] * 2, [0.1] * 2, [0.0] * 2, rows=rows, table_ms=[[5, 5, 5, 6]] * 2, buckets=rows)
    assert proportional.segment_ms(1, 5) == 8.0 and proportional.segment_ms(1, 4) == 4.0  # a step costs its bucket
    split = DrexPolicy(2, proportional).pick(waiting)
    assert split.rows == 4 and split.predicted_ms == 4.0 and "rebucket" in split.reason
    padded = DrexPolicy(2, flat).pick(waiting)
    assert padded.rows == 5 and padded.predicted_ms == 6.0 and "whole" in padded.reason


def test_every_decision_is_recorded_with_its_bucket_padding_and_reason():
    model = _model("llama", "classifier")
    _, _, prompts = _prompts(LENGTHS[8][:5])
    settings = DecodeSettings(max_new_tokens=8)
    dist = ExitDistribution((0.25, 0.25, 0.25, 0.25), seed=4)
    engine = DrexEngine(
        model, max_batch=5, max_len=24, settings=settings, exit_source="trace", exit_distribution=dist,
        static_shapes=True, buckets=(1, 2, 4, 8), record_decisions=True, cost_model=CostModel.constant(4),
    )  # fmt: skip
    with torch.no_grad():
        for p in prompts:
            engine.add_request(p)
        engine.run()
    decisions = engine.stats.decisions
    assert len(decisions) == engine.stats.steps > 0
    padding = 0
    for d in decisions:
        assert d["reason"] and d["measured_ms"] > 0 and d["predicted_ms"] is not None
        if d["segment"] is None:  # the last deferred tokens, projected on their own once no row waits
            assert d["reason"] == "deferred projections" and d["projections"] > 0 and d["bucket"] == 0
            continue
        run = d["rows"]
        assert d["bucket"] == (0 if run == 0 else min(b for b in (1, 2, 4, 8) if b >= run))
        padding += (d["bucket"] - run) * len(engine.segments[d["segment"]])
    assert engine.stats.padded_layer_rows == padding > 0
    assert {d["segment"] for d in decisions} - {None} == {0, 1, 2, 3}
    assert engine.stats.to_dict()["decisions"] == decisions


def test_a_prefill_into_scattered_free_slots_with_triton_kernels_equals_the_reference(monkeypatch):
    """Requests that join while others decode are prefilled together into whatever slots are free
    (here 0 and 2 of 4): the kernels then get a scattered slot list, read through its strides."""
    from drex_hf.kernels import dispatch

    monkeypatch.setenv("DREX_KERNELS", "triton")
    dispatch.reset()
    assert dispatch.backend("cpu") == "triton"
    model = _model("llama")
    _, _, prompts = _prompts([5, 9, 3, 7, 6, 4])
    settings = DecodeSettings(max_new_tokens=6)
    engine = DrexEngine(model, max_batch=4, max_len=20, settings=settings, thresholds=[math.inf] * 3)
    with torch.no_grad():
        ids = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts[:4], (2, 6, 2, 6))]
        while len(engine.finished) < 2:
            engine.step()
        assert sorted(engine.finished) == [ids[0], ids[2]] and engine.store.free_slots == 2
        ids += [engine.add_request(p) for p in prompts[4:]]  # one prefill, slots 0 and 2
        results = engine.run()
    assert dispatch.broken() == {}
    lengths = (2, 6, 2, 6, 6, 6)
    for rid, prompt, n in zip(ids, prompts, lengths):
        (want,) = generate_reference(model, [prompt], DecodeSettings(max_new_tokens=n), [math.inf] * 3)
        assert results[rid].tokens == want.tokens, rid


def test_the_kv_fill_measured_faster_per_bucket_is_the_one_that_runs(monkeypatch):
    """Where Triton runs (the interpreter here, a GPU in use), the engine times the fused fill kernel
    against the plain product at every bucket and keeps the faster; mixed choices still give the
    reference's tokens. (The timer is given: timing the interpreter would mean nothing.)"""
    from drex_hf.kernels import dispatch

    monkeypatch.setenv("DREX_KERNELS", "triton")
    dispatch.reset()
    model = _model("llama")
    _, _, prompts = _prompts([5, 9, 3, 7])
    settings = DecodeSettings(max_new_tokens=8)
    thresholds = _thresholds(model, prompts)
    engine = DrexEngine(model, max_batch=4, max_len=20, settings=settings, thresholds=thresholds,
                        cost_model=CostModel.constant(4))  # fmt: skip
    assert engine.fill_choice == {}  # not on a CPU unless asked: the interpreter's timings mean nothing
    runs = {"triton": 0, "torch": 0}
    bucket_now = [0]
    real_probe = engine.runner.probe

    def probe(kind, index, slots, position):
        bucket_now[0] = len(slots)
        return real_probe(kind, index, slots, position)

    def timer(fn, repeats, device):  # the product is "faster" at even buckets, the kernel at odd ones
        fn()
        bucket = bucket_now[0]
        backend = engine.runner.programs.fill_choice[bucket]  # what this timing runs
        runs[backend] += 1
        return 1.0 if (backend == "torch") == (bucket % 2 == 0) else 2.0

    monkeypatch.setattr(engine.runner, "probe", probe)
    choice = engine.runner.choose_fill(repeats=1, timer=timer)
    assert choice == {b: "torch" if b % 2 == 0 else "triton" for b in engine.buckets}
    assert runs["triton"] and runs["torch"]
    with torch.no_grad():
        ids = [engine.add_request(p) for p in prompts]
        results = engine.run()
    reference = generate_reference(model, prompts, settings, thresholds)
    _assert_same_as_reference([results[i] for i in ids], reference)
    assert dispatch.broken() == {}
