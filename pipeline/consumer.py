"""The consumer: lands its slot's spool files in the Delta tables, exactly once, in commit groups.

A group gathers files for up to COMMIT_INTERVAL (or COMMIT_TARGET_ROWS), so that the tables
get about one commit per second rather than one per producer batch. Per group:

1. take batches from the source (``pipeline.source``: the slot's spool files), read them;
2. record the group's intent (files, clock, watermark) durably;
3. decide (``pipeline.decide``): validate, dedupe within the group, claim keys under the
   group's claim id ``<app_id>:<version>``, enrich;
4. land it (``pipeline.landing``): record the decided ledger rows, then commit events →
   quarantine → ledger through the lake writer (``lake.writer``), each with the Delta
   transaction ``(app_id, version)``: a table that already has the version skips it;
5. finish the claim, retire the inputs (the source sets bad ones aside), forget the intent.

A restart (or a transient fault) redoes every intent left, in order, with its recorded inputs:
see :meth:`Consumer.resume`. Three groups are in hand at once, one a thread: while group N is
committed (fsyncs and Delta commits, mostly waiting) on the committing thread, group N+1's
Parquet files are written on the writing thread, and group N+2 is decided on this one (Polars,
Redis and delta-rs release the GIL). Groups commit in version order, and a group whose earlier
group failed does not commit at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from lake.location import LakeLocation
from lake.tables import EVENTS, LEDGER, QUARANTINE
from lake.writer import DeltaLakeWriter, LakeWriter
from pipeline import faults
from pipeline.consumer_lock import ConsumerLock, ConsumerLockedError
from pipeline.decide import FileInput
from pipeline.enrich import CampaignFile
from pipeline.fingerprint import Keys
from pipeline.groups import Intent, Intents
from pipeline.keycache import CacheLostError, KeyCache, Mask, Positions
from pipeline.lake import window_keys
from pipeline.landing import Group, Lander, Pacer, Written, close_cache, decide_group
from pipeline.retry import StatusBoard, Supervisor, check_free_space, classify
from pipeline.schema import Layout, LedgerRow
from pipeline.settings import Settings
from pipeline.source import Source, SpoolSource

log = logging.getLogger("adevents.consumer")
__all__ = ["Consumer", "ConsumerLockedError", "Group", "Totals"]


def _now() -> datetime:
    return datetime.now(UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@dataclass
class Totals:
    """Running totals of one consumer process, for its summary line."""

    files: int = 0
    rows_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bad_files: int = 0
    commits: int = 0

    def add(self, row: LedgerRow) -> None:
        self.files += 1
        self.rows_in += row.rows_in
        self.accepted += row.accepted
        self.duplicates += row.duplicates
        self.quarantined += row.quarantined
        self.bad_files += row.status != "ok"

    def line(self, wall_seconds: float) -> str:
        rate = self.rows_in / wall_seconds if wall_seconds > 0 else 0.0
        return (
            f"files={self.files} rows_in={self.rows_in} accepted={self.accepted} "
            f"duplicates={self.duplicates} quarantined={self.quarantined} "
            f"bad_files={self.bad_files} commits={self.commits} events_per_s={rate:,.0f}"
        )


class Consumer:
    """Lands the spool files of one slot in the lake's Delta tables, exactly once."""

    def __init__(
        self,
        settings: Settings,
        cache: KeyCache,
        *,
        source: Source | None = None,
        lake: LakeWriter | None = None,
        location: LakeLocation | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        """``source`` and ``lake`` default to this machine's spool slot and the Delta tables at
        ``location`` (LAKE_URI); tests pass in-memory ones (``pipeline.testing``)."""
        self.settings = settings
        self.layout = Layout(settings.data_dir)
        self.layout.ensure()
        self.cache = cache
        self.clock = clock
        self.window_ms = settings.dedupe_window_ms
        self.slice_ms = settings.dedupe_generation_ms
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.durable = settings.fsync
        self.source: Source = source or SpoolSource(
            self.layout,
            settings.consumer_slot,
            durable=self.durable,
            keep_processed=settings.keep_processed,
        )
        self.lake: LakeWriter = lake or DeltaLakeWriter(
            location or LakeLocation.from_settings(settings),
            fsync=self.durable,
            after_write=_after_parquet,
        )
        self.intents = Intents(self.layout.state, settings.consumer_slot, durable=self.durable)
        self.app_id = self.source.app_id
        self.lander = Lander(
            self.app_id,
            self.lake,
            cache,
            self.source,
            self.intents,
            consumer=self.name,
            clock=clock,
            slice_ms=self.slice_ms,
        )
        self.totals = Totals()
        self.status = StatusBoard(self.layout.state, self.name)
        self._lock = ConsumerLock(
            self.layout.state,
            self.layout.root,
            settings.consumer_slot,
            shared=settings.redis_url is not None,
        )
        self.campaigns = CampaignFile(self.layout.campaigns)
        self._pacer = Pacer(settings.max_events_per_second)
        self._next_version = 0
        self._decided_watermark: int | None = None
        self._last_group = 0.0
        #: Groups handed to the writing and committing threads, oldest first (at most two).
        self._in_flight: list[_Landing] = []

    # -- start-up ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take this consumer's place, or fail with ConsumerLockedError (``ConsumerLock``)."""
        self._lock.acquire(self.name)

    def start(self, *, resume: bool = True) -> None:
        """Lock, then (``resume``) finish what a crash interrupted; :meth:`run` resumes too."""
        self.lock()
        if resume:
            self.resume()

    def resume(self) -> None:
        """What a restart does: open the tables, make the key cache whole, redo every group
        whose intent is left, in order. Run at start and after every transient fault, so
        riding a fault out is exactly as safe as the kill -9 and restart the tests check."""
        self._decided_watermark = None
        self.ensure_cache()
        self.intents.drop_partial_records()
        intents = self.intents.pending()
        committed = [
            v
            for table in (EVENTS.name, QUARANTINE.name, LEDGER.name)
            if (v := self.lake.committed_version(table, self.app_id)) is not None
        ]
        newest = max([*committed, *(i.version for i in intents)], default=-1)
        self._next_version = newest + 1
        for intent in intents:
            log.info(
                "redoing group %d (%d files) left unfinished", intent.version, len(intent.files)
            )
            self._redo(intent)

    def ensure_cache(self) -> None:
        """Rebuild the key cache from the events table if it lost its state (or never had it).

        Groups not committed yet need nothing here: their redo claims again under the same
        claim id. Those whose events committed but did not finish are restored by their redo.
        """
        started = time.perf_counter()

        def loader(since: float | None) -> tuple[Keys, int | None]:
            return window_keys(self.lake, self.window_ms, self.slice_ms, since)

        if self.cache.ensure(loader):
            log.info(
                "rebuilt the key cache from the events table in %.1fs",
                time.perf_counter() - started,
            )

    # -- reading and deciding ------------------------------------------------------------------
    def _decide(self, intent: Intent, inputs: Sequence[FileInput], *, claim: bool) -> Group:
        claim_id = self.lander.claim_id(intent.version)

        def claim_keys(keys: Keys, positions: Positions) -> Mask:
            return self.cache.claim(claim_id, keys, positions)

        return decide_group(
            intent,
            inputs,
            claim_keys if claim else None,
            window_ms=self.window_ms,
            slice_ms=self.slice_ms,
            campaigns=self.campaigns.current(),
        )

    def _watermark(self) -> int | None:
        # Groups decided but still being written count too, so that the decisions are the
        # same whether or not writing overlaps the next group's deciding.
        marks = [m for m in (self.cache.watermark(), self._decided_watermark) if m is not None]
        return max(marks, default=None)

    def _gather(self, once: bool, stop: threading.Event) -> list[FileInput]:
        """Batches for the next group, read: those taken before first, then new ones, until
        COMMIT_TARGET_ROWS rows or COMMIT_INTERVAL since the last group."""
        busy = {f.name for landing in self._in_flight for f in landing.group.intent.files}
        target = self.settings.commit_target_rows
        deadline = self._last_group + self.settings.commit_interval
        chosen: list[FileInput] = []
        rows = 0
        while True:
            for inp in self.source.take(busy | {c.file.name for c in chosen}):
                if inp.table is not None:
                    faults.point("after_read")
                chosen.append(inp)
                rows += 0 if inp.table is None else inp.table.num_rows
                if rows >= target or stop.is_set():
                    break
            if once or rows >= target or stop.is_set() or time.monotonic() >= deadline:
                break
            stop.wait(min(self.settings.poll_interval, max(0.0, deadline - time.monotonic())))
        if chosen:
            self.source.hold()
        return chosen

    def _next_group(self, once: bool, stop: threading.Event) -> Group | None:
        """Gather, record the intent, decide. None when nothing is waiting."""
        check_free_space(self.layout.root, self.settings.disk_min_free)
        inputs = self._gather(once, stop)
        if not inputs:
            return None
        self._last_group = time.monotonic()
        intent = Intent(
            version=self._next_version,
            files=[i.file for i in inputs],
            now_ms=_ms(self.clock()),
            watermark_ms=self._watermark(),
        )
        self.intents.record(intent)
        self._next_version += 1
        faults.point("after_intent")
        group = self._decide(intent, inputs, claim=True)
        faults.point("after_claim")
        top = group.top()
        if top is not None:
            self._decided_watermark = max(self._decided_watermark or top, top)
        return group

    # -- landing -----------------------------------------------------------------------------
    def _land(self, group: Group) -> list[LedgerRow]:
        """Commit a decided group, finish its claim, retire its inputs, on this thread."""
        return self.lander.land(group)

    def _complete(
        self, written: Future[Written], before: Future[list[LedgerRow]] | None
    ) -> list[LedgerRow]:
        """Complete a group once its files are written, on the committing thread; fails
        without committing anything when the group ``before`` it failed, so that versions
        commit in order."""
        if before is not None:
            before.result()
        return self.lander.complete(written.result())

    def _redo(self, intent: Intent) -> None:
        """Land a group left by a crash exactly as its first attempt would have."""
        inputs = []
        for position in intent.files:
            inp = self.source.read(position)
            if inp is None:
                continue  # retired already (the crash came mid-retire)
            if inp.table is not None:
                faults.point("after_read")
            inputs.append(inp)
        done = self.lake.committed_version(EVENTS.name, self.app_id)
        if done is None or done < intent.version:
            self._account(self._land(self._decide(intent, inputs, claim=True)))
            return
        if intent.ledger is None:
            raise RuntimeError(
                f"group {intent.version}: its events are committed but its decided ledger rows "
                f"are missing from {self.intents.dir}; the ledger cannot be written exactly"
            )
        group = self._decide(intent, inputs, claim=False) if inputs else Group(intent, [], 0.0)
        self._account(self.lander.land_committed(group, intent.ledger))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> Totals:
        """Land groups until stopped (or, with ``once``, until the spool is empty).

        A transient fault (Redis down or lost, a full disk, a failing lake) never ends the run:
        the groups in hand are dropped, and after a backoff the consumer resumes as a restart
        would (see :meth:`resume`), for as long as it takes. With ``once`` it gives up after
        ONCE_RETRY_TIMEOUT with :class:`pipeline.retry.GaveUpError`. Anything else is a bug or
        a poison input that escaped isolation, and is raised.
        """
        stop = stop or threading.Event()
        supervisor = Supervisor(
            self.status,
            stop,
            max_delay=self.settings.retry_max_delay,
            give_up_after=self.settings.once_retry_timeout if once else None,
        )
        self.status.start()
        try:
            with (
                ThreadPoolExecutor(1, thread_name_prefix="adevents-writer") as writer,
                ThreadPoolExecutor(1, thread_name_prefix="adevents-committer") as committer,
            ):
                self._supervised(_Threads(writer, committer), supervisor, once, stop)
        finally:
            self.status.stop()
        return self.totals

    def _supervised(
        self, threads: _Threads, supervisor: Supervisor, once: bool, stop: threading.Event
    ) -> None:
        resumed = False
        while not stop.is_set():
            try:
                if not resumed:
                    self.resume()
                    resumed = True
                more = self._pass(threads, once, stop)
                if not more:
                    self._settle()
                supervisor.ok()
                if not more:
                    break
            except Exception as exc:
                self._abandon()
                supervisor.failed(exc)  # waits, or raises what is not transient
                resumed = False
        try:
            self._settle()
        except Exception as exc:
            if classify(exc) is None:
                raise
            # Stopping during a fault: the group is redone, exactly, at the next start.
            log.warning("stopped with a group unfinished (%s); the next start redoes it", exc)

    def _pass(self, threads: _Threads, once: bool, stop: threading.Event) -> bool:
        """Decide the next group and hand it to the writing and committing threads; False
        when ``once`` and done."""
        group = self._next_group(once, stop)
        if group is None:
            if once and not self._in_flight:
                return False
            self._settle()
            if not once:
                stop.wait(self.settings.poll_interval)
            return True
        # One group writing and one committing: the group before has its files written (so
        # that decided groups do not pile up in memory), the one before that has landed.
        if self._in_flight:
            self._in_flight[-1].written.result()
        self._settle(keep=1)
        before = self._in_flight[-1].landed if self._in_flight else None
        written = threads.writer.submit(self.lander.write, group)
        landed = threads.committer.submit(self._complete, written, before)
        self._in_flight.append(_Landing(group, written, landed))
        return True

    def _abandon(self) -> None:
        """After a fault: let the groups in hand finish or fail, and forget decisions made
        since, so that the next try starts from what is durable, as a restart would."""
        in_flight, self._in_flight = self._in_flight, []
        self._decided_watermark = None
        for landing in in_flight:
            try:
                self._account(landing.landed.result())
            except Exception as exc:
                if classify(exc) is None and not isinstance(exc, CacheLostError):
                    raise
                log.debug("a group being landed failed too: %s", exc)

    def _settle(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` groups are in hand, oldest first, and count them."""
        while len(self._in_flight) > keep:
            self._account(self._in_flight.pop(0).landed.result())

    def _account(self, rows: list[LedgerRow]) -> None:
        """Count a landed group, and pace the next one."""
        self.totals.commits += 1
        for row in rows:
            self.totals.add(row)
        self._pacer.landed(sum(r.rows_in for r in rows))

    def close(self) -> None:
        close_cache(self.cache)
        self._lock.release()


@dataclass(frozen=True)
class _Threads:
    """The threads a run lands groups on: one writes files, one commits."""

    writer: ThreadPoolExecutor
    committer: ThreadPoolExecutor


@dataclass(frozen=True)
class _Landing:
    """A group handed over: its files being written, then its commits."""

    group: Group
    written: Future[Written]
    landed: Future[list[LedgerRow]]


def _after_parquet(table: str) -> None:
    """The crash point between a table's Parquet write and its commit."""
    faults.point(f"after_{table}_parquet")
