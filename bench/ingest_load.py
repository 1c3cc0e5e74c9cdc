"""HTTP ingest benchmark: concurrent POST /ad_events from this process to a uvicorn server.

Run (starts ``uvicorn api.app:app`` over a scratch DATA_DIR, one worker, fsync on):

    python bench/ingest_load.py --format arrow --events-per-request 10000 --seconds 10
    python bench/ingest_load.py --format json --events-per-request 1000 --seconds 10

Bodies are realistic generator batches (Zipf campaigns, funnel, prices) in the contract's plain
types, built before the clock starts; ``--clients`` coroutines keep one request in flight each.
Every answer must be 202 with every event accepted. A drain thread deletes spool files as a
consumer would, so the disk does not fill and the backlog bound is never hit. Prints events/s,
requests/s, latency percentiles, spool files written and the server's CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

from api.ingest_testing import body_of, start_server
from generator import model
from pipeline.decode import ARROW_STREAM, JSON, NDJSON
from pipeline.normalize import normalize
from pipeline.spool import list_incoming

KEY = "bench-key"
MEDIA = {"arrow": ARROW_STREAM, "json": JSON, "ndjson": NDJSON}


def build_bodies(media: str, events: int, count: int, seed: int = 1) -> list[bytes]:
    """``count`` bodies of ``events`` distinct, valid, recent events each."""
    rng = np.random.default_rng(seed)
    campaigns = model.build_campaigns(rng, 1000)
    population = model.build_population(rng, model.campaign_ids(campaigns))
    now = int(time.time() * 1000)
    bodies = []
    for i in range(count):
        spec = model.BatchSpec(b"bench-", i * events, events, now - 60_000, now, 0.0)
        frame = model.generate_batch(rng, population, spec).frame
        table: pa.Table = normalize(model.to_spool_table(frame, population))[0]
        bodies.append(body_of(table, media))
    return bodies


def drain(incoming: Path, stop: threading.Event, counted: list[int]) -> None:
    """Delete spool files as a consumer would; count them."""
    while not stop.wait(0.5):
        for path in list_incoming(incoming):
            path.unlink(missing_ok=True)
            counted[0] += 1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    url: str, media: str, bodies: list[bytes], *, events: int, seconds: float, clients: int
) -> dict[str, float]:
    latencies: list[float] = []
    accepted = 0
    failures: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": media, "x-api-key": KEY}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as c:
        await c.post("/ad_events", content=bodies[0])  # warm up

        async def worker(k: int) -> None:
            nonlocal accepted
            i = k
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await c.post("/ad_events", content=bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t)
                i += clients
                if r.status_code == 202 and r.json()["accepted"] == events:
                    accepted += events
                else:
                    key = f"{r.status_code}"
                    failures[key] = failures.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "events_per_s": accepted / wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": q[49] * 1000,
        "p95_ms": q[94] * 1000,
        "p99_ms": q[98] * 1000,
        "wall_s": wall,
        "failures": float(sum(failures.values())),
        **{f"status_{k}": float(v) for k, v in failures.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=sorted(MEDIA), default="arrow")
    parser.add_argument("--events-per-request", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bodies", type=int, default=16, help="distinct bodies to cycle through")
    parser.add_argument("--batch-interval", default="100ms", help="server's BATCH_INTERVAL")
    parser.add_argument("--url", help="use this server (its INGEST_API_KEYS must hold bench-key)")
    parser.add_argument("--data-dir", help="server DATA_DIR (default: a temporary directory)")
    args = parser.parse_args(argv)
    media = MEDIA[args.format]
    events = args.events_per_request or (10_000 if args.format == "arrow" else 1_000)
    bodies = build_bodies(media, events, args.bodies)
    size = sum(map(len, bodies)) / len(bodies)
    print(
        f"{args.format}: {events} events per request, {size / 1024:.0f} KiB per body, "
        f"{args.clients} clients, {args.seconds:.0f} s",
        flush=True,
    )
    if args.url:
        result = asyncio.run(
            load(args.url, media, bodies, events=events, seconds=args.seconds, clients=args.clients)
        )
        print(" ".join(f"{k}={v:,.1f}" for k, v in result.items()))
        return 0
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch:
        data_dir = Path(args.data_dir or scratch)
        env = {
            "INGEST_API_KEYS": KEY,
            "BATCH_INTERVAL": args.batch_interval,
            "MAX_BACKLOG_EVENTS": "1000000000",
        }
        server = start_server(str(data_dir), Path(scratch) / "server.log", env)
        stop, files = threading.Event(), [0]
        drainer = threading.Thread(target=drain, args=(data_dir / "incoming", stop, files))
        drainer.start()
        try:
            cpu0 = cpu_seconds(server.proc.pid)
            result = asyncio.run(
                load(
                    server.url,
                    media,
                    bodies,
                    events=events,
                    seconds=args.seconds,
                    clients=args.clients,
                )
            )
            cpu = cpu_seconds(server.proc.pid) - cpu0
        finally:
            server.stop()
            stop.set()
            drainer.join()
        files[0] += len(list_incoming(data_dir / "incoming"))
        result["server_cpu_pct"] = 100 * cpu / result["wall_s"]
        result["spool_files"] = float(files[0])
        print(" ".join(f"{k}={v:,.1f}" for k, v in result.items()))
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
