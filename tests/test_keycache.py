"""The key cache contract, run against every cache: the embedded one, the Redis one, and the
in-memory fake that ``pipeline.testing`` ships (so the fake cannot drift from the real ones)."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import redis
from conftest import RedisServer
from redis_module_server import ModuleRedisServer, build_module

import pipeline.keycache as keycache_module
import pipeline.redis_cache as redis_cache_module
from pipeline import redis_tables
from pipeline.fingerprint import Keys, compute_keys, empty_keys, fingerprint_check
from pipeline.keycache import (
    CacheLostError,
    CacheStats,
    EmbeddedKeyCache,
    KeyCache,
    RebuildableKeyCache,
    expired_before,
    position_of,
    read_key_file,
)
from pipeline.keytable import SEGMENT_BITS
from pipeline.redis_cache import LAYOUT, MAX_MEMBERS_PER_CALL, RedisKeyCache
from pipeline.testing import MemoryKeyCache, MemoryKeyState

WINDOW_MS = 10_000
SLICE_MS = 1_000

Opener = Callable[..., Any]


# -- helpers ---------------------------------------------------------------------------------------
def keys_at(times_ms: list[int] | np.ndarray, *, seed: int, slice_ms: int = SLICE_MS) -> Keys:
    """Random 128-bit fingerprints, one per event time (distinct with overwhelming odds)."""
    rng = np.random.default_rng(seed)
    ms = np.asarray(times_ms, dtype=np.int64)
    hi = rng.integers(0, 2**64, len(ms), dtype=np.uint64)
    lo = rng.integers(0, 2**64, len(ms), dtype=np.uint64)
    return Keys(np.floor_divide(ms, slice_ms), hi, lo, ms)


def keys_in_slice(n: int, sl: int, *, seed: int, with_ms: bool = True) -> Keys:
    """``n`` keys spread evenly over slice ``sl``."""
    ms = sl * SLICE_MS + (np.arange(n, dtype=np.int64) * SLICE_MS) // max(n, 1)
    keys = keys_at(ms, seed=seed)
    return keys if with_ms else Keys(keys.slice, keys.hi, keys.lo)


def event_keys(ids: range, *, time_ms: int = 5_000) -> Keys:
    """Keys of events ``ev-<i>`` through the real fingerprint function."""
    event_id = pl.Series("event_id", [f"ev-{i}" for i in ids], dtype=pl.String)
    event_time = pl.Series("event_time", [time_ms] * len(ids), dtype=pl.Int64).cast(
        pl.Datetime("ms", "UTC")
    )
    return compute_keys(event_id, event_time, SLICE_MS)


_probes = itertools.count()


def probe(cache: KeyCache, keys: Keys) -> np.ndarray:
    """Which keys the cache holds (claims them under a throwaway batch, so call it last).

    The Redis cache refuses claims below the slices it expired (ExpiredSliceError): keys there
    are not held, and only the others are probed.
    """
    floor = cache.expired_below() if isinstance(cache, RedisKeyCache) else None
    held = np.zeros(len(keys), dtype=bool)
    live = np.ones(len(keys), dtype=bool) if floor is None else keys.slice >= floor
    held[live] = ~cache.claim(f"probe-{next(_probes)}", keys.take(live))
    return held


@pytest.fixture(scope="session")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleRedisServer]:
    """One redis-server with the adevents module for the session (tests use fresh prefixes)."""
    server = ModuleRedisServer(tmp_path_factory.mktemp("module-redis"), build_module()).start()
    yield server
    server.stop()


@pytest.fixture(params=["sets", "module"])
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server, once plain (the bucket-set layout) and once with the adevents
    module (the table layout): tests that restart or flush Redis run on both layouts."""
    if request.param == "module":
        server: RedisServer = ModuleRedisServer(tmp_path / "redis", build_module()).start()
    else:
        server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "redis", "redis-module", "memory"])
def open_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Factory: ``open_cache(name)`` opens (another instance of) the cache called ``name``.

    Two instances of one name share state: the same directory (embedded), the same key prefix
    (Redis) or the same state object (memory), i.e. a consumer restarted over the same state,
    or two consumers sharing Redis. "redis" is the bucket-set layout on the shared Redis,
    "redis-module" the table layout on a Redis with the adevents module.
    ``fresh=True`` rebuilds it empty first, as the consumer does for a cache that needs it.
    """
    kind = request.param
    url = prefix = ""
    layout: str | None = None
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        layout = LAYOUT  # whatever the shared Redis has loaded
    elif kind == "redis-module":
        url = request.getfixturevalue("module_redis").url
        prefix = f"adtest-{uuid.uuid4().hex[:10]}"
    opened: list[RebuildableKeyCache] = []
    states: dict[str, MemoryKeyState] = {}

    def factory(
        name: str = "c",
        *,
        fresh: bool = True,
        window_ms: int = WINDOW_MS,
        slice_ms: int = SLICE_MS,
        snapshot_every: int = 256,
    ) -> RebuildableKeyCache:
        cache: RebuildableKeyCache
        if kind == "memory":
            state = states.setdefault(name, MemoryKeyState())
            cache = MemoryKeyCache(state, window_ms=window_ms, slice_ms=slice_ms)
        elif kind == "embedded":
            cache = EmbeddedKeyCache(
                tmp_path / "state" / name,
                window_ms=window_ms,
                slice_ms=slice_ms,
                snapshot_every=snapshot_every,
            )
        else:
            cache = RedisKeyCache.from_url(
                url,
                prefix=f"{prefix}:{name}",
                window_ms=window_ms,
                slice_ms=slice_ms,
                layout=layout,
            )
            assert cache.tables == (kind == "redis-module")  # detected, or asked for
        if fresh:
            assert cache.needs_rebuild()
            cache.rebuild(empty_keys(), None)
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        cache.close()


def on_shared_redis(url: str, prefix: str, layout: str | None = LAYOUT) -> RedisKeyCache:
    """A Redis cache under ``prefix`` on a test server shared by tests (the test's own keys),
    in the bucket-set layout unless told."""
    return RedisKeyCache.from_url(
        url, prefix=prefix, window_ms=WINDOW_MS, slice_ms=SLICE_MS, layout=layout
    )


@dataclass(frozen=True)
class SharedRedis:
    url: str
    prefix: str
    layout: str

    def cache(self, prefix: str | None = None) -> RedisKeyCache:
        return on_shared_redis(self.url, prefix or self.prefix, self.layout)


@pytest.fixture(params=["sets", "module"])
def shared_redis(request: pytest.FixtureRequest) -> SharedRedis:
    """Consumers sharing one Redis: the shared test server in the bucket-set layout, then the
    session's server with the module in the table layout (each test under its own prefix)."""
    if request.param == "sets":
        url = request.getfixturevalue("redis_url")
        return SharedRedis(url, request.getfixturevalue("redis_prefix"), LAYOUT)
    url = request.getfixturevalue("module_redis").url
    return SharedRedis(url, f"adtest-{uuid.uuid4().hex[:10]}", redis_tables.LAYOUT)


@pytest.fixture
def private_cache(redis_server: Any) -> Iterator[Callable[..., RedisKeyCache]]:
    """Factory of Redis caches on the private server (which tests may flush or restart)."""
    opened: list[RedisKeyCache] = []

    def factory(prefix: str = "adtest", **kw: Any) -> RedisKeyCache:
        kw.setdefault("window_ms", WINDOW_MS)
        kw.setdefault("slice_ms", SLICE_MS)
        cache = RedisKeyCache.from_url(redis_server.url, prefix=prefix, **kw)
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        cache.close()


# -- pure parts ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("watermark", "expected"),
    [
        (None, None),
        # Slice s goes once (s+1)*slice <= W - window: slice 5 ends at 6000, so W=16000.
        (15_999, 5),
        (16_000, 6),
        (16_999, 6),
        (17_000, 7),
        (0, -10),
    ],
)
def test_expired_before_boundary(watermark: int | None, expected: int | None) -> None:
    assert expired_before(watermark, WINDOW_MS, SLICE_MS) == expected


