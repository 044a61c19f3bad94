"""A CPU recorder with CUDA-graph semantics, so that every captured program is checked without a GPU.

`ReplayRecorder` plugs into `graphs.GraphRunner` in place of `CudaRecorder` (DESIGN.md §10): it runs a
program once, records the aten ops it dispatched on the tensors they ran on, and replays those ops —
never the Python — so new inputs reach a replay only through the static buffers, as on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

aten = torch.ops.aten
Program = Callable[[], None]


class CaptureError(RuntimeError):
    """A program does something that a CUDA graph would not replay as it ran."""


HOST_READ = "reads device data on the host (a synchronisation; the value would be baked into the graph)"
DATA_SHAPE = "has an output shape that depends on device data"
RNG = "draws from torch's generator, which a replay would not advance as a graph does"
OUTSIDE = (
    "reads a tensor made outside the program and not among its static buffers (a replay would read "
    "whatever that memory holds then: copy new inputs into a static buffer)"
)
# Refused ops, by overload packet, with why a graph cannot hold them.
_REFUSED = dict.fromkeys((aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose), HOST_READ)
_REFUSED |= dict.fromkeys(
    (aten.nonzero, aten.argwhere, aten.nonzero_numpy, aten.masked_select, aten.bincount), DATA_SHAPE
)
_REFUSED |= dict.fromkeys(
    (aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive), DATA_SHAPE
)
_REFUSED |= dict.fromkeys(
    (aten.resize_, aten.resize_as_, aten.set_),
    "changes a tensor's storage in place (a graph holds the storage it was recorded with)",
)
_MASK_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
_LIFTS = (aten.lift_fresh, aten.lift_fresh_copy, aten.lift)
_COPIES = (aten._to_copy, aten.copy_, aten.to, aten._copy_from, aten._copy_from_and_resize)
# Allocations run no kernel in a graph: a replay leaves their memory as the last replay left it.
_ALLOCATIONS = (aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided)
# Tensor methods that read data on the host without dispatching an aten op.
_HOST_METHODS = {
    torch.Tensor.tolist: "Tensor.tolist()",
    torch.Tensor.numpy: "Tensor.numpy()",
    torch.Tensor.__array__: "Tensor.__array__()",
    torch.Tensor.__dlpack__: "Tensor.__dlpack__()",
}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _describe(t: torch.Tensor | None) -> str:
    return "no tensor argument" if t is None else f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"


def _draws(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether a seeded op draws: attention and dropout ops are seeded for their dropout, and draw
    nothing at p = 0 or outside training."""
    values = {}
    for i, argument in enumerate(func._schema.arguments):
        values[argument.name] = args[i] if i < len(args) else kwargs.get(argument.name, argument.default_value)
    p = values.get("dropout_p", values.get("p"))
    return not (p == 0 or values.get("train", True) is False)


@dataclass
class _Step:
    """One op to re-run: `fresh` are (index in the op's flattened result, recorded output) to copy into."""

    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    fresh: list[tuple[int, torch.Tensor]]


class Replay:
    """A recorded program: re-runs its ops, in order, on the tensors they were recorded with."""

    def __init__(
        self, key: tuple, steps: list[_Step], pool: list[torch.Tensor], storages: dict[int, int], inference: bool
    ) -> None:
        self.key = key
        self.steps = steps
        self.pool = pool  # every tensor the recording made, kept alive like a graph's pool memory
        self.storages = storages  # bytes of each storage the recording allocated, by address
        self.inference = inference

    def __call__(self) -> None:
        with torch.inference_mode(self.inference), torch.no_grad():
            for step in self.steps:
                result = step.func(*step.args, **step.kwargs)
                if step.fresh:
                    leaves = tree_flatten(result)[0]
                    for i, target in step.fresh:
                        target.copy_(leaves[i])  # the graph writes into the memory it wrote at capture


