"""API load benchmark: concurrent keep-alive clients per endpoint; req/s and p50/p95/p99 each.

Run (builds the lake first when DATA_DIR has no events; ``--prepare`` then compacts closed hours
and brings the rollups up to date, as the scheduled jobs would):

    python bench/api_load.py --data-dir /tmp/bench-lake --events 50000000 --prepare \\
        --workers 2 --processes 2 --clients 16 --seconds 15

It starts ``adevents serve`` (uvicorn, ``--workers`` processes) on a free port over DATA_DIR (or
uses ``--url``), then hits /health, /ad_events/latest, /campaigns/{id}/stats and
/ad_events/by_campaign/{id}, each for ``--seconds``, with ``--clients`` concurrent clients (spread
over ``--processes`` load processes) each keeping one request in flight on its own connection.
``--campaigns N`` rotates the campaign over the top N; ``--vary`` makes every stats and
by_campaign request a different question (a unique ``until``), so none is answered from the
API's memory of an unchanged lake: the cost of real query work. The first ``until`` is a minute
from now (after every event: the newest events, in the current hour) unless ``--until-at`` puts
it elsewhere, e.g. inside an hour the compaction job has clustered:

    python bench/api_load.py --data-dir /tmp/bench-lake --workers 2 --processes 2 --clients 16 \\
        --seconds 10 --campaigns 100 --vary --until-at 2026-12-03T12:58:00Z
The clients speak minimal HTTP/1.1 over asyncio streams, so that the load generator costs far
less CPU per request than the server: on a small machine an httpx client saturates first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from api.testing import free_port

CLI = [sys.executable, "-m", "cli"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "FSYNC": "false", "LOG_LEVEL": "WARNING", **extra}


def build_lake(data_dir: str, events: int, rate: int) -> None:
    """Generate ``events`` into the spool and land them with one ``consume --once`` (unless the
    lake at the default LAKE_URI, DATA_DIR/lake, already has an events table)."""
    if Path(data_dir, "lake", "events", "_delta_log").is_dir():
        return
    env = _env(MAX_EVENTS_PER_SECOND="0")
    started = time.perf_counter()
    gen = [*CLI, "generate", "--data-dir", data_dir, "--events", str(events), "--rate", str(rate)]
    subprocess.run(gen, check=True, env=env)
    subprocess.run([*CLI, "consume", "--once", "--data-dir", data_dir], check=True, env=env)
    print(f"built the lake in {time.perf_counter() - started:.0f}s", flush=True)


def prepare(data_dir: str) -> None:
    """What the scheduler does in production: compact closed hours, then roll up."""
    env = _env(COMPACT_MIN_AGE="0")
    for job in ("compact", "rollup"):
        started = time.perf_counter()
        done = subprocess.run(
            [*CLI, job, "--once", "--data-dir", data_dir],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        print(f"{done.stdout.strip()} ({time.perf_counter() - started:.1f}s)", flush=True)


@contextmanager
def server(data_dir: str, workers: int, log: Path) -> Iterator[str]:
    """``adevents serve --workers N`` over ``data_dir``; its URL once it answers."""
    port = free_port()
    argv = [*CLI, "serve", "--data-dir", data_dir, "--port", str(port), "--workers", str(workers)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_probe(url)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start: {log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- a minimal HTTP/1.1 keep-alive client --------------------------------------------------------
class Connection:
    """One keep-alive connection; ``get`` returns (status, body). Content-Length bodies only."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise RuntimeError("chunked responses are not supported by this client")
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def _probe(url: str) -> int | None:
    u = urlsplit(url)
    conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
    try:
        status, _ = await conn.get("/docs/openapi.json")
        return status
    except OSError:
        return None
    finally:
        conn.close()


async def _fetch(url: str, path: str) -> object:
    u = urlsplit(url)
    conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
    try:
        status, body = await conn.get(path)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    return json.loads(body)


class Paths:
    """The path of each request: ``template`` with ``{campaign}`` taken in turn from
    ``campaigns`` and ``{until}`` a different instant (epoch ms) for every request, so that no
    two requests ask the same question (nothing can be answered from memory): load process
    ``salt`` of ``stride`` takes every ``stride``-th millisecond from ``base`` on."""

    def __init__(
        self, template: str, campaigns: list[str], salt: int, base: int, stride: int
    ) -> None:
        self.template, self.campaigns = template, campaigns
        self.n = 0
        self.base, self.salt, self.stride = base, salt, stride

    def next(self) -> str:
        self.n += 1
        campaign = self.campaigns[self.n % len(self.campaigns)]
        until = self.base + self.n * self.stride + self.salt
        return self.template.format(campaign=campaign, until=until)


@dataclass(frozen=True)
class Load:
    """What to request, from where, for how long."""

    url: str
    template: str
    campaigns: list[str]
    seconds: float
    #: The first ``until`` (epoch ms) and how many load processes share the instants after it.
    until_ms: int = 0
    processes: int = 1


