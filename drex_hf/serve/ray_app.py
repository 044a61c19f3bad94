"""Replicas of `drex serve` on Ray Serve: one engine per replica, the same OpenAI routes, behind Ray's
HTTP proxy.

Each replica builds what `drex serve` builds (`server.build_state`: the model, its engine thread,
metrics) and serves `app.create_app`'s FastAPI app through Ray (`serve.ingress` with the app built
in the replica), adding an `x-drex-replica` header that names the replica. Ray health-checks it
(`check_health` fails once the engine thread has died, and Ray replaces the replica) and drains it
as SIGTERM drains `drex serve`. The model comes from a `load` callable the application builder
passes in (drex_hf/cli/ray_serve.py), so this package never imports the command line. Needs the
`ray` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray import serve

from drex_hf.serve.app import create_app
from drex_hf.serve.server import ServeOptions, build_state, drain

logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-drex-replica"


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it (streams included;
    it only adds a header to `http.response.start` and passes the body through untouched)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment(name="drex")
@serve.ingress()
class DrexReplica:
    """One replica: a model, its engine thread and the `drex serve` routes.

    `load()` returns (model, tokenizer, served name), e.g. `functools.partial(drex_hf.cli.serve.load,
    synthetic="tiny")`; `options` are `drex serve`'s knobs; `torch_threads` sets torch's thread
    count in this replica before the model loads (None: leave it, Ray sets OMP_NUM_THREADS to the
    replica's num_cpus)."""

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any, str]],
        options: ServeOptions,
        served_model_name: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        model, tokenizer, name = load()
        self.options = options
        self.state = build_state(model, tokenizer, served_model_name or name, options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        logger.info("drex replica %s: %s ready", self.replica, self.state.settings.model_name)

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.state)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`; raising marks the replica unhealthy and Ray
        starts a new one."""
        if self.state.worker.failed:
            raise RuntimeError(f"drex replica {self.replica}: the engine thread failed")

    async def __del__(self) -> None:
        """Ray stops a replica (scale-down, redeploy, `serve shutdown`) after the requests it routed
        here have ended or `graceful_shutdown_timeout_s` has passed; drain what is left as `drex
        serve` does on SIGTERM, then stop the engine thread."""
        state = getattr(self, "state", None)
        if state is None:  # the constructor failed: nothing was started
            return
        await drain(state, self.options.grace_s)
        state.worker.stop()
