"""A Redis that flaps never stops the consumer: it waits, rebuilds, and lands everything once.

Real ``adevents consume`` processes against a private redis-server that the tests stop,
restart empty (kill -9 and start) and flap, at named points of a commit group and of the
rebuild (from the events table), and a hypothesis property over fault schedules run
in-process against the same real Redis. Every test compares the Delta tables with an
uninterrupted run's: nothing lost, nothing duplicated. Every group is one spool file
(COMMIT_TARGET_ROWS=1), so the groups, and so the decisions, are the same in every run.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
import redis
from conftest import RedisServer
from hardening import (
    TIMEOUT_S,
    ConsumerProcess,
    assert_same_lake,
    base_env,
    copy_spool,
    drained,
    ledger,
    statuses,
    wait_for,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_crash import build_spool

from pipeline import faults
from pipeline.consumer import Consumer
from pipeline.factory import make_consumer
from pipeline.groups import waiting_entries
from pipeline.settings import Settings
from pipeline.testing import lake_contents

Lake = tuple[pl.DataFrame, pl.DataFrame]


def consumer_settings(data: Path, url: str, prefix: str) -> Settings:
    return Settings.from_env(
        {},
        data_dir=str(data),
        redis_url=url,
        redis_key_prefix=prefix,
        fsync=False,
        max_events_per_second=0,
        poll_interval=0.02,
        rebuild_grace=0.05,
        retry_max_delay=0.5,
        disk_min_free=0,
        commit_target_rows=1,
    )


def reference_lake(spool: Path, work: Path, url: str) -> Lake:
    """The lake an uninterrupted in-process consumer makes of ``spool``."""
    copy_spool(spool, work)
    consumer = make_consumer(consumer_settings(work, url, "reference"))
    consumer.start(resume=False)
    consumer.run(once=True)
    consumer.close()
    events, quarantine = lake_contents(work)
    assert len(events) and len(quarantine)
    return events, quarantine


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_spool(tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer) -> Path:
    spool = tmp_path_factory.mktemp("spool") / "incoming"
    build_spool(spool, files=6, rows=300)
    return spool


@pytest.fixture(scope="module")
def small_reference(
    tmp_path_factory: pytest.TempPathFactory, small_spool: Path, module_redis: RedisServer
) -> Lake:
    return reference_lake(small_spool, tmp_path_factory.mktemp("ref"), module_redis.url)


def flush(server: RedisServer) -> None:
    client = redis.Redis(port=server.port)
    client.flushall()
    client.close()


def env_for(data: Path, server: RedisServer, **extra: str) -> dict[str, str]:
    return base_env(
        data, REDIS_URL=server.url, REDIS_KEY_PREFIX="faults", COMMIT_TARGET_ROWS="1", **extra
    )


def finish_and_check(consumer: ConsumerProcess, data: Path, reference: Lake) -> str:
    """Wait until the spool is drained, stop the consumer cleanly, compare the lake."""
    wait_for(lambda: drained(data) or not consumer.running(), "the consumer to drain the spool")
    assert consumer.running(), "the consumer exited\n" + consumer.text()
    assert consumer.terminate() == 0, consumer.text()
    text = consumer.text()
    assert "Traceback" not in text, text
    assert_same_lake(data, reference)
    (status,) = [s for s in statuses(data) if consumer.proc and s.pid == consumer.proc.pid]
    assert status.state == "stopped"
    return text


# -- the cases of issue 14, each in a real process -----------------------------------------------
def test_redis_lost_during_the_startup_rebuild(
    tmp_path: Path, module_redis: RedisServer, small_spool: Path, small_reference: Lake
) -> None:
    """Before: ``CacheLostError: lost the rebuild lock during the rebuild`` and exit 1.
    Now: the consumer waits, rebuilds again, and lands everything exactly once."""
    data = tmp_path / "data"
    names = sorted(p.name for p in small_spool.iterdir())
    (data / "incoming").mkdir(parents=True)
    for name in names[:3]:  # half of the spool lands first, so the rebuild has work to do
        shutil.copy2(small_spool / name, data / "incoming" / name)
    flush(module_redis)
    first = ConsumerProcess(env_for(data, module_redis), tmp_path / "first.log", ("--once",))
    proc = first.start().proc
    assert proc is not None and proc.wait(timeout=TIMEOUT_S) == 0, first.text()
    for name in names[3:]:
        shutil.copy2(small_spool / name, data / "incoming" / name)
    flush(module_redis)  # the next start must rebuild from the events table
    consumer = ConsumerProcess(
        env_for(data, module_redis, ADEVENTS_STOP_AT="mid_rebuild"), tmp_path / "c.log"
    ).start()
    try:
        consumer.wait_stopped_at_point()
        module_redis.restart()  # the rebuild lock and every key written so far are gone
        consumer.cont()
        text = finish_and_check(consumer, data, small_reference)
    finally:
        consumer.kill()
    assert "pausing: redis_lost" in text, text
    assert "resumed after" in text, text


def test_redis_restarted_twice_within_moments_mid_batch(
    tmp_path: Path, module_redis: RedisServer, small_spool: Path, small_reference: Lake
) -> None:
    """Before: ``NoScriptError`` on the second script reload, or a ``CacheLostError`` raised in
    the retry's own handler, and exit 1. Now: the consumer rides both restarts out."""
    data = tmp_path / "data"
    copy_spool(small_spool, data)
    flush(module_redis)
    consumer = ConsumerProcess(
        env_for(data, module_redis, ADEVENTS_STOP_AT="after_claim:3"), tmp_path / "c.log"
    ).start()
    try:
        consumer.wait_stopped_at_point()
        module_redis.restart()
        consumer.cont()  # it meets an empty Redis with no scripts ...
        module_redis.restart()  # ... which restarts again while it reacts
        finish_and_check(consumer, data, small_reference)
    finally:
        consumer.kill()


