"""Putting a server together: the engine thread over a loaded model, the app, and uvicorn with a
graceful SIGTERM (stop admitting, let running requests finish within a grace period, cancel the
rest, exit 0).

`run_server()` runs one on a free local port from Python (in a thread) for tests and load scripts;
`drex serve` (drex_hf/cli/serve.py) runs one in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from drex_hf.errors import ConfigError
from drex_hf.serve.app import ServerState, ServeSettings, create_app
from drex_hf.serve.metrics import ServerMetrics
from drex_hf.serve.worker import EngineWorker

logger = logging.getLogger(__name__)
STATS_WINDOW = 1024  # steps of per-step statistics the engine keeps


@dataclass
class ServeOptions:
    """The server's knobs (`drex serve --help` explains each)."""

    max_batch: int = 8
    max_len: int = 1024
    policy: str | None = None  # None: the card's calibrated choice for this device at max_batch (else drex)
    draft_source: str | None = None  # self_spec: as generate()'s (None: the choice's, else "head")
    draft_exit: int | None = None
    draft_tokens: int | str | None = None
    max_logprobs: int = 20  # the most top logprobs a request may ask for
    sla_tpot_ms: float | None = None
    max_queue: int = 64
    request_timeout_s: float = 600.0
    grace_s: float = 30.0
    max_body_bytes: int = 1 << 20
    graphs: bool | None = None

    @classmethod
    def from_fields(cls, source: Any) -> ServeOptions:
        """The options `source` names as attributes (drex serve's parsed arguments, the Ray
        application's); those it lacks keep their defaults."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)})


@dataclass
class ServedPolicy:
    """The policy a server runs: its name, self_spec's drafting, and where it came from."""

    policy: str
    draft_source: str | None = None
    draft_exit: int | None = None
    draft_tokens: int | str | None = None
    origin: str = "--policy"

    def describe(self) -> str:
        from drex_hf.calibration_file import describe_choice

        choice = {"policy": self.policy, "draft_source": self.draft_source or "head", "draft_exit": self.draft_exit,
                  "draft_tokens": self.draft_tokens}  # fmt: skip
        return f"{describe_choice(choice)}, {self.origin}"


def served_policy(model: Any, options: ServeOptions) -> ServedPolicy:
    """`--policy`, or the card's calibrated choice for this device at `--max-batch` rows (the choice of
    the largest calibrated batch size not above it, as `generate()` picks), else drex; self_spec's
    drafting from the options, else the choice's (for `--policy self_spec`: the card's self_spec
    choice nearest `--max-batch`, if it has one), else the last exit's head, k 4."""
    from drex_hf.calibration_file import choice_for

    choices = getattr(model, "policy_choice", None)
    choice = choice_for(choices, options.max_batch) if options.policy is None else None
    if options.policy == "self_spec":  # drafting as the card's calibrated self_spec choice nearest --max-batch
        spec = {b: c for b, c in (choices or {}).items() if c.get("policy") == "self_spec"}
        found = choice_for(spec, options.max_batch)
        served = ServedPolicy("self_spec")
        if found is not None:
            served = ServedPolicy("self_spec", found.get("draft_source"), found.get("draft_exit"),
                                  found.get("draft_tokens"), origin="--policy, drafting as the card's calibrated "
                                  "self_spec choice")  # fmt: skip
    elif options.policy is not None:
        served = ServedPolicy(options.policy)
    elif choice is not None:
        origin = f"the card's calibrated choice here at --max-batch {options.max_batch}"
        served = ServedPolicy(choice["policy"], choice.get("draft_source"), choice.get("draft_exit"),
                              choice.get("draft_tokens"), origin=origin)  # fmt: skip
    else:
        served = ServedPolicy("drex", origin="the default (the card has no calibrated choice for this device)")
    drafting = (options.draft_source, options.draft_exit, options.draft_tokens)
    if served.policy != "self_spec":
        if any(v is not None for v in drafting):
            given = "--draft-source, --draft-exit and --draft-tokens"
            raise ConfigError(f"{given} apply to self_spec, not {served.policy}")
        return served
    served.draft_source = options.draft_source or served.draft_source or "head"
    served.draft_exit = options.draft_exit if options.draft_exit is not None else served.draft_exit
    if served.draft_exit is None and served.draft_source != "ngram":
        served.draft_exit = model.exit_layers[-1]
    tokens = options.draft_tokens if options.draft_tokens is not None else served.draft_tokens
    served.draft_tokens = 4 if tokens is None else tokens
    return served


