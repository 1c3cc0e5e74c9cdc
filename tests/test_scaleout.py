"""Several real consumers on one spool and one Redis, each on its own slot: kill -9, SIGSTOP,
Redis losing its data, a second consumer on a taken slot.

A consumer owns the spool files it renamed into ``incoming/.slot-<n>/`` until it has landed them;
a slot's files wait for that slot (restarted, they are its again), nobody takes them over. Every
test runs real ``adevents consume`` processes against a private redis-server (so that FLUSHALL
and restarts are safe) and checks the Delta tables against the generator's ground truth or the
events it was given. The helpers below read the lake of a DATA_DIR (``DATA_DIR/lake``).
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
from hardening import (
    TIMEOUT_S,
    consume_refused,
    drained,
    lake_table,
    ledger,
    statuses,
    wait_for,
)

from generator.runner import generate
from pipeline.fingerprint import Keys, empty_keys
from pipeline.groups import slot_dir, waiting_entries
from pipeline.leases import process_space
from pipeline.reconcile import reconcile
from pipeline.redis_cache import REBUILD_LOCK, ExpiredSliceError, RedisKeyCache
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter, list_incoming
from pipeline.testing import event_table

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


@dataclass
class Fleet:
    """Consumer slots of one spool, each running one real ``adevents consume`` at a time."""

    data: Path
    redis_url: str
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    generation: itertools.count[int] = field(default_factory=itertools.count)
    kills: int = 0

    def env(self, slot: int, name: str, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ADEVENTS_")}
        return {
            **base,
            "DATA_DIR": str(self.data),
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": "scale",
            "CONSUMER_SLOT": str(slot),
            "FSYNC": "false",
            "REBUILD_GRACE": "200ms",
            "POLL_INTERVAL": "20ms",
            "RETRY_MAX_DELAY": "500ms",
            "LOG_LEVEL": "WARNING",
            "CONSUMER_NAME": name,
            "MAX_EVENTS_PER_SECOND": "0",
            **self.extra_env,
            **extra,
        }

    def start(self, slot: int, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        name = f"c{slot}-g{next(self.generation)}"
        self.procs[slot], self.names[slot] = self.run(slot, name, *args, **extra), name
        return self.procs[slot]

    def run(self, slot: int, name: str, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        """A consumer process on ``slot`` that the fleet does not track (its log is kept)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "cli", "consume", *args],
                env=self.env(slot, name, **extra),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill(self, slot: int) -> None:
        """kill -9 the slot's process (its slot lock goes with it)."""
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills += 1

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


