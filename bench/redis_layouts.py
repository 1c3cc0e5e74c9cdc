"""Redis key cache: module tables against Lua bucket sets, side by side on one Redis (issue 12).

    python bench/redis_layouts.py --preload 30000000 --keys 2000000 --batch 100000 --rounds 2
    python bench/redis_layouts.py redis://127.0.0.1:6400/0 --keys 2000000   # a Redis with the
                                                                           # module loaded

Without a URL it builds ``redis_module`` (make) and starts a private redis-server with
``--loadmodule`` on a free port (no persistence), so no other client's work lands in its CPU
figures. Each round runs each layout in turn on that one server, under a fresh key prefix: loads
``--preload`` keys into the generation (as a rebuild does, not timed: a generation of an hour at
50k events/s holds 180M keys, and a table or a bucket costs what it costs when it is full), then
claims ``--keys`` fresh keys in batches of ``--batch`` (event times at 50k events/s after the
preloaded ones, window-long generations: sized as in production), then claims them all again
(every key a duplicate). Reported per layout and phase: Redis CPU µs per claimed key
(``INFO cpu``, user + sys, deltas), claim keys/s (wall, client included), and bytes per key
held (``used_memory`` growth over preload and fresh claims, claim records dropped). The keys are
removed after each run.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from keycache_shards import WINDOW_MS, batch_keys  # the same keys as the shard bench

from pipeline import redis_tables
from pipeline.fingerprint import empty_keys
from pipeline.redis_cache import LAYOUT, RedisKeyCache

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {"lua-sets": LAYOUT, "module-tables": redis_tables.LAYOUT}


def cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def used_memory(client: redis.Redis) -> int:
    """Bytes in use once the background frees of earlier runs' keys (UNLINK) are done."""
    while int(client.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.05)
    info = client.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def run(
    url: str, layout: str, *, keys: int, size: int, preload: int, seed: int
) -> dict[str, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    cache = RedisKeyCache.from_url(
        url, prefix=prefix, window_ms=WINDOW_MS, slice_ms=WINDOW_MS, layout=layout
    )
    cache.rebuild(empty_keys(), None)
    memory0 = used_memory(client)
    chunk = 1_000_000
    for i in range(preload // chunk):  # keys 0 .. preload: the generation's earlier events
        k = batch_keys(i, chunk, seed + 1_000)
        cache.restore(f"preload{i}", k, int(k.ms.max()) if k.ms is not None else None)
    first = preload // chunk * chunk // size
    batches = [batch_keys(first + i, size, seed) for i in range(keys // size)]
    claimed = len(batches) * size
    result: dict[str, float] = {}
    for phase, expect_new in (("fresh", True), ("again", False)):
        cpu0, started = cpu_seconds(client), time.perf_counter()
        for i, k in enumerate(batches):
            won = cache.claim(f"{phase}{i}", k)
            assert won.all() if expect_new else not won.any()
            cache.finish(f"{phase}{i}", int(k.ms.max()) if k.ms is not None else None)
        wall = time.perf_counter() - started
        result[f"{phase}_cpu_us_per_key"] = (cpu_seconds(client) - cpu0) / claimed * 1e6
        result[f"{phase}_keys_per_s"] = claimed / wall
        if phase == "fresh":
            held = claimed + preload // chunk * chunk
            result["bytes_per_key"] = (used_memory(client) - memory0) / held
    assert cache.stats().keys == held
    cache._unlink_matching(f"{prefix}:*")
    cache.close()
    client.close()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def module_server() -> Iterator[str]:
    """A private redis-server with the module loaded; its URL."""
    subprocess.run(["make", "-s", "-C", str(REPO / "redis_module")], check=True)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH")
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        module = REPO / "redis_module" / "adevents_keys.so"
        proc = subprocess.Popen(
            ["redis-server", *args, "--dir", work, "--loadmodule", str(module)],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


@contextmanager
def given(url: str) -> Iterator[str]:
    yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="a Redis with the adevents module loaded")
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--preload", type=int, default=0, help="a multiple of 1M")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="default: both"
    )
    args = parser.parse_args()
    with given(args.url) if args.url else module_server() as url:
        print(
            "round | layout | preloaded | claimed | fresh: Redis CPU µs/key | keys/s | "
            "again: Redis CPU µs/key | keys/s | bytes/key"
        )
        for rnd in range(args.rounds):
            for name in args.layouts:
                layout = LAYOUTS[name]
                r = run(
                    url, layout, keys=args.keys, size=args.batch, preload=args.preload, seed=rnd
                )
                print(
                    f"{rnd} | {name} | {args.preload:,} | {args.keys:,} | "
                    f"{r['fresh_cpu_us_per_key']:.3f} | "
                    f"{r['fresh_keys_per_s']:,.0f} | {r['again_cpu_us_per_key']:.3f} | "
                    f"{r['again_keys_per_s']:,.0f} | {r['bytes_per_key']:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
