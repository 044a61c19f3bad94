"""The CPU recorder replays programs as CUDA graphs would (DESIGN.md §10), and refuses what they would not.

Each program reads its inputs from static buffers and writes into static buffers; its replay must equal
eager execution bit for bit for several inputs copied in between replays, without running the Python
again. Programs that read tensors made outside their static buffers, make tensors from Python data, read
device data on the host or have data-dependent shapes must fail at record time, naming what they did.
"""

import pytest
import torch

from drex_hf.generation.graphs import GraphRunner
from drex_hf.generation.recorder import CaptureError, ReplayRecorder

MODES = [torch.no_grad, torch.inference_mode]  # composite ops reach the recorder whole under inference mode


def _toy(seed=0):
    """Static buffers, a tiny Linear + LayerNorm, and a program over them touching many kinds of op."""
    torch.manual_seed(seed)
    lin, norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    s = {
        "x": torch.zeros(4, 8),
        "idx": torch.zeros(3, dtype=torch.long),
        "out": torch.zeros(4, 8),
        "top": torch.zeros(4, 3, dtype=torch.long),
        "order": torch.zeros(4, dtype=torch.long),
        "best": torch.zeros(4),
        "edge": torch.zeros(4, dtype=torch.long),
    }

    def program():
        h = norm(lin(s["x"]))
        att = torch.softmax(h @ h.transpose(0, 1) / 3.0, dim=-1)
        mixed = (att @ h).view(4, 2, 4).reshape(4, 8)
        mixed = mixed + mixed.t().reshape(4, 8) * 0.25  # a reshape that copies (one op under inference mode)
        picked = mixed.index_select(0, s["idx"])
        acc = torch.zeros(4, 8)
        acc.index_copy_(0, s["idx"], picked * 2)
        acc.view(-1)[:16].view(2, 8).mul_(0.5)  # in place through views of an intermediate
        acc[1:3].add_(1.0)
        acc.t()[0].neg_()  # a transposed view written in place
        values, indices = torch.topk(mixed, 3, dim=-1)
        _, order = torch.sort(mixed[:, 0])
        best, where = mixed.max(dim=1)
        cum = torch.cumsum(acc, dim=1)
        chosen = torch.where(cum > 0.5, cum, torch.arange(8).to(cum.dtype))
        s["out"].copy_(chosen + values.sum(-1, keepdim=True))
        s["top"].copy_(indices)
        s["order"].copy_(order)
        s["best"].copy_(best + where)
        # zero-element tensors, a fixed output dtype, an op returning a bool, views from split and unbind
        empty = mixed[:, :0].sum(-1) + torch.zeros(0).sum()
        halves = torch.split(mixed, 4, dim=1)
        rows = torch.unbind(halves[1], dim=0)
        assert torch.is_same_size(rows[0], rows[1])
        s["edge"].copy_(torch.argmax(halves[0], dim=-1) + empty.long() + torch.stack(rows).argmin(-1))

    return s, [lin, norm], program


def _outputs(s):
    return {k: v.clone() for k, v in s.items() if k not in ("x", "idx")}


def _spoil(s):
    for k, v in s.items():
        if k not in ("x", "idx"):
            v.fill_(-7)


@pytest.mark.parametrize("mode", MODES)
def test_replays_equal_eager_bit_for_bit_for_new_inputs_copied_into_static_buffers(mode):
    s, modules, program = _toy()
    recorder = ReplayRecorder(lambda: [*s.values(), *(t for m in modules for t in m.state_dict().values())])
    with mode():
        recorder.warm_up({("toy",): program})
        replay = recorder.record(("toy",), program)
        for step in range(4):
            torch.manual_seed(100 + step)
            s["x"].copy_(torch.randn(4, 8))
            s["idx"].copy_(torch.randperm(4)[:3])
            program()
            eager = _outputs(s)
            _spoil(s)
            replay()
            for name, want in eager.items():
                assert torch.equal(s[name], want), (step, name)
    assert recorder.memory() > 0


