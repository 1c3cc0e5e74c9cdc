"""A Kafka cluster for tests and benches: librdkafka's built-in mock brokers.

The mock speaks the real Kafka protocol over TCP on loopback (producers, consumer groups,
offset commits, rebalances) but not transactions or CreateTopics: a topic is created on first
use, with PARTITIONS partitions. The cluster lives inside
the process that made it; other processes reach it through :attr:`MockCluster.bootstrap`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipeline.settings import KafkaSettings

#: Partitions of every topic the mock creates.
PARTITIONS = 4


class MockCluster:
    """``with MockCluster(brokers=3) as cluster:`` ... ``cluster.settings(topic)``."""

    def __init__(self, brokers: int = 3) -> None:
        self._holder = Producer(
            {
                "test.mock.num.brokers": brokers,
                "log_level": 3,
            }
        )
        metadata = self._holder.list_topics(timeout=10)
        self.bootstrap = ",".join(
            f"{b.host}:{b.port}" for b in sorted(metadata.brokers.values(), key=lambda b: b.id)
        )
        self.partitions = PARTITIONS

    def settings(
        self, topic: str = "ad-events", group: str = "adevents", **extra: Any
    ) -> KafkaSettings:
        return KafkaSettings(
            kafka_bootstrap_servers=self.bootstrap,
            kafka_topic=topic,
            kafka_group_id=group,
            **extra,
        )

    def create_topic(self, topic: str) -> None:
        """Make ``topic`` exist (auto-created by a metadata request for it) with all partitions."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for _ in range(50):
            md = admin.list_topics(topic=topic, timeout=5)
            t = md.topics.get(topic)
            if t is not None and t.error is None and len(t.partitions) == self.partitions:
                return
        raise RuntimeError(f"mock topic {topic} did not appear")

    def close(self) -> None:
        self._holder.flush(5)

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
