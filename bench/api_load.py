"""API load benchmark: 16 concurrent httpx clients per endpoint; prints req/s and p50/p95/p99.

Run (builds the lake first when DATA_DIR has no events):

    python bench/api_load.py --data-dir /tmp/bench-lake --events 3000000 --seconds 10

It starts ``uvicorn api.app:app`` on a free port over DATA_DIR (or uses ``--url``), then hits
/health, /ad_events/latest, /campaigns/{id}/stats and /ad_events/by_campaign/{id}, each for
``--seconds``, with ``--clients`` concurrent clients keeping one request in flight each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from api.testing import running_server


def build_lake(data_dir: str, events: int, rate: int) -> None:
    """Generate ``events`` into the spool and land them with one ``consume --once``."""
    if any(Path(data_dir, "events").rglob("*.parquet")):
        return
    env = {**os.environ, "FSYNC": "false", "LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    started = time.perf_counter()
    gen = [*cli, "generate", "--data-dir", data_dir, "--events", str(events), "--rate", str(rate)]
    subprocess.run(gen, check=True, env=env)
    subprocess.run([*cli, "consume", "--once", "--data-dir", data_dir], check=True, env=env)
    print(f"built the lake in {time.perf_counter() - started:.0f}s", flush=True)


async def hammer(client: httpx.AsyncClient, path: str, seconds: float, clients: int) -> str:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            r = await client.get(path)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code >= 500

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return (
        f"{path[:60]:<60} {len(latencies) / wall:8.0f} req/s  "
        f"p50 {q[49] * 1000:7.1f} ms  p95 {q[94] * 1000:7.1f} ms  p99 {q[98] * 1000:7.1f} ms"
        f"  5xx {errors}"
    )


async def run(url: str, seconds: float, clients: int) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        latest = (await client.get("/ad_events/latest?limit=1")).json()
        print(f"lake: {latest['total_count']:,} events", flush=True)
        top = (await client.get("/campaigns/top?metric=spend&limit=1")).json()["campaigns"]
        campaign = top[0]["campaign_id"] if top else "cmp-00001"
        for path in [
            "/health",
            "/ad_events/latest?limit=100",
            f"/campaigns/{campaign}/stats?granularity=hour",
            f"/ad_events/by_campaign/{campaign}?limit=100",
        ]:
            await client.get(path)  # warm up caches
            print(await hammer(client, path, seconds, clients), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/tmp/adevents-bench")
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument(
        "--rate", type=int, default=0, help="generator rate when building (0 = max)"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.seconds, args.clients))
        return 0
    build_lake(args.data_dir, args.events, args.rate)
    with running_server(args.data_dir, Path(args.data_dir) / "bench-server.log") as url:
        asyncio.run(run(url, args.seconds, args.clients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