def test_a_replay_runs_the_recorded_ops_not_the_program():
    x, out = torch.zeros(4), torch.zeros(4)
    calls, branch = [], {"double": True}

    def program():
        calls.append(1)
        if branch["double"]:  # Python control flow: the branch taken at record time is baked in
            out.copy_(x * 2)
        else:
            out.copy_(x + 100)

    replay = ReplayRecorder(lambda: [x, out]).record(("branch",), program)
    branch["double"] = False
    for step in range(3):
        x.copy_(torch.arange(4.0) + step)
        replay()
        assert torch.equal(out, (torch.arange(4.0) + step) * 2)
    assert len(calls) == 1
    program()  # eager now takes the other branch
    assert torch.equal(out, x + 100)


def test_shape_changes_in_place_and_uninitialised_allocations_replay_as_recorded():
    """`unsqueeze_`/`t_` change a tensor's view once, at record time; `empty` is memory, not a kernel."""
    x, out = torch.zeros(2, 3), torch.zeros(3, 2)

    def program():
        h = x * 2
        total = h.sum(0)  # recorded on the 2-D view of h
        h.unsqueeze_(0)
        buf = torch.empty(3, 2)
        buf.copy_(h[0].t())
        buf.t_()
        out.copy_((buf + total).t())

    replay = ReplayRecorder(lambda: [x, out]).record(("views",), program)
    for step in range(3):
        x.copy_(torch.randn(2, 3))
        program()
        eager = out.clone()
        out.fill_(0)
        replay()
        assert torch.equal(out, eager), step


def test_python_scalars_and_scalar_constants_are_baked_in():
    x, out = torch.zeros(4), torch.zeros(4)
    scale = {"value": 3.0}

    def program():
        y = x * scale["value"] + torch.tensor(0.5)
        y[0] = -1.0
        out.copy_(y)

    replay = ReplayRecorder(lambda: [x, out]).record(("scalars",), program)
    scale["value"] = 10.0
    x.copy_(torch.ones(4))
    replay()
    assert out.tolist() == [-1.0, 3.5, 3.5, 3.5]


@pytest.mark.parametrize("mode", MODES)
def test_attention_is_not_refused_for_the_dropout_it_does_not_do(mode):
    """SDPA's kernels are tagged as drawing random numbers (for dropout): at dropout_p = 0 they draw none."""
    q, out = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)

    def program():
        out.copy_(torch.nn.functional.scaled_dot_product_attention(q, q * 2, q.flip(-1), is_causal=True))

    with mode():
        replay = ReplayRecorder(lambda: [q, out]).record(("sdpa",), program)
        for step in range(3):
            q.copy_(torch.randn(1, 2, 3, 4))
            program()
            eager = out.clone()
            out.zero_()
            replay()
            assert torch.equal(out, eager), step


