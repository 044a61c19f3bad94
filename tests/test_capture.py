"""Every program the engines capture as a CUDA graph, captured and replayed on the CPU with CUDA-graph
semantics (DESIGN.md §10): `recorder.ReplayRecorder` records the ops a program dispatches on the exact
tensors it reads and writes, refuses any read of a tensor made outside its static buffers (and any
host read, tensor from host data or data-dependent shape), and replays the recorded ops — never the
Python — so each later step's inputs reach a replay only through the static buffers, as on a GPU.
Each segment at each bucket (its exit check and token pick inside), the deferred projection, the KV
fill, the verdict report, self-speculation's draft and verify: all replayed over many steps with
changing rows, against the reference decoders (eager). A broken program that reads a tensor made
outside its static buffers is caught.
"""

import math

import pytest
import torch
from conftest import make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.recorder import CaptureError, ReplayRecorder
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.sampling import RequestSampling
from drex_hf.generation.scheduler import CostModel
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine

BUCKETS = (1, 2, 4, 6)


def _model(kind, confidence, seed=0):
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=math.inf, confidence=confidence, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind, seed=seed), config)
    if confidence == "classifier":
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    return model


def _prompts(lengths=(5, 9, 3, 12, 1, 7)):
    ids, mask = padded_batch(list(lengths))
    return [ids[b, mask[b].bool()] for b in range(len(lengths))]


def _recorder(holder):
    """A recorder whose static buffers are the engine's runner's (known once the engine exists)."""
    return ReplayRecorder(lambda: holder["engine"].runner.static_tensors())


def _drex(model, recorder, holder, lazy=True, **kwargs):
    engine = DrexEngine(
        model, max_batch=6, max_len=24, static_shapes=True, buckets=BUCKETS, cost_model=CostModel.constant(4),
        graphs=recorder, lazy_capture=lazy, **kwargs,
    )  # fmt: skip
    holder["engine"] = engine
    return engine


def _run(engine, prompts, seeds, sampling=None):
    with torch.no_grad():
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            engine.add_request(prompt, seed=seed, **({} if sampling is None else {"sampling": sampling[i]}))
        steps = 0
        while engine.step():
            steps += 1
            assert engine.runner.transfers["uploads"] == engine.runner.transfers["reads"] + engine.runner.in_flight
    return steps


CASES = [
    ("llama", "classifier", "trace", False),  # deferred projections, KV fill, trace exits
    ("llama", "max_prob", "heads", True),  # tokens picked at the exits from logits, sampled on the device
    ("gpt2", "margin", "heads", False),  # learned positions: no rotary tables
    ("mistral", "saturation", "heads", True),  # a sliding window; the previous exit's state
]


@pytest.mark.parametrize(("kind", "confidence", "source", "sample"), CASES)
def test_every_drex_program_replays_its_recording_and_equals_the_reference(kind, confidence, source, sample):
    from test_engine import _thresholds

    model = _model(kind, confidence)
    prompts = _prompts()
    sampling = dict(do_sample=True, temperature=2.0, top_k=20, top_p=0.9) if sample else {}
    settings = DecodeSettings(max_new_tokens=10, **sampling)
    seeds = [40 + i for i in range(6)]
    kwargs = {}
    if source == "trace":
        kwargs = dict(exit_source="trace", exit_distribution=ExitDistribution((0.25, 0.25, 0.25, 0.25), seed=3))
        thresholds = [math.inf] * 3
    else:
        thresholds = _thresholds(model, prompts)
    holder = {}
    recorder = _recorder(holder)
    engine = _drex(model, recorder, holder, settings=settings, thresholds=thresholds, **kwargs)
    steps = _run(engine, prompts, seeds)
    graphs = engine.runner.graphs
    kinds = {key[0] for key in graphs.graphs}
    assert {("segment", s) for s in range(4)} <= {key[:2] for key in graphs.graphs}
    assert kinds >= {"segment", "report", "fill"} | (
        {"project"} if confidence in ("classifier", "saturation") else set()
    )
    assert graphs.replays > len(graphs.graphs) and steps > 20  # recordings really were replayed, many times
    assert engine.stats.graphs["graphs"] == len(graphs.graphs) and engine.stats.graphs["pool_bytes"] > 0
    assert len({key[2] for key in graphs.graphs if key[0] == "segment"}) > 1  # at more than one bucket
    assert engine.stats.padded_layer_rows > 0  # the buckets really padded some steps
    assert recorder.memory() > 0
    exits = [engine.finished[i].exit_layers for i in range(6)]
    assert {layer for row in exits for layer in row[1:]} == {0, 1, 2, 3}
    if source == "trace":  # the same draws as an eager engine's
        eager = DrexEngine(
            model, max_batch=6, max_len=24, settings=settings, cost_model=CostModel.constant(4), **kwargs
        )
        _run(eager, prompts, seeds)
        assert [eager.finished[i].exit_layers for i in range(6)] == exits
        return
    reference = generate_reference(model, prompts, settings, thresholds, seeds)
    for i, want in enumerate(reference):
        got = engine.finished[i]
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), i


