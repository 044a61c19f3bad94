"""Soak `drex serve` on Ray Serve: the soak's seeded schedule of streamed requests sent through Ray's
HTTP proxy to `--replicas` replicas of the tiny synthetic model, counted as benchmarks/soak.py counts.

    python benchmarks/ray_soak.py --requests 1000 --out runs/ray-soak

The script starts a local Ray instance (every Ray port on 127.0.0.1; dashboard off), Serve's proxy
on a free loopback port and the application of drex_hf/cli/ray_serve.py, then sends soak.py's
schedule (Poisson arrivals at `--rate`, prompts of 1-200 token ids, `max_tokens` 1-64, `--cancel-frac`
closed by the client after 1-3 chunks, half sampled, all streamed with `return_exit_layers`) through
an httpx.AsyncClient. It checks what soak.py checks, with soak.py's own code: nothing lost, nothing
duplicated, every finished greedy response and `--check-sampled` sampled ones equal to an offline
`DrexEngine` (`--check-decoder` of them also to the reference decoder); and per replica (its
`/metrics`, told apart by the `x-drex-replica` header): idle once all requests have ended, and the
requests that left its engine adding up to the schedule. It reports how the requests spread over
the replicas, time to first token and per output token, and throughput. Ray is shut down at the end,
also on failure. Writes ray-soak.json and ray-soak.md to `--out`; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (benchmarks/soak.py: schedule, client, checks)

ROOT = Path(__file__).resolve().parents[1]
APP = "drex"


# ---------------------------------------------------------------------- Ray
def ray_environment(threads: int) -> None:
    """What this process and the Ray processes it starts must see, set before `import ray` (Ray reads
    the first when imported): a Ray that is not a cluster takes 127.0.0.1 as its node address and
    every process it starts listens there; one torch thread per replica, as the references; this
    checkout's drex_hf."""
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )


