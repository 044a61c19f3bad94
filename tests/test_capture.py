"""The fast path's step programs are safe to capture as CUDA graphs (DESIGN.md §10), checked on the CPU.

A step is: plan upload, the executor's programs, verdict read. Under a TorchDispatchMode every decode
step fails on any op that would synchronise or read device data on the host on CUDA (`.item()`,
`nonzero`, boolean-mask indexing, `masked_select`, tensors made from Python data, copies across
devices, `.tolist()`/`.numpy()` of a device tensor), and counts the copies that touch the host
staging buffers: exactly the upload and the read, once each per step. The programs run through the
graph cache with a recorder that "replays" a program by running it again: every replay must
dispatch exactly the ops its first run did, on the same external buffers (same storage, offset,
shape, stride) with the same scalars — what makes a recording valid for every later step — and a
program's ops must not depend on how many rows it holds (no loop over rows). The tokens must still
equal the reference decoder's.
"""

import math

import pytest
import torch
from conftest import make_tiny, padded_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.exits import ExitDistribution
from drex_hf.generation.graphs import GraphCache
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.scheduler import CostModel
from drex_hf.generation.settings import DecodeSettings

aten = torch.ops.aten
# ops whose result the host must wait for on CUDA, or that make a tensor from host data
SYNCING = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _storage(t):
    return t.untyped_storage().data_ptr()


class StepGuard(TorchDispatchMode):
    """Fails on a syncing op anywhere in a step; counts copies into and out of the host buffers, and
    fails on any other use of them; records each program's ops (see `start`)."""

    def __init__(self, host_buffers):
        super().__init__()
        self.host = host_buffers
        self.uploads = self.reads = 0
        self.trace = None  # the running program's ops, when one runs
        self.internal = set()

    def start(self):
        self.trace, self.internal = [], set()

    def stop(self):
        trace, self.trace = self.trace, None
        return trace

    def _describe(self, value):
        if isinstance(value, torch.Tensor):
            if _storage(value) in self.internal:
                return ("made here", tuple(value.shape), value.dtype)
            return ("buffer", _storage(value), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        return repr(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        assert func not in SYNCING, f"{func} in a step would synchronise with the host on CUDA"
        if func in INDEXING:
            indices = args[1]
            assert not any(i is not None and i.dtype == torch.bool for i in indices), f"boolean-mask indexing: {func}"
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        touched = [t for t in tensors if _storage(t) in self.host]
        if touched:
            assert self.trace is None, f"a program touched a host staging buffer ({func})"
            assert func is aten.copy_.default and len(tensors) == 2, f"{func} on a host staging buffer"
            if _storage(tensors[1]) in self.host:
                self.uploads += 1
            else:
                self.reads += 1
        if func in (aten._to_copy.default, aten.copy_.default):
            devices = {t.device for t in tensors} | (
                {torch.device(kwargs["device"])} if kwargs.get("device") else set()
            )
            assert len(devices) == 1, f"{func} copies across devices"
        descriptor = (str(func), tuple(self._describe(a) for a in tree_flatten((args, kwargs))[0]))
        out = func(*args, **kwargs)
        if self.trace is not None:
            self.trace.append(descriptor)
            self.internal.update(_storage(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


class ReplayRecorder:
    """A `GraphCache` recorder for the CPU: a program's first run under the guard is its recording;
    every replay runs it again and must dispatch the same ops on the same buffers."""

    def __init__(self):
        self.guard = None
        self.first = {}
        self.replays = {}

    def warm_up(self, programs):
        for program in programs.values():
            program()

    def record(self, key, program):
        def replay():
            if self.guard is None:  # the start-up profile, before the test watches
                return program()
            self.guard.start()
            program()
            trace = self.guard.stop()
            if key not in self.first:
                self.first[key] = trace
            else:
                assert trace == self.first[key], f"program {key} dispatched other ops or buffers than when recorded"
            self.replays[key] = self.replays.get(key, 0) + 1

        return replay

    def finish(self):
        pass

    def memory(self):
        return 0


def _model(kind, confidence, seed=0):
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=math.inf, confidence=confidence, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind, seed=seed), config)
    if confidence == "classifier":
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    return model


def _guarded_run(engine, prompts, seeds, sampling=None):
    recorder = engine.executor.graphs.recorder
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        engine.add_request(prompt, seed=seed, sampling=None if sampling is None else sampling[i])
    engine.step()  # the prefill: not a step program
    guard = StepGuard(engine.executor.host_buffers)
    recorder.guard = guard
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "item")}

    def forbid(name):
        def call(self, *a, **k):
            assert _storage(self) in guard.host, f"Tensor.{name}() of a device tensor in a step"
            return originals[name](self, *a, **k)

        return call

    steps = 0
    try:
        for name in originals:
            setattr(torch.Tensor, name, forbid(name))
        with torch.no_grad():
            while engine.requests or engine.prefill_queue:
                with guard:
                    assert engine.step()
                steps += 1
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return guard, steps


CASES = [
    ("llama", "classifier", "trace", False),  # deferred projections, KV fill, trace exits
    ("llama", "max_prob", "heads", True),  # tokens picked at the exits from logits, sampled on the device
    ("gpt2", "margin", "heads", False),  # learned positions: no rotary tables
    ("mistral", "saturation", "heads", True),  # a sliding window; the previous exit's state
]


