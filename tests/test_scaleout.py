"""Several real consumers on one Redis: kill -9, a stalled consumer, Redis losing its data.

Every test runs real ``adevents consume`` processes against a private redis-server (so that
FLUSHALL and restarts are safe) and reconciles the lake with the generator's ground truth.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import redis
from conftest import RedisServer

from generator.runner import generate
from pipeline.consumer import lease_name
from pipeline.fingerprint import Keys, empty_keys
from pipeline.reconcile import reconcile
from pipeline.redis_cache import ExpiredSliceError, RedisKeyCache
from pipeline.settings import Settings
from pipeline.spool import list_incoming

LEASE_TIMEOUT_S = 3.0
#: What the consumer that rebuilds the Redis cache logs.
REBUILT = "the Redis key cache is empty or lost its data"


# -- helpers -----------------------------------------------------------------------------------
def make_spool(data: Path, truth: Path, *, events: int, batch_size: int, seed: int) -> int:
    """A generated spool with 1 % duplicates, some re-sent up to 20 files later; its file count."""
    settings = Settings.from_env({}, data_dir=str(data), dup_rate=0.01, events_per_second=50_000)
    summary = generate(
        settings, events=events, rate=0, batch_size=batch_size, seed=seed, truth=truth
    )
    assert summary.duplicates > 0
    return summary.files


def spool_ids(incoming: Path) -> pl.DataFrame:
    """(source_file, event_id) of every row waiting in the spool."""
    return pl.concat(
        [
            pl.read_ipc(p, columns=["event_id"]).with_columns(source_file=pl.lit(p.name))
            for p in list_incoming(incoming)
        ]
    )


def staging_empty(data: Path) -> bool:
    staging = data / "staging"
    return not staging.exists() or not any(staging.iterdir())


def ledger(data: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((data / "ledger").rglob("*.parquet")))


@dataclass
class Fleet:
    """Numbered consumer slots, each running one real ``adevents consume`` process at a time."""

    data: Path
    redis_url: str
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    generation: itertools.count[int] = field(default_factory=itertools.count)
    kills: int = 0
    zombies: list[tuple[float, subprocess.Popen[bytes]]] = field(default_factory=list)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ADEVENTS_")}
        return {
            **base,
            "DATA_DIR": str(self.data),
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": "scale",
            "FSYNC": "false",
            "LEASE_TIMEOUT": f"{LEASE_TIMEOUT_S}s",
            "REBUILD_GRACE": "200ms",
            "POLL_INTERVAL": "20ms",
            "LOG_LEVEL": "WARNING",
            "CONSUMER_NAME": name,
            "MAX_EVENTS_PER_SECOND": "0",
            **self.extra_env,
            **extra,
        }

    def start(self, slot: int, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        name = f"c{slot}-g{next(self.generation)}"
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "consume", *args],
                env=self.env(name, **extra),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.procs[slot], self.names[slot] = proc, name
        return proc

    def kill(self, slot: int, *, reap: bool = True) -> None:
        """kill -9 the slot's process. Unreaped, it stays a zombie whose pid still exists, so the
        others cannot tell it died and must wait for its leases to expire."""
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        self.kills += 1
        if reap:
            proc.wait()
        else:
            self.zombies.append((time.monotonic() + 2 * LEASE_TIMEOUT_S, proc))

    def reap_zombies(self, *, all_now: bool = False) -> None:
        now = time.monotonic()
        for entry in list(self.zombies):
            if all_now or entry[0] <= now:
                entry[1].wait()
                self.zombies.remove(entry)

    def stop_all(self, timeout: float = 60) -> dict[str, int | None]:
        """SIGTERM every running consumer; their exit codes by name."""
        for proc in self.procs.values():
            wait_catches_sigterm(proc)  # one restarted a moment ago may still be importing
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for slot, proc in self.procs.items():
            try:
                codes[self.names[slot]] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[self.names[slot]] = proc.wait()
        self.reap_zombies(all_now=True)
        return codes

    def log_text(self) -> str:
        return "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.logs.glob("*"))
        )


def wait_catches_sigterm(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until ``proc`` has installed its SIGTERM handler (or exited)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            return
        caught = int(
            next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16
        )
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.05)


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "data", redis_server.url, tmp_path / "logs")
    yield f
    for proc in f.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    f.reap_zombies(all_now=True)


def overlapping_cross_consumer_copies(copies: pl.DataFrame, rows: pl.DataFrame) -> tuple[int, int]:
    """(event_ids whose copies were landed by different consumers, of which in overlapping time).

    ``copies`` is (source_file, event_id) of duplicated ids; ``rows`` the ledger.
    """
    end = pl.col("committed_at").dt.epoch("ms")
    landed = rows.select(
        "source_file", "consumer", end=end, begin=end - pl.col("processing_ms").cast(pl.Int64)
    )
    spans = copies.join(landed, on="source_file")
    pairs = spans.join(spans, on="event_id", suffix="_b").filter(
        pl.col("source_file") < pl.col("source_file_b"),
        pl.col("consumer") != pl.col("consumer_b"),
    )
    together = pairs.filter(
        (pl.col("begin") < pl.col("end_b")) & (pl.col("begin_b") < pl.col("end"))
    )
    return pairs["event_id"].n_unique(), together["event_id"].n_unique()


# -- three consumers, kill -9 and a Redis flush ---------------------------------------------
@pytest.mark.slow
def test_three_consumers_kill9_and_a_flush_land_every_event_once(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    """≥ 2M events over 3 consumers; a random one is killed every 1–2.5 s (half of the time left
    unreaped, so its leases must expire) and restarted; Redis is flushed once half-way."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    files = make_spool(data, truth, events=2_000_000, batch_size=10_000, seed=20_251_127)
    waiting = spool_ids(data / "incoming")
    counts = waiting.group_by("event_id").agg(pl.col("source_file").n_unique().alias("files"))
    across = counts.filter(pl.col("files") > 1)["event_id"]
    assert len(across) > 5_000  # copies in different files, up to 20 files apart
    copies = waiting.filter(pl.col("event_id").is_in(across.implode()))

    # A cap per consumer stretches the run to ~20 s, so kills land all along it on any machine.
    fleet.extra_env["MAX_EVENTS_PER_SECOND"] = "40000"
    for slot in range(3):
        fleet.start(slot)
    rng = random.Random(7)
    client = redis.Redis.from_url(redis_server.url)
    flushed_at = None
    deadline = time.monotonic() + 150
    next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
    while list_incoming(data / "incoming") or not staging_empty(data):
        assert time.monotonic() < deadline, "the consumers did not finish\n" + fleet.log_text()
        left = len(list_incoming(data / "incoming"))
        if flushed_at is None and left <= files // 2:
            client.flushall()
            flushed_at = left
        if time.monotonic() >= next_kill and left:
            slot = rng.randrange(3)
            fleet.kill(slot, reap=fleet.kills % 2 == 0)
            fleet.start(slot)
            next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
        fleet.reap_zombies()
        time.sleep(0.05)
    client.close()
    codes = fleet.stop_all()
    logs = fleet.log_text()
    assert set(codes.values()) == {0}, f"{codes}\n{logs}"
    assert "Traceback" not in logs, logs
    assert fleet.kills >= 4
    assert flushed_at is not None and flushed_at > 0
    # Built once on the empty Redis at the start, and again after the flush.
    assert logs.count(REBUILT) >= 2, logs

    result = reconcile(data, truth)  # raises on any loss, duplicate or miscount
    assert result.stored == result.truth_distinct_valid
    assert result.stored_distinct == result.stored
    assert result.ledger_rows_in == result.truth_rows >= 2_000_000
    rows = ledger(data)
    assert rows["source_file"].n_unique() == len(rows) == files
    assert rows["consumer"].n_unique() >= 4  # the three slots and some of their restarts
    across_consumers, at_once = overlapping_cross_consumer_copies(copies, rows)
    assert across_consumers > 1_000
    assert at_once > 0  # copies of one event held by two consumers at the same moment


