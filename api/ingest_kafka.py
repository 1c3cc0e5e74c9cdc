"""The ingest's Kafka sink (INGEST_SINK=kafka): each micro-batch published to KAFKA_TOPIC, and
its requests answered only once the brokers acknowledged every message of it.

Accepted rows go as Arrow IPC stream messages (key: the first event_id); the micro-batch's
rejected rows go after them as Arrow messages with the header ``adevents-kind: rejected``, in
the columns of the spool's rejected file (``REJECTED_SCHEMA``, stamped with the arrival), which
the consumer quarantines. The group committer runs one write at a time and each write waits for
its messages, so an acknowledgement is exactly this micro-batch's. A write the brokers do not
acknowledge within ``message.timeout.ms`` raises: some of its messages may have landed, and the
client's retry repeats rows the consumer deduplicates.
"""

from __future__ import annotations

import logging
from typing import Final

import polars as pl
import pyarrow as pa
from confluent_kafka import KafkaException

from api.ingest_spool import Written, rejected_table
from pipeline.kafka import REJECTED, ClientLog, KafkaUnavailableError, Publisher
from pipeline.settings import KafkaSettings, SettingsError

log = logging.getLogger("adevents.ingest")

#: Longest wait for the brokers' acknowledgement of a micro-batch, unless KAFKA_CONFIG sets
#: ``message.timeout.ms``: a broker failover (seconds) fits, a client's HTTP timeout does not
#: run out first.
ACK_TIMEOUT_SECONDS: Final = 10.0
#: The producer notices a timed-out message within about a second: the flush waits that much
#: longer, so that it returns with every message acknowledged or failed, none left queued.
FLUSH_SLACK_SECONDS: Final = 5.0
_TIMEOUT_PROPERTIES: Final = ("message.timeout.ms", "delivery.timeout.ms")


def ack_timeout(kafka: KafkaSettings) -> float | None:
    """Seconds a micro-batch may wait for acknowledgement: ``message.timeout.ms`` (or its alias
    ``delivery.timeout.ms``) from KAFKA_CONFIG, else ACK_TIMEOUT_SECONDS; None for 0 (wait
    for ever, as librdkafka does)."""
    configured = dict(kafka.kafka_config)
    for name in _TIMEOUT_PROPERTIES:
        if name in configured:
            value = configured[name]
            if not value.isdecimal():
                raise SettingsError(
                    f"KAFKA_CONFIG's {name}={value!r} is not a whole number of milliseconds"
                )
            return None if int(value) == 0 else int(value) / 1000
    return ACK_TIMEOUT_SECONDS


class KafkaBatchWriter:
    """Publishes micro-batches of the group committer; ``write`` has SpoolBatchWriter's shape
    and raises :class:`KafkaUnavailableError` unless the brokers acknowledged all of it. The
    producer is made on first use (in the worker process that serves the requests)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.timeout = ack_timeout(kafka)
        self._publisher: Publisher | None = None

    def _connected(self) -> Publisher:
        if self._publisher is None:
            extra: dict[str, object] = {}
            if not any(name in dict(self.kafka.kafka_config) for name in _TIMEOUT_PROPERTIES):
                extra["message.timeout.ms"] = int(ACK_TIMEOUT_SECONDS * 1000)
            self._publisher = Publisher(self.kafka, logger=ClientLog(log), **extra)
        return self._publisher

    def _flush(self, publisher: Publisher) -> None:
        publisher.flush(-1 if self.timeout is None else self.timeout + FLUSH_SLACK_SECONDS)

    def write(
        self, accepted: list[pa.Table], rejected: list[pl.DataFrame], arrived_ms: int
    ) -> Written:
        """Publish the micro-batch and wait for the brokers' acknowledgement, or raise.

        Accepted rows are acknowledged before rejected rows are sent, as the spool writes its
        files: if the rejected rows then fail, the client's retry repeats accepted rows, which
        the consumer deduplicates, and not rejected rows, which nothing deduplicates.
        """
        rows = sum(t.num_rows for t in accepted)
        quarantined = sum(len(r) for r in rejected)
        try:
            publisher = self._connected()
            if rows:
                publisher.publish_table(
                    pa.concat_tables(accepted) if len(accepted) > 1 else accepted[0]
                )
                self._flush(publisher)
            if quarantined:
                table = rejected_table(pl.concat(rejected), arrived_ms)
                publisher.publish_table(table, kind=REJECTED)
                self._flush(publisher)
        except (KafkaUnavailableError, KafkaException) as exc:
            # A producer whose writes timed out may have hit a fatal idempotence error, after
            # which it refuses everything: the next micro-batch gets a fresh one (its queue is
            # empty: the flush outlasted message.timeout.ms).
            self._publisher = None
            if isinstance(exc, KafkaUnavailableError):
                raise
            raise KafkaUnavailableError(f"Kafka refused the micro-batch: {exc}") from exc
        return Written(None, rows, None, quarantined)

    def close(self) -> None:
        """Let go of the producer (every micro-batch was already acknowledged or failed)."""
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return
        try:
            publisher.close(FLUSH_SLACK_SECONDS)
        except KafkaUnavailableError as exc:
            log.warning("ingest: closing the Kafka producer: %s", exc)
