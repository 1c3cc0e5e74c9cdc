"""``adevents consume --source kafka``: a Kafka consumer group lands a topic in the lake, exactly
once, without broker transactions (the kafka-delta-ingest design, plus exact event_id dedupe).

- **Work.** Kafka's group protocol assigns partitions to consumers (cooperative-sticky: a
  rebalance moves only the partitions that change owner). Each partition's messages are gathered
  into micro-batches of up to KAFKA_BATCH_EVENTS events or BATCH_INTERVAL, and the micro-batches
  of every partition into a commit group of up to COMMIT_TARGET_ROWS events or COMMIT_INTERVAL,
  like the spool's files. A group takes the oldest micro-batches first, whatever their
  partition, and the consumer holds at most READ_AHEAD_GROUPS groups' worth of events read
  and not yet taken (a backlog waits in the brokers, not decoded in memory). A group goes
  through the spool's own path: ``pipeline.kafka_batch`` makes decide inputs,
  ``pipeline.decide`` normalises, validates, dedupes, claims and enriches.
- **Exactly once.** A group's commit to each table carries one Delta app transaction per
  partition, ``(<group>-<topic>-<partition>, last offset of the partition in the group)``, so
  "the rows are in" and "the partition is done through this offset" are one atomic fact. On
  assignment a partition starts at its events-table version + 1; Kafka's own offset commits
  are only advisory (lag monitoring). A zombie's late commit conflicts with its successor's in
  delta-rs (same app id), and a table holding part of a group's txns is refused
  (``TxnOverlapError``): the consumer then forms its groups again from what the tables hold.
- **Redo.** The events commit carries, in its commit info, what a redo needs to write the same
  quarantine and ledger rows (the micro-batches' ranges, the clock, the watermark and the decided
  ledger rows): a consumer assigned a partition whose ledger lags its events table re-reads those
  ranges and finishes that group before landing anything newer. A group that died before its
  events commit is simply consumed again, with whatever boundaries: the key cache's claims are
  idempotent per (partition, offset), so every event its dead attempt claimed is still its own.
- **Revocation.** A revoked partition's group in the writer is committed (or fails and is
  abandoned) before the callback returns; its buffered messages are dropped for the new owner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import polars as pl
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from lake.location import LakeLocation
from lake.tables import EVENTS, LEDGER, QUARANTINE
from lake.writer import DeltaLakeWriter, LakeWriter
from pipeline import faults
from pipeline.consumer import Totals
from pipeline.consumer_lock import ConsumerLock
from pipeline.decide import FileInput, FileOutcome
from pipeline.enrich import CampaignFile
from pipeline.fingerprint import Keys
from pipeline.groups import Intent
from pipeline.kafka import CONTENT_TYPE, KIND, ClientLog, header
from pipeline.kafka_batch import Polled, app_id_for, decoded, partition_inputs
from pipeline.keycache import CacheLostError, KeyCache, Mask, Positions
from pipeline.lake import window_keys
from pipeline.landing import Group, Pacer, close_cache, decide_group, restore_claims, stamp
from pipeline.retry import StatusBoard, Supervisor, check_free_space, classify
from pipeline.schema import Layout, LedgerRow, ledger_frame
from pipeline.settings import Settings
from pipeline.spool import atomic_write_bytes

log = logging.getLogger("adevents.kafka")

#: Commit-info key of a group's redo record (see the module docstring).
GROUP_KEY: Final = "adevents.group"
#: Messages one poll returns at most (the loop polls again while the read-ahead has room).
POLL_MESSAGES: Final = 64
#: A draining consumer's poll wait (seconds): short, as nothing more may be coming.
DRAIN_POLL: Final = 0.005
#: Commit groups' worth of events the consumer holds read and not yet taken (see ``_full``):
#: one, as librdkafka's own queue already holds the next ones, fetched.
READ_AHEAD_GROUPS: Final = 1
#: How often the partitions' lag is published (seconds).
LAG_EVERY: Final = 1.0


@dataclass
class _MicroBatch:
    messages: list[Polled] = field(default_factory=list)
    events: int = 0
    opened: float = field(default_factory=time.monotonic)


@dataclass
class _Partition:
    """An assigned partition: what the events table holds of it, and what waits."""

    partition: int
    app_id: str
    #: The events table's version for this partition (its last landed offset), once read.
    committed: int | None = None
    #: Read from the lake since the assignment (or the last fault).
    ready: bool = False
    #: The next offset expected from the broker.
    next_offset: int | None = None
    batches: list[_MicroBatch] = field(default_factory=list)
    high: int | None = None

    def buffered(self) -> int:
        return sum(b.events for b in self.batches)


@dataclass
class _Landing:
    """A decided group and what its commits carry."""

    group: Group
    claim_id: str
    txns: dict[str, int]
    ranges: list[tuple[int, int, int]]  # (partition, first, last) per micro-batch
    through: dict[int, int]


def _now() -> datetime:
    return datetime.now(UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _polled(message: Any, partition: int, offset: int) -> Polled:
    """What the consumer keeps of a Kafka message (its partition and offset checked set)."""
    return decoded(
        Polled(
            partition,
            offset,
            message.value(),
            header(message, CONTENT_TYPE),
            header(message, KIND),
            message.timestamp()[1],
        )
    )


def _take(partitions: Iterable[_Partition], target: int) -> dict[int, list[_MicroBatch]]:
    """The waiting micro-batches of a group, taken off their partitions: the oldest first
    across partitions (each partition's in offset order), until they hold ``target`` events.
    A backlog lands in the order it came, every partition in turn; taking partitions in a
    fixed order starved the last ones behind the first ones' backlog (and a producer waiting
    for room on them)."""
    by_number = {state.partition: state for state in partitions}
    waiting = sorted(
        (batch.opened, number, i)
        for number, state in by_number.items()
        for i, batch in enumerate(state.batches)
    )
    taken: dict[int, list[_MicroBatch]] = {}
    events = 0
    for _, number, _ in waiting:
        if events >= target:
            break
        batch = by_number[number].batches.pop(0)
        taken.setdefault(number, []).append(batch)
        events += batch.events
    return taken


class KafkaLander:
    """Lands a Kafka topic in the lake's Delta tables, exactly once, as one group member."""

    def __init__(
        self,
        settings: Settings,
        cache: KeyCache,
        *,
        lake: LakeWriter | None = None,
        location: LakeLocation | None = None,
        clock: Callable[[], datetime] = _now,
        client_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = settings.kafka
        if not self.kafka.kafka_bootstrap_servers:
            raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set: name the brokers to read from")
        self.topic = self.kafka.kafka_topic
        self.group_id = self.kafka.kafka_group_id
        self.layout = Layout(settings.data_dir)
        self.layout.ensure()
        self.cache = cache
        self.clock = clock
        self.window_ms = settings.dedupe_window_ms
        self.slice_ms = settings.dedupe_generation_ms
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.lake: LakeWriter = lake or DeltaLakeWriter(
            location or LakeLocation.from_settings(settings),
            fsync=settings.fsync,
            after_write=lambda table: faults.point(f"after_{table}_parquet"),
        )
        #: The key cache's stream of this topic's claims (positions name the partition).
        self.stream = f"kafka:{self.group_id}:{self.topic}"
        self.totals = Totals()
        self.status = StatusBoard(self.layout.state, self.name)
        self._lock = ConsumerLock(
            self.layout.state,
            self.layout.root,
            settings.consumer_slot,
            shared=settings.redis_url is not None,
        )
        self._client_config = client_config or {}
        self._client: Consumer | None = None
        self._partitions: dict[int, _Partition] = {}
        self._guard = threading.RLock()
        self._writer: ThreadPoolExecutor | None = None
        self._pacer = Pacer(settings.max_events_per_second)
        self._in_flight: tuple[Future[list[LedgerRow]], _Landing] | None = None
        self._need_resume = True
        self._fresh = True
        self._seq = 0
        self._instance = uuid.uuid4().hex[:8]
        self._decided_watermark: int | None = None
        self._last_group = time.monotonic()
        self._last_lag = 0.0
        self.campaigns = CampaignFile(self.layout.campaigns)
        #: Set on the first assignment (a bench starts producing then, past the group join).
        self.assigned = threading.Event()

    # -- the client ------------------------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            **self.kafka.client_config(),
            "group.id": self.group_id,
            "client.id": self.name,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "logger": ClientLog(log),
        }
        config.update(self._client_config)
        return config

    def _on_assign(self, client: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each new partition just past what the events table holds of it."""
        with self._guard:
            for tp in partitions:
                state = _Partition(
                    tp.partition, app_id_for(self.group_id, self.topic, tp.partition)
                )
                try:
                    committed = self.lake.committed_version(EVENTS.name, state.app_id)
                    tp.offset = OFFSET_BEGINNING if committed is None else committed + 1
                except Exception as exc:  # the lake is down: resume() reads it, messages wait
                    log.warning(
                        "partition %d: lake not readable at assignment: %s", tp.partition, exc
                    )
                self._partitions[tp.partition] = state
            self._need_resume = True
            self._fresh = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))
        client.incremental_assign(partitions)
        self.assigned.set()

    def _on_revoke(self, client: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit the group in the writer before the partitions go; drop what waits."""
        try:
            self._settle(pace=False)
        except Exception as exc:
            log.warning("the group being written when partitions were revoked failed: %s", exc)
            self._need_resume = True
        with self._guard:
            for tp in partitions:
                self._partitions.pop(tp.partition, None)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))
        client.incremental_unassign(partitions)

    # -- start, resume ---------------------------------------------------------------------
    def lock(self) -> None:
        self._lock.acquire(self.name)

    def start(self, *, resume: bool = True) -> None:
        """Lock; :meth:`run` resumes each partition as it is assigned."""
        del resume
        self.lock()

    def ensure_cache(self) -> None:
        def loader(since: float | None) -> tuple[Keys, int | None]:
            return window_keys(self.lake, self.window_ms, self.slice_ms, since)

        if self.cache.ensure(loader):
            log.info("rebuilt the key cache from the events table")

    def _resume(self) -> set[int]:
        """What a restart does, for every assigned partition: finish a group whose events are
        in but whose ledger is not, then go on just past what the events table holds. Returns
        the partitions read again from there (messages polled before are stale)."""
        assert self._client is not None
        self._decided_watermark = None
        self.ensure_cache()
        with self._guard:
            partitions = list(self._partitions.values())
        sought: set[int] = set()
        app_ids = [state.app_id for state in partitions]
        landed = self.lake.committed_versions(EVENTS.name, app_ids)
        ledgered = self.lake.committed_versions(LEDGER.name, app_ids)
        for state in partitions:
            events, ledger = landed[state.app_id], ledgered[state.app_id]
            if events is not None and (ledger is None or ledger < events):
                self._redo_committed(state.app_id, events)
            elif events is not None:
                self._restore_last(state.app_id, events)
            start = OFFSET_BEGINNING if events is None else events + 1
            self._check_not_behind(state, events)
            if state.ready or state.batches:
                # Dropped what waited (a fault): read it again from the broker.
                self._client.seek(TopicPartition(self.topic, state.partition, start))
                sought.add(state.partition)
            state.batches.clear()
            state.committed = events
            state.next_offset = None if events is None else events + 1
            state.ready = True
        self._fresh = True
        self._need_resume = False
        return sought

    # -- gathering -------------------------------------------------------------------------
    def _buffer(self, messages: Sequence[Any], stale: set[int]) -> None:
        batch_events = self.kafka.kafka_batch_events
        interval = self.settings.batch_interval
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal() or not error.retriable():
                    raise KafkaException(error)
                log.warning("Kafka: %s", error)
                continue
            partition, offset = message.partition(), message.offset()
            if partition in stale or partition is None or offset is None:
                continue  # fetched before the seek back of a resume: it comes again
            state = self._partitions.get(partition)
            if state is None or (state.committed is not None and offset <= state.committed):
                continue  # revoked meanwhile, or landed already (started before the table's end)
            if state.next_offset is not None and offset < state.next_offset:
                continue  # fetched before a seek back
            if state.next_offset is not None and offset > state.next_offset:
                # An idempotent producer's offsets have no holes: these were deleted (retention
                # outran the group) or compacted away before they landed. Said, not guessed.
                log.error(
                    "partition %d of %s: offsets %d-%d were never delivered (deleted by "
                    "retention before they landed, or compacted); their events are not in the lake",
                    partition,
                    self.topic,
                    state.next_offset,
                    offset - 1,
                )
            kept = _polled(message, partition, offset)
            open_batch = state.batches[-1] if state.batches else None
            if (
                open_batch is None
                or open_batch.events >= batch_events
                or time.monotonic() - open_batch.opened >= interval
            ):
                open_batch = _MicroBatch()
                state.batches.append(open_batch)
            open_batch.messages.append(kept)
            open_batch.events += kept.events
            state.next_offset = offset + 1

    def _full(self) -> bool:
        """Whether READ_AHEAD_GROUPS groups' worth waits: read no more until a group is taken.
        Unbounded, a backlog (a restart, a producer ahead) was all read into memory, decoded;
        bounded, the rest waits in the brokers and librdkafka's queue (its own bound is
        queued.max.messages.kbytes)."""
        with self._guard:
            waiting = sum(p.buffered() for p in self._partitions.values())
        return waiting >= READ_AHEAD_GROUPS * self.settings.commit_target_rows

    def _group_due(self, *, idle: bool = False) -> bool:
        waiting = sum(p.buffered() for p in self._partitions.values())
        if waiting >= self.settings.commit_target_rows:
            return True
        # ``idle``: draining and a poll found nothing new, so no more is coming; land what
        # waits now rather than after COMMIT_INTERVAL, as the spool consumer's --once does.
        late = time.monotonic() - self._last_group >= self.settings.commit_interval
        return waiting > 0 and (idle or late)

    def _watermark(self) -> int | None:
        marks = [m for m in (self.cache.watermark(), self._decided_watermark) if m is not None]
        return max(marks, default=None)

    def _next_landing(self) -> _Landing | None:
        """Take every waiting micro-batch into a group and decide it."""
        now = self.clock()
        inputs: list[FileInput] = []
        txns: dict[str, int] = {}
        ranges: list[tuple[int, int, int]] = []
        through: dict[int, int] = {}
        with self._guard:
            taken = _take(self._partitions.values(), self.settings.commit_target_rows)
            app_ids = {number: self._partitions[number].app_id for number in taken}
        for number, batches in sorted(taken.items()):
            for batch in batches:
                first, last = batch.messages[0].offset, batch.messages[-1].offset
                inputs += partition_inputs(
                    self.topic, self.group_id, number, batch.messages, _ms(now)
                )
                ranges.append((number, first, last))
                txns[app_ids[number]] = last
                through[number] = last
        if not inputs:
            return None
        check_free_space(self.layout.root, self.settings.disk_min_free)
        self._seq += 1
        intent = Intent(self._seq, [i.file for i in inputs], _ms(now), self._watermark())
        claim_id = f"{self.name}-{self._instance}:{self._seq}"
        group = self._decide(intent, inputs, claim_id, claim=True)
        self._fresh = False
        faults.point("after_claim")
        top = group.top()
        if top is not None:
            self._decided_watermark = max(self._decided_watermark or top, top)
        self._last_group = time.monotonic()
        return _Landing(group, claim_id, txns, ranges, through)

    def _decide(
        self, intent: Intent, inputs: Sequence[FileInput], claim_id: str, *, claim: bool
    ) -> Group:
        def claim_keys(keys: Keys, positions: Positions) -> Mask:
            return self.cache.claim(
                claim_id, keys, positions, stream=self.stream, fresh=self._fresh
            )

        return decide_group(
            intent,
            inputs,
            claim_keys if claim else None,
            window_ms=self.window_ms,
            slice_ms=self.slice_ms,
            campaigns=self.campaigns.current(),
        )

    # -- landing ---------------------------------------------------------------------------------
    def _land(self, landing: _Landing) -> list[LedgerRow]:
        """Commit a group to the three tables, finish its claim, set bad messages aside."""
        t0 = time.perf_counter()
        group = landing.group
        if not self.cache.valid(landing.claim_id):
            raise CacheLostError(f"group {landing.claim_id}: the key cache lost its claims")
        rows = [replace(o.ledger) for o in group.outcomes]
        for row in rows:
            row.validate_ms = group.timings.get("validate_ms")
            row.dedupe_ms = group.timings.get("dedupe_ms")
        record = {
            "txns": landing.txns,
            "ranges": landing.ranges,
            "now_ms": group.intent.now_ms,
            "watermark_ms": group.intent.watermark_ms,
            "ledger": [asdict(r) for r in rows],
        }
        self._commit(landing.txns, EVENTS.name, group.frame(EVENTS.name), json.dumps(record))
        self._commit(landing.txns, QUARANTINE.name, group.frame(QUARANTINE.name))
        return self._finish(landing, rows, write_ms=group.write_ms(t0), started=group.started)

    def _commit(
        self, txns: dict[str, int], table: str, frame: pl.DataFrame, record: str | None = None
    ) -> None:
        metadata = None if record is None else {GROUP_KEY: record}
        (result,) = self.lake.commit_group(txns, {table: frame}, metadata)
        if result.outcome.value == "committed":
            faults.point(f"after_{table}_commit")

    def _finish(
        self,
        landing: _Landing,
        rows: list[LedgerRow],
        *,
        write_ms: float | None,
        started: float | None,
    ) -> list[LedgerRow]:
        stamp(rows, _ms(self.clock()), self.name, write_ms=write_ms, started=started)
        self._commit(landing.txns, LEDGER.name, ledger_frame(rows))
        self.cache.finish(
            landing.claim_id, landing.group.top(), stream=self.stream, through=landing.through
        )
        faults.point("after_finish")
        for outcome in landing.group.outcomes:
            if outcome.poison is not None:
                self._set_aside(outcome)
        return rows

    def _set_aside(self, outcome: FileOutcome) -> None:
        """Keep a message that could not be read under ``quarantine/files/<batch_id>/``, with
        ``reason.json`` naming its topic, partition and offset."""
        assert outcome.poison is not None
        where = outcome.file.batch_id.rsplit("@", 1)
        partition, offset = int(where[0].rsplit("-", 1)[1]), int(where[1])
        directory = self.layout.quarantine_files / outcome.file.batch_id
        directory.mkdir(parents=True, exist_ok=True)
        reason = {
            "topic": self.topic,
            "partition": partition,
            "offset": offset,
            "reason": outcome.poison.reason,
            "message": outcome.poison.message,
            "batch_id": outcome.file.batch_id,
        }
        body = json.dumps(reason, indent=2).encode()
        atomic_write_bytes(directory / "reason.json", body, durable=self.settings.fsync)
        log.warning(
            "quarantined %s partition %d offset %d: %s: %s",
            self.topic,
            partition,
            offset,
            outcome.poison.reason,
            outcome.poison.message,
        )

    def _check_not_behind(self, state: _Partition, events: int | None) -> None:
        """Say so, loudly, when a partition ends before what the lake holds of it: the topic
        was deleted and created again (or its broker's log lost), and its new messages up to
        that offset would be taken for landed ones. Not guessed around: an operator decides
        (another KAFKA_GROUP_ID starts the group's app ids afresh)."""
        assert self._client is not None
        if events is None:
            return
        try:
            _, high = self._client.get_watermark_offsets(
                TopicPartition(self.topic, state.partition), timeout=5.0
            )
        except KafkaException:
            return
        if 0 <= high <= events:
            log.error(
                "partition %d of %s ends at offset %d, but the lake already holds it through "
                "offset %d: was the topic recreated? Its messages up to offset %d are skipped "
                "as landed; use a new KAFKA_GROUP_ID to land a recreated topic from its start",
                state.partition,
                self.topic,
                high,
                events,
                events,
            )

    def _restore_last(self, app_id: str, version: int) -> None:
        """Put the keys of a partition's last landed group back into the key cache: a crash
        between its ledger commit and its finish left them out of a cache whose claims die
        with the process (the embedded one). Idempotent; a no-op for a cache that has them."""
        raw = self.lake.group_metadata(EVENTS.name, GROUP_KEY, app_id, version)
        if raw is None:
            return  # landed before this record existed, or by a spool consumer
        ledger = [LedgerRow(**row) for row in json.loads(raw)["ledger"]]
        restore_claims(self.lake, self.cache, f"restore:{app_id}", ledger, self.slice_ms)

    def _redo_committed(self, app_id: str, version: int) -> None:
        """Finish a group whose events commit landed but whose ledger did not (its writer died
        between them): the same quarantine and ledger rows, from its recorded ranges."""
        raw = self.lake.group_metadata(EVENTS.name, GROUP_KEY, app_id, version)
        if raw is None:
            raise RuntimeError(
                f"{app_id}: the events table holds offset {version} but not the commit record "
                "a redo needs; its ledger cannot be written exactly"
            )
        record = json.loads(raw)
        ranges = [tuple(r) for r in record["ranges"]]
        messages = read_ranges(self._consumer_config(), self.topic, ranges)
        inputs: list[FileInput] = []
        for partition, first, last in ranges:
            got = [m for m in messages.get(partition, []) if first <= m.offset <= last]
            if got:
                inputs += partition_inputs(self.topic, self.group_id, partition, got, 0)
        intent = Intent(0, [i.file for i in inputs], record["now_ms"], record["watermark_ms"])
        group = self._decide(intent, inputs, "redo", claim=False)
        ledger = [LedgerRow(**row) for row in record["ledger"]]
        txns = {str(k): int(v) for k, v in record["txns"].items()}
        through = {int(p): int(last) for p, _, last in ranges}
        log.info("finishing group %s left half-landed by its consumer", txns)
        restore_claims(self.lake, self.cache, "redo", ledger, self.slice_ms)
        self._commit(txns, QUARANTINE.name, group.frame(QUARANTINE.name))
        landing = _Landing(group, "redo", txns, [], through)
        self._finish(landing, [replace(r) for r in ledger], write_ms=None, started=None)

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        *,
        once: bool = False,
        stop: threading.Event | None = None,
        drain: threading.Event | None = None,
    ) -> Totals:
        """Consume until stopped (or, with ``once``, until the assigned partitions are read to
        their end; ``drain`` does the same from the moment it is set, for a caller that knows
        its producers are done). Transient faults are waited out as the spool consumer does."""
        stop = stop or threading.Event()
        drain = drain or threading.Event()
        if once:
            drain.set()
        supervisor = Supervisor(
            self.status,
            stop,
            max_delay=self.settings.retry_max_delay,
            give_up_after=self.settings.once_retry_timeout if once else None,
        )
        self.status.start()
        client = Consumer(self._consumer_config())
        self._client = client
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adevents-writer") as writer:
                self._writer = writer
                client.subscribe(
                    [self.topic],
                    on_assign=self._on_assign,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_revoke,
                )
                self._loop(supervisor, drain, stop)
                try:
                    client.close()  # leaves the group: the revoke callback settles the writer
                except Exception as exc:
                    log.warning("closing the Kafka consumer: %s", exc)
        finally:
            self.status.stop()
        return self.totals

    def _loop(self, supervisor: Supervisor, drain: threading.Event, stop: threading.Event) -> None:
        assert self._client is not None
        while not stop.is_set():
            try:
                once = drain.is_set()
                # consume(n, t) waits out t unless n messages come, and a few Arrow messages
                # hold a group: wait for the first one only, then take what is queued. A drain
                # does not wait a poll period to learn that nothing more is coming.
                wait = DRAIN_POLL if once else self.settings.poll_interval
                messages = [] if self._full() else self._client.consume(1, wait)
                stale = self._resume() if self._need_resume else set()
                with self._guard:
                    self._buffer(messages, stale)
                # Then what is queued already, a chunk at a time, up to the read-ahead (not
                # after a resume's seeks: the next pass reads what they fetch).
                while messages and not stale and not self._full():
                    more = self._client.consume(POLL_MESSAGES, 0)
                    if not more:
                        break
                    with self._guard:
                        self._buffer(more, stale)
                    messages += more
                self._publish_lag()
                idle = once and not messages and self._read_to_ends(cached=True)
                if self._group_due(idle=idle):
                    landing = self._next_landing()
                    self._settle()
                    if landing is not None:
                        assert self._writer is not None
                        self._in_flight = (self._writer.submit(self._land, landing), landing)
                elif not messages or (self._in_flight and self._in_flight[0].done()):
                    # A landed group's offsets are committed (advisory, for lag) as soon as
                    # it lands, not when the next group is due.
                    self._settle()
                supervisor.ok()
                if once and self._caught_up():
                    self._settle()
                    break
            except Exception as exc:
                self._abandon()
                supervisor.failed(exc)
                self._need_resume = True

    def _settle(self, *, pace: bool = True) -> None:
        """Wait for the group in the writer, count it, commit its offsets (advisory) and, from
        the loop (``pace``; not from a rebalance callback), keep to MAX_EVENTS_PER_SECOND."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        future, landing = in_flight
        rows = future.result()
        self.totals.commits += 1
        for row in rows:
            self.totals.add(row)
        self._commit_offsets(landing.through)
        if pace:
            self._pacer.landed(sum(row.rows_in for row in rows))

    def _commit_offsets(self, through: dict[int, int]) -> None:
        """Advisory only (lag monitoring): the tables' txns say where a partition resumes."""
        if self._client is None:
            return
        offsets = [TopicPartition(self.topic, p, last + 1) for p, last in through.items()]
        try:
            self._client.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.debug("advisory offset commit failed: %s", exc)

    def _abandon(self) -> None:
        """After a fault: let the group in the writer finish (counted, as any landed group)
        or fail, and forget decisions made since, as a restart would."""
        self._decided_watermark = None
        try:
            self._settle()
        except Exception as exc:
            if classify(exc) is None and not isinstance(exc, CacheLostError):
                raise
            log.debug("the group being written failed too: %s", exc)

    def _caught_up(self) -> bool:
        """``once``: every assigned partition read to its end and landed."""
        if self._in_flight is not None or not self.assigned.is_set() or self._need_resume:
            return False
        with self._guard:
            if any(state.batches for state in self._partitions.values()):
                return False  # known without asking the brokers
        # The ends the last fetches reported first (no round trip: they only lag the brokers'),
        # then the brokers' own, once those say every partition is done.
        return self._read_to_ends(cached=True) and self._read_to_ends(cached=False)

    def _read_to_ends(self, *, cached: bool) -> bool:
        """Whether every assigned partition was read to its end: the one the brokers report
        now, or (``cached``) the one the last fetch reported, which may lag it. True with no
        partition assigned (a member beyond the partition count has nothing to land)."""
        assert self._client is not None
        with self._guard:
            states = list(self._partitions.values())
        for state in states:
            tp = TopicPartition(self.topic, state.partition)
            if cached:
                _, high = self._client.get_watermark_offsets(tp, cached=True)
            else:
                _, high = self._client.get_watermark_offsets(tp, timeout=5.0)
            done = state.committed if state.next_offset is None else state.next_offset - 1
            if high > 0 and (done is None or done < high - 1):
                return False
        return True

    def _publish_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_EVERY or self._client is None:
            return
        self._last_lag = now
        lag: dict[str, int] = {}
        with self._guard:
            states = list(self._partitions.values())
        for state in states:
            tp = TopicPartition(self.topic, state.partition)
            try:
                _, high = self._client.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            position = state.next_offset or (0 if state.committed is None else state.committed + 1)
            lag[f"{self.topic}/{state.partition}"] = max(0, high - position)
        self.status.set_kafka_lag(lag)

    def close(self) -> None:
        close_cache(self.cache)
        self._lock.release()