# -- a stalled consumer -------------------------------------------------------------------------
def wait_stopped(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] != "T":
        assert proc.poll() is None, "the consumer exited instead of stopping"
        assert time.monotonic() < deadline, "the consumer never reached its stop point"
        time.sleep(0.02)


def held_files(data: Path, owner: str) -> set[str]:
    """Spool files ``owner`` has staged (its attempt directories name it)."""
    from pipeline.commit import batch_id_of
    from pipeline.consumer import source_name

    return {
        source_name(batch_id_of(d))
        for d in (data / "staging").iterdir()
        if d.name.endswith(".partial") and f"_{owner}_" in d.name
    }


@pytest.mark.parametrize("point", ["after_claim", "after_stage"])
def test_stalled_consumer_loses_its_lease_and_never_commits(
    tmp_path: Path, fleet: Fleet, point: str
) -> None:
    """SIGSTOP (a long GC pause) longer than the lease: the other consumer takes the file over
    once the lease expires and lands it once; the stalled one, resumed, commits nothing stale."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    make_spool(data, truth, events=60_000, batch_size=3_000, seed=5)
    names = [p.name for p in list_incoming(data / "incoming")]
    # The third file stalls (after_claim: between its claim and staging; after_stage: just
    # before the commit check), while the second may still be being written: both leases lapse.
    stale = fleet.start(0, "--once", ADEVENTS_STOP_AT=f"{point}:3")
    wait_stopped(stale)
    # When the stalled consumer's lease on the third file runs out, read from Redis itself
    # (its heartbeat thread is stopped too), so the check below depends on no timing.
    client = redis.Redis.from_url(fleet.redis_url)
    lease_ms = client.pttl(f"scale:{{l}}:{lease_name(names[2])}")
    lease_expiry_ms = time.time() * 1000 + lease_ms
    client.close()
    assert lease_ms > 0, "the stalled consumer should hold the third file's lease"
    stalled_name = fleet.names[0]
    staged_by_stalled = held_files(data, stalled_name)
    if point == "after_stage":
        assert names[2] in staged_by_stalled
    taker = fleet.start(1, "--once")
    assert taker.wait(timeout=120) == 0, fleet.log_text()
    assert not list_incoming(data / "incoming")
    rows = ledger(data)
    third = rows.row(by_predicate=pl.col("source_file") == names[2], named=True)
    assert third["consumer"] == fleet.names[1]  # the taker landed the stalled file
    # ... never while the stalled consumer's lease was still valid (10 ms: PTTL's rounding).
    assert third["committed_at"].timestamp() * 1000 >= lease_expiry_ms - 10

    os.kill(stale.pid, signal.SIGCONT)
    assert stale.wait(timeout=60) == 0, fleet.log_text()
    assert "not committing" in (fleet.logs / f"{stalled_name}.log").read_text()
    assert "Traceback" not in fleet.log_text(), fleet.log_text()
    rows = ledger(data)
    assert len(rows) == rows["source_file"].n_unique() == len(names)
    # The stalled consumer committed at most the two files before; never the stalled one.
    assert set(rows.filter(pl.col("consumer") == stalled_name)["source_file"]) <= set(names[:2])
    assert staging_empty(data)
    reconcile(data, truth)


# -- Redis restarts empty while consumers run -------------------------------------------------
@pytest.mark.slow
def test_redis_restart_while_consumers_run(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    """Redis goes away for a second and comes back empty: the consumers wait, rebuild, go on."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    files = make_spool(data, truth, events=400_000, batch_size=5_000, seed=9)
    fleet.extra_env["MAX_EVENTS_PER_SECOND"] = "40000"
    for slot in range(2):
        fleet.start(slot)
    deadline = time.monotonic() + 120
    while len(list_incoming(data / "incoming")) > files // 2:
        assert time.monotonic() < deadline, fleet.log_text()
        time.sleep(0.05)
    redis_server.stop()
    time.sleep(1.0)
    redis_server.start()
    while list_incoming(data / "incoming") or not staging_empty(data):
        assert time.monotonic() < deadline, fleet.log_text()
        time.sleep(0.05)
    codes = fleet.stop_all()
    assert set(codes.values()) == {0}, f"{codes}\n{fleet.log_text()}"
    assert fleet.log_text().count(REBUILT) >= 2, fleet.log_text()
    reconcile(data, truth)


