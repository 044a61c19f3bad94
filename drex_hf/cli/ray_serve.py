"""Replicas of `drex serve` on Ray Serve, behind Ray's HTTP proxy: an application builder for
`serve run` / `serve deploy`.

    serve run drex_hf.cli.ray_serve:app synthetic_config=tiny num_replicas=2
    serve run drex_hf.cli.ray_serve:app model=path/to/heads num_replicas=4 num_gpus=1

Each `key=value` is a field of `RayServeArgs` (`python -m drex_hf.cli.ray_serve --help` lists them
with their defaults): the model and `drex serve`'s options, then how Ray places the replicas. The
builder checks them on the machine that runs `serve run`; each replica then loads the model with
`drex_hf.cli.serve.load` (passed to it, so drex_hf.serve never imports the command line) and serves
the routes of `drex serve` (drex_hf/serve/ray_app.py). Needs the `ray` extra.
"""

# no `from __future__ import annotations`: Ray reads the builder's parameter annotation as a class
# to turn `serve run`'s key=value strings into a checked RayServeArgs

import functools
import math
import sys
from pathlib import Path
from typing import Any, Literal

from drex_hf.config import CONFIDENCE_MEASURES, DRAFT_SOURCES, HEAD_TYPES
from drex_hf.errors import ConfigError
from drex_hf.generation.scheduler import POLICY_NAMES

RAY_EXTRA = "pip install 'drex-hf[ray]'"

try:  # pydantic comes with ray[serve] (and fastapi)
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        NonNegativeFloat,
        PositiveFloat,
        PositiveInt,
        field_validator,
        model_validator,
    )
except ImportError:
    raise ConfigError(f"Ray Serve replicas need the ray extra (pydantic is missing): {RAY_EXTRA}") from None