class _Capture(TorchDispatchMode):
    """Records one program's ops and refuses what a CUDA graph would not replay faithfully."""

    def __init__(self, key: tuple, static: set[int], strict: bool) -> None:
        super().__init__()
        self.key = key
        self.static = static
        self.strict = strict
        self.made: set[int] = set()  # storages that ops of this recording produced
        self.constants: set[int] = set()  # 0-dim tensors lifted from Python scalars: baked in, like scalars
        self.steps: list[_Step] = []
        self.pool: list[torch.Tensor] = []
        self.fresh: dict[int, int] = {}
        self.error: CaptureError | None = None

    def fail(self, what: str, why: str, tensor: torch.Tensor | None) -> None:
        self.error = CaptureError(f"program {self.key!r}: {what} {why}; {_describe(tensor)}")
        raise self.error

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self.check(func, args, kwargs)
        if torch.Tag.inplace_view in func.tags:
            self.freeze(args[0])
        out = func(*args, **kwargs)
        self.note(func, args, kwargs, out)
        return out

    def check(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
        tensors = _tensors((args, kwargs))
        first = tensors[0] if tensors else None
        packet = func.overloadpacket
        if packet in _REFUSED:
            self.fail(str(func), _REFUSED[packet], first)
        if func is aten.where.default:
            self.fail(f"{func} (where with one argument)", DATA_SHAPE, first)
        if packet is aten.repeat_interleave and func._overloadname.endswith("Tensor"):
            if kwargs.get("output_size") is None:
                self.fail(f"{func} without output_size", DATA_SHAPE, first)
        if packet in _MASK_INDEXING:
            for index in args[1]:
                if index is not None and index.dtype in (torch.bool, torch.uint8):
                    self.fail(f"{func} (boolean-mask indexing)", DATA_SHAPE, index)
        if torch.Tag.nondeterministic_seeded in func.tags and _draws(func, args, kwargs):
            self.fail(str(func), RNG, first)
        if packet in _LIFTS and args[0].dim() > 0:
            self.fail(f"{func} (torch.tensor of Python data)", "makes a tensor from host data at record time", args[0])
        self.check_devices(func, args, kwargs, tensors)
        if self.strict:
            for t in tensors:
                storage = _storage(t)
                if t.numel() and storage not in self.static and storage not in self.made and packet not in _LIFTS:
                    self.fail(str(func), OUTSIDE, t)

    def check_devices(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, tensors: list) -> None:
        copy = func.overloadpacket in _COPIES
        devices = {t.device for t in tensors if copy or _storage(t) not in self.constants}
        devices |= {x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.device)}
        if len(devices) > 1:
            what = "copies across devices" if copy else "mixes devices"
            self.fail(str(func), f"{what} ({', '.join(sorted(map(str, devices)))})", tensors[0] if tensors else None)

    def freeze(self, tensor: torch.Tensor) -> None:
        """An op about to change `tensor`'s shape or strides in place runs once, at record time: the ops
        recorded before it keep the old view, through an alias of its current shape and strides."""
        frozen = tensor.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())

        def swap(t: torch.Tensor) -> torch.Tensor:
            return frozen if t is tensor else t

        for step in self.steps:
            step.args, step.kwargs = tree_map_only(torch.Tensor, swap, (step.args, step.kwargs))
            step.fresh = [(i, swap(t)) for i, t in step.fresh]

    def note(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> None:
        inputs = {_storage(t) for t in _tensors((args, kwargs))}
        fresh = []
        for i, leaf in enumerate(tree_flatten(out)[0]):
            if not isinstance(leaf, torch.Tensor):
                continue
            self.pool.append(leaf)
            storage = _storage(leaf)
            if func.overloadpacket in _LIFTS:
                self.constants.add(storage)
            if storage:
                self.made.add(storage)
            # Fresh by storage, not by schema alone: under inference mode composite ops such as reshape,
            # contiguous and to() reach this mode whole and may return a copy though their schema says
            # "alias", while _unsafe_view says "fresh" yet returns a view of its input.
            if storage == 0 or storage not in inputs:
                fresh.append((i, leaf))
                if storage:
                    self.fresh[storage] = leaf.untyped_storage().nbytes()
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if torch.Tag.inplace_view in func.tags or func.overloadpacket in _ALLOCATIONS:
            return  # no kernel to re-run: shape changes happened once, and allocations keep their memory
        if mutates or fresh:  # views of recorded tensors already alias the right memory
            self.steps.append(_Step(func, args, kwargs, fresh))


class _HostReads(TorchFunctionMode):
    """Catches the Tensor methods that read data on the host without dispatching an aten op."""

    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in _HOST_METHODS:
            self.capture.fail(_HOST_METHODS[func], "reads device data on the host", args[0])
        return func(*args, **(kwargs or {}))


class ReplayRecorder:
    """A `GraphRunner` recorder for the CPU with the semantics of CUDA graphs.

    `static()` returns the tensors that exist outside the programs (the runner's static buffers, the
    model's parameters and buffers, the KV store); views of them count as static (compared by
    storage). `record` runs a program once, recording the aten ops it dispatches, and refuses with a
    `CaptureError` what a graph would not replay faithfully: reading a tensor made outside the program
    and outside the static buffers, tensors made from Python data, host reads of device data
    (`.item()`, `.tolist()`, ...), data-dependent output shapes (`nonzero`, boolean masks, ...),
    copies across devices, torch's RNG. The replay it returns re-runs exactly those ops on exactly
    those tensors; Python scalars and control flow are baked in. `strict=False` lets tensors made
    outside through, for tests that show why they are refused.

    Not emulated: on the CPU every tensor is on the host, so host-side work inside a device program
    (which a graph would run once, at capture) shows only where an op mixes devices; reads that
    dispatch no op (raw storage or `data_ptr` access) pass unseen; and each recording keeps its own
    intermediates, where graphs sharing a pool may overwrite another graph's (a program reading
    another's intermediate is still refused: that tensor was made outside it).
    """

    def __init__(self, static: Callable[[], Iterable[torch.Tensor]] | None = None, strict: bool = True) -> None:
        self.static = static or (lambda: ())
        self.strict = strict
        self.recordings: dict[tuple, Replay] = {}

    def warm_up(self, programs: dict[tuple, Program]) -> None:
        for program in programs.values():
            program()

    def record(self, key: tuple, program: Program) -> Replay:
        static = list(self.static())  # held while recording, so no storage address is reused meanwhile
        capture = _Capture(key, {_storage(t) for t in static if _storage(t)}, self.strict)
        with _HostReads(capture), capture:
            program()
        if capture.error is not None:  # the program swallowed the refusal
            raise capture.error
        replay = Replay(key, capture.steps, capture.pool, capture.fresh, torch.is_inference_mode_enabled())
        self.recordings[key] = replay
        return replay

    def finish(self) -> None:
        pass

    def memory(self) -> int:
        """Bytes held by the recordings' intermediates (each storage once), as a graph pool holds them."""
        storages: dict[int, int] = {}
        for replay in self.recordings.values():
            storages.update(replay.storages)
        return sum(storages.values())