@pytest.mark.parametrize("when", ["at_start", "mid_run"])
def test_redis_down_for_a_while_then_back(
    tmp_path: Path,
    module_redis: RedisServer,
    small_spool: Path,
    small_reference: Lake,
    when: str,
) -> None:
    """Redis refuses connections until the consumer has retried several times, visibly in its
    status, logging the pause once; it comes back empty, and the consumer finishes exactly."""
    data = tmp_path / "data"
    copy_spool(small_spool, data)
    flush(module_redis)
    stop_at = {"ADEVENTS_STOP_AT": "after_events_parquet:2"} if when == "mid_run" else {}
    if when == "at_start":
        module_redis.stop()
    consumer = ConsumerProcess(env_for(data, module_redis, **stop_at), tmp_path / "c.log").start()
    try:
        if when == "mid_run":
            consumer.wait_stopped_at_point()
            module_redis.stop()
            consumer.cont()

        def retried_a_few_times() -> bool:
            found = statuses(data)
            return bool(found) and found[0].state == "retrying" and found[0].attempts >= 2

        wait_for(retried_a_few_times, "the status to show several retries")
        (status,) = statuses(data)
        assert status.fault == "redis_unavailable"
        assert status.next_retry_at is not None and status.since > 0
        assert consumer.running()
        module_redis.start()
        text = finish_and_check(consumer, data, small_reference)
    finally:
        consumer.kill()
        if module_redis.proc is None:
            module_redis.start()
    assert text.count("pausing: redis_unavailable") == 1, text  # once per state change
    assert text.count("resumed after") >= 1, text


def test_once_gives_up_after_the_retry_timeout(
    tmp_path: Path, module_redis: RedisServer, small_spool: Path
) -> None:
    """With --once, a Redis that stays down ends the run with a clear message and exit 1."""
    data = tmp_path / "data"
    copy_spool(small_spool, data)
    module_redis.stop()
    try:
        consumer = ConsumerProcess(
            env_for(data, module_redis, ONCE_RETRY_TIMEOUT="1s"), tmp_path / "c.log", ("--once",)
        ).start()
        assert consumer.proc is not None
        assert consumer.proc.wait(timeout=TIMEOUT_S) == 1
    finally:
        module_redis.start()
    text = consumer.text()
    assert "adevents consume: gave up after" in text and "redis_unavailable" in text, text
    assert "Traceback" not in text, text
    assert len(waiting_entries(data / "incoming")) == len(list(small_spool.iterdir()))
    assert ledger(data).is_empty()


# -- property: any schedule of Redis faults, at any point of a group or of the rebuild ----------
#: Points a fault may strike: the steps of a group (both threads) and the middle of a rebuild.
SCHEDULE_POINTS = (*faults.POINTS, "mid_rebuild")
#: restart: kill -9 and start empty; flap: that twice in a row; flush: FLUSHALL; down: stop,
#: and start again only once the consumer's status shows it is retrying (or nothing is left).
ACTIONS = ("restart", "flap", "flush", "down")
schedules = st.lists(
    st.tuples(st.sampled_from(SCHEDULE_POINTS), st.integers(1, 4), st.sampled_from(ACTIONS)),
    min_size=1,
    max_size=3,
    unique_by=lambda event: event[:2],
)