# -- the key cache across epochs, threads and consumers -----------------------------------------
def _keys(n: int, sl: int, seed: int) -> Keys:
    rng = np.random.default_rng(seed)
    ms = np.full(n, sl * 1000, dtype=np.int64)
    hi = rng.integers(0, 2**64, n, dtype=np.uint64)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    return Keys(ms // 1000, hi, lo, ms)


def _cache(url: str, **kw: Any) -> RedisKeyCache:
    return RedisKeyCache.from_url(url, prefix="ep", window_ms=60_000, slice_ms=1_000, **kw)


def test_valid_is_per_batch_across_a_rebuild(redis_server: RedisServer) -> None:
    """A consumer decides batch 2 while batch 1 is still being committed: after a rebuild by
    another consumer in between, batch 2 (claimed in the new epoch) may commit, batch 1 not."""
    a, b = _cache(redis_server.url), _cache(redis_server.url)
    a.rebuild(empty_keys(), None)
    assert not b.needs_rebuild()
    assert b.claim("one", _keys(100, 5, seed=1)).all()
    redis.Redis.from_url(redis_server.url).flushall()
    a.rebuild(empty_keys(), None)  # another consumer rebuilt: batch one's claims are gone
    assert b.claim("two", _keys(100, 6, seed=2)).all()  # adopts the new epoch on the way
    assert b.valid("two")
    assert not b.valid("one")
    b.finish("two", 6_000)
    a.close()
    b.close()


def test_a_rebuild_fences_claims_below_its_window(redis_server: RedisServer) -> None:
    """A batch validated before Redis lost its data, claimed again in the rebuilt epoch, must
    not find the slices the rebuild left out (late at the rebuilt watermark) empty."""
    a, b = _cache(redis_server.url), _cache(redis_server.url)
    a.rebuild(empty_keys(), None)
    old = _keys(100, 5, seed=3)
    assert b.needs_rebuild() is False and b.claim("first", old).all()
    b.finish("first", 5_999)
    redis.Redis.from_url(redis_server.url).flushall()
    a.rebuild(old, 70_000)  # the lake says: watermark 70 s, so slices below 10 are late
    assert a.expired_below() == 10
    with pytest.raises(ExpiredSliceError):
        b.claim("validated-before-the-loss", Keys.concat([old, _keys(5, 60, seed=4)]))
    assert b.claim("fresh", _keys(5, 60, seed=5)).all()
    a.close()
    b.close()


def test_rebuild_lock_follows_lease_timeout(redis_server: RedisServer) -> None:
    """The rebuild lock of a consumer that died on another host expires after LEASE_TIMEOUT."""
    cache = _cache(redis_server.url, lock_timeout_s=0.5)
    client = redis.Redis.from_url(redis_server.url)
    client.set("ep:{l}:rebuild-lock", "elsewhere@1|1|rebuild|x", px=500)
    started = time.monotonic()
    assert cache.ensure(lambda since: (empty_keys(), None))
    assert 0.4 < time.monotonic() - started < 5
    assert not cache.needs_rebuild()
    cache.close()
    client.close()