class RayServeArgs(BaseModel):
    """The application's arguments (`serve run ... key=value`, or `args:` in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    # the model, as `drex serve` takes it
    model: str | None = Field(None, description="exit-heads folder (on every node) or hub id; or synthetic_config")
    synthetic_config: str | None = Field(None, description="a random-weight shape (tiny, moderate, ...) for load tests")
    served_model_name: str | None = Field(None, description="the model id clients send (none: the folder name)")
    exit_layers: list[int] | None = Field(None, description="a base model: new, untrained heads after these layers")
    head: str | None = Field(None, description=f"head type for new heads: {', '.join(HEAD_TYPES)}")
    confidence: str | None = Field(None, description=f"confidence measure: {', '.join(CONFIDENCE_MEASURES)}")
    threshold: float | None = Field(None, description="one threshold for every exit, in [0, 1] or inf")
    device: str | None = Field(None, description="cpu, cuda, ... in each replica (none: cuda if the replica sees one)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on CUDA")
    # each replica's engine and routes (drex serve --help)
    max_batch: PositiveInt = Field(8, description="requests decoding at once per replica (engine slots)")
    max_len: PositiveInt = Field(1024, description="positions per slot: prompt + max_tokens")
    policy: str | None = Field(
        None,
        description=f"policy: {', '.join(POLICY_NAMES)} or self_spec (none: the card's calibrated choice for "
        f"the replica's device at max_batch rows, else drex)",
    )
    draft_source: str | None = Field(None, description=f"self_spec: {', '.join(DRAFT_SOURCES)} (none: the choice's)")
    draft_exit: int | None = Field(
        None, description="self_spec: the exit that drafts (none: the choice's, else the last)"
    )
    draft_tokens: PositiveInt | Literal["adaptive"] | None = Field(
        None, description="self_spec: drafts per round, or adaptive (none: the choice's, else 4)"
    )
    max_logprobs: int = Field(20, ge=0, le=20, description="the most top logprobs a request may ask for")
    sla_tpot_ms: PositiveFloat | None = Field(None, description="drex: target time per output token")
    max_queue: PositiveInt = Field(64, description="requests waiting in a replica before it answers 429")
    request_timeout_s: PositiveFloat = Field(600.0, description="per-request time limit")
    grace_s: PositiveFloat = Field(30.0, description="when Ray stops a replica: time its running requests get")
    max_body_bytes: PositiveInt = Field(1 << 20, description="larger request bodies get 413")
    torch_threads: PositiveInt | None = Field(
        None, description="torch threads per replica (none: Ray sets OMP_NUM_THREADS to num_cpus)"
    )
    # how Ray runs them (a config file's `deployments:` entry for `drex` overrides these)
    num_replicas: PositiveInt = Field(1, description="replicas, one engine each")
    num_cpus: NonNegativeFloat = Field(1.0, description="CPUs Ray reserves per replica")
    num_gpus: NonNegativeFloat = Field(0.0, description="GPUs Ray reserves per replica (1: one GPU each)")
    max_ongoing_requests: PositiveInt | None = Field(
        None, description="requests Ray routes to one replica at once (none: 2 x max_batch; the rest wait in Ray)"
    )
    health_check_period_s: PositiveFloat = Field(10.0, description="how often Ray checks each replica")

    @field_validator("exit_layers", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # serve run passes exit_layers=5,11 as text
            try:
                return [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"exit_layers is a comma-separated list of layer indices, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "RayServeArgs":
        from drex_hf.bench.synthetic import SHAPES

        if (self.model is None) == (self.synthetic_config is None):
            raise ValueError("give model=MODEL_DIR or synthetic_config=SHAPE (exactly one)")
        if self.synthetic_config is not None and self.synthetic_config not in SHAPES:
            raise ValueError(f"synthetic_config {self.synthetic_config!r} is not one of {', '.join(SHAPES)}")
        if self.policy is not None and self.policy not in (*POLICY_NAMES, "self_spec"):
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICY_NAMES)}, self_spec")
        if self.draft_source is not None and self.draft_source not in DRAFT_SOURCES:
            raise ValueError(f"draft_source {self.draft_source!r} is not one of {', '.join(DRAFT_SOURCES)}")
        if self.head is not None and self.head not in HEAD_TYPES:
            raise ValueError(f"head {self.head!r} is not one of {', '.join(HEAD_TYPES)}")
        if self.confidence is not None and self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence {self.confidence!r} is not one of {', '.join(CONFIDENCE_MEASURES)}")
        if self.threshold is not None and not (0 <= self.threshold <= 1 or self.threshold == math.inf):
            raise ValueError(f"threshold is in [0, 1] or inf, got {self.threshold}")
        return self


def app(args: RayServeArgs) -> Any:
    """The Ray Serve application (`serve run drex_hf.cli.ray_serve:app key=value ...`): `args`'
    replicas of the `drex` deployment, each loading the model and serving `drex serve`'s routes.
    Takes a RayServeArgs, or a dict of its fields (from Python: `serve.run(app({...}))`)."""
    if not isinstance(args, RayServeArgs):
        args = RayServeArgs.model_validate(args)
    try:
        from drex_hf.serve.ray_app import DrexReplica
    except ImportError as err:
        raise ConfigError(f"Ray Serve replicas need the ray extra ({err.name} is missing): {RAY_EXTRA}") from None
    from drex_hf.cli.serve import load
    from drex_hf.serve.server import ServeOptions

    options = ServeOptions.from_fields(args)
    model = args.model
    if model is not None and Path(model).exists():  # replicas need not start in this folder
        model = str(Path(model).resolve())
    loader = functools.partial(
        load,
        model,
        args.synthetic_config,
        args.device,
        args.dtype,
        exit_layers=args.exit_layers,
        head=args.head,
        confidence=args.confidence,
        threshold=args.threshold,
    )
    deployment = DrexReplica.options(
        num_replicas=args.num_replicas,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch,
        graceful_shutdown_timeout_s=args.grace_s + 10,  # the drain, then up to 5 s of cancelling
        health_check_period_s=args.health_check_period_s,
    )
    return deployment.bind(loader, options, args.served_model_name, args.torch_threads)


def usage() -> str:
    lines = [__doc__.strip().split("\n\n")[0], "", "usage: serve run drex_hf.cli.ray_serve:app [key=value ...]", ""]
    for name, field in RayServeArgs.model_fields.items():
        default = "none" if field.default is None else field.default
        lines.append(f"  {name:<22} {field.description} (default: {default})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(usage())
    sys.exit(0 if set(sys.argv[1:]) <= {"-h", "--help"} else 2)