def wait_stopped(proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``proc`` stopped itself at its ADEVENTS_STOP_AT point."""

    def stopped() -> bool:
        assert proc.poll() is None, "the consumer exited instead of stopping"
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "T"

    wait_for(stopped, "the consumer to reach its stop point")


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "data", redis_server.url, tmp_path / "logs")
    yield f
    for proc in f.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def files_across_consumers(copies: pl.DataFrame, rows: pl.DataFrame) -> int:
    """Event ids whose copies were in files landed by different consumers.

    ``copies`` is (source_file, event_id) of duplicated ids; ``rows`` the ledger.
    """
    spans = copies.join(rows.select("source_file", "consumer"), on="source_file")
    pairs = spans.join(spans, on="event_id", suffix="_b").filter(
        pl.col("source_file") < pl.col("source_file_b"),
        pl.col("consumer") != pl.col("consumer_b"),
    )
    return pairs["event_id"].n_unique()


# -- three slots, kill -9 and a Redis flush ----------------------------------------------------
@pytest.mark.slow
def test_three_slots_kill9_and_a_flush_land_every_event_once(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    """≥ 2M events over slots 0–2 of one spool; a random slot is killed (kill -9) every 1–2.5 s
    and restarted on its slot, where it redoes its unfinished groups; Redis is flushed once
    half-way, so every slot meets a lost cache with groups in hand."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    files = make_spool(data, truth, events=2_000_000, batch_size=10_000, seed=20_251_127)
    waiting = spool_ids(data / "incoming")
    counts = waiting.group_by("event_id").agg(pl.col("source_file").n_unique().alias("files"))
    across = counts.filter(pl.col("files") > 1)["event_id"]
    assert len(across) > 5_000  # copies in different files, up to 20 files apart
    copies = waiting.filter(pl.col("event_id").is_in(across.implode()))

    # A cap per consumer stretches the run to ~20 s, so kills land all along it on any machine;
    # groups of two files make the slots take turns along the spool.
    fleet.extra_env |= {"MAX_EVENTS_PER_SECOND": "40000", "COMMIT_TARGET_ROWS": "20000"}
    for slot in range(3):
        fleet.start(slot)
    rng = random.Random(7)
    client = redis.Redis.from_url(redis_server.url)
    flushed_at = None
    deadline = time.monotonic() + 300
    next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
    # A kill waits for a file landed since the previous one: on a loaded machine a restart (and
    # its rebuild after the flush) can outlast the pause, and kills alone would then starve the
    # run. Progress between kills, not the clock, bounds the run.
    left_at_kill = files + 1
    while not drained(data):
        assert time.monotonic() < deadline, "the consumers did not finish\n" + fleet.log_text()
        left = len(waiting_entries(data / "incoming"))
        if flushed_at is None and left <= files // 2:
            client.flushall()
            flushed_at = left
        if time.monotonic() >= next_kill and 0 < left < left_at_kill:
            slot = rng.randrange(3)
            fleet.kill(slot)
            fleet.start(slot)
            left_at_kill = left
            next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
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
    assert files_across_consumers(copies, rows) > 1_000


# -- one slot stopped (a long GC pause) while the others run -----------------------------------
@pytest.mark.parametrize("point", ["after_claim", "after_events_parquet", "after_events_commit"])
def test_a_stopped_slot_keeps_its_files_and_lands_them_once_when_resumed(
    tmp_path: Path, fleet: Fleet, point: str
) -> None:
    """SIGSTOP of slot 0 in its second group while slots 1 and 2 drain the spool: no one takes
    slot 0's files (there is no lease to expire), and resumed, it lands them exactly once."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    files = make_spool(data, truth, events=60_000, batch_size=3_000, seed=5)
    names = [p.name for p in list_incoming(data / "incoming")]
    fleet.extra_env["COMMIT_TARGET_ROWS"] = "1"  # one file per group
    stalled = fleet.start(0, "--once", ADEVENTS_STOP_AT=f"{point}:2")
    wait_stopped(stalled)
    # Slot 0 started alone: its first group is the first file (landed or not yet retired),
    # the stopped one the second. Stopped on its committing thread, it may have taken two more
    # (docs/decisions/0012-staged-commits.md): the third written, the fourth decided; the fifth
    # waits for the second to land. Stopped while deciding (after_claim), none more.
    ahead = 0 if point == "after_claim" else 2
    held = {p.name for p in list_incoming(slot_dir(data / "incoming", 0))}
    assert names[1] in held and held <= set(names[: 2 + ahead]), held
    for slot in (1, 2):
        fleet.start(slot, "--once")
    for slot in (1, 2):
        assert fleet.procs[slot].wait(timeout=TIMEOUT_S) == 0, fleet.log_text()
    # Everything else landed; what slot 0 owns still waits in its slot, for it alone.
    assert {p.name for p in waiting_entries(data / "incoming")} == held
    rows = ledger(data)
    assert names[1] not in set(rows["source_file"])
    assert set(rows.filter(pl.col("source_file").is_in(held))["consumer"]) <= {fleet.names[0]}

    os.kill(stalled.pid, signal.SIGCONT)
    assert stalled.wait(timeout=TIMEOUT_S) == 0, fleet.log_text()
    assert "Traceback" not in fleet.log_text(), fleet.log_text()
    assert drained(data)
    rows = ledger(data)
    assert len(rows) == rows["source_file"].n_unique() == files
    assert held <= set(rows.filter(pl.col("consumer") == fleet.names[0])["source_file"])
    reconcile(data, truth)


# -- copies of one event claimed by two slots at the same moment --------------------------------
@pytest.mark.parametrize("then", ["resumed", "killed_and_restarted", "redis_flushed"])
def test_copies_held_by_two_slots_at_once_land_once(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer, then: str
) -> None:
    """Files a (slot 0) and b (slot 1) carry the same 500 events. Slot 0 stops right after
    claiming a's keys, and slot 1 lands b meanwhile:

    - resumed, or killed -9 and restarted (its redo claims again under the same claim id, and
      gets the same answers), slot 0 lands a; b's copies were duplicates;
    - Redis flushed before slot 1 starts: slot 1 rebuilds from the events table and wins the
      keys; slot 0's claims belong to a lost epoch, so its group is decided again, and a's
      copies are the duplicates.
    """
    data = fleet.data
    incoming = data / "incoming"
    base_ms = int(time.time() * 1000) - 1_800_000
    ids = [f"ev-{i:04d}" for i in range(500)]
    times = [base_ms + i for i in range(len(ids))]
    a = SpoolWriter(incoming, "a").write(event_table(ids, time_ms=times))
    first = fleet.start(0, "--once", ADEVENTS_STOP_AT="after_claim")
    wait_stopped(first)
    if then == "redis_flushed":
        redis.Redis.from_url(redis_server.url).flushall()
    b = SpoolWriter(incoming, "b").write(event_table(ids, time_ms=times, user_id=["other"] * 500))
    assert fleet.start(1, "--once").wait(timeout=TIMEOUT_S) == 0, fleet.log_text()
    assert {p.name for p in waiting_entries(incoming)} == {a.name}
    if then == "killed_and_restarted":
        fleet.kill(0)
        fleet.start(0, "--once")
    else:
        os.kill(first.pid, signal.SIGCONT)
    assert fleet.procs[0].wait(timeout=TIMEOUT_S) == 0, fleet.log_text()
    assert "Traceback" not in fleet.log_text(), fleet.log_text()

    assert drained(data)
    events = lake_table(data, "events")
    assert sorted(events["event_id"]) == ids
    winner, loser = (b, a) if then == "redis_flushed" else (a, b)
    assert set(events["user_id"]) == (
        {"other"} if winner == b else {f"user-{i}" for i in range(500)}
    )
    rows = {r["source_file"]: r for r in ledger(data).iter_rows(named=True)}
    assert (rows[winner.name]["accepted"], rows[winner.name]["duplicates"]) == (500, 0)
    assert (rows[loser.name]["accepted"], rows[loser.name]["duplicates"]) == (0, 500)


def test_a_second_consumer_on_a_taken_slot_is_refused(tmp_path: Path, fleet: Fleet) -> None:
    """Two processes on one slot would land its files twice over: the second one exits at once
    with a message naming the slot and the way out, and loses nothing; another slot may start."""
    data = fleet.data
    ids = [f"ev-{i}" for i in range(100)]
    path = SpoolWriter(data / "incoming", "p").write(
        event_table(ids, time_ms=int(time.time() * 1000) - 60_000)
    )
    first = fleet.start(0, "--once", ADEVENTS_STOP_AT="after_claim")
    wait_stopped(first)
    second = fleet.run(0, "second-on-slot-0", "--once")
    assert second.wait(timeout=TIMEOUT_S) == 2
    text = (fleet.logs / "second-on-slot-0.log").read_text()
    assert "already running on slot 0" in text and "CONSUMER_SLOT" in text, text
    assert "Traceback" not in text, text
    assert fleet.run(1, "on-slot-1", "--once").wait(timeout=TIMEOUT_S) == 0, fleet.log_text()

    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=TIMEOUT_S) == 0, fleet.log_text()
    assert drained(data)
    assert sorted(lake_table(data, "events")["event_id"]) == sorted(ids)
    assert ledger(data)["source_file"].to_list() == [path.name]


# -- Redis restarts empty while consumers run -------------------------------------------------
@pytest.mark.slow
def test_redis_restart_while_consumers_run(
    tmp_path: Path, fleet: Fleet, redis_server: RedisServer
) -> None:
    """Redis goes away until a consumer shows it waits, and comes back empty: the consumers
    rebuild from the events table and go on."""
    data, truth = fleet.data, tmp_path / "truth.parquet"
    files = make_spool(data, truth, events=400_000, batch_size=5_000, seed=9)
    fleet.extra_env |= {"MAX_EVENTS_PER_SECOND": "40000", "COMMIT_TARGET_ROWS": "10000"}
    for slot in range(2):
        fleet.start(slot)
    wait_for(
        lambda: len(waiting_entries(data / "incoming")) <= files // 2,
        "half of the spool to land\n" + fleet.log_text(),
    )
    redis_server.stop()
    wait_for(
        lambda: any(s.fault == "redis_unavailable" for s in statuses(data)),
        "a consumer to show it waits for Redis",
    )
    redis_server.start()
    wait_for(lambda: drained(data), "the spool to drain")
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
    """A consumer decides group 2 while group 1 is still being committed: after a rebuild by
    another consumer in between, group 2 (claimed in the new epoch) may commit, group 1 not."""
    a, b = _cache(redis_server.url), _cache(redis_server.url)
    a.rebuild(empty_keys(), None)
    assert not b.needs_rebuild()
    assert b.claim("one", _keys(100, 5, seed=1)).all()
    redis.Redis.from_url(redis_server.url).flushall()
    a.rebuild(empty_keys(), None)  # another consumer rebuilt: group one's claims are gone
    assert b.claim("two", _keys(100, 6, seed=2)).all()  # adopts the new epoch on the way
    assert b.valid("two")
    assert not b.valid("one")
    b.finish("two", 6_000)
    a.close()
    b.close()


def test_a_rebuild_fences_claims_below_its_window(redis_server: RedisServer) -> None:
    """A group validated before Redis lost its data, claimed again in the rebuilt epoch, must
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


def test_rebuild_waits_for_a_live_holder_of_the_rebuild_lock(redis_server: RedisServer) -> None:
    """The rebuild lock of a consumer on another host holds the rebuild off until it expires;
    the lock this consumer then takes lasts LEASE_TIMEOUT (``lock_timeout_s``) at most."""
    cache = _cache(redis_server.url, lock_timeout_s=5.0)
    client = redis.Redis.from_url(redis_server.url)
    key = f"ep:{{l}}:{REBUILD_LOCK}"
    client.set(key, "elsewhere@1|1|rebuild|x", px=300)
    seen: list[tuple[str, int]] = []

    def loader(since: float | None) -> tuple[Keys, int | None]:
        holder = client.get(key)
        seen.append((holder.decode() if isinstance(holder, bytes) else "", int(client.pttl(key))))
        return empty_keys(), None

    assert cache.ensure(loader)
    assert seen, "the rebuild never read the lake"
    for holder, ttl_ms in seen:
        assert holder.startswith(f"{process_space()}|{os.getpid()}|"), holder
        assert 0 < ttl_ms <= 5_000
    assert not cache.needs_rebuild()
    assert client.get(key) is None  # released once the cache was whole
    cache.close()
    client.close()


def test_an_embedded_cache_consumer_is_refused_beside_a_redis_slot(
    tmp_path: Path, fleet: Fleet
) -> None:
    """Two key caches on one spool could not see each other's claims: the second is refused."""
    SpoolWriter(fleet.data / "incoming", "p").write(
        event_table([f"e{i}" for i in range(10)], time_ms=int(time.time() * 1000) - 60_000)
    )
    first = fleet.start(0, "--once", ADEVENTS_STOP_AT="after_claim")
    wait_stopped(first)
    env = fleet.env(0, "embedded")
    del env["REDIS_URL"]
    embedded = consume_refused(env)
    assert "already running" in embedded.stderr and "embedded key cache" in embedded.stderr
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=TIMEOUT_S) == 0
