"""Kafka messages of adevents, and the idempotent publisher that producers share.

A message is either

- an **Arrow IPC stream** holding a micro-batch of events (header ``content-type:
  application/vnd.apache.arrow.stream``), or
- **one JSON event** (header ``content-type: application/json``, or no content type).

The recommended key is the event_id (a JSON event's own; a micro-batch's first), so that a
partition holds an id's copies in order; dedupe is exact whatever the key (the key cache is
shared by every partition). A micro-batch larger than MESSAGE_MAX_BYTES is split into several
messages, as a broker refuses messages over its ``message.max.bytes`` (1 MB by default).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final

import pyarrow as pa
from cachetools import TTLCache
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.settings import KafkaSettings

CONTENT_TYPE: Final = "content-type"
ARROW_STREAM: Final = "application/vnd.apache.arrow.stream"
JSON: Final = "application/json"
#: Header marking a micro-batch of rows the HTTP ingest already rejected (value ``rejected``):
#: the consumer quarantines every row with the reason it carries, as for a spool file whose
#: name ends in ``pipeline.spool.REJECTED_SUFFIX``.
KIND: Final = "adevents-kind"
REJECTED: Final = "rejected"
#: Largest message a publisher sends: under the brokers' default ``message.max.bytes``.
MESSAGE_MAX_BYTES: Final = 900_000


class KafkaUnavailableError(ConnectionError):
    """The brokers did not acknowledge a write in time (or refused it); nothing is promised."""


def arrow_message(table: pa.Table | pa.RecordBatch) -> bytes:
    """One micro-batch as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return bytes(sink.getvalue())


def split_batch(table: pa.Table, max_bytes: int = MESSAGE_MAX_BYTES) -> Iterator[pa.Table]:
    """``table`` in slices whose IPC streams stay under ``max_bytes`` (a row is never split)."""
    if table.num_rows == 0:
        return
    per_row = max(1, table.nbytes // table.num_rows)
    # A tenth of headroom for the stream's schema and framing.
    rows = max(1, int(max_bytes * 0.9) // per_row)
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def header(message: Message, name: str) -> str | None:
    """A message header's value as text (the last one of that name), or None."""
    found = None
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    for key, value in pairs:
        if key.lower() == name and value is not None:
            found = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return found


class ClientLog:
    """librdkafka's log lines through ``logging`` (pass as the ``logger`` property), each
    distinct line at most once per ``every`` seconds: a client retries an unreachable broker
    about every 50 ms, one identical line each time, and would bury everything else."""

    def __init__(self, logger: logging.Logger, *, every: float = 60.0) -> None:
        self._logger = logger
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=every)
        self._guard = threading.Lock()

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        with self._guard:
            if text in self._seen:
                return
            self._seen[text] = True
        self._logger.log(level, "%s", text)


def producer_config(kafka: KafkaSettings, **extra: Any) -> dict[str, Any]:
    """An idempotent producer's properties: every write acknowledged by all in-sync replicas,
    retried without duplicates or reordering by the broker (``enable.idempotence``)."""
    config: dict[str, Any] = {
        **kafka.client_config(),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.max.bytes": MESSAGE_MAX_BYTES + 100_000,
    }
    config.update(extra)
    return config


#: ``produce``'s partition for "the partitioner picks, by key" (librdkafka's RD_KAFKA_PARTITION_UA).
ANY_PARTITION: Final = -1


class Publisher:
    """An idempotent producer that can wait for its writes: :meth:`publish` queues messages,
    :meth:`flush` returns once the brokers acknowledged every one of them, or raises
    :class:`KafkaUnavailableError` (some may still land: a retry then relies on dedupe)."""

    def __init__(self, kafka: KafkaSettings, **extra: Any) -> None:
        self.topic = kafka.kafka_topic
        self._producer = Producer(producer_config(kafka, **extra))
        self._guard = threading.Lock()
        self._failed: list[KafkaError] = []
        self.delivered = 0

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._guard:
            if err is not None:
                self._failed.append(err)
            else:
                self.delivered += 1

    def publish(
        self,
        value: bytes,
        *,
        key: str | bytes | None = None,
        content_type: str = ARROW_STREAM,
        kind: str | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one message (waits for room when the local queue is full), to ``partition``
        or, by default, to the one the partitioner picks for ``key``."""
        headers: list[tuple[str, str | bytes | None]] = [(CONTENT_TYPE, content_type.encode())]
        if kind is not None:
            headers.append((KIND, kind.encode()))
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=self._on_delivery,
                    partition=ANY_PARTITION if partition is None else partition,
                )
                break
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let deliveries drain it
        self._producer.poll(0)

    def publish_table(
        self,
        table: pa.Table,
        *,
        key_column: str = "event_id",
        kind: str | None = None,
        partition: int | None = None,
    ) -> int:
        """Queue a micro-batch as Arrow messages (split under MESSAGE_MAX_BYTES); how many.
        ``kind=REJECTED`` for rows the HTTP ingest rejected (with their ``reason`` column)."""
        sent = 0
        for part in split_batch(table):
            key = None
            if key_column in part.column_names and part.num_rows:
                first = part.column(key_column)[0].as_py()
                key = None if first is None else str(first)
            self.publish(arrow_message(part), key=key, kind=kind, partition=partition)
            sent += 1
        return sent

    def publish_json(self, events: Sequence[bytes], keys: Sequence[str | None]) -> None:
        """Queue JSON events, one message each."""
        for value, key in zip(events, keys, strict=True):
            self.publish(value, key=key, content_type=JSON)

    def raise_refused(self) -> None:
        """Raise :class:`KafkaUnavailableError` if a message was refused (or timed out) since
        the last check or flush, without waiting: a long-running producer stops at the first
        lost message instead of at its final flush."""
        self._producer.poll(0)
        with self._guard:
            failed, self._failed = self._failed, []
        if failed:
            raise KafkaUnavailableError(f"Kafka refused {len(failed)} message(s): {failed[0]}")

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message is acknowledged; raise if any was refused or the
        brokers did not answer within ``timeout`` seconds."""
        left = self._producer.flush(timeout)
        self.raise_refused()
        if left:
            raise KafkaUnavailableError(f"Kafka did not acknowledge {left} message(s) in time")

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)


def is_retriable(exc: BaseException) -> bool:
    """A Kafka client error worth waiting out (a broker down, a timeout, a rebalance)."""
    if isinstance(exc, KafkaUnavailableError):
        return True
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err: KafkaError = exc.args[0]
        return bool(err.retriable() or err.code() in _TRANSIENT)
    return False


_TRANSIENT: Final = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
    }
)
