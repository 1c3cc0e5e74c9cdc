"""``consume --source kafka`` against librdkafka's mock cluster: the real Kafka protocol over
loopback (producers, a consumer group across processes, rebalances, offset commits), with the
Delta tables and (where claims must outlive a process) a real Redis.

Reconciled against the generator's truth: every event exactly once. What the mock cannot show
(a broker failing over, transactions: this design needs none) is said in README's Kafka section.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from hardening import ConsumerProcess, base_env, lake_table, ledger, wait_for

from pipeline.factory import make_key_cache
from pipeline.kafka import JSON, Publisher, arrow_message
from pipeline.kafka_consumer import KafkaLander
from pipeline.kafka_testing import MockCluster
from pipeline.reconcile import ReconcileError, reconcile
from pipeline.settings import Settings

HERE = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as mock:
        yield mock


@pytest.fixture
def topic(cluster: MockCluster) -> str:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(name)
    return name


@pytest.fixture
def shared_redis(redis_url: str, redis_prefix: str) -> dict[str, str]:
    """Settings of a Redis key cache: claims that outlive a consumer process."""
    return {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": redis_prefix}


def kafka_env(cluster: MockCluster, topic: str, data: Path, **extra: str) -> dict[str, str]:
    return base_env(
        data,
        KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap,
        KAFKA_TOPIC=topic,
        KAFKA_GROUP_ID=f"grp-{topic}",
        CONSUMER_SOURCE="kafka",
        COMMIT_INTERVAL="200ms",
        COMMIT_TARGET_ROWS="5000",
        KAFKA_BATCH_EVENTS="2000",
        # A member killed with -9 leaves the group when its session expires (45 s by default).
        KAFKA_CONFIG="session.timeout.ms=6000,heartbeat.interval.ms=500",
        **extra,
    )


def generate(env: dict[str, str], data: Path, events: int, *, seed: int, **rates: str) -> Path:
    """``adevents generate --kafka``: micro-batches with duplicates (within and across
    partitions: each message's key is its first event_id) and re-stamped copies."""
    truth = data / f"truth-{seed}.parquet"
    run_env = {**env, "DUP_RATE": "0.05", "RESTAMP_RATE": "0.3", "BATCH_INTERVAL": "20ms", **rates}
    subprocess.run(
        [sys.executable, "-m", "cli", "generate", "--kafka", "--events", str(events), "--rate",
         "20000", "--seed", str(seed), "--truth", str(truth)],
        env=run_env, cwd=HERE, check=True, capture_output=True,
    )  # fmt: skip
    return truth


def reconciled(data: Path, truth: Path) -> bool:
    try:
        reconcile(data, truth)
    except (ReconcileError, FileNotFoundError, OSError, KeyError):
        return False
    return True


def land_once(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    lander = KafkaLander(settings, make_key_cache(settings))
    lander.start()
    try:
        lander.run(once=True)
    finally:
        lander.close()


def test_a_topic_lands_exactly_once(cluster: MockCluster, topic: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = kafka_env(cluster, topic, data)
    truth = generate(env, data, 30_000, seed=5)
    land_once(env)
    result = reconcile(data, truth)
    assert result.stored == result.truth_distinct_valid > 0
    assert result.expected_duplicates > 0
    # One txn per partition in every table: each partition's version is its last offset.
    rows = ledger(data)
    assert rows["source_file"].str.starts_with(f"kafka:{topic}/").all()


def _event(i: int, **fields: object) -> bytes:
    body = {
        "event_id": f"json-{i}",
        "event_type": "click",
        "event_time": 1_796_270_000_000 + i,
        "campaign_id": "cmp-00001",
        "ad_id": "ad-1",
        "publisher_id": "pub-1",
        "cost_micros": 10,
        "revenue_micros": 0,
        **fields,
    }
    return json.dumps(body).encode()


def test_json_events_and_bad_messages(cluster: MockCluster, topic: str, tmp_path: Path) -> None:
    """JSON events land, their copies on other partitions are duplicates, and messages that
    cannot be read are quarantined with topic, partition and offset; nothing stops."""
    data = tmp_path / "data"
    env = kafka_env(cluster, topic, data)
    publisher = Publisher(Settings.from_env(env).kafka)
    publisher.publish_json([_event(i) for i in range(100)], [f"json-{i}" for i in range(100)])
    # Copies of ten of them under other keys (so, likely, on other partitions).
    publisher.publish_json([_event(i) for i in range(10)], [f"other-{i}" for i in range(10)])
    publisher.publish(b"{not json", key="bad-json", content_type=JSON)
    publisher.publish(b"\x00garbage", key="bad-arrow")
    mismatch = pa.table({"event_id": [["a", "b"]], "event_time": [1]})  # a list id
    publisher.publish(arrow_message(mismatch), key="bad-schema")
    publisher.publish(_event(999, event_type="teleport"), key="invalid-row", content_type=JSON)
    publisher.flush()
    land_once(env)

    events = lake_table(data, "events")
    assert sorted(events["event_id"].to_list()) == sorted(f"json-{i}" for i in range(100))
    rows = ledger(data)
    assert rows["duplicates"].sum() == 10
    bad = rows.filter(pl.col("status") != "ok").sort("status")
    assert bad["status"].to_list() == [
        "schema_mismatch",
        "unreadable_message",
        "unreadable_message",
    ]
    assert bad["source_file"].str.contains(rf"^kafka:{topic}/\d@\d+$").all()
    # Each one's bytes are described where a human finds them: topic, partition, offset.
    for batch_id in bad["batch_id"]:
        reason = json.loads((data / "quarantine" / "files" / batch_id / "reason.json").read_text())
        assert reason["topic"] == topic and reason["reason"] in bad["status"].to_list()
        assert f"{reason['partition']}@{reason['offset']}" in batch_id
    quarantined = lake_table(data, "quarantine")
    assert quarantined["reason"].to_list() == ["invalid_event_type"]
    assert quarantined["source_file"].str.contains(rf"^kafka:{topic}/\d@\d+$").all()


@pytest.mark.parametrize(
    ("point", "cache"),
    [
        ("after_claim", "redis"),
        ("after_events_commit", "redis"),
        ("after_ledger_commit", "redis"),
        ("after_ledger_commit", "embedded"),
    ],
)
def test_kill9_then_a_restart_that_batches_otherwise(
    cluster: MockCluster,
    topic: str,
    tmp_path: Path,
    *,
    request: pytest.FixtureRequest,
    point: str,
    cache: str,
) -> None:
    """kill -9 after the claims (before any commit), between the events and the ledger
    commits, and between the Delta commits and Kafka's offset commit; the restart forms other
    batches. Every event lands once; what was committed is not read again. The embedded key
    cache loses its process's claims and the finish of the group in flight: the restart puts
    that group's keys back from the lake."""
    data = tmp_path / "data"
    redis_env = request.getfixturevalue("shared_redis") if cache == "redis" else {}
    env = kafka_env(cluster, topic, data, **redis_env)
    truth = generate(env, data, 20_000, seed=7)
    crashing = ConsumerProcess(
        {**env, "ADEVENTS_CRASH_AT": f"{point}:2"}, tmp_path / "c1.log", ("--once",)
    ).start()
    assert crashing.proc is not None
    assert crashing.proc.wait(timeout=120) == -9, crashing.text()
    landed_before = ledger(data) if (data / "lake" / "ledger").exists() else None
    other = {"COMMIT_TARGET_ROWS": "7000", "KAFKA_BATCH_EVENTS": "700"}
    restart = ConsumerProcess({**env, **other}, tmp_path / "c2.log", ("--once",)).start()
    assert restart.proc is not None
    assert restart.proc.wait(timeout=120) == 0, restart.text()
    reconcile(data, truth)
    # The ledger covers every offset once: nothing committed was read (and counted) again.
    rows = ledger(data)
    assert rows["rows_in"].sum() == pl.read_parquet(truth)["copies"].sum()
    if landed_before is not None and point == "after_ledger_commit":
        assert set(landed_before["batch_id"]) <= set(rows["batch_id"])


def test_three_consumers_kill9_and_a_newcomer(
    cluster: MockCluster, topic: str, tmp_path: Path, shared_redis: dict[str, str]
) -> None:
    """Three members of one group share the partitions; one dies with kill -9 mid-batch (its
    partitions move), a fourth joins (another rebalance); duplicates within and across
    partitions. Every event lands exactly once."""
    data = tmp_path / "data"
    env = kafka_env(cluster, topic, data, **shared_redis)
    members = [
        ConsumerProcess(
            {**env, "CONSUMER_SLOT": str(i), "CONSUMER_NAME": f"c{i}", **extra},
            tmp_path / f"c{i}.log",
        ).start()
        for i, extra in enumerate(
            # The victim lands small groups: whichever partitions it gets, it dies in its second.
            [
                {},
                {"ADEVENTS_CRASH_AT": "after_events_parquet:2", "COMMIT_TARGET_ROWS": "1000"},
                {"KAFKA_BATCH_EVENTS": "900"},
            ]
        )
    ]
    try:
        # Every member holds partitions before anything is published (the mock assigns a new
        # group at once: a member alone for a moment would otherwise land everything).
        wait_for(
            lambda: all(re.search(r"assigned partitions \[\d", m.text()) for m in members),
            "each member to be assigned partitions",
            60,
        )
        truth = generate(env, data, 20_000, seed=9)
        victim = members[1]
        assert victim.proc is not None
        victim.proc.wait(timeout=120)
        assert victim.proc.returncode == -9, victim.text()
        newcomer = ConsumerProcess(
            {**env, "CONSUMER_SLOT": "3", "CONSUMER_NAME": "c3"}, tmp_path / "c3.log"
        ).start()
        members.append(newcomer)
        more = generate(env, data, 10_000, seed=10)
        wait_for(lambda: reconciled_both(data, truth, more), "every event to land once", 180)
    finally:
        for member in members:
            if member.running():
                member.terminate()
    assert_both(data, truth, more)
    # The victim's partitions were taken over by another member (a rebalance across processes).
    victim_had = set(re.findall(r"assigned partitions \[([\d, ]+)\]", victim.text())[0].split(", "))
    others = "".join(m.text() for m in members if m is not victim)
    taken_over = {
        p
        for line in re.findall(r"assigned partitions \[([\d, ]*)\]", others)
        for p in line.split(", ")
    }
    assert victim_had <= taken_over, (victim_had, others)


def reconciled_both(data: Path, first: Path, second: Path) -> bool:
    try:
        assert_both(data, first, second)
    except (AssertionError, FileNotFoundError, OSError, KeyError):
        return False
    return True


def assert_both(data: Path, first: Path, second: Path) -> None:
    """Both truths at once: the lake holds their distinct events exactly once."""
    truth = pl.concat([pl.read_parquet(first), pl.read_parquet(second)])
    merged = data / "truth-both.parquet"
    truth.write_parquet(merged)
    reconcile(data, merged)
    os.remove(merged)


def test_sigusr1_lands_what_the_topic_holds_then_exits(
    cluster: MockCluster, tmp_path: Path
) -> None:
    """A running member told that its producers are done (SIGUSR1, what the bench sends after
    its last publish) lands everything its partitions hold and exits 0, without waiting for
    COMMIT_INTERVAL (an hour here)."""
    name = f"ev-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(name, 8)  # more partitions than the mock's default
    data = tmp_path / "data"
    env = {
        **kafka_env(cluster, name, data),
        "COMMIT_INTERVAL": "1h",
        "COMMIT_TARGET_ROWS": "1000000",
    }
    member = ConsumerProcess(env, tmp_path / "c.log").start()
    try:
        wait_for(lambda: "assigned partitions [0, 1, 2, 3, 4, 5, 6, 7]" in member.text(), "join")
        truth = generate(env, data, 12_000, seed=21)
        assert member.proc is not None and member.running()
        member.proc.send_signal(signal.SIGUSR1)
        assert member.proc.wait(timeout=120) == 0, member.text()
    finally:
        if member.running():
            member.terminate()
    result = reconcile(data, truth)
    assert result.stored == result.truth_distinct_valid > 0
    assert set(ledger(data)["source_file"].str.extract(r"/(\d+)$").cast(int)) == set(range(8))


def test_once_with_no_partition_assigned_exits(
    cluster: MockCluster, tmp_path: Path, shared_redis: dict[str, str]
) -> None:
    """``--once`` in a group whose partitions another member holds (more members than
    partitions): assigned nothing, it has nothing to land and exits 0 instead of waiting."""
    name = f"ev-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(name, 1)
    data = tmp_path / "data"
    env = kafka_env(cluster, name, data, **shared_redis)  # two members on one DATA_DIR
    holder = ConsumerProcess({**env, "CONSUMER_SLOT": "0"}, tmp_path / "a.log").start()
    try:
        wait_for(lambda: "assigned partitions [0]" in holder.text(), "the first member's join")
        other = ConsumerProcess(
            {**env, "CONSUMER_SLOT": "1", "CONSUMER_NAME": "b"}, tmp_path / "b.log", ("--once",)
        ).start()
        assert other.proc is not None
        assert other.proc.wait(timeout=60) == 0, other.text()
        assert "assigned partitions []" in other.text()
    finally:
        if holder.running():
            holder.terminate()


def test_the_throughput_cap_holds_for_the_kafka_source(
    cluster: MockCluster, topic: str, tmp_path: Path
) -> None:
    """MAX_EVENTS_PER_SECOND caps the Kafka source as it caps the spool's: 6,000 events (and
    their copies) at 1,000/s take at least six seconds, however fast the machine (uncapped,
    they land in one or two)."""
    data = tmp_path / "data"
    env = kafka_env(cluster, topic, data)
    truth = generate(env, data, 6_000, seed=23)
    started = time.monotonic()
    land_once({**env, "MAX_EVENTS_PER_SECOND": "1000"})
    assert time.monotonic() - started >= 6.0
    reconcile(data, truth)