def new_engine(model: Any, options: ServeOptions, served: ServedPolicy | None = None) -> Any:
    """The server's engine for `served` (default: `served_policy`): a `DrexEngine` (full, drex, ...)
    or a `SpecEngine` (self_spec), with the end-of-sequence ids `generate()` would use, each request's
    own sampling and logprobs, and bounded memory."""
    from drex_hf.generation.settings import merge_generation_config, settings_from_config

    served = served or served_policy(model, options)
    settings = settings_from_config(merge_generation_config(model.base_model, None, {"max_new_tokens": 16}), 1)
    common = dict(max_batch=options.max_batch, max_len=options.max_len, settings=settings, graphs=options.graphs,
                  progress=False, per_request_sampling=True, keep_finished=False,
                  logprobs=options.max_logprobs)  # fmt: skip
    if served.policy == "self_spec":
        from drex_hf.generation.spec.engine import SpecEngine, model_drafting

        return SpecEngine(model, draft_source=served.draft_source, draft_exit=served.draft_exit,
                          draft_tokens=served.draft_tokens,
                          **model_drafting(model, served.draft_tokens, served.draft_source), **common)  # fmt: skip
    from drex_hf.generation.engine import DrexEngine

    return DrexEngine(
        model,
        policy=served.policy,
        sla_tpot_ms=options.sla_tpot_ms,
        stats_window=STATS_WINDOW,
        sla_per_request=served.policy == "drex",  # a request's own sla_tpot_ms steers the scheduler
        **common,
    )


def build_state(model: Any, tokenizer: Any, model_name: str, options: ServeOptions) -> ServerState:
    """Start the engine thread (the engine is built on it) and return what the routes share."""
    metrics = ServerMetrics()
    served = served_policy(model, options)
    worker = EngineWorker(
        lambda: new_engine(model, options, served),
        metrics,
        max_queue=options.max_queue,
        sla_tpot_ms=options.sla_tpot_ms,
    )
    worker.start()
    engine = worker.engine
    settings = ServeSettings(
        model_name=model_name,
        max_len=_request_positions(engine),  # the engine may cap it at a learned position limit
        vocab_size=model.arch.input_vocab_size,
        request_timeout_s=options.request_timeout_s,
        max_body_bytes=options.max_body_bytes,
        max_prompts=options.max_queue,
        policy=served.policy,
        max_logprobs=options.max_logprobs,
    )
    state = ServerState(settings, tokenizer, worker, metrics)
    state.served = served
    return state


def _request_positions(engine: Any) -> int:
    """The positions a request may use: a self-speculation engine's store keeps k + 1 spare ones."""
    from drex_hf.generation.spec.engine import SpecEngine

    return engine.max_len if isinstance(engine, SpecEngine) else engine.store.max_len


class DrexServer(uvicorn.Server):
    """uvicorn's server with a draining shutdown. The first SIGTERM/SIGINT (or `drain()`) starts it:
    new requests get 503, queued ones 503, running ones get `grace_s` to finish, the rest are
    cancelled, then uvicorn exits; a second SIGINT forces the exit. The signal is not re-raised, so
    the process exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        logger.info("drex serve: %s, draining (grace %g s)", signal.Signals(sig).name, self.grace_s)
        self.drain()

    def drain(self) -> None:
        """Start the draining shutdown (from any thread)."""
        if self._draining or self._loop is None:
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        await drain(self.state, self.grace_s)
        self.should_exit = True


async def drain(state: ServerState, grace_s: float) -> None:
    """Stop admitting (new and queued requests get 503), give running requests `grace_s` to finish,
    then cancel the rest (their clients get what they have). `drex serve` runs it on SIGTERM, a Ray
    Serve replica (ray_app.py) when Ray stops it."""
    state.draining = True
    state.worker.begin_drain()
    deadline = time.monotonic() + grace_s
    while state.worker.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.worker.busy:
        logger.info("drex serve: grace period over, cancelling %d request(s)", state.worker.busy)
        state.worker.cancel_all()
        end = time.monotonic() + 5.0
        while state.worker.busy and time.monotonic() < end:
            await asyncio.sleep(0.02)


def make_server(state: ServerState, host: str, port: int, grace_s: float) -> DrexServer:
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    return DrexServer(config, state, grace_s)


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@dataclass
class Served:
    """A server running in this process: its base URL, the routes' shared state, the uvicorn server."""

    url: str
    state: ServerState
    server: DrexServer


@contextlib.contextmanager
def run_server(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str = "drex",
    options: ServeOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 60.0,
) -> Iterator[Served]:
    """Serve `model` (an `EarlyExitModelForCausalLM`, e.g. from `drex_hf.cli.serve.load()`) from a
    thread; yields a `Served` whose `url` is http://host:port (a free port by default), and stops the
    server and its engine thread on exit.

        model, tokenizer, name = load("path/to/heads")
        with run_server(model, tokenizer, model_name=name, options=ServeOptions(max_len=256)) as served:
            openai.OpenAI(base_url=served.url + "/v1", api_key="none").completions.create(model=name, ...)
    """
    options = options or ServeOptions()
    state = build_state(model, tokenizer, model_name, options)
    sock = free_socket(host, port)
    server = make_server(state, host, sock.getsockname()[1], options.grace_s)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="drex-http", daemon=True)
    thread.start()
    try:
        end = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the drex server did not start")
            time.sleep(0.01)
        yield Served(f"http://{host}:{sock.getsockname()[1]}", state, server)
    finally:
        server.should_exit = True
        thread.join(30)
        state.worker.stop()
        sock.close()