@pytest.mark.parametrize(("kind", "confidence", "source", "sample"), CASES)
def test_every_decode_step_is_capture_safe_and_replays_its_recording(kind, confidence, source, sample):
    model = _model(kind, confidence)
    _, mask = padded_batch([5, 9, 3, 12, 1, 7])
    ids, _ = padded_batch([5, 9, 3, 12, 1, 7])
    prompts = [ids[b, mask[b].bool()] for b in range(6)]
    sampling = dict(do_sample=True, temperature=2.0, top_k=20, top_p=0.9) if sample else {}
    settings = DecodeSettings(max_new_tokens=10, **sampling)
    seeds = [40 + i for i in range(6)]
    kwargs = {}
    if source == "trace":
        kwargs = dict(exit_source="trace", exit_distribution=ExitDistribution((0.25, 0.25, 0.25, 0.25), seed=3))
        thresholds = [math.inf] * 3
    else:
        from test_engine import _thresholds

        thresholds = _thresholds(model, prompts)
    engine = DrexEngine(
        model, max_batch=6, max_len=24, settings=settings, thresholds=thresholds, static_shapes=True,
        buckets=(1, 2, 4, 6), cost_model=CostModel.constant(4), **kwargs,
    )  # fmt: skip
    recorder = ReplayRecorder()
    report = engine.capture_graphs(GraphCache("cpu", recorder=recorder))
    assert report["graphs"] == len(engine.executor.program_keys()) == 4 * (4 + 1 + 3)
    assert engine.policy.ride is False
    guard, steps = _guarded_run(engine, prompts, seeds)

    # every step ran captured programs only, each with one upload and one read
    assert guard.uploads == guard.reads == steps == engine.stats.steps
    assert sum(recorder.replays.values()) == engine.executor.graphs.replays >= steps
    assert any(n > 1 for n in recorder.replays.values())  # recordings really were replayed
    assert engine.stats.padded_layer_rows > 0  # the buckets really padded some steps
    # a program's ops do not depend on its rows: the same segment at 2 and 4 rows dispatches the same ops
    for s in range(4):
        two, four = recorder.first.get(("segment", s, 2)), recorder.first.get(("segment", s, 4))
        if two is not None and four is not None:
            assert [op for op, _ in two] == [op for op, _ in four]
    # and the tokens are the reference decoder's
    if source == "trace":
        exits = [engine.finished[i].exit_layers for i in range(6)]
        assert {layer for row in exits for layer in row[1:]} == {0, 1, 2, 3}
        return
    reference = generate_reference(model, prompts, settings, thresholds, seeds)
    for i, want in enumerate(reference):
        got = engine.finished[i]
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), i
    assert {layer for r in reference for layer in r.exit_layers[1:]} == {0, 1, 2, 3}


def test_a_step_of_the_eager_cpu_path_also_makes_one_upload_and_one_read():
    """The default CPU engine (eager programs, exact row counts) keeps the same two transfers a step."""
    model = _model("llama", "classifier")
    ids, mask = padded_batch([5, 9, 3, 12])
    prompts = [ids[b, mask[b].bool()] for b in range(4)]
    dist = ExitDistribution((0.25, 0.25, 0.25, 0.25), seed=1)
    engine = DrexEngine(
        model, max_batch=4, max_len=20, settings=DecodeSettings(max_new_tokens=8), exit_source="trace",
        exit_distribution=dist, cost_model=CostModel.constant(4),
    )  # fmt: skip
    for prompt in prompts:
        engine.add_request(prompt)
    engine.step()
    guard = StepGuard(engine.executor.host_buffers)
    steps = 0
    with torch.no_grad():
        while engine.requests:
            with guard:
                engine.step()
            steps += 1
    assert guard.uploads == guard.reads == steps
    assert engine.executor.transfers == {"uploads": steps, "reads": steps}


def test_per_request_sampling_steps_are_capture_safe_and_equal_each_requests_reference():
    """A server's engine: each row samples with its own parameters (greedy rows among them), read from
    its slot on the device inside the captured programs."""
    from drex_hf.generation.sampling import RequestSampling

    model = _model("llama", "max_prob")
    ids, mask = padded_batch([5, 9, 3, 12, 1, 7])
    prompts = [ids[b, mask[b].bool()] for b in range(6)]
    params = [RequestSampling(0.0), RequestSampling(2.0, 0.9, 20), RequestSampling(0.7), RequestSampling(1.0, 0.8),
              RequestSampling(0.0), RequestSampling(1.5, 1.0, 5)]  # fmt: skip
    seeds = [40 + i for i in range(6)]
    from test_engine import _thresholds

    thresholds = _thresholds(model, prompts)
    engine = DrexEngine(
        model, max_batch=6, max_len=24, settings=DecodeSettings(max_new_tokens=10), thresholds=thresholds,
        static_shapes=True, buckets=(1, 2, 4, 6), cost_model=CostModel.constant(4), per_request_sampling=True,
    )  # fmt: skip
    engine.capture_graphs(GraphCache("cpu", recorder=ReplayRecorder()))
    guard, steps = _guarded_run(engine, prompts, seeds, params)
    assert guard.uploads == guard.reads == steps == engine.stats.steps
    for i, p in enumerate(params):
        settings = DecodeSettings(
            max_new_tokens=10, do_sample=not p.greedy, temperature=p.temperature if not p.greedy else 1.0,
            top_k=p.top_k or None, top_p=p.top_p,
        )  # fmt: skip
        (want,) = generate_reference(model, [prompts[i]], settings, thresholds, [seeds[i]])
        got = engine.finished[i]
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), i
