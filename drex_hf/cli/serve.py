"""`drex serve MODEL_DIR`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the
continuous-batching engine. The server's packages and torch are imported only when it runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from drex_hf.cli import COMMANDS
from drex_hf.cli.common import HelpFormatter, add_model_arguments, positive_float, positive_int
from drex_hf.config import DRAFT_SOURCES
from drex_hf.errors import ConfigError
from drex_hf.generation.scheduler import POLICY_NAMES as POLICIES


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535, got {text}")
    return value


def _draft_tokens(text: str) -> int | str:
    if text == "adaptive":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"drafts per round are at least 1 (or 'adaptive'), got {text}")
    return value


def _max_logprobs(text: str) -> int:
    from drex_hf.generation.engine import MAX_LOGPROBS

    value = int(text)
    if not 0 <= value <= MAX_LOGPROBS:
        raise argparse.ArgumentTypeError(f"--max-logprobs is in 0..{MAX_LOGPROBS}, got {text}")
    return value


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "serve",
        help=COMMANDS["serve"],
        description="Serve an early-exit model over HTTP with the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models) plus /health and /metrics (Prometheus). Requests join the "
        "running batch as slots free up; SIGTERM drains: new requests get 503, running ones finish "
        "within --grace-s, the rest are cancelled, and the process exits 0. Replicas on Ray Serve, behind "
        "Ray's HTTP proxy: `serve run drex_hf.cli.ray_serve:app model=MODEL_DIR num_replicas=N` (these "
        "options as key=value, e.g. max_batch=8; `python -m drex_hf.cli.ray_serve --help` lists them).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL_DIR",
        nargs="?",
        help="exit-heads folder (or hub id), or a base model with --exit-layers; omit with --synthetic-config",
    )
    parser.add_argument(
        "--synthetic-config",
        default=None,
        metavar="SHAPE",
        help="serve a random-weight model of a named shape (tiny, moderate, llama-1b, ...) with a byte "
        "tokenizer, for load tests (default: off)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="requests decoding at once (engine slots)")
    parser.add_argument("--max-len", type=positive_int, default=1024, help="positions per slot: prompt + max_tokens")
    parser.add_argument(
        "--policy",
        choices=[*POLICIES, "self_spec"],
        default=None,
        help="the engine's policy (default: the card's calibrated choice for this device at --max-batch rows, "
        "else drex); self_spec is lossless: full depth's tokens, drafted and verified",
    )
    parser.add_argument(
        "--draft-source",
        choices=DRAFT_SOURCES,
        default=None,
        help="self_spec: where drafts come from (default: the calibrated choice's, else head)",
    )
    parser.add_argument(
        "--draft-exit",
        type=int,
        default=None,
        help="self_spec: the exit that drafts (default: the choice's, else the last)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=_draft_tokens,
        default=None,
        help="self_spec: drafts per round, or 'adaptive' (default: the choice's, else 4)",
    )
    parser.add_argument(
        "--max-logprobs",
        type=_max_logprobs,
        default=20,
        help="the most top logprobs a request may ask for (logprobs / top_logprobs)",
    )
    parser.add_argument(
        "--sla-tpot-ms", type=positive_float, default=None, help="drex: target time per output token (default: none)"
    )
    parser.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting for a slot before new ones get 429"
    )
    parser.add_argument("--request-timeout-s", type=positive_float, default=600.0, help="per-request time limit")
    parser.add_argument("--grace-s", type=positive_float, default=30.0, help="on SIGTERM: time running requests get")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="larger request bodies get 413")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def load(
    model: str | None = None,
    synthetic: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    *,
    exit_layers: list[int] | None = None,
    head: str | None = None,
    confidence: str | None = None,
    threshold: float | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, served name) for a model folder (an exit-heads folder, or a hub id; a base
    model with `exit_layers` gets new heads) or a synthetic shape (`drex_hf.bench.synthetic.SHAPES`,
    with a byte tokenizer), as `drex serve` loads them (the keywords are its --exit-layers, --head,
    --confidence and --threshold). It lives with the command, not in drex_hf.serve: it reads the
    command's model options (cli.common) and the benchmark's synthetic shapes, and the server package
    imports neither (a Ray Serve replica gets it passed in, see cli/ray_serve.py)."""
    from pathlib import Path

    from drex_hf.cli.common import load_model, pick_device, pick_dtype, tokenizer_for
    from drex_hf.serve.text import ByteTokenizer

    if synthetic is not None:
        from drex_hf.bench.synthetic import synthetic_model

        where = pick_device(device)
        wrapper = synthetic_model(synthetic, dtype=pick_dtype(dtype, where), device=where)
        return wrapper, ByteTokenizer(wrapper.arch.vocab_size), f"synthetic-{synthetic}"
    args = argparse.Namespace(
        exit_layers=exit_layers, head=head, confidence=confidence, threshold=threshold, dtype=dtype, device=device
    )
    wrapper = load_model(model, args)
    return wrapper, tokenizer_for(wrapper), Path(model).name or model


def run(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.synthetic_config is None):
        raise ConfigError("give MODEL_DIR or --synthetic-config SHAPE (exactly one)")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        missing = f"drex serve needs the serve extra ({err.name} is missing): pip install 'drex-hf[serve]'"
        raise ConfigError(missing) from None
    from drex_hf.cli.common import load_model, tokenizer_for
    from drex_hf.serve.server import ServeOptions, build_state, free_socket, make_server

    try:  # before the model loads: a port in use is one line, not a traceback after the load
        sock = free_socket(args.host, args.port)
        sock.listen()
    except OSError as err:
        why = err.strerror or err
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({why})") from None
    if args.synthetic_config is not None:
        model, tokenizer, name = load(synthetic=args.synthetic_config, device=args.device, dtype=args.dtype)
    else:
        model = load_model(args.model, args)
        tokenizer, name = tokenizer_for(model), args.model.rstrip("/").split("/")[-1]
    options = ServeOptions.from_fields(args)
    state = build_state(model, tokenizer, args.served_model_name or name, options)
    port = sock.getsockname()[1]
    server = make_server(state, args.host, port, options.grace_s)
    print(f"drex serve: {state.settings.model_name} on http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
    print(f"drex serve: policy {state.served.describe()}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.worker.stop()
        sock.close()
    print("drex serve: stopped", file=sys.stderr, flush=True)
    return 0
