"""A Kafka cluster for tests and benches: librdkafka's built-in mock brokers.

The mock speaks the real Kafka protocol over TCP on loopback (producers, consumer groups,
offset commits, rebalances) but not transactions or CreateTopics. Its cluster API is in the
librdkafka that confluent-kafka loads, not in the Python binding: it is reached with ctypes,
to create topics of any partition count and to set the group coordinator's initial rebalance
delay (``group.initial.rebalance.delay.ms``, 3 s by default, which every group join waits out).
The cluster lives inside the process that made it; other processes reach it through
:attr:`MockCluster.bootstrap`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import confluent_kafka

from pipeline.settings import KafkaSettings

#: Partitions of a topic unless asked otherwise (what the mock gives a topic made on first use).
PARTITIONS: Final = 4
_PRODUCER: Final = 0  # rd_kafka_type_t RD_KAFKA_PRODUCER


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka confluent-kafka runs on (the wheel bundles its own): found in this
    process's mappings, so the mock and the clients are one library."""
    assert confluent_kafka.libversion()  # the binding, and so its librdkafka, is loaded
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "librdkafka" in Path(path).name:
                return _declare(ctypes.CDLL(path))
    found = ctypes.util.find_library("rdkafka")
    if found is None:
        raise RuntimeError("librdkafka is not loaded and not found: no mock Kafka cluster")
    return _declare(ctypes.CDLL(found))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "rd_kafka_conf_new": (p, []),
        "rd_kafka_conf_set": (i, [p, s, s, s, ctypes.c_size_t]),
        "rd_kafka_new": (p, [i, p, s, ctypes.c_size_t]),
        "rd_kafka_destroy": (None, [p]),
        "rd_kafka_mock_cluster_new": (p, [p, i]),
        "rd_kafka_mock_cluster_destroy": (None, [p]),
        "rd_kafka_mock_cluster_bootstraps": (s, [p]),
        "rd_kafka_mock_topic_create": (i, [p, s, i, i]),
        "rd_kafka_mock_group_initial_rebalance_delay_ms": (None, [p, ctypes.c_int32]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


class MockCluster:
    """``with MockCluster(brokers=3) as cluster:`` ... ``cluster.settings(topic)``.

    ``rebalance_delay_ms``: how long the coordinator holds a new group before assigning (a
    broker's ``group.initial.rebalance.delay.ms``; 0 here, so a test's members join at once)."""

    def __init__(self, brokers: int = 3, *, rebalance_delay_ms: int = 0) -> None:
        self._lib = _librdkafka()
        error = ctypes.create_string_buffer(512)
        conf = self._lib.rd_kafka_conf_new()
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"3", error, len(error))
        self._handle = self._lib.rd_kafka_new(_PRODUCER, conf, error, len(error))
        if not self._handle:
            raise RuntimeError(f"librdkafka: {error.value.decode(errors='replace')}")
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._handle, brokers)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._handle)
            raise RuntimeError("librdkafka could not start a mock cluster")
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._cluster, rebalance_delay_ms)
        self.bootstrap: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()
        self.brokers = brokers
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

    def create_topic(self, topic: str, partitions: int = PARTITIONS) -> None:
        """Create ``topic`` with ``partitions`` partitions, replicated on up to three brokers."""
        code = self._lib.rd_kafka_mock_topic_create(
            self._cluster, topic.encode(), partitions, min(3, self.brokers)
        )
        if code:
            raise RuntimeError(f"mock topic {topic}: {confluent_kafka.KafkaError(code).str()}")

    def close(self) -> None:
        """Stop the brokers (their clients see the connections close)."""
        if self._cluster:
            self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
            self._cluster = None
        if self._handle:
            self._lib.rd_kafka_destroy(self._handle)
            self._handle = None

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