def read_ranges(
    config: dict[str, Any], topic: str, ranges: Sequence[tuple[int, ...]], timeout: float = 60.0
) -> dict[int, list[Polled]]:
    """The messages of ``(partition, first, last)`` ranges, read outside the group (a redo):
    an assigned, non-member consumer that commits nothing."""
    wanted: dict[int, tuple[int, int]] = {}
    for number, first, last in ranges:
        lo, hi = wanted.get(number, (first, last))
        wanted[number] = (min(lo, first), max(hi, last))
    reader_config = {k: v for k, v in config.items() if k != "partition.assignment.strategy"}
    reader_config["group.id"] = f"{config['group.id']}-redo"
    reader = Consumer(reader_config)
    out: dict[int, list[Polled]] = {p: [] for p in wanted}
    try:
        reader.assign([TopicPartition(topic, p, lo) for p, (lo, _) in wanted.items()])
        left = set(wanted)
        deadline = time.monotonic() + timeout
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read back {topic} partitions {sorted(left)}")
            for message in reader.consume(POLL_MESSAGES, 0.5):
                partition, offset = message.partition(), message.offset()
                if message.error() is not None or partition is None or offset is None:
                    continue
                if partition not in left:
                    continue
                if offset <= wanted[partition][1]:
                    out[partition].append(_polled(message, partition, offset))
                if offset >= wanted[partition][1]:
                    left.discard(partition)
    finally:
        reader.close()
    return out
