"""One partition's polled messages as decide inputs: its events, the rows the ingest rejected,
and each message that cannot be read. Pure: messages in, ``FileInput`` objects out.

- The events of every readable message (Arrow micro-batches normalised one by one; JSON events
  decoded together) become one input named ``kafka:<topic>/<partition>``, with batch id
  ``<group>-<topic>-<partition>@<first>-<last>`` and each row's position: its message's
  partition and offset (``pipeline.keycache.position_of``). Its quarantined rows name their
  message as ``kafka:<topic>/<partition>@<offset>``.
- A message that cannot be decoded is an input of its own, poisoned with ``unreadable_message``
  or ``schema_mismatch`` and named after its topic, partition and offset: its ledger row says
  why, and the consumer sets its bytes aside (``quarantine/files/``). It never stops the batch.
- A micro-batch of rows the HTTP ingest rejected (header ``adevents-kind: rejected``) is an
  input of its own, quarantined row by row as a spool ``.rejected.arrow`` file is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline.decide import FileInput
from pipeline.decode import JSON, BodyError, decode, read_arrow_stream
from pipeline.fingerprint import I64
from pipeline.groups import GroupFile
from pipeline.kafka import ARROW_STREAM, REJECTED
from pipeline.keycache import position_of
from pipeline.normalize import SchemaMismatchError, normalize
from pipeline.spool import REJECTED_SUFFIX, PoisonInputError


@dataclass(frozen=True)
class Polled:
    """What the consumer keeps of one Kafka message."""

    partition: int
    offset: int
    value: bytes | None
    content_type: str | None
    kind: str | None
    timestamp_ms: int
    #: An Arrow message's micro-batch, read, validated (and, for events, normalised) once, when
    #: it is polled; or why it cannot be read. None for a JSON event (decoded with its batch).
    table: pa.Table | PoisonInputError | None = None

    @property
    def events(self) -> int:
        """Events it holds, for sizing micro-batches (an unreadable message counts one)."""
        return max(1, self.table.num_rows) if isinstance(self.table, pa.Table) else 1


def decoded(message: Polled) -> Polled:
    """``message`` with its Arrow micro-batch decoded (see ``Polled.table``)."""
    return replace(message, table=_table(message))


def _table(message: Polled) -> pa.Table | PoisonInputError | None:
    if message.value is None:
        return PoisonInputError("unreadable_message", "the message has no value (a tombstone)")
    if message.kind != REJECTED and _media(message) != ARROW_STREAM:
        return None
    try:
        table = read_arrow_stream(message.value)
    except BodyError as exc:
        return PoisonInputError("unreadable_message", str(exc))
    if message.kind == REJECTED:  # kept as the ingest wrote it, with its ``reason`` column
        return table
    try:
        # Dictionaries kept as the producer sent them, as decide holds them (not decoded here
        # to be encoded again there).
        return normalize(table, dictionaries=True)[0]
    except SchemaMismatchError as exc:
        return PoisonInputError("schema_mismatch", str(exc))


def app_id_for(group: str, topic: str, partition: int) -> str:
    """The Delta application id of one partition's commits: ``<group>-<topic>-<partition>``."""
    return f"{group}-{topic}-{partition}"


def _file(topic: str, group: str, partition: int, suffix: str = "") -> GroupFile:
    return GroupFile(
        f"kafka:{topic}/{partition}{suffix}", f"{app_id_for(group, topic, partition)}{suffix}"
    )


def _media(message: Polled) -> str:
    content_type = (message.content_type or JSON).split(";", 1)[0].strip().lower()
    return ARROW_STREAM if content_type == ARROW_STREAM else JSON


def partition_inputs(
    topic: str, group: str, partition: int, messages: Sequence[Polled], now_ms: int
) -> list[FileInput]:
    """The decide inputs of one partition's messages (in offset order, at least one)."""
    first, last = messages[0].offset, messages[-1].offset
    inputs: list[FileInput] = []
    tables: list[pa.Table] = []
    offsets: list[I64] = []  # each table's rows' offsets
    json_messages: list[Polled] = []

    def poison(message: Polled, error: PoisonInputError) -> None:
        file = _file(topic, group, partition, f"@{message.offset}")
        inputs.append(FileInput(file, message.timestamp_ms or now_ms, None, error))

    for message in messages:
        if isinstance(message.table, PoisonInputError):
            poison(message, message.table)
        elif message.table is None:
            json_messages.append(message)
        elif message.kind == REJECTED:
            file = _file(topic, group, partition, f"@{message.offset}{REJECTED_SUFFIX}")
            inputs.append(FileInput(file, message.timestamp_ms or now_ms, message.table))
        else:
            tables.append(message.table)
            offsets.append(np.full(message.table.num_rows, message.offset, dtype=np.int64))
    good, bad = _decode_json(json_messages)
    for message, why in bad:
        poison(message, PoisonInputError("unreadable_message", why))
    if good is not None:
        tables.append(normalize(good[0], dictionaries=True)[0])  # one schema to concatenate
        offsets.append(np.array(good[1], dtype=np.int64))
    if tables:
        file = GroupFile(
            f"kafka:{topic}/{partition}", f"{app_id_for(group, topic, partition)}@{first}-{last}"
        )
        arrived = min(m.timestamp_ms for m in messages if m.timestamp_ms) if messages else now_ms
        positions = position_of(partition, np.concatenate(offsets))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        inputs.insert(0, FileInput(file, arrived or now_ms, table, positions=positions))
    return inputs


def _decode_json(
    messages: Sequence[Polled],
) -> tuple[tuple[pa.Table, list[int]] | None, list[tuple[Polled, str]]]:
    """JSON events, one per message: decoded as one array when every message is one event
    (the common case: one decoder call), else message by message."""
    if not messages:
        return None, []
    values = [m.value or b"" for m in messages]
    try:
        table = decode(b"[" + b",".join(values) + b"]", JSON, max_events=len(values))
        if table.num_rows == len(values):
            return (table, [m.offset for m in messages]), []
    except BodyError:
        pass
    tables: list[pa.Table] = []
    offsets: list[int] = []
    bad: list[tuple[Polled, str]] = []
    for message, value in zip(messages, values, strict=True):
        try:
            one = decode(b"[" + value + b"]", JSON, max_events=1)
        except BodyError as exc:
            bad.append((message, str(exc)))
            continue
        if one.num_rows != 1:
            bad.append((message, "a message must hold exactly one JSON event object"))
            continue
        tables.append(one)
        offsets.append(message.offset)
    return ((pa.concat_tables(tables), offsets) if tables else None), bad
