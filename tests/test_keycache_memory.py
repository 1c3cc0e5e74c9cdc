"""Memory stays bounded by the dedupe window, never by the volume: a long run of claims whose
event time moves on through many windows keeps each cache at (window + one generation) worth
of keys, and the process (or the Redis server) does not grow with the run.

Issue 12's shape for the embedded cache: 30M events with a 1-minute window (at 50k events per
second of event time, so the run spans ten windows). The Redis cache is driven through the same
ten windows at a tenth of the volume (its claims cost ~5 us each on this machine's shared
cores), which exercises the same generation expiry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import RedisServer
from redis_module_server import ModuleRedisServer, build_module

from pipeline.fingerprint import Keys, empty_keys
from pipeline.keycache import EmbeddedKeyCache, RebuildableKeyCache
from pipeline.redis_cache import RedisKeyCache

WINDOWS = 10  #: the run spans this many windows of event time
BATCHES_PER_WINDOW = 30


def _batch(index: int, keys_per_batch: int, batch_ms: int, window_ms: int) -> Keys:
    """Batch ``index``: random fingerprints stamped evenly over its slice of event time."""
    rng = np.random.default_rng(index)
    start = index * batch_ms
    ms = start + (np.arange(keys_per_batch, dtype=np.int64) * batch_ms) // keys_per_batch
    hi = rng.integers(0, 2**64, keys_per_batch, dtype=np.uint64)
    lo = rng.integers(0, 2**64, keys_per_batch, dtype=np.uint64)
    return Keys(ms // window_ms, hi, lo, ms)  # one generation per window (DEDUPE_SLICE = 0)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _run(
    cache: RebuildableKeyCache, keys_per_batch: int, window_ms: int, memory: object
) -> tuple[list[int], list[float]]:
    """Claim WINDOWS windows of batches, finishing each; the cache's keys and ``memory()``
    sampled after each window."""
    batch_ms = window_ms // BATCHES_PER_WINDOW
    held: list[int] = []
    used: list[float] = []
    assert callable(memory)
    for index in range(WINDOWS * BATCHES_PER_WINDOW):
        keys = _batch(index, keys_per_batch, batch_ms, window_ms)
        assert cache.claim(f"b{index}", keys).all()  # every key is new
        cache.finish(f"b{index}", int(keys.ms.max()) if keys.ms is not None else 0)
        if (index + 1) % BATCHES_PER_WINDOW == 0:
            held.append(cache.stats().keys)
            used.append(float(memory()))
    return held, used


def _assert_bounded(held: list[int], used: list[float], per_window: int, slack: float) -> None:
    # Live: the window behind the watermark plus the generation being filled, at most three
    # generations of one window each.
    assert max(held) <= 3 * per_window, held
    # Flat: from the third window on, neither the keys nor the memory keep growing.
    assert max(held[3:]) <= max(held[:3]), held
    assert max(used[3:]) <= max(used[:3]) + slack, used


@pytest.mark.timeout(600)
def test_embedded_cache_memory_stays_flat_over_30m_events(tmp_path: Path) -> None:
    window_ms = 60_000
    per_batch = 100_000  # 30 batches a minute: 50k events per second of event time
    cache = EmbeddedKeyCache(tmp_path / "state", window_ms=window_ms, slice_ms=window_ms)
    assert cache.needs_rebuild()
    cache.rebuild(empty_keys(), None)
    held, rss = _run(cache, per_batch, window_ms, _rss_mb)
    cache.close()
    assert WINDOWS * BATCHES_PER_WINDOW * per_batch == 30_000_000
    # 16 B a key: 3M keys a window are ~48 MB; the process may keep one window's worth of
    # freed pages in its allocator, never another window's for every window run.
    _assert_bounded(held, rss, per_window=BATCHES_PER_WINDOW * per_batch, slack=64.0)
    # The key files on disk are compacted the same way (snapshots keep only live keys).
    on_disk = sum(p.stat().st_size for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert on_disk <= 3 * BATCHES_PER_WINDOW * per_batch * 16 * 1.1, on_disk


@pytest.mark.timeout(600)
def test_redis_cache_memory_stays_flat_over_ten_windows(redis_server: RedisServer) -> None:
    # A private server: used_memory of the shared one moves with whatever else runs beside.
    redis_url = redis_server.url
    window_ms = 6_000
    per_batch = 10_000  # 3M claims in all
    cache = RedisKeyCache.from_url(
        redis_url, prefix="flat", window_ms=window_ms, slice_ms=window_ms
    )
    assert cache.needs_rebuild()
    cache.rebuild(empty_keys(), None)
    server = redis.Redis.from_url(redis_url)
    try:
        held, used = _run(
            cache, per_batch, window_ms, lambda: server.info("memory")["used_memory"] / 2**20
        )
    finally:
        server.close()
        cache.close()
    # Redis's allocator and its claim records (kept until their batch is finished) add a
    # little per window; a generation's sets are dropped whole.
    _assert_bounded(held, used, per_window=BATCHES_PER_WINDOW * per_batch, slack=16.0)


@pytest.mark.timeout(600)
def test_redis_module_cache_memory_stays_flat_over_ten_windows(tmp_path: Path) -> None:
    """The table layout (a Redis with the adevents module) through the same ten windows, at the
    embedded cache's half volume (its claims cost well under a microsecond of Redis CPU): a
    generation's tables are unlinked whole, and Redis gives their memory back."""
    window_ms = 6_000
    per_batch = 50_000  # 15M claims in all, 1.5M a window
    server = ModuleRedisServer(tmp_path / "redis", build_module()).start()
    cache = RedisKeyCache.from_url(
        server.url, prefix="flat", window_ms=window_ms, slice_ms=window_ms
    )
    client = redis.Redis.from_url(server.url)
    try:
        assert cache.needs_rebuild() and cache.tables
        cache.rebuild(empty_keys(), None)
        held, used = _run(
            cache, per_batch, window_ms, lambda: client.info("memory")["used_memory"] / 2**20
        )
    finally:
        client.close()
        cache.close()
        server.stop()
    # At most 16 B a key for at most three windows of keys (~72 MB), and flat from then on.
    assert max(used) <= 3 * BATCHES_PER_WINDOW * per_batch * 16 / 2**20 + 16, used
    _assert_bounded(held, used, per_window=BATCHES_PER_WINDOW * per_batch, slack=16.0)