class FaultSchedule:
    """Strikes Redis when the consumer passes a point for the nth time (faults.point hook)."""

    def __init__(self, server: RedisServer, events: list[tuple[str, int, str]]) -> None:
        self.server = server
        self.events = {(p, n): a for p, n, a in events}
        self.visits: Counter[str] = Counter()
        self.guard = threading.Lock()
        self.down = threading.Event()
        self.struck: list[str] = []

    def point(self, name: str) -> None:
        with self.guard:
            self.visits[name] += 1
            action = self.events.get((name, self.visits[name]))
            if action is None:
                return
            self.struck.append(f"{action}@{name}:{self.visits[name]}")
            if action == "restart":
                self.server.restart()
            elif action == "flap":
                self.server.restart()
                self.server.restart()
            elif action == "flush":
                flush(self.server)
            else:
                self.server.stop()
                self.down.set()

    def bring_back(self, consumer: Consumer, data: Path, stop: threading.Event) -> None:
        """Controller thread: restart a stopped Redis once the consumer shows it waits."""
        while not stop.is_set():
            if not self.down.wait(0.05):
                continue
            wait_for(
                lambda: consumer.status.status.state == "retrying" or drained(data),
                "the consumer to show it is retrying",
            )
            with self.guard:
                # A restart scheduled while it was down may have brought it back already:
                # starting a second server would leave the first one running, unreferenced.
                if self.server.proc is None:
                    self.server.start()
                self.down.clear()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=schedules)
# Redis loses the last group's claims between its claim and its events commit: valid() says
# so, and the group is decided again in the new epoch instead of being committed on lost claims.
@example(events=[("after_claim", 6, "flush")])
# The same mid-run: the next group's claim or this one's valid() finds the loss first.
@example(events=[("after_claim", 2, "flush")])
@example(events=[("after_events_parquet", 3, "restart")])
# Lost after the events commit: the redo restores the group's keys from the events table.
@example(events=[("after_events_commit", 2, "flush"), ("after_ledger_commit", 4, "down")])
def test_any_redis_fault_schedule_lands_everything_once(
    tmp_path_factory: pytest.TempPathFactory,
    module_redis: RedisServer,
    small_spool: Path,
    small_reference: Lake,
    events: list[tuple[str, int, str]],
) -> None:
    data = tmp_path_factory.mktemp("schedule")
    copy_spool(small_spool, data)
    flush(module_redis)
    schedule = FaultSchedule(module_redis, events)
    consumer = make_consumer(consumer_settings(data, module_redis.url, "prop"))
    consumer.start(resume=False)
    stop, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(stop=stop)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=run, name="consumer")
    controller = threading.Thread(target=schedule.bring_back, args=(consumer, data, done))
    with mock.patch.object(faults, "point", schedule.point):
        worker.start()
        controller.start()
        try:
            wait_for(lambda: drained(data) or done.is_set(), "the spool to drain")
            assert not done.is_set(), f"the consumer stopped by itself: {errors}"
        finally:
            stop.set()
            worker.join(TIMEOUT_S)
            controller.join(TIMEOUT_S)
            consumer.close()
            if module_redis.proc is None:
                module_redis.start()
    assert not errors, errors
    event(f"faults struck: {len(schedule.struck)}")
    assert_same_lake(data, small_reference)


def test_a_redis_cluster_without_a_reachable_node_is_waited_for(
    tmp_path: Path, small_spool: Path
) -> None:
    """A cluster client cannot even be built with no node up: that is waited out too (shown in
    the status), and with --once given up on after ONCE_RETRY_TIMEOUT, without a traceback."""
    from conftest import free_port

    data = tmp_path / "data"
    copy_spool(small_spool, data)
    env = base_env(
        data, REDIS_URL=f"redis+cluster://127.0.0.1:{free_port()}", ONCE_RETRY_TIMEOUT="1s"
    )
    consumer = ConsumerProcess(env, tmp_path / "c.log", ("--once",)).start()
    assert consumer.proc is not None
    assert consumer.proc.wait(timeout=TIMEOUT_S) == 1
    text = consumer.text()
    assert "gave up after" in text and "redis_unavailable" in text, text
    assert "Traceback" not in text, text
    (status,) = statuses(data)
    assert (status.state, status.fault) == ("retrying", "redis_unavailable")


def test_key_cache_statistics_at_exit_survive_redis_down(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``consume --stats`` asks Redis for the cache's size at exit: Redis down then is no crash."""
    from types import SimpleNamespace

    from cli.consume import _cache_stats
    from pipeline.factory import make_key_cache

    settings = Settings.from_env(
        {}, data_dir=str(tmp_path / "data"), redis_url=redis_server.url, redis_key_prefix="s"
    )
    cache = make_key_cache(settings)
    try:
        assert "keys" in _cache_stats(SimpleNamespace(cache=cache))  # type: ignore[arg-type]
        redis_server.stop()
        stats = _cache_stats(SimpleNamespace(cache=cache))  # type: ignore[arg-type]
        assert stats == {"unavailable": "redis_unavailable"}
    finally:
        cache.close()
