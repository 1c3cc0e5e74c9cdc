"""Key-cache memory and claim throughput on one Redis server versus a Redis Cluster.

    python bench/keycache_shards.py redis://127.0.0.1:6379/0 redis+cluster://127.0.0.1:7000 \
        --keys 5000000 --batch 100000 --clients 1 2

For each URL and client count: claims ``--keys`` fresh keys in batches of ``--batch`` (event
times at 50k events/s, so generations are sized as in production), split over that many client
processes; then reports claim keys/s (wall), Redis CPU seconds per million keys (summed over
every server: what one Redis core can sustain is 1e6 / that), and bytes per key (used_memory
growth over every server, claim records dropped). Each run uses its own key prefix and removes
its keys afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import uuid

import numpy as np

from pipeline.fingerprint import Keys, empty_keys
from pipeline.redis_cache import RedisKeyCache

WINDOW_MS = 3600 * 1000
GENERATION_MS = WINDOW_MS  # the default: DEDUPE_SLICE 0
DENSITY = 50_000  # events per second of event time


def batch_keys(index: int, size: int, seed: int) -> Keys:
    rng = np.random.default_rng([seed, index])
    start = index * size * 1000 // DENSITY
    ms = start + np.arange(size, dtype=np.int64) * 1000 // DENSITY
    hi = rng.integers(0, 2**64, size, dtype=np.uint64)
    lo = rng.integers(0, 2**64, size, dtype=np.uint64)
    return Keys(ms // GENERATION_MS, hi, lo, ms)


def open_cache(url: str, prefix: str) -> RedisKeyCache:
    return RedisKeyCache.from_url(url, prefix=prefix, window_ms=WINDOW_MS, slice_ms=GENERATION_MS)


def client(url: str, prefix: str, batches: list[int], size: int, out: mp.Queue[float]) -> None:
    cache = open_cache(url, prefix)
    assert not cache.needs_rebuild()
    keys = [batch_keys(i, size, seed=1) for i in batches]
    started = time.perf_counter()
    for i, k in zip(batches, keys, strict=True):
        won = cache.claim(f"b{i}", k)
        assert won.all()
        cache.finish(f"b{i}", int(k.ms.max()) if k.ms is not None else None)
    out.put(time.perf_counter() - started)
    cache.close()


def cpu_seconds(cache: RedisKeyCache) -> float:
    total = 0.0
    for server in cache._servers():
        info = server.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def run(url: str, keys: int, size: int, clients: int) -> dict[str, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    cache = open_cache(url, prefix)
    cache.rebuild(empty_keys(), None)
    n_batches = keys // size
    memory0, cpu0 = cache.memory_used(), cpu_seconds(cache)
    ctx = mp.get_context("spawn")  # Polars' thread pool does not survive fork()
    queue: mp.Queue[float] = ctx.Queue()
    procs = [
        ctx.Process(
            target=client, args=(url, prefix, list(range(c, n_batches, clients)), size, queue)
        )
        for c in range(clients)
    ]
    started = time.perf_counter()
    for p in procs:
        p.start()
    times = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    wall = time.perf_counter() - started
    claimed = n_batches * size
    result = {
        "keys": claimed,
        "claim_keys_per_s": claimed / max(times),
        "wall_keys_per_s": claimed / wall,
        "redis_cpu_s_per_million": (cpu_seconds(cache) - cpu0) / claimed * 1e6,
        "bytes_per_key": (cache.memory_used() - memory0) / claimed,
        "servers": len(cache._servers()),
    }
    stats = cache.stats()
    assert stats.keys == claimed, stats
    cache._unlink_matching(f"{prefix}:*")
    cache.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--keys", type=int, default=5_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    print("url | servers | clients | keys | claim keys/s | Redis CPU s per 1M keys | bytes/key")
    for url in args.urls:
        for clients in args.clients:
            r = run(url, args.keys, args.batch, clients)
            line = (
                f"{url} | {r['servers']:.0f} | {clients} | {r['keys']:,.0f} | "
                f"{r['claim_keys_per_s']:,.0f} | {r['redis_cpu_s_per_million']:.2f} | "
                f"{r['bytes_per_key']:.1f}"
            )
            print(line, flush=True)


if __name__ == "__main__":
    main()