def start_ray(args: argparse.Namespace, temp: str) -> str:
    """A local Ray, Serve's proxy on a free loopback port and the drex application; the base URL."""
    import ray
    from ray import serve

    from drex_hf.cli.ray_serve import app

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":
        raise RuntimeError(f"Ray's node address is {node}, not 127.0.0.1: it would listen beyond this machine")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = {
        "synthetic_config": args.shape,
        "num_replicas": args.replicas,
        "num_cpus": args.ray_cpus / (args.replicas + 1),  # logical: room for a replacement replica
        "torch_threads": args.threads,
        "max_batch": args.max_batch,
        "max_len": args.max_len,
        "max_queue": args.max_queue,
        "policy": args.policy,
    }
    serve.run(app(options), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_ray() -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------- the client
async def per_replica_metrics(client: httpx.AsyncClient, url: str, replicas: int, tries: int = 200) -> dict:
    """{replica: its /metrics samples}: /metrics goes to whichever replica Ray picks; ask until each answered."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(tries):
        response = await client.get(url + "/metrics")
        seen[response.headers.get("x-drex-replica", "?")] = soak.gauges(response.text)
        if len(seen) >= replicas:
            break
    return seen


async def wait_idle(client: httpx.AsyncClient, url: str, replicas: int, within_s: float = 10.0) -> dict:
    """Every replica's /metrics once they settle (no row running, nothing queued), or after `within_s`."""
    end = time.monotonic() + within_s
    while True:
        seen = await per_replica_metrics(client, url, replicas)
        busy = any(g["drex_running_requests"] or g["drex_queue_depth"] for g in seen.values())
        if (len(seen) >= replicas and not busy) or time.monotonic() > end:
            return seen
        await asyncio.sleep(0.1)


async def drive(args: argparse.Namespace, url: str, model: str, plans: list[soak.Plan]) -> dict[str, Any]:
    """Send the schedule as soak.py does (at most --concurrency in flight); the outcomes and each replica's metrics."""
    outcomes: dict[int, soak.Outcome] = {}
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    every = max(1, min(1000, len(plans) // 10))
    done = [0]
    t0 = time.perf_counter()

    async def one(client: httpx.AsyncClient, plan: soak.Plan) -> None:
        try:
            outcomes[plan.index] = await soak.send(client, url, model, plan, t0)
        finally:
            gate.release()
            done[0] += 1
            if done[0] % every == 0 or done[0] == len(plans):
                elapsed = time.perf_counter() - t0
                bad = sum(1 for o in outcomes.values() if not (o.finished or o.cancelled))
                print(f"ray soak: {done[0]}/{len(plans)} requests, {elapsed:.1f} s, {done[0] / elapsed:.1f} req/s, "
                      f"{bad} lost", file=sys.stderr, flush=True)  # fmt: skip

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, httpx.AsyncClient(timeout=10) as side:
        timed_out = await soak.dispatch_schedule(plans, t0, gate, lambda plan: one(client, plan), args.timeout_s)
        wall = time.perf_counter() - t0
        replicas = await wait_idle(side, url, args.replicas)
    generated = sum(g.get("drex_generation_tokens_total", math.nan) for g in replicas.values())
    return {"outcomes": outcomes, "wall_s": wall, "timed_out": timed_out, "replicas": replicas,
            "metrics": {"drex_generation_tokens_total": generated}}  # fmt: skip


# ---------------------------------------------------------------------- report
def summary(run: dict[str, Any], checks: dict[str, Any], args: argparse.Namespace) -> dict:
    outcomes = run["outcomes"]
    spread = Counter(o.replica for o in outcomes.values() if o.status == 200)
    per_replica = {}
    for replica, g in run["replicas"].items():
        left = {k.split("=")[1].rstrip("}"): v for k, v in g.items() if k.startswith("drex_requests_finished_total{")}
        per_replica[replica] = {"running": g["drex_running_requests"], "queue": g["drex_queue_depth"],
                                "left_engine": sum(left.values()), "finished_by_reason": left,
                                "answered": spread.get(replica, 0)}  # fmt: skip
    failures = []
    if run["timed_out"]:
        failures.append(f"the schedule did not finish within --timeout-s {args.timeout_s:g}")
    for name in ("lost", "duplicated", "mismatches"):
        if checks[name]:
            failures.append(f"{checks[name]} {name}")
    if checks["decoder_mismatches"]:
        failures.append(f"{len(checks['decoder_mismatches'])} engine references differ from the reference decoder")
    if len(per_replica) != args.replicas:
        failures.append(f"{len(per_replica)} replicas answered /metrics, not {args.replicas}")
    if any(r["running"] or r["queue"] for r in per_replica.values()):
        failures.append(f"a replica is not idle after the run: {per_replica}")
    left_engine = sum(r["left_engine"] for r in per_replica.values())
    if left_engine != args.requests:
        failures.append(f"the replicas counted {left_engine:g} requests leaving their engines, not {args.requests}")
    if len([r for r in spread if r is not None]) < args.replicas:
        failures.append(f"the requests did not reach every replica: {dict(spread)}")
    return {"ok": not failures, "failures": failures, "replicas": per_replica}


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray-soak.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    c, lat, a, reps = report["checks"], report["latency"], report["args"], report["replicas"]
    spread = ", ".join(f"{r}: {v['answered']}" for r, v in sorted(reps.items()))
    rows = [
        soak.sent_row(a),
        ("replicas", f"{a['replicas']} (max batch {a['max_batch']} each, one torch thread) behind Ray's HTTP proxy"),
        ("answered per replica", spread),
        *soak.check_rows(c),
        (
            "after the run, per replica",
            "; ".join(
                f"{r}: {v['running']:g} running, {v['queue']:g} queued, {v['left_engine']:g} left its engine "
                f"({v['finished_by_reason'].get('cancelled', 0):g} cancelled)"
                for r, v in sorted(reps.items())
            ),
        ),
        *soak.latency_rows(lat),
        ("429s retried", str(lat["retries_429"])),
        (
            "wall",
            f"{lat['wall_s']} s of requests (+ {report['startup_s']} s starting Ray and the replicas, "
            f"{c['reference_engine_s']} s offline engine, {c['reference_decoder_s']} s decoder)",
        ),
    ]
    title = f"Soak: drex serve on Ray Serve, {a['replicas']} replicas of synthetic `{a['shape']}`"
    soak.write_markdown(out / "ray-soak.md", title, report, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak drex serve on Ray Serve (local Ray, loopback only) and check what came back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=1000, help="requests to send")
    p.add_argument("--rate", type=float, default=20.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule (prompts, lengths, sampling, cancels)")
    p.add_argument("--cancel-frac", type=float, default=0.1, help="share of streams the client closes after 1-3 chunks")
    p.add_argument("--concurrency", type=int, default=48, help="requests in flight at most (httpx connections)")
    p.add_argument("--check-sampled", type=int, default=200, help="sampled responses compared with their reference")
    p.add_argument("--check-decoder", type=int, default=50, help="checked ones also decoded by generate_reference")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit on sending the whole schedule")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="client read timeout per request")
    p.add_argument("--shape", default="tiny", help="synthetic model shape the replicas serve")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas, one engine each")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs the local Ray instance offers (logical)")
    p.add_argument("--max-batch", type=int, default=8, help="engine slots per replica")
    p.add_argument("--max-len", type=int, default=soak.MAX_PROMPT + soak.MAX_TOKENS, help="positions per slot")
    p.add_argument("--max-queue", type=int, default=64, help="replica queue bound (past it: 429, retried)")
    p.add_argument("--policy", default="drex", help="replica scheduling policy")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica and of the offline references")
    p.add_argument("--reference-batch", type=int, default=32, help="rows of the offline reference engine")
    p.add_argument("--out", type=Path, default=Path("runs/ray-soak"), help="folder for ray-soak.json and ray-soak.md")
    args = p.parse_args(argv)
    for name in ("requests", "rate", "concurrency", "timeout_s", "replicas", "ray_cpus", "max_batch", "threads"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.cancel_frac <= 1:
        p.error(f"--cancel-frac must be in [0, 1], got {args.cancel_frac}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_environment(args.threads)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("ray_soak.py needs Ray Serve: pip install 'drex-hf[ray]'", file=sys.stderr)
        return 2
    command = "python benchmarks/ray_soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plans = soak.schedule(args.requests, args.rate, args.seed, args.cancel_frac)
    temp = tempfile.mkdtemp(prefix="drexray")  # short: Ray puts unix sockets under it
    t = time.perf_counter()
    try:
        url = start_ray(args, temp)
        startup = time.perf_counter() - t
        run = asyncio.run(drive(args, url, f"synthetic-{args.shape}", plans))
    finally:
        stop_ray()
        shutil.rmtree(temp, ignore_errors=True)
    import torch

    torch.set_num_threads(args.threads)  # as the replicas': the same reductions, the same tokens
    checks = soak.check(plans, run, args)
    verdict = summary(run, checks, args)
    report = {
        "command": command,
        **verdict,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "startup_s": round(startup, 1),
        "checks": checks,
        "latency": soak.latency(run, plans),
        "outcomes_head": [asdict(run["outcomes"][i]) for i in sorted(run["outcomes"])[:5]],
    }
    write(args.out, report)
    print(
        f"ray soak: {'PASS' if report['ok'] else 'FAIL: ' + '; '.join(report['failures'])} -> "
        f"{args.out / 'ray-soak.md'}",
        file=sys.stderr,
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