def test_fingerprints_are_stable_128_bit_and_sliced_by_floor() -> None:
    ids = pl.Series(["a", "b", "a", "c"], dtype=pl.String)
    times = pl.Series([-1, 0, 999, 1_000], dtype=pl.Int64).cast(pl.Datetime("ms", "UTC"))
    keys = compute_keys(ids, times, SLICE_MS)
    assert keys.slice.tolist() == [-1, 0, 0, 1]
    assert keys.ms is not None and keys.ms.tolist() == [-1, 0, 999, 1_000]
    assert keys.hi.dtype == np.uint64 and keys.lo.dtype == np.uint64
    # Same id, same fingerprint; different ids differ in both halves here.
    assert (keys.hi[0], keys.lo[0]) == (keys.hi[2], keys.lo[2])
    assert len({(int(h), int(lo)) for h, lo in zip(keys.hi, keys.lo, strict=True)}) == 3
    again = compute_keys(ids, times, SLICE_MS)
    assert np.array_equal(again.hi, keys.hi) and np.array_equal(again.lo, keys.lo)
    assert fingerprint_check() == fingerprint_check()
    assert len(fingerprint_check().split("-")) == 6


def test_cache_stats_bytes_per_key() -> None:
    assert CacheStats(keys=0, bytes=100).bytes_per_key == 0.0
    assert CacheStats(keys=4, bytes=100).bytes_per_key == 25.0


# -- the contract, both caches ---------------------------------------------------------------------
def test_fresh_cache_needs_rebuild_then_not(open_cache: Opener) -> None:
    cache = open_cache(fresh=False)
    assert cache.needs_rebuild()
    assert cache.watermark() is None
    cache.rebuild(empty_keys(), None)
    assert not cache.needs_rebuild()
    # Another instance over the same state agrees.
    assert not open_cache(fresh=False).needs_rebuild()


def test_claim_within_and_across_batches(open_cache: Opener) -> None:
    cache = open_cache()
    first = cache.claim("b1", event_keys(range(1_000)))
    assert first.dtype == np.bool_ and first.shape == (1_000,) and first.all()
    cache.finish("b1", 5_000)
    second = cache.claim("b2", event_keys(range(500, 1_500)))
    assert not second[:500].any() and second[500:].all()
    # Not yet finished: another batch still loses the keys b2 won.
    third = cache.claim("b3", event_keys(range(1_400, 1_600)))
    assert not third[:100].any() and third[100:].all()
    cache.finish("b2", 5_000)
    cache.finish("b3", 5_000)
    assert not cache.claim("b4", event_keys(range(1_600))).any()
    assert cache.stats().keys == 1_600


def test_empty_batch(open_cache: Opener) -> None:
    cache = open_cache()
    mask = cache.claim("empty", empty_keys())
    assert mask.shape == (0,) and mask.dtype == np.bool_
    cache.finish("empty", None)
    assert cache.watermark() is None
    cache.restore("empty-2", empty_keys(), None)
    cache.rebuild(empty_keys(), None)
    assert cache.stats().keys == 0
    assert not cache.needs_rebuild()


def test_retry_is_idempotent_per_batch(open_cache: Opener) -> None:
    cache = open_cache()
    k = keys_in_slice(300, 5, seed=1)
    l_ = keys_in_slice(200, 5, seed=2)
    m = keys_in_slice(100, 6, seed=3)
    assert cache.claim("b1", k).all()
    b2 = cache.claim("b2", Keys.concat([k, l_]))
    assert not b2[:300].any() and b2[300:].all()
    # Retries, in any order, give each batch the same answers (each key at its own source
    # position: b2 held k at rows 0-299 and l_ at 300-499); a retry may bring new keys too.
    b2_positions = np.concatenate([np.arange(300, 500), np.arange(300)])
    for _ in range(2):
        assert cache.claim("b1", Keys.concat([k, m])).all()
        b2_again = cache.claim("b2", Keys.concat([l_, k]), b2_positions)
        assert b2_again[:200].all() and not b2_again[200:].any()
    # Once finished, the claim record is forgotten: the keys are simply known.
    cache.finish("b1", 5_500)
    assert not cache.claim("b1", k).any()
    cache.finish("b2", 5_500)
    assert not cache.claim("b2", l_).any()


def test_retry_after_consumer_restart(open_cache: Opener) -> None:
    """A crash between claim and commit: the new process retries with the same batch ids."""
    first = open_cache("shared")
    k = keys_in_slice(300, 5, seed=1)
    l_ = keys_in_slice(200, 5, seed=2)
    assert first.claim("b1", k).all()
    assert not first.claim("b2", Keys.concat([k, l_]))[:300].any()
    # Redis keeps the claim records; the embedded cache never persisted the claims. Either way
    # the retried batches get the answers they had.
    second = open_cache("shared", fresh=False)
    assert not second.needs_rebuild()
    assert second.claim("b1", k).all()
    b2 = second.claim("b2", Keys.concat([k, l_]))
    assert not b2[:300].any() and b2[300:].all()


def test_racing_batches_exactly_one_wins(open_cache: Opener) -> None:
    cache = open_cache()
    shared = keys_in_slice(1_000, 7, seed=4)
    wins = np.zeros(len(shared), dtype=np.int64)
    batches = [f"race-{i}" for i in range(4)]
    answers = {}
    for i, batch in enumerate(batches):
        # Each batch claims an overlapping window of the shared keys.
        part = shared.take(np.arange(i * 100, len(shared)))
        got = cache.claim(batch, part)
        answers[batch] = (np.arange(i * 100, len(shared)), got)
        wins[np.arange(i * 100, len(shared))[got]] += 1
    assert (wins == 1).all()
    for batch in reversed(batches):
        idx, got = answers[batch]
        assert np.array_equal(cache.claim(batch, shared.take(idx)), got)