def test_programs_captured_up_front_replay_from_the_first_step():
    """Capture before any request (the queues empty, so warm-up and capture write only the scratch
    slot): every program of every bucket, then a run that only replays."""
    from test_engine import _thresholds

    model = _model("qwen2", "classifier")
    prompts = _prompts()
    thresholds = _thresholds(model, prompts)
    settings = DecodeSettings(max_new_tokens=8)
    holder = {}
    engine = _drex(model, _recorder(holder), holder, lazy=True, settings=settings, thresholds=thresholds)
    report = engine.capture_graphs(progress=False)
    assert report["graphs"] == len(engine.runner.program_keys()) == 1 + len(BUCKETS) * (4 + 1 + 3)
    assert report["capture_s"] > 0 and report["warmup_s"] > 0 and report["pool_bytes"] > 0  # reported
    assert engine.stats.graphs == report
    captured = dict(engine.runner.graphs.graphs)
    _run(engine, prompts, [0] * 6)
    assert engine.runner.graphs.graphs == captured  # nothing was captured later: every step replayed
    reference = generate_reference(model, prompts, settings, thresholds)
    for i, want in enumerate(reference):
        assert engine.finished[i].tokens == want.tokens and engine.finished[i].exit_layers == want.exit_layers


def test_per_request_sampling_programs_replay_each_rows_own_parameters():
    """A server's engine: each row samples with its own parameters (greedy rows among them), read from
    its slot inside the replayed programs."""
    from test_engine import _thresholds

    model = _model("llama", "max_prob")
    prompts = _prompts()
    params = [RequestSampling(0.0), RequestSampling(2.0, 0.9, 20), RequestSampling(0.7), RequestSampling(1.0, 0.8),
              RequestSampling(0.0), RequestSampling(1.5, 1.0, 5)]  # fmt: skip
    seeds = [40 + i for i in range(6)]
    thresholds = _thresholds(model, prompts)
    holder = {}
    engine = _drex(model, _recorder(holder), holder, settings=DecodeSettings(max_new_tokens=10),
                   thresholds=thresholds, per_request_sampling=True)  # fmt: skip
    _run(engine, prompts, seeds, params)
    assert engine.runner.graphs.replays > 0
    for i, p in enumerate(params):
        settings = DecodeSettings(
            max_new_tokens=10, do_sample=not p.greedy, temperature=p.temperature if not p.greedy else 1.0,
            top_k=p.top_k or None, top_p=p.top_p,
        )  # fmt: skip
        (want,) = generate_reference(model, [prompts[i]], settings, thresholds, [seeds[i]])
        got = engine.finished[i]
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), i


