"""How the Kafka consumer gathers a backlog: which micro-batches a group takes, how far ahead of
the group being decided it reads, and when a landed group's offsets are committed.

The pure part (``_take``) is tested on hand-made micro-batches; the read-ahead and the offset
commits on librdkafka's mock cluster with a real lander, counting what it holds rather than
timing it, so that no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from hardening import base_env, lake_table

from pipeline.factory import make_key_cache
from pipeline.kafka import Publisher
from pipeline.kafka_batch import Polled
from pipeline.kafka_consumer import (
    POLL_MESSAGES,
    READ_AHEAD_GROUPS,
    KafkaLander,
    _Landing,
    _MicroBatch,
    _Partition,
    _take,
)
from pipeline.kafka_testing import MockCluster
from pipeline.settings import Settings


def _batch(opened: float, events: int, first: int) -> _MicroBatch:
    messages = [Polled(0, first + i, b"", None, None, 0) for i in range(events)]
    return _MicroBatch(messages, events, opened)


def _partition(number: int, *batches: _MicroBatch) -> _Partition:
    return _Partition(number, f"app-{number}", batches=list(batches))


def test_a_group_takes_the_oldest_micro_batches_across_partitions() -> None:
    """Partition 0's backlog does not hold back the others: a group takes what came first,
    whichever partition it is on (taking partitions in a fixed order, from 0, starved the
    last ones), each partition's micro-batches in offset order."""
    p0 = _partition(0, _batch(2.0, 100, 0), _batch(4.0, 100, 100))
    p1 = _partition(1, _batch(1.0, 100, 0), _batch(3.0, 100, 100))
    p2 = _partition(2, _batch(0.5, 100, 0))

    def offsets(taken: dict[int, list[_MicroBatch]]) -> dict[int, list[int]]:
        return {n: [b.messages[0].offset for b in bs] for n, bs in taken.items()}

    assert offsets(_take([p0, p1, p2], target=200)) == {1: [0], 2: [0]}
    # What was not taken waits, in order, for the next group.
    assert [b.opened for b in p0.batches] == [2.0, 4.0]
    assert [b.opened for b in p1.batches] == [3.0]
    assert offsets(_take([p0, p1, p2], target=300)) == {0: [0, 100], 1: [100]}
    assert p0.batches == p1.batches == p2.batches == []


@pytest.mark.parametrize("target", [1, 150, 10_000])
def test_a_group_takes_whole_micro_batches_up_to_its_target(target: int) -> None:
    p0 = _partition(0, _batch(1.0, 100, 0), _batch(2.0, 100, 100))
    p1 = _partition(1, _batch(1.5, 100, 0))
    taken = _take([p0, p1], target=target)
    events = sum(b.events for bs in taken.values() for b in bs)
    # At least one micro-batch, never split, and none more once the target is reached.
    assert events == {1: 100, 150: 200, 10_000: 300}[target]


def test_nothing_waiting_takes_nothing() -> None:
    assert _take([_partition(0), _partition(1)], target=100) == {}


# -- on the mock cluster ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as mock:
        yield mock


def _json_event(i: int) -> bytes:
    return json.dumps(
        {
            "event_id": f"e-{i}",
            "event_type": "impression",
            "event_time": 1_796_270_000_000 + i,
            "campaign_id": "cmp-00001",
            "ad_id": "ad-1",
            "publisher_id": "pub-1",
            "cost_micros": 1,
            "revenue_micros": 0,
        }
    ).encode()


class _Watched(KafkaLander):
    """A lander that notes what it holds each time it takes a group, and the group's
    ``through`` offsets with the Kafka offsets committed when it lands."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, make_key_cache(settings))
        self.held: list[int] = []

    def _next_landing(self) -> _Landing | None:
        with self._guard:
            self.held.append(sum(p.buffered() for p in self._partitions.values()))
        return super()._next_landing()


def test_a_backlog_is_read_no_further_ahead_than_the_read_ahead(
    cluster: MockCluster, tmp_path: Path
) -> None:
    """Unbounded, the consumer read all of a backlog into memory, decoded, before landing it;
    now it holds at most READ_AHEAD_GROUPS groups' worth (plus one poll's messages) and leaves
    the rest with the brokers. Every event still lands once, and the groups' offsets are
    committed (advisory) through the end."""
    topic = f"ra-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic, 2)
    data = tmp_path / "data"
    target, events = 200, 3_000
    env = base_env(
        data,
        KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap,
        KAFKA_TOPIC=topic,
        KAFKA_GROUP_ID=f"grp-{topic}",
        CONSUMER_SOURCE="kafka",
        COMMIT_TARGET_ROWS=str(target),
        KAFKA_BATCH_EVENTS="100",
    )
    settings = Settings.from_env(env)
    publisher = Publisher(settings.kafka)
    # Keyed, so that both partitions hold a backlog: with no key, the sticky partitioner may
    # put all of it on one, whose neighbour then has no offset to commit.
    keys = [f"user-{i}" for i in range(events)]
    publisher.publish_json([_json_event(i) for i in range(events)], keys)
    publisher.flush()
    del publisher  # its connections go before the cluster's

    lander = _Watched(settings)
    lander.start()
    try:
        lander.run(once=True)
    finally:
        lander.close()

    assert lake_table(data, "events").height == events
    bound = READ_AHEAD_GROUPS * target + POLL_MESSAGES
    assert bound < events / 2  # so that reading the backlog whole first would show
    assert lander.held and max(lander.held) <= bound
    reader = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": f"grp-{topic}"})
    try:
        partitions = [TopicPartition(topic, p) for p in range(2)]
        committed = {tp.partition: tp.offset for tp in reader.committed(partitions, timeout=10)}
        ends = {tp.partition: reader.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
    finally:
        reader.close()
    assert all(end > 0 for end in ends.values()) and sum(ends.values()) == events
    assert committed == ends  # each partition's next offset