def _claim_at_once(caches: list[RedisKeyCache], batch_ids: list[str], keys: Keys) -> np.ndarray:
    """Each cache claims ``keys`` for its batch id, all released at the same instant."""
    results: list[np.ndarray] = [np.empty(0, bool)] * len(caches)
    barrier = threading.Barrier(len(caches))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = caches[i].claim(batch_ids[i], keys)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(caches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.stack(results)


def test_racing_consumers_on_redis(shared_redis: SharedRedis) -> None:
    """Real concurrency: four Redis clients claim the same keys at once, five rounds."""
    caches = [shared_redis.cache() for _ in range(4)]
    caches[0].rebuild(empty_keys(), None)
    for rnd in range(5):
        keys = keys_in_slice(20_000, 3 + rnd, seed=100 + rnd)
        batch_ids = [f"r{rnd}-c{i}" for i in range(len(caches))]
        got = _claim_at_once(caches, batch_ids, keys)
        assert (got.sum(axis=0) == 1).all()
        # Retries, racing again, get the same answers.
        assert np.array_equal(_claim_at_once(caches, batch_ids, keys), got)
    for cache in caches:
        cache.close()


@pytest.mark.parametrize(
    "watermark", [None, 15_000, 15_999, 16_000, 16_999, 17_000, 17_001, 25_999, 26_000]
)
def test_expiry_is_exact_at_the_slice_boundary(open_cache: Opener, watermark: int | None) -> None:
    times = [4_999, 5_000, 5_500, 5_999, 6_000, 6_999, 7_000, 15_999]
    cache = open_cache()
    keys = keys_at(times, seed=5)
    assert cache.claim("b", keys).all()
    cache.finish("b", watermark)
    assert cache.watermark() == watermark
    cutoff = expired_before(watermark, WINDOW_MS, SLICE_MS)
    expected = np.ones(len(times), bool) if cutoff is None else keys.slice >= cutoff
    assert cache.stats().keys == int(expected.sum())
    held = probe(cache, keys)
    assert np.array_equal(held, expected)
    if watermark is not None:
        # The guarantee itself: an event that is not late has its key.
        not_late = np.asarray(times) >= watermark - WINDOW_MS
        assert held[not_late].all()
        # ... and whole slices go once all of them is late, never part of one.
        assert (held == (keys.slice * SLICE_MS + SLICE_MS > watermark - WINDOW_MS)).all()


def test_watermark_is_monotonic(open_cache: Opener) -> None:
    cache = open_cache("wm")
    assert cache.watermark() is None
    cache.finish("a", 100_000)
    assert cache.watermark() == 100_000
    cache.finish("b", 50_000)
    assert cache.watermark() == 100_000
    cache.finish("c", None)
    assert cache.watermark() == 100_000
    cache.restore("d", empty_keys(), 99_999)
    assert cache.watermark() == 100_000
    cache.finish("e", 100_001)
    assert cache.watermark() == 100_001
    assert open_cache("wm", fresh=False).watermark() == 100_001


def test_finish_expires_and_only_then(open_cache: Opener) -> None:
    cache = open_cache()
    old = keys_in_slice(50, 0, seed=6)
    new = keys_in_slice(50, 20, seed=7)
    cache.claim("b1", Keys.concat([old, new]))
    cache.finish("b1", 10_999)  # cutoff 0: slice 0 still in
    assert cache.stats().keys == 100
    cache.finish("b2", 11_000)  # cutoff 1: slice 0 is late as a whole
    assert cache.stats().keys == 50
    held = probe(cache, Keys.concat([old, new]))
    assert not held[:50].any() and held[50:].all()


def test_restore_readds_a_committed_batch(open_cache: Opener) -> None:
    first = open_cache("shared")
    k = keys_in_slice(500, 8, seed=8)
    assert first.claim("b1", k).all()
    # Committed, then a crash before finish(): the new process restores it from events/.
    second = open_cache("shared", fresh=False)
    second.restore("b1", k, 8_999)
    second.restore("b1", k, 8_999)  # idempotent
    assert second.watermark() == 8_999
    assert second.stats().keys == 500
    # The claim record is forgotten and the keys are known to everyone.
    assert not second.claim("b1", k).any()
    assert not second.claim("b2", k).any()


def test_rebuild_replaces_content(open_cache: Opener) -> None:
    cache = open_cache("rb")
    before = keys_in_slice(100, 30, seed=9)
    cache.claim("b1", before)
    cache.finish("b1", 30_500)
    live = keys_in_slice(200, 40, seed=10)
    late = keys_in_slice(70, 20, seed=11)  # already expired at the rebuilt watermark
    cache.rebuild(Keys.concat([live, late]), 40_999)
    assert not cache.needs_rebuild()
    assert cache.watermark() == 40_999
    assert cache.stats().keys == 200
    reopened = open_cache("rb", fresh=False)
    assert not reopened.needs_rebuild()
    assert reopened.watermark() == 40_999
    assert reopened.stats().keys == 200
    held = probe(reopened, Keys.concat([live, before]))
    assert held[:200].all() and not held[200:].any()


def test_large_batch_in_one_slice(open_cache: Opener) -> None:
    """200k keys in one slice; on Redis all in one bucket, far past one SADD's worth."""
    cache = open_cache()
    n = 200_000
    # One key first, without event times: the slice is sized for it (a single bucket).
    seed_key = keys_in_slice(1, 9, seed=12, with_ms=False)
    assert cache.claim("small", seed_key).all()
    big = keys_in_slice(n, 9, seed=13, with_ms=False)
    assert n > 40 * MAX_MEMBERS_PER_CALL
    batch = Keys.concat([seed_key, big])
    got = cache.claim("big", batch)
    assert not got[0] and got[1:].all()
    assert np.array_equal(cache.claim("big", batch), got)
    assert not cache.claim("other", big).any()
    cache.finish("small", 9_999)
    cache.finish("big", 9_999)
    assert cache.stats().keys == n + 1


def test_keys_spanning_many_slices(open_cache: Opener) -> None:
    # Twenty generations of a tenth of the window each: a claim looks in every live one (11
    # or 12 here), so a window of a thousand generations would cost a thousand lookups a key.
    window, generation = 1_000 * SLICE_MS, 100 * SLICE_MS
    cache = open_cache(window_ms=window, slice_ms=generation)
    rng = np.random.default_rng(14)
    times = rng.integers(0, 2_000 * SLICE_MS, 20_000)
    keys = keys_at(times, seed=15, slice_ms=generation)
    assert cache.claim("b1", keys).all()
    half = keys.take(np.arange(10_000, 20_000))
    extra = keys_at(rng.integers(0, 2_000 * SLICE_MS, 5_000), seed=16, slice_ms=generation)
    got = cache.claim("b2", Keys.concat([half, extra]))
    assert not got[:10_000].any() and got[10_000:].all()
    watermark = int(max(times.max(), 0))
    cache.finish("b1", watermark)
    cache.finish("b2", watermark)
    cutoff = expired_before(watermark, window, generation)
    assert cutoff is not None and cutoff >= 9
    everything = Keys.concat([keys, extra])
    live = everything.slice >= cutoff
    assert cache.stats().keys == int(live.sum())
    assert np.array_equal(probe(cache, everything), live)


# -- embedded only ---------------------------------------------------------------------------------
def embedded(tmp_path: Path, **kw: Any) -> EmbeddedKeyCache:
    kw.setdefault("window_ms", WINDOW_MS)
    kw.setdefault("slice_ms", SLICE_MS)
    return EmbeddedKeyCache(tmp_path / "state", **kw)


def test_embedded_persists_across_instances(tmp_path: Path) -> None:
    first = embedded(tmp_path)
    first.rebuild(empty_keys(), None)
    committed = [keys_in_slice(100, s, seed=20 + s) for s in range(5)]
    for i, k in enumerate(committed):
        first.claim(f"b{i}", k)
        first.finish(f"b{i}", (i + 1) * SLICE_MS - 1)
    unfinished = keys_in_slice(100, 5, seed=30)
    first.claim("pending", unfinished)
    assert (tmp_path / "state" / "embedded" / "meta.json").exists()
    # No close(): a crash. Segments alone carry the finished batches.
    second = embedded(tmp_path)
    assert not second.needs_rebuild()
    assert second.watermark() == 5 * SLICE_MS - 1
    assert second.stats().keys == 500
    second.finish("b5", 12_500)  # cutoff 2: slices 0 and 1 go
    second.close()
    third = embedded(tmp_path)
    assert third.watermark() == 12_500
    assert third.stats().keys == 300
    # A claim not finished before the crash was not persisted: the consumer retries it.
    held = probe(third, Keys.concat([*committed, unfinished]))
    assert not held[:200].any() and held[200:500].all() and not held[500:].any()


def test_embedded_snapshot_compaction_keeps_only_live_keys(tmp_path: Path) -> None:
    cache = embedded(tmp_path, snapshot_every=3)
    cache.rebuild(empty_keys(), None)
    batches = []
    for i in range(10):
        k = keys_in_slice(50, 4 * i, seed=40 + i)
        batches.append(k)
        cache.claim(f"b{i}", k)
        cache.finish(f"b{i}", 4 * i * SLICE_MS + 500)
    watermark = 36 * SLICE_MS + 500
    cutoff = expired_before(watermark, WINDOW_MS, SLICE_MS)
    assert cutoff == 26
    live = [k for k in batches if k.slice[0] >= cutoff]
    assert cache.stats().keys == 50 * len(live) == 150
    state = tmp_path / "state" / "embedded"
    snaps = sorted(state.glob("snap-*.keys"))
    segs = sorted(state.glob("seg-*.keys"))
    assert len(snaps) == 1 and len(segs) < 3
    # The snapshot holds live keys only (what was live when it was taken).
    snap_wm, chunks, mixed = read_key_file(snaps[0])
    assert not len(mixed)  # a snapshot holds chunks only
    snap_cutoff = expired_before(snap_wm, WINDOW_MS, SLICE_MS)
    assert snap_cutoff is not None
    assert all(sl >= snap_cutoff for sl, _, _ in chunks)
    assert sum(len(lo) for _, _, lo in chunks) <= 50 * 3
    reopened = embedded(tmp_path, snapshot_every=3)
    assert reopened.watermark() == watermark
    assert reopened.stats().keys == 150
    held = probe(reopened, Keys.concat(batches))
    assert np.array_equal(held, np.repeat([k.slice[0] >= cutoff for k in batches], 50))


def test_embedded_snapshots_only_once_new_keys_reach_half_the_live_ones(tmp_path: Path) -> None:
    """A snapshot rewrites every live key: taken every few batches of a large window, it wrote
    3 GB every 25 s in the soak. It waits until the segments since the last one hold half as
    many keys as the last snapshot (half the live ones), so each key is written at most twice
    more, and a restart reads at most twice the live keys."""
    cache = embedded(tmp_path, snapshot_every=1)
    cache.rebuild(keys_in_slice(1_000, 0, seed=70), 500)
    state = tmp_path / "state" / "embedded"
    for i in range(10):
        cache.claim(f"b{i}", keys_in_slice(100, 1 + i, seed=71 + i))
        cache.finish(f"b{i}", 1_500)
        if i < 9:  # 100..900 new keys: fewer than the 1,000 of the last snapshot
            assert len(list(state.glob("seg-*.keys"))) == i + 1
    # 1,000 new keys, as many as the snapshot holds: one new snapshot, and no segment left.
    assert len(list(state.glob("snap-*.keys"))) == 1
    assert not list(state.glob("seg-*.keys"))
    assert embedded(tmp_path).stats().keys == 2_000


def test_embedded_segment_files_hold_one_generation_as_a_chunk(tmp_path: Path) -> None:
    """A batch's keys in one generation (the usual case) are written as one chunk, 10 bytes a
    key (``lo`` and the 12 bits of ``hi`` a table looks at); a batch spanning generations keeps
    each key's. Both read back whole."""
    cache = embedded(tmp_path)
    cache.rebuild(empty_keys(), None)
    one = keys_in_slice(300, 2, seed=90)
    two = Keys.concat([keys_in_slice(100, 2, seed=91), keys_in_slice(100, 3, seed=92)])
    cache.claim("one", one)
    cache.finish("one", 2 * SLICE_MS)
    cache.claim("two", two)
    cache.finish("two", 3 * SLICE_MS)
    first, second = sorted((tmp_path / "state" / "embedded").glob("seg-*.keys"))
    _, chunks, mixed = read_key_file(first)
    assert [(sl, len(lo)) for sl, _, lo in chunks] == [(2, 300)] and not len(mixed)
    _, chunks, mixed = read_key_file(second)
    assert not chunks and len(mixed) == 200
    assert first.stat().st_size == 16 + 8 + 16 + 300 * 10  # magic, watermark, record, keys
    assert second.stat().st_size == 16 + 8 + 16 + 200 * 18  # and a generation a key
    reopened = embedded(tmp_path)
    assert probe(reopened, Keys.concat([one, two])).all()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_embedded_rebuilds_when_a_key_file_is_unreadable(tmp_path: Path, damage: str) -> None:
    cache = embedded(tmp_path)
    cache.rebuild(empty_keys(), None)
    cache.claim("b0", keys_in_slice(100, 0, seed=80))
    cache.finish("b0", 500)
    (segment,) = (tmp_path / "state" / "embedded").glob("seg-*.keys")
    data = segment.read_bytes()
    segment.write_bytes(data[:-9] if damage == "truncated" else b"PK\x03\x04" + data)
    reopened = embedded(tmp_path)
    assert reopened.needs_rebuild() and reopened.stats().keys == 0
    lake_keys = keys_in_slice(100, 0, seed=80)
    assert reopened.ensure(lambda since: (lake_keys, 500))
    assert reopened.stats().keys == 100 and probe(reopened, lake_keys).all()
    assert not embedded(tmp_path).needs_rebuild()


def test_embedded_claims_go_on_while_a_snapshot_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot of a large window takes seconds to write: the writer thread writes it
    outside the cache's lock, so the main thread's claims are not held up meanwhile."""
    cache = embedded(tmp_path, snapshot_every=1)
    cache.rebuild(empty_keys(), None)
    writing, release = threading.Event(), threading.Event()
    real_write = keycache_module.write_key_file

    def slow_snapshot(path: Path, *args: Any) -> None:
        if path.name.startswith("snap-"):
            writing.set()
            assert release.wait(30)
        real_write(path, *args)

    monkeypatch.setattr(keycache_module, "write_key_file", slow_snapshot)
    cache.claim("b0", keys_in_slice(100, 0, seed=90))
    writer = threading.Thread(target=cache.finish, args=("b0", 500))
    writer.start()
    assert writing.wait(30)  # the snapshot is being written ...
    claimed = cache.claim("b1", keys_in_slice(100, 1, seed=91))  # ... and a claim goes through
    release.set()
    writer.join()
    assert claimed.all()
    cache.finish("b1", 1_500)
    cache.close()
    assert embedded(tmp_path).stats().keys == 200


def test_embedded_close_compacts_to_one_snapshot(tmp_path: Path) -> None:
    cache = embedded(tmp_path)
    cache.rebuild(empty_keys(), None)
    for i in range(4):
        cache.claim(f"b{i}", keys_in_slice(10, i, seed=50 + i))
        cache.finish(f"b{i}", i * SLICE_MS)
    cache.close()
    state = tmp_path / "state" / "embedded"
    assert len(list(state.glob("snap-*.keys"))) == 1
    assert not list(state.glob("seg-*.keys"))
    assert embedded(tmp_path).stats().keys == 40


def test_embedded_detects_a_fingerprint_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_keys = [keys_in_slice(100, s, seed=60 + s) for s in range(4)]
    first = embedded(tmp_path)
    first.rebuild(empty_keys(), None)
    for i, k in enumerate(old_keys):
        first.claim(f"b{i}", k)
        first.finish(f"b{i}", 4_000)
    first.close()
    # A new Polars hashes differently: the persisted fingerprints mean nothing any more.
    monkeypatch.setattr(keycache_module, "fingerprint_check", lambda: "other-check")
    second = embedded(tmp_path)
    assert second.needs_rebuild()
    new_keys = keys_in_slice(100, 3, seed=70)
    second.rebuild(new_keys, 4_000)
    assert not second.needs_rebuild()
    second.close()
    # Nothing written under the old fingerprint may come back.
    third = embedded(tmp_path)
    assert not third.needs_rebuild()
    assert third.watermark() == 4_000
    assert third.stats().keys == 100
    held = probe(third, Keys.concat([new_keys, *old_keys]))
    assert held[:100].all() and not held[100:].any()


def test_embedded_detects_a_slice_change(tmp_path: Path) -> None:
    first = embedded(tmp_path)
    first.rebuild(keys_in_slice(10, 1, seed=80), 1_000)
    first.close()
    assert embedded(tmp_path, slice_ms=2 * SLICE_MS).needs_rebuild()
    meta = json.loads((tmp_path / "state" / "embedded" / "meta.json").read_text())
    assert meta["slice_ms"] == SLICE_MS


# -- Redis only: losses, scripts, memory -----------------------------------------------------------
def test_redis_detects_a_fingerprint_change(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = on_shared_redis(redis_url, redis_prefix)
    cache.rebuild(empty_keys(), None)
    assert not cache.needs_rebuild()
    cache.close()
    monkeypatch.setattr(redis_cache_module, "fingerprint_check", lambda: "other-check")
    other = on_shared_redis(redis_url, redis_prefix)
    assert other.needs_rebuild()
    with pytest.raises(CacheLostError):
        other.claim("b", keys_in_slice(10, 1, seed=81))
    other.close()


def test_redis_switching_layouts_rebuilds_instead_of_mixing(
    module_redis: ModuleRedisServer,
) -> None:
    """A cache written as bucket sets is not read as tables (nor the other way round): the
    layout is part of the check value, so the other layout rebuilds from the lake."""
    prefix = f"adtest-{uuid.uuid4().hex[:10]}"

    def open_one(layout: str | None) -> RedisKeyCache:
        return RedisKeyCache.from_url(
            module_redis.url, prefix=prefix, window_ms=WINDOW_MS, slice_ms=SLICE_MS, layout=layout
        )

    sets = open_one(LAYOUT)  # as on a Redis without the module
    sets.rebuild(empty_keys(), None)
    k = keys_in_slice(100, 5, seed=82)
    assert sets.claim("b1", k).all()
    sets.finish("b1", 5_999)
    tables = open_one(None)
    assert tables.tables and tables.needs_rebuild()
    with pytest.raises(CacheLostError):
        tables.claim("b2", k)
    tables.rebuild(k, 5_999)  # from the events table
    assert sets.needs_rebuild()
    assert not tables.claim("b2", k).any()
    client = redis.Redis.from_url(module_redis.url)
    assert not list(client.scan_iter(match=f"{prefix}:{{g*}}:5:*"))  # no bucket set left
    assert len(list(client.scan_iter(match=f"{prefix}:{{g*}}:t:5"))) == redis_cache_module.GROUPS
    client.close()
    sets.close()
    tables.close()


def test_redis_flushall_raises_cache_lost(
    private_cache: Callable[..., RedisKeyCache], redis_server: Any
) -> None:
    cache = private_cache()
    cache.rebuild(empty_keys(), None)
    k = keys_in_slice(1_000, 5, seed=90)
    assert cache.claim("b1", k).all()
    cache.finish("b1", 5_999)
    redis.Redis.from_url(redis_server.url).flushall()
    assert cache.needs_rebuild()
    assert cache.watermark() is None
    with pytest.raises(CacheLostError):
        cache.claim("b2", k)
    with pytest.raises(CacheLostError):  # and again: never silently accepted
        cache.claim("b2", k)
    cache.rebuild(k, 5_999)
    assert not cache.needs_rebuild()
    assert not cache.claim("b2", k).any()
    assert cache.claim("b3", keys_in_slice(10, 5, seed=91)).all()


def test_redis_restart_raises_cache_lost(
    private_cache: Callable[..., RedisKeyCache], redis_server: Any
) -> None:
    cache = private_cache()
    cache.rebuild(empty_keys(), None)
    k = keys_in_slice(1_000, 5, seed=92)
    assert cache.claim("b1", k).all()
    cache.finish("b1", 5_999)
    redis_server.restart()  # comes back empty, without the scripts
    with pytest.raises(CacheLostError):
        cache.claim("b2", k)
    assert cache.needs_rebuild()
    cache.rebuild(k, 5_999)
    assert not cache.claim("b2", k).any()
    cache.finish("b2", 6_500)
    assert cache.watermark() == 6_500


def test_redis_reloads_scripts_after_script_flush(
    private_cache: Callable[..., RedisKeyCache], redis_server: Any
) -> None:
    cache = private_cache()
    cache.rebuild(empty_keys(), None)
    k = keys_in_slice(1_000, 5, seed=93)
    assert cache.claim("b1", k).all()
    client = redis.Redis.from_url(redis_server.url)
    client.script_flush()
    # NOSCRIPT is not a data loss: the claim goes through, and the retry still counts as b1's.
    assert cache.claim("b1", k).all()
    assert not cache.claim("b2", k).any()
    client.script_flush()
    cache.finish("b1", 7_000)
    assert cache.watermark() == 7_000
    client.close()


def test_redis_missing_group_sentinel_refuses(
    private_cache: Callable[..., RedisKeyCache], redis_server: Any
) -> None:
    cache = private_cache()
    cache.rebuild(empty_keys(), None)
    client = redis.Redis.from_url(redis_server.url)
    client.delete("adtest:{g3}:alive")  # e.g. evicted: a partial loss is a loss
    assert cache.needs_rebuild()
    with pytest.raises(CacheLostError):
        cache.claim("b1", keys_in_slice(5_000, 5, seed=94))
    client.close()


def _used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        info = client.info("memory")
        return int(info["used_memory"]) - int(info["mem_clients_normal"])
    finally:
        client.close()


def test_redis_bytes_per_key_dense_slice(
    private_cache: Callable[..., RedisKeyCache], redis_server: Any
) -> None:
    n = 200_000
    cache = private_cache(prefix="mem")
    cache.rebuild(empty_keys(), None)
    cache.claim("warm", keys_in_slice(10, 1, seed=95))  # warm the script and the connection
    cache.finish("warm", None)
    before = _used_memory(redis_server.url)
    keys = keys_in_slice(n, 2, seed=96)
    assert cache.claim("dense", keys).all()
    cache.finish("dense", None)  # drops the claim record
    after = _used_memory(redis_server.url)
    per_key = (after - before) / n
    client = redis.Redis.from_url(redis_server.url)
    if cache.tables:  # issue 12: at most 16 bytes a key in the module's tables
        assert per_key <= 16, f"{per_key:.1f} bytes a key"
        tables = list(client.scan_iter(match="mem:{g*}:t:2", count=10_000))
        assert len(tables) == redis_cache_module.GROUPS
        infos = [client.execute_command("ADEVENTS.INFO", t) for t in tables]
        assert sum(int(info[1]) for info in infos) == n
        assert all(int(info[3]) / int(info[1]) <= 16 for info in infos), infos
        client.close()
        return
    assert per_key <= 24, f"{per_key:.1f} bytes a key"
    buckets = list(client.scan_iter(match="mem:{g*}:2:*", count=10_000))
    assert len(buckets) > 1
    encodings = {client.object("encoding", b) for b in buckets}
    assert encodings == {b"intset"}
    assert sum(client.scard(b) for b in buckets) == n
    client.close()


def test_redis_consumer_follows_a_rebuild_by_another(shared_redis: SharedRedis) -> None:
    """Consumer B must see the slices as consumer A's rebuild laid them out, not as it cached."""
    a, b = shared_redis.cache(), shared_redis.cache()
    a.rebuild(empty_keys(), None)
    early = keys_in_slice(10, 5, seed=97, with_ms=False)  # sizes slice 5 for a few keys
    assert b.claim("b1", early).all()
    b.finish("b1", 5_000)
    # Redis lost its data; A notices first and rebuilds from events/ (many keys in slice 5).
    window = Keys.concat([early, keys_in_slice(100_000, 5, seed=98)])
    a.rebuild(window, 5_999)
    assert not b.needs_rebuild()  # so B's consumer does not rebuild: B must still be right
    assert not b.claim("b2", window).any()
    a.close()
    b.close()


def test_redis_consumer_follows_an_expiry_by_another(shared_redis: SharedRedis) -> None:
    """A claim reaching a slice another consumer expired is refused, not taken for new.

    B validated its batch just before A moved the watermark past slice 5: accepting the
    straggler as new would store a second copy of an event whose key A just dropped. Refused,
    the batch is validated again, against the new watermark (its slice-5 events are late now).
    """
    a, b = shared_redis.cache(), shared_redis.cache()
    a.rebuild(empty_keys(), None)
    first = keys_in_slice(10, 5, seed=99)
    assert b.claim("b1", first).all()
    b.finish("b1", 5_999)
    a.finish("a1", 16_000)  # slice 5 is late as a whole: A drops it
    assert a.stats().keys == 0
    assert b.expired_below() == 6
    straggler = Keys.concat([first, keys_in_slice(10, 5, seed=100)])
    with pytest.raises(redis_cache_module.ExpiredSliceError):
        b.claim("b2", straggler)
    assert isinstance(redis_cache_module.ExpiredSliceError("x"), CacheLostError)
    a.finish("a2", 16_000)
    client = redis.Redis.from_url(shared_redis.url)
    assert not list(client.scan_iter(match=f"{shared_redis.prefix}:{{g*}}:5:*"))  # sets
    assert not list(client.scan_iter(match=f"{shared_redis.prefix}:{{g*}}:t:5"))  # tables
    client.close()
    # Slices still in the window are claimed as before.
    assert b.claim("b3", keys_in_slice(10, 7, seed=101)).all()
    a.close()
    b.close()


def _whole_hi_directory(tmp_path: Path, magic: bytes, keys: Keys, **meta: object) -> Path:
    """An embedded cache directory as version 1 or 2 wrote it (``hi`` in 64 bits): one
    snapshot holding ``keys`` (one generation) at watermark 2 slices, and its meta.json."""
    state = tmp_path / "state" / "embedded"
    state.mkdir(parents=True)
    record = np.array([(int(keys.slice[0]), len(keys))], [("slice", "<i8"), ("n", "<i8")])
    body = keys.hi.astype("<u8").tobytes() + keys.lo.astype("<u8").tobytes()
    watermark = np.int64(2 * SLICE_MS).tobytes()
    (state / "snap-000000000001.keys").write_bytes(magic + watermark + record.tobytes() + body)
    (state / "meta.json").write_text(_meta_json(magic, **meta))
    return state


def _meta_json(magic: bytes, **meta: object) -> str:
    base = {"fingerprint": fingerprint_check(), "slice_ms": SLICE_MS}
    return json.dumps({**base, "format": magic.decode().strip(), **meta})


def _reads_without_a_rebuild(tmp_path: Path, keys: Keys) -> EmbeddedKeyCache:
    cache = embedded(tmp_path)
    assert not cache.needs_rebuild() and cache.stats().keys == len(keys)
    assert not cache.claim("again", keys).any()
    return cache


def test_embedded_reads_a_version_1_directory_without_a_rebuild(tmp_path: Path) -> None:
    """Version 1 key files hold whole fingerprints, which fit tables of any segment bits: an
    upgrade reads them. A version 2 directory of other segment bits is rebuilt."""
    keys = keys_in_slice(3000, 2, seed=60)
    state = _whole_hi_directory(tmp_path, b"adevents-keys-1\n", keys)
    cache = _reads_without_a_rebuild(tmp_path, keys)
    cache.close()
    (state / "meta.json").write_text(
        json.dumps({**cache._meta(), "segment_bits": SEGMENT_BITS + 1})
    )
    assert embedded(tmp_path).needs_rebuild()


def test_embedded_reads_a_version_2_directory_without_a_rebuild(tmp_path: Path) -> None:
    """Version 2 wrote ``hi`` in 64 bits (16 bytes a key): an upgrade reads such a directory
    as it is, and the keys written after it are version 3's. One of other segment bits is
    rebuilt."""
    keys = keys_in_slice(3000, 2, seed=61)
    v2 = b"adevents-keys-2\n"
    state = _whole_hi_directory(tmp_path, v2, keys, segment_bits=SEGMENT_BITS)
    cache = _reads_without_a_rebuild(tmp_path, keys)
    more = keys_in_slice(500, 2, seed=62)
    assert cache.claim("more", more).all()
    cache.finish("more", 2 * SLICE_MS)
    cache.close()
    newest = max(state.glob("s*.keys"))  # the snapshot taken at close, past the version 2 one
    assert newest.name != "snap-000000000001.keys"
    assert newest.read_bytes().startswith(b"adevents-keys-3\n")
    reopened = embedded(tmp_path)
    assert not reopened.needs_rebuild() and reopened.stats().keys == 3500
    assert probe(reopened, Keys.concat([keys, more])).all()
    reopened.close()

    (state / "meta.json").write_text(_meta_json(v2, segment_bits=SEGMENT_BITS + 1))
    assert embedded(tmp_path).needs_rebuild()


def test_embedded_keys_sharing_lo_stay_distinct_by_the_top_bits_of_hi(tmp_path: Path) -> None:
    """A table tells keys apart by ``lo`` and the top SEGMENT_BITS of ``hi`` (76 bits): keys
    sharing ``lo`` are distinct when those bits differ, through a snapshot and a restart too;
    ``hi``'s lower bits are not looked at (pipeline.keytable gives the odds)."""
    top = np.uint64(64 - SEGMENT_BITS)
    cache = embedded(tmp_path, snapshot_every=4)
    cache.rebuild(empty_keys(), None)
    hi = np.arange(12, dtype=np.uint64) << top
    for i in range(12):
        k = Keys(np.array([3]), hi[i : i + 1], np.full(1, 42, np.uint64))
        assert cache.claim(f"b{i}", k).all()
        cache.finish(f"b{i}", 3_000)
    assert cache.stats().keys == 12
    cache.close()
    cache = embedded(tmp_path)
    asked = np.array([5 << top, (11 << top) | 7, 12 << top, 1], dtype=np.uint64)
    others = Keys(np.full(4, 3), asked, np.full(4, 42, np.uint64))
    assert cache.claim("x", others).tolist() == [False, False, True, False]


def test_embedded_cache_claims_while_another_thread_finishes_and_snapshots(
    tmp_path: Path,
) -> None:
    """The consumer claims group N+1 on its main thread while its writer finishes group N, and
    every finish may write a snapshot of all keys: the two never see the cache half-changed."""
    cache = EmbeddedKeyCache(tmp_path, window_ms=3_600_000, slice_ms=1_000, snapshot_every=1)
    cache.rebuild(empty_keys(), None)  # a first start: nothing stored yet
    base = 1_700_000_000_000
    rounds = 60
    errors: list[BaseException] = []

    def group_keys(n: int) -> Keys:
        ids = pl.Series([f"g{n}-{i}" for i in range(2_000)])
        # New slices every group, so claims add slices while a snapshot walks them.
        times = pl.Series([base + n * 5_000 + i for i in range(2_000)]).cast(
            pl.Datetime("ms", "UTC")
        )
        return compute_keys(ids, times, 1_000)

    go, done = threading.Semaphore(0), threading.Semaphore(0)

    def writer() -> None:
        try:
            for n in range(rounds):
                go.acquire()
                cache.finish(f"g{n}", base + n * 5_000 + 1_999)
                done.release()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            done.release()

    thread = threading.Thread(target=writer)
    thread.start()
    assert cache.claim("g0", group_keys(0)).all()
    for n in range(rounds):
        go.release()  # the writer finishes group n (and snapshots) ...
        if n + 1 < rounds:  # ... while group n+1 is claimed, in pieces
            keys = group_keys(n + 1)
            for piece in np.array_split(np.arange(len(keys)), 10):
                assert cache.claim(f"g{n + 1}", keys.take(piece)).all()
        done.acquire()
        assert not errors, errors
    thread.join()
    cache.close()
    reopened = EmbeddedKeyCache(tmp_path, window_ms=3_600_000, slice_ms=1_000)
    assert reopened.stats().keys == rounds * 2_000


def test_redis_sends_a_batch_again_after_a_lost_connection(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = on_shared_redis(redis_url, redis_prefix)
    cache.rebuild(empty_keys(), None)
    waits: list[float] = []
    cache._resend = cache._resend.copy(sleep=waits.append)
    send_once = cache._send_once
    blips = [redis.ConnectionError("reset by peer"), redis.TimeoutError("timed out")]

    def flaky(commands: list[tuple[str, bytes]], counts: list[int] | None = None) -> list[Any]:
        if blips:
            raise blips.pop(0)
        return send_once(commands, counts)

    monkeypatch.setattr(cache, "_send_once", flaky)
    k = keys_in_slice(100, 5, seed=95)
    assert cache.claim("b1", k).all()
    assert waits == [0.05, 0.1]  # backoff between the sends
    blips.extend(redis.ConnectionError("refused") for _ in range(100))
    with pytest.raises(redis.ConnectionError, match="Redis unreachable: refused"):
        cache.claim("b2", k)
    assert len(blips) == 100 - (redis_cache_module.SEND_RETRIES + 1)
    assert max(waits) == redis_cache_module.SEND_BACKOFF_CAP_S
    cache.close()


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_a_lost_cache_refuses_claims_until_ensure_rebuilds_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The loss contract of the caches that can lose their data while a consumer runs."""
    cache: RebuildableKeyCache
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        cache = on_shared_redis(url, prefix)

        def lose() -> None:
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.unlink(key)
            client.close()
    else:
        cache = MemoryKeyCache(window_ms=WINDOW_MS, slice_ms=SLICE_MS)
        lose = cache.lose
    loaded = keys_in_slice(100, 5, seed=96)
    assert cache.ensure(lambda since: (loaded, 5_500))
    assert not cache.ensure(lambda since: (loaded, 5_500))  # whole: nothing to do
    assert cache.valid() and cache.watermark() == 5_500
    k = keys_in_slice(50, 6, seed=97)
    assert cache.claim("b1", k).all() and cache.valid("b1")
    lose()
    assert cache.needs_rebuild() and not cache.valid("b1")
    with pytest.raises(CacheLostError):
        cache.claim("b2", k)
    assert cache.ensure(lambda since: (loaded, 5_500))
    assert not cache.valid("b1")  # its claims were made before the loss: never commit on them
    assert not cache.claim("b2", loaded).any() and cache.claim("b2", k).all()
    cache.close()


# -- re-stamped copies (issue 12): an event_id is a duplicate whatever its event_time ----------
def restamped(keys: Keys, shift_ms: int, slice_ms: int) -> Keys:
    """The same fingerprints stamped ``shift_ms`` later (earlier when negative)."""
    assert keys.ms is not None
    ms = keys.ms + shift_ms
    return Keys(np.floor_divide(ms, slice_ms), keys.hi, keys.lo, ms)


#: Originals spanning 59.0-61.4 s, across the 60 s boundary: every shift moves some across.
ORIGINAL_MS = 59_000 + np.arange(1_200, dtype=np.int64) * 2


@pytest.mark.parametrize("slice_ms", [SLICE_MS, WINDOW_MS], ids=["1s-generations", "window"])
@pytest.mark.parametrize("shift_ms", [-3_000, -300, 300, 3_500])
def test_a_restamped_copy_is_a_duplicate_across_batches_and_restarts(
    open_cache: Opener, slice_ms: int, shift_ms: int
) -> None:
    cache = open_cache("c", slice_ms=slice_ms)
    original = keys_at(ORIGINAL_MS, seed=31, slice_ms=slice_ms)
    assert cache.claim("b1", original).all()
    cache.finish("b1", int(ORIGINAL_MS.max()))
    copies = restamped(original, shift_ms, slice_ms)
    assert (copies.slice != original.slice).any()  # some copies sit in other generations
    fresh = keys_at(ORIGINAL_MS + shift_ms, seed=32, slice_ms=slice_ms)
    won = cache.claim("b2", Keys.concat([copies, fresh]))
    assert not won[: len(copies)].any()
    assert won[len(copies) :].all()
    cache.finish("b2", int(ORIGINAL_MS.max() + max(shift_ms, 0)))
    # A restarted consumer (the same directory, prefix or state) still knows them all.
    cache.close()
    again = open_cache("c", fresh=False, slice_ms=slice_ms)
    assert not again.claim("b3", restamped(original, -shift_ms // 2, slice_ms)).any()


@pytest.mark.parametrize("shift_ms", [-2_000, 2_000])
def test_a_restamped_copy_is_a_duplicate_after_a_rebuild(open_cache: Opener, shift_ms: int) -> None:
    """A cache rebuilt from the events table (after Redis lost its data) catches copies of the
    events it was rebuilt with, whatever their event_time."""
    cache = open_cache("c", slice_ms=WINDOW_MS)
    original = keys_at(ORIGINAL_MS, seed=33, slice_ms=WINDOW_MS)
    cache.replace(original, int(ORIGINAL_MS.max()))
    cache.open_epoch()
    assert not cache.claim("b1", restamped(original, shift_ms, WINDOW_MS)).any()


def test_a_copy_outside_the_window_is_forgotten(open_cache: Opener) -> None:
    """Memory is bounded by the window: once the watermark has moved a window (and a
    generation) past a key, a copy of it is new again."""
    cache = open_cache("c", slice_ms=WINDOW_MS)
    original = keys_at([1_000, 2_000], seed=34, slice_ms=WINDOW_MS)
    assert cache.claim("b1", original).all()
    cache.finish("b1", 2_000)
    later = 2 * WINDOW_MS + 1  # generation 0 ends at 10 s: late once W - window >= 10 s
    cache.finish("b2", later)
    assert cache.claim("b3", restamped(original, later - 2_000, WINDOW_MS)).all()


def test_racing_consumers_store_each_restamped_event_once(open_cache: Opener) -> None:
    """Two consumers claim copies of the same events at the same moment, stamped in different
    generations: per event exactly one of them wins. (The embedded cache serves one process:
    there, two threads race on it.)"""
    a = open_cache("c", slice_ms=WINDOW_MS)
    b = a if isinstance(a, EmbeddedKeyCache) else open_cache("c", fresh=False, slice_ms=WINDOW_MS)
    original = keys_at(ORIGINAL_MS, seed=35, slice_ms=WINDOW_MS)
    copies = restamped(original, 2_500, WINDOW_MS)
    barrier = threading.Barrier(2)
    results: dict[str, np.ndarray] = {}

    def run(name: str, cache: KeyCache, keys: Keys) -> None:
        barrier.wait()
        results[name] = cache.claim(name, keys)

    threads = [
        threading.Thread(target=run, args=("a", a, original)),
        threading.Thread(target=run, args=("b", b, copies)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (results["a"] ^ results["b"]).all()


def test_redis_claim_sees_a_generation_another_consumer_registered_meanwhile(
    shared_redis: SharedRedis,
) -> None:
    """B's list of generations is stale (A opened a new one after B last looked): B's claim of
    an older copy must still find A's key there, not store the event twice."""
    a = shared_redis.cache()
    b = shared_redis.cache()
    a.rebuild(empty_keys(), None)
    assert not b.needs_rebuild()
    early = keys_at([5_000, 5_100], seed=36)
    assert b.claim("b0", early).all()  # B has now read the lists: one generation
    original = keys_at(ORIGINAL_MS, seed=37)
    assert a.claim("a1", original).all()  # new generations, registered by A
    assert not b.claim("b1", restamped(original, -1_500, SLICE_MS)).any()


# --- claims idempotent per source position (a Kafka partition's offsets) ------------------------


def _at(partition: int, first: int, n: int) -> np.ndarray:
    return position_of(partition, np.arange(first, first + n, dtype=np.int64))


def test_a_redo_with_other_boundaries_gets_the_same_answers(open_cache: Opener) -> None:
    """A consumer claims offsets 100-199 and 200-299 of partition 3, then dies before its
    commits; the new owner batches 100-249 and 250-299. Every key the dead attempts won is
    the new owner's at the same offset, and a copy of one at another offset is a duplicate."""
    dead = open_cache("shared")
    k1, k2 = keys_in_slice(100, 5, seed=11), keys_in_slice(100, 5, seed=12)
    assert dead.claim("g1", k1, _at(3, 100, 100), stream="grp-topic").all()
    assert dead.claim("g2", k2, _at(3, 200, 100), stream="grp-topic", fresh=False).all()
    # Redis keeps the claims across processes; the embedded cache's die with its process, so
    # there the redo is this process's own (after a fault or a revocation and reassignment).
    heir = open_cache("shared", fresh=False) if not isinstance(dead, EmbeddedKeyCache) else dead
    both = Keys.concat([k1, k2])
    first = heir.claim("h1", both.take(np.arange(150)), _at(3, 100, 150), stream="grp-topic")
    assert first.all()
    # A copy of a key at another offset (a duplicate published twice) is not this position's.
    copy = heir.claim("h2", k1.take(np.arange(5)), _at(3, 400, 5), stream="grp-topic", fresh=False)
    assert not copy.any()
    # Another stream (another topic's consumer group) never holds them.
    assert not heir.claim("x1", k1, _at(3, 100, 100), stream="other").any()
    heir.finish("h1", 5_500, stream="grp-topic", through={3: 249})
    rest = heir.claim("h3", both.take(np.arange(150, 200)), _at(3, 250, 50), stream="grp-topic")
    assert rest.all()
    # Once committed, a position's claim is forgotten: the key is simply known.
    assert not heir.claim("h4", k1, _at(3, 100, 100), stream="grp-topic", fresh=False).any()
    heir.finish("h3", 5_500, stream="grp-topic", through={3: 299})
    assert not heir.claim("h5", k2, _at(3, 200, 100), stream="grp-topic").any()


def test_positions_of_other_partitions_are_distinct(open_cache: Opener) -> None:
    cache = open_cache()
    k = keys_in_slice(50, 5, seed=13)
    assert cache.claim("a", k, _at(0, 10, 50), stream="s").all()
    assert not cache.claim("b", k, _at(1, 10, 50), stream="s", fresh=False).any()
    assert cache.claim("c", k, _at(0, 10, 50), stream="s", fresh=False).all()


def test_redis_drops_the_records_of_committed_claims(shared_redis: SharedRedis) -> None:
    prefix = f"{shared_redis.prefix}:records"
    dead, heir = shared_redis.cache(prefix), shared_redis.cache(prefix)
    try:
        dead.rebuild(empty_keys(), None)
        k = keys_in_slice(200, 5, seed=14)
        dead.claim("g1", k.take(np.arange(100)), _at(0, 0, 100), stream="s")
        dead.claim("g2", k.take(np.arange(100, 200)), _at(0, 100, 100), stream="s", fresh=False)
        client = redis.Redis.from_url(shared_redis.url)
        assert client.keys(f"{prefix}:*claim:s:*")
        assert heir.claim("h1", k, _at(0, 0, 200), stream="s").all()
        heir.finish("h1", 5_500, stream="s", through={0: 199})
        assert client.keys(f"{prefix}:*claim:s:*") == []
        assert client.keys(f"{prefix}:*claims:s") == []
    finally:
        dead.close()
        heir.close()


def test_a_small_fresh_claim_then_the_rest(open_cache: Opener) -> None:
    """The first claim after a reassignment holds one key; later ones (not fresh) still find
    what the dead attempt won in every other part of the cache (Redis reads each group's
    records the first time a claim reaches it)."""
    dead = open_cache("shared")
    k = keys_in_slice(400, 5, seed=15)
    assert dead.claim("g1", k, _at(2, 0, 400), stream="s").all()
    heir = open_cache("shared", fresh=False) if not isinstance(dead, EmbeddedKeyCache) else dead
    assert heir.claim("h1", k.take(np.arange(1)), _at(2, 0, 1), stream="s").all()
    rest = heir.claim("h2", k.take(np.arange(1, 400)), _at(2, 1, 399), stream="s", fresh=False)
    assert rest.all()


def test_redis_claims_won_in_a_lost_epoch_are_not_the_streams_any_more(
    shared_redis: SharedRedis,
) -> None:
    """A consumer claims, Redis loses its data, another consumer rebuilds the cache from the
    events table (which holds the keys: it landed them). The first consumer's redo must not
    take its old claims for its own: they belong to the lost epoch."""
    prefix = f"{shared_redis.prefix}:epochs"
    first, other = shared_redis.cache(prefix), shared_redis.cache(prefix)
    try:
        first.rebuild(empty_keys(), None)
        k = keys_in_slice(100, 5, seed=16)
        assert first.claim("g1", k, stream="s").all()
        client = redis.Redis.from_url(shared_redis.url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.unlink(key)
        assert other.needs_rebuild()
        other.rebuild(k, None)
        assert not first.needs_rebuild()  # adopts the new epoch
        assert not first.claim("g1", k, stream="s").any()
    finally:
        first.close()
        other.close()