async def _clients(load: Load, clients: int, salt: int) -> tuple[list[float], int]:
    """``clients`` connections, each with one request in flight, for ``load.seconds``."""
    u = urlsplit(load.url)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + load.seconds
    paths = Paths(load.template, load.campaigns, salt, load.until_ms, load.processes)

    async def worker() -> None:
        nonlocal errors
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        try:
            while time.perf_counter() < deadline:
                path = paths.next()
                t = time.perf_counter()
                status, _ = await conn.get(path)
                latencies.append(time.perf_counter() - t)
                errors += status >= 500
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


def _load_process(load: Load, clients: int, salt: int) -> tuple[list[float], int]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio works too, a little slower
        pass
    return asyncio.run(_clients(load, clients, salt))


def hammer(load: Load, clients: int, processes: int) -> str:
    """Run ``load`` from ``processes`` processes sharing ``clients`` connections; one line."""
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    jobs = [(load, n, i) for i, n in enumerate(shares) if n > 0]
    started = time.perf_counter()
    if len(jobs) == 1:
        results = [_load_process(*jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
            results = pool.starmap(_load_process, jobs)
    wall = time.perf_counter() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = sum(e for _, e in results)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    name = load.template.format(campaign=f"<{len(load.campaigns)} campaigns>", until="<unique>")
    return (
        f"{name[:66]:<66} {len(latencies) / wall:7.0f} req/s  "
        f"p50 {q[49] * 1000:6.1f} ms  p95 {q[94] * 1000:6.1f} ms  p99 {q[98] * 1000:6.1f} ms"
        f"  n {len(latencies):6d}  5xx {errors}"
    )


def run(
    url: str,
    seconds: float,
    clients: int,
    processes: int,
    *,
    campaigns: int = 1,
    vary: bool = False,
    only: list[str] | None = None,
    until_ms: int | None = None,
) -> None:
    latest = asyncio.run(_fetch(url, "/ad_events/latest?limit=1"))
    assert isinstance(latest, dict)
    print(f"lake: {latest['total_count']:,} events", flush=True)
    top = asyncio.run(_fetch(url, f"/campaigns/top?metric=spend&limit={campaigns}"))
    assert isinstance(top, dict)
    ids = [c["campaign_id"] for c in top["campaigns"]] or ["cmp-00001"]
    until = "&until={until}" if vary else ""
    templates = [
        "/health",
        "/ad_events/latest?limit=100",
        f"/campaigns/{{campaign}}/stats?granularity=hour{until}",
        f"/ad_events/by_campaign/{{campaign}}?limit=100{until}",
    ]
    first = int(time.time() * 1000) + 60_000 if until_ms is None else until_ms
    if vary:
        print(f"until from {datetime.fromtimestamp(first / 1000, UTC):%Y-%m-%dT%H:%M:%S.%fZ}")
    for template in templates:
        if only and not any(word in template for word in only):
            continue
        # Warm every worker first (its connections, DuckDB's footer cache), on instants before
        # the measured ones (other questions, mostly of the same files).
        warm = Load(url, template, ids, min(2.0, seconds), first - 100_000, processes)
        hammer(warm, clients, processes)
        load = Load(url, template, ids, seconds, first, processes)
        print(hammer(load, clients, processes), flush=True)


def _instant(text: str) -> int:
    """Epoch ms of ``text``: epoch ms, or an ISO date-time (UTC when it has no zone)."""
    if text.isdigit():
        return int(text)
    parsed = datetime.fromisoformat(text)
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp() * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", default="/tmp/adevents-bench")
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument(
        "--rate", type=int, default=0, help="generator rate when building (0 = max)"
    )
    parser.add_argument(
        "--prepare", action="store_true", help="compact closed hours and roll up before the load"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--campaigns", type=int, default=1, help="stats/by_campaign rotate over the top N (1)"
    )
    parser.add_argument(
        "--vary",
        action="store_true",
        help="a different until= on every stats/by_campaign request: no answer from memory",
    )
    parser.add_argument(
        "--until-at",
        help="first until= of --vary: epoch ms or an ISO date-time (default: a minute from now)",
    )
    parser.add_argument("--only", nargs="*", help="only endpoints whose path has one of these")
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    args = parser.parse_args()
    until_ms = None if args.until_at is None else _instant(args.until_at)
    load = {"campaigns": args.campaigns, "vary": args.vary, "only": args.only, "until_ms": until_ms}
    if args.url:
        run(args.url, args.seconds, args.clients, args.processes, **load)
        return 0
    build_lake(args.data_dir, args.events, args.rate)
    if args.prepare:
        prepare(args.data_dir)
    log = Path(args.data_dir) / "bench-server.log"
    with server(args.data_dir, args.workers, log) as url:
        print(f"server: {args.workers} worker(s); load: {args.processes} process(es)", flush=True)
        run(url, args.seconds, args.clients, args.processes, **load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