@pytest.mark.parametrize(("k", "sample"), [(2, False), (3, True)])
def test_self_spec_draft_and_verify_replay_their_recordings_and_equal_full_depth(k, sample):
    from drex_hf.generation.spec.reference import generate_self_spec

    model = _model("llama", "max_prob")
    prompts = _prompts()
    sampling = dict(do_sample=True, temperature=1.5, top_k=30) if sample else {}
    settings = DecodeSettings(max_new_tokens=10, **sampling)
    seeds = [7 + i for i in range(6)]
    holder = {}
    engine = SpecEngine(model, max_batch=6, max_len=24, draft_exit=1, draft_tokens=k, settings=settings,
                        graphs=_recorder(holder), static_shapes=True, buckets=BUCKETS)  # fmt: skip
    holder["engine"] = engine
    _run(engine, prompts, seeds)
    graphs = engine.runner.graphs
    assert {key[0] for key in graphs.graphs} == {"draft", "verify"}
    assert graphs.replays > len(graphs.graphs)
    reference = generate_self_spec(model, prompts, settings, 1, k, seeds)
    for i, want in enumerate(reference):
        assert engine.finished[i].tokens == want.tokens, i


@pytest.mark.parametrize("sample", [False, True])
def test_self_spec_text_drafts_replay_their_recordings_and_equal_eager(sample):
    """Mixed drafting (issue 26): verify passes with some row's drafts from its own text (every input
    through every layer) and without, each captured once and replayed, equal the eager engine."""
    model = _model("llama", "max_prob")
    prompts = _prompts()
    sampling = dict(do_sample=True, temperature=1.5, top_k=30) if sample else {}
    settings = DecodeSettings(max_new_tokens=10, **sampling)
    seeds = [7 + i for i in range(6)]
    holder = {}
    options = dict(max_batch=6, max_len=24, draft_exit=1, draft_tokens=3, draft_source="mixed", settings=settings)
    engine = SpecEngine(model, **options, graphs=_recorder(holder), static_shapes=True, buckets=BUCKETS)
    holder["engine"] = engine
    _run(engine, prompts, seeds)
    graphs = engine.runner.graphs
    fresh = {key[-1] for key in graphs.graphs if key[0] == "verify"}
    assert fresh == {False, True} and graphs.replays > len(graphs.graphs)
    eager = SpecEngine(model, **options)
    _run(eager, prompts, seeds)
    assert eager.stats.ngram_rounds > 0
    for i in range(len(prompts)):
        assert engine.finished[i].tokens == eager.finished[i].tokens, i


def test_a_program_that_reads_a_tensor_made_outside_its_static_buffers_is_caught():
    """The negative check: a broken projection program that reads a per-step tensor the host made outside
    the static buffers (instead of copying it into one) fails at capture, naming the op; without the
    check (strict=False) its replays read the stale tensor and decode wrongly."""
    from drex_hf.generation.runner import Runner

    model = _model("llama", "max_prob")
    prompts = _prompts()
    original = Runner._project

    def broken(self, bucket):
        original(self, bucket)
        tokens = self.state.tokens  # the next inputs shifted by the step's own tensor, made on the host each step
        tokens.copy_(torch.remainder(tokens + self._outside, 90))

    def launch(self, plan, _launch=Runner.launch):
        self._outside = torch.zeros((), dtype=torch.long) + plan.step % 3  # a new tensor every step
        return _launch(self, plan)

    settings = DecodeSettings(max_new_tokens=6)
    holder = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Runner, "_project", broken)
        patch.setattr(Runner, "launch", launch)
        engine = _drex(model, _recorder(holder), holder, settings=settings, thresholds=[0.5] * 3)
        with pytest.raises(CaptureError, match=r"aten.add.*reads a tensor made outside the program"):
            _run(engine, prompts, [0] * 6)
        stale = ReplayRecorder(lambda: holder["engine"].runner.static_tensors(), strict=False)
        engine = _drex(model, stale, holder, settings=settings, thresholds=[0.5] * 3)
        _run(engine, prompts, [0] * 6)
        eager = DrexEngine(model, max_batch=6, max_len=24, settings=settings, thresholds=[0.5] * 3,
                           static_shapes=True, buckets=BUCKETS, cost_model=CostModel.constant(4))  # fmt: skip
        _run(eager, prompts, [0] * 6)
    assert [engine.finished[i].tokens for i in range(6)] != [eager.finished[i].tokens for i in range(6)]