def _refused(program, static, match, mode=torch.no_grad):
    with mode(), pytest.raises(CaptureError, match=match) as info:
        ReplayRecorder(lambda: static).record(("bad", 2), program)
    assert "program ('bad', 2)" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_reading_a_tensor_made_outside_the_static_buffers_is_refused(mode):
    x, out = torch.zeros(4), torch.zeros(4)
    stale = torch.ones(5, 4, dtype=torch.float64)  # made before recording, not among the static buffers
    message = _refused(lambda: out.copy_(x + stale[1]), [x, out], r"made outside the program", mode)
    assert "aten.select.int" in message and "shape (5, 4)" in message and "torch.float64" in message
    # a view of a static buffer is static; a view made outside of a static buffer is too
    view = x[1:]
    ReplayRecorder(lambda: [x, out]).record(("ok",), lambda: out[1:].copy_(view * 2))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "body", "match", "described"),
    [
        ("torch.tensor", lambda x, out: out.add_(torch.tensor([1.0, 2.0, 3.0, 4.0])), r"lift_fresh", "shape (4,)"),
        ("item", lambda x, out: out.fill_(x.sum().item()), r"aten\.(item|_local_scalar_dense)", "shape ()"),
        ("if tensor", lambda x, out: out.fill_(1.0 if x.sum() > 0 else 2.0), r"is_nonzero|_local_scal", "torch.bool"),
        ("mask", lambda x, out: out[:1].copy_(x[x > 0][:1]), r"boolean-mask indexing", "torch.bool"),
        ("nonzero", lambda x, out: out[:1].copy_(torch.nonzero(x)[0]), r"aten\.nonzero", "shape (4,)"),
        ("where(cond)", lambda x, out: out[:1].copy_(torch.where(x > 0)[0][:1]), r"aten\.(where|nonzero)", "(4,)"),
        ("tolist", lambda x, out: out.fill_(x.tolist()[0]), r"Tensor\.tolist\(\)", "torch.float32"),
        ("numpy", lambda x, out: out.fill_(float(x.numpy()[0])), r"Tensor\.numpy\(\)", "torch.float32"),
        ("rand", lambda x, out: out.copy_(torch.rand(4)), r"aten\.rand\b.*generator", "no tensor argument"),
        ("dropout", lambda x, out: out.copy_(torch.nn.functional.dropout(x, 0.5, True)), r"generator", "(4,)"),
    ],
)
def test_host_data_host_reads_data_dependent_shapes_and_rng_are_refused(mode, name, body, match, described):
    x, out = torch.ones(4), torch.zeros(4)
    assert described in _refused(lambda: body(x, out), [x, out], match, mode)


def test_a_refusal_the_program_swallows_still_fails_the_recording():
    x, out = torch.ones(4), torch.zeros(4)

    def program():
        try:
            out.fill_(x.sum().item())
        except CaptureError:
            out.fill_(0.0)

    _refused(program, [x, out], r"_local_scalar_dense")


def test_without_the_outside_check_a_replay_reads_stale_inputs():
    """Why the check matters: a per-step tensor made outside the static buffers is read at the address
    recorded, so every replay computes with the record-time values while eager sees the new ones."""
    out, static_in = torch.zeros(4), torch.zeros(4)
    step_input = {"t": torch.zeros(4)}

    def program():
        out.copy_(step_input["t"] * 2)

    with pytest.raises(CaptureError, match="made outside"):
        ReplayRecorder(lambda: [out]).record(("stale",), program)
    replay = ReplayRecorder(lambda: [out], strict=False).record(("stale",), program)
    fixed = ReplayRecorder(lambda: [out, static_in]).record(("fixed",), lambda: out.copy_(static_in * 2))
    for step in range(1, 4):
        step_input["t"] = torch.full((4,), float(step))  # what a caller would make each step
        program()
        eager = out.clone()
        replay()
        assert not torch.equal(out, eager)
        assert torch.equal(out, torch.zeros(4))  # the record-time input, read again
        static_in.copy_(step_input["t"])  # the fix: new inputs go through a static buffer
        fixed()
        assert torch.equal(out, eager)


def test_the_recorder_works_through_the_graph_runner():
    lin = torch.nn.Linear(6, 6)
    x, out = torch.zeros(4, 6), torch.zeros(4, 6)

    def build(key):
        rows = key[1]

        def program():
            out[:rows].copy_(torch.relu(lin(x[:rows])).cumsum(-1))

        return program

    recorder = ReplayRecorder(lambda: [x, out, *lin.parameters()])
    runner = GraphRunner(build, recorder)
    with torch.inference_mode():
        report = runner.capture([("lin", 2), ("lin", 4)], bucket_of_key=lambda key: key[1], progress=False)
        assert report["graphs"] == 2 and runner.order == [("lin", 4), ("lin", 2)]
        assert report["pool_bytes"] == recorder.memory() > 0
        for rows in (4, 2, 4):
            x.copy_(torch.randn(4, 6))
            build(("lin", rows))()
            eager = out.clone()
            out.zero_()
            runner.run(("lin", rows))
            assert torch.equal(out[:rows], eager[:rows])
        assert ("lin", 3) not in runner.graphs
    assert runner.replays == 3
