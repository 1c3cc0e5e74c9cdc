"""The rebuild orchestration (``pipeline.rebuild``) over the in-memory cache and lock; the Redis
cache runs the same code with its lease (tests/test_keycache.py, tests/test_redis_faults.py)."""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
import pytest

from pipeline import rebuild
from pipeline.fingerprint import Keys, compute_keys
from pipeline.keycache import CacheLostError
from pipeline.testing import MemoryKeyCache, MemoryKeyState, MemoryRebuildLock

WINDOW_MS, SLICE_MS = 10_000, 1_000


def keys(first: int, n: int, *, time_ms: int = 5_000) -> Keys:
    """Keys of events ``ev-<first>`` … through the real fingerprint function."""
    ids = pl.Series("event_id", [f"ev-{i}" for i in range(first, first + n)])
    times = pl.Series("event_time", [time_ms] * n).cast(pl.Datetime("ms", "UTC"))
    return compute_keys(ids, times, SLICE_MS)


def cache(state: MemoryKeyState | None = None) -> MemoryKeyCache:
    return MemoryKeyCache(state, window_ms=WINDOW_MS, slice_ms=SLICE_MS)


def test_a_cache_of_one_process_reads_the_lake_once() -> None:
    calls: list[float | None] = []

    def loader(since: float | None) -> tuple[Keys, int | None]:
        calls.append(since)
        return keys(0, 10), 5_000

    c = cache()
    assert rebuild.ensure(c, loader)
    assert not rebuild.ensure(c, loader)  # whole: nothing to do
    assert calls == [None]
    assert not c.claim("b1", keys(0, 10)).any() and c.watermark() == 5_000


def test_a_shared_rebuild_catches_up_with_commits_made_during_its_read() -> None:
    calls: list[float | None] = []

    def loader(since: float | None) -> tuple[Keys, int | None]:
        calls.append(since)
        # The first read sees events 0-9; a group of events 10-14 commits while it runs.
        return (keys(0, 10), 5_000) if since is None else (keys(10, 5, time_ms=6_000), 6_000)

    c = cache()
    assert rebuild.ensure(c, loader, lock=MemoryRebuildLock())
    assert calls[0] is None and calls[1] is not None
    both = Keys.concat([keys(0, 10), keys(10, 5, time_ms=6_000)])
    assert not c.claim("b1", both).any()  # both reads' keys are held
    assert c.watermark() == 6_000 and c.valid()


def test_a_rebuilder_that_lost_its_lock_leaves_the_cache_closed() -> None:
    lock = MemoryRebuildLock()
    c = cache()

    def loader(since: float | None) -> tuple[Keys, int | None]:
        lock.lose()  # the lease expired during the read: another consumer may rebuild now
        return keys(0, 10), 5_000

    with pytest.raises(CacheLostError, match="lost the rebuild lock"):
        rebuild.ensure(c, loader, lock=lock)
    assert c.needs_rebuild() and not c.valid()
    with pytest.raises(CacheLostError):
        c.claim("b1", keys(0, 1))


def test_a_waiting_consumer_adopts_the_rebuild_of_the_lock_holder() -> None:
    state, lock = MemoryKeyState(), MemoryRebuildLock()
    holder, waiter = cache(state), cache(state)
    token = lock.acquire()
    assert token is not None
    read: list[float | None] = []
    result: list[bool] = []

    def loader(since: float | None) -> tuple[Keys, int | None]:
        read.append(since)
        return keys(0, 1), 1

    def wait() -> None:
        result.append(rebuild.ensure(waiter, loader, lock=lock))

    thread = threading.Thread(target=wait)
    thread.start()
    holder.rebuild(keys(0, 10), 5_000)  # the holder's rebuild, while the waiter polls
    lock.release(token)
    thread.join()
    assert result == [False] and read == []  # the waiter never read the lake
    assert not waiter.claim("b1", keys(0, 10)).any()
    assert np.array_equal(waiter.claim("b2", keys(10, 2)), [True, True])
