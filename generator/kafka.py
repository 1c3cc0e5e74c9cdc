"""Publish the generator's micro-batches to a Kafka topic instead of writing spool files.

Each micro-batch becomes Arrow IPC stream messages (split under ``MESSAGE_MAX_BYTES``, key: the
first event_id), written by an idempotent producer (acks=all, ``enable.idempotence``): the
broker neither loses an acknowledged write nor stores a retried one twice. The run ends only
once the brokers acknowledged every message; a message the producer gave up on
(``message.timeout.ms``, 5 min unless KAFKA_CONFIG sets it) fails the run at the next batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka import ClientLog, KafkaUnavailableError, Publisher
from pipeline.settings import KafkaSettings

log = logging.getLogger("adevents.kafka")

#: ``Producer.flush`` without a deadline: the producer's own ``message.timeout.ms`` bounds it
#: (each message is acknowledged or given up on by then).
UNTIL_DELIVERED_OR_FAILED: Final = -1.0


class KafkaPublishError(RuntimeError):
    """The brokers did not acknowledge every event; the message says where and why."""


@dataclass
class PublishTotals:
    """What was published and acknowledged."""

    batches: int = 0
    messages: int = 0
    events: int = 0

    def line(self, topic: str) -> str:
        return (
            f"published {self.events} events to Kafka topic {topic} in {self.batches} "
            f"micro-batches ({self.messages} messages), every one acknowledged"
        )


class KafkaSender:
    """:meth:`write` has SpoolWriter's shape; :meth:`close` waits for every acknowledgement.

    A failure (a message refused or timed out) is raised by the next :meth:`write` or by
    :meth:`close`, as :class:`KafkaPublishError` naming KAFKA_BOOTSTRAP_SERVERS.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        if not kafka.kafka_bootstrap_servers:
            raise ValueError(
                "--kafka needs KAFKA_BOOTSTRAP_SERVERS (host:port[,host:port]) in the environment"
            )
        self.kafka = kafka
        self.totals = PublishTotals()
        self._guard = threading.Lock()
        self._client_error: KafkaError | None = None
        try:
            # librdkafka's own log lines (a refused connection, ...) go through logging, under
            # LOG_LEVEL, instead of straight to stderr.
            self._publisher = Publisher(
                kafka, logger=ClientLog(log), error_cb=self._on_client_error
            )
        except KafkaException as exc:  # a property KAFKA_CONFIG names that librdkafka lacks
            raise ValueError(f"the Kafka settings are invalid: {exc.args[0].str()}") from None

    def _on_client_error(self, err: KafkaError) -> None:
        # Kept for the final message: "1/1 brokers are down" says more than "timed out".
        with self._guard:
            self._client_error = err

    def _failed(self, exc: BaseException) -> KafkaPublishError:
        with self._guard:
            cause = self._client_error
        why = str(exc) if cause is None else f"{exc}; last client error: {cause.str()}"
        return KafkaPublishError(
            f"the Kafka brokers at KAFKA_BOOTSTRAP_SERVERS={self.kafka.kafka_bootstrap_servers} "
            f"(topic {self.kafka.kafka_topic}) did not acknowledge the events: {why}"
        )

    def write(self, table: pa.Table) -> None:
        """Queue one micro-batch (blocks while the producer's local queue is full)."""
        try:
            self._publisher.raise_refused()
            messages = self._publisher.publish_table(table)
        except (KafkaUnavailableError, KafkaException) as exc:
            raise self._failed(exc) from None
        self.totals.batches += 1
        self.totals.messages += messages
        self.totals.events += table.num_rows

    def close(self) -> None:
        """Wait until the brokers acknowledged every message; raise if any was lost."""
        try:
            self._publisher.flush(UNTIL_DELIVERED_OR_FAILED)
        except (KafkaUnavailableError, KafkaException) as exc:
            raise self._failed(exc) from None
