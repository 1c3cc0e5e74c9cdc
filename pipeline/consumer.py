"""The consumer: lands its slot's spool files in the Delta tables, exactly once, in commit groups.

A group gathers files for up to COMMIT_INTERVAL (or COMMIT_TARGET_ROWS), so that the tables
get about one commit per second rather than one per producer batch. Per group:

1. claim files into the slot (``pipeline.groups``), read them;
2. record the group's intent (files, clock, watermark) durably;
3. decide (``pipeline.decide``): validate, dedupe within the group, claim keys under the
   group's claim id ``<app_id>:<version>``, enrich;
4. record the decided ledger rows, then commit events → quarantine → ledger, each with the
   Delta transaction ``(app_id, version)``: a table that already has the version skips it;
5. finish the claim, retire the inputs (bad ones to ``quarantine/files/``), forget the intent.

A restart (or a transient fault) redoes every intent left, in order, with its recorded inputs:
see :meth:`Consumer.resume`. While group N is committed on a writer thread, group N+1 is
decided (Polars, Redis and delta-rs release the GIL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
from deltalake import DeltaTable

from lake.location import LakeLocation
from lake.tables import EVENTS, LEDGER, QUARANTINE, TableSpec, ensure_tables
from lake.writer import commit_files, committed_version, write_files
from pipeline import faults
from pipeline.decide import FileInput, FileOutcome, decide
from pipeline.enrich import empty_campaigns, load_campaigns
from pipeline.fingerprint import Keys
from pipeline.groups import GroupFile, Intent, Slot, app_id_for, spool_id
from pipeline.keycache import CacheLostError, KeyCache, Mask
from pipeline.lake import batch_keys, window_keys
from pipeline.retry import StatusBoard, Supervisor, check_free_space, classify
from pipeline.schema import ENRICHED_SCHEMA, QUARANTINE_SCHEMA, Layout, LedgerRow, ledger_frame
from pipeline.settings import Settings
from pipeline.spool import (
    ARRIVED_AT_KEY,
    MAX_FILE_BYTES,
    PoisonInputError,
    atomic_write_bytes,
    display_name,
    fsync,
    internal_stem,
    list_incoming,
    read_spool_file,
    sweep_stale_temp_files,
)

log = logging.getLogger("adevents.consumer")
#: How often a running consumer sweeps incoming/ for producers' stale temp files.
SWEEP_INTERVAL_SECONDS = 300.0


class ConsumerLockedError(RuntimeError):
    """Another consumer already holds this DATA_DIR (or this slot of it)."""


def batch_id_for(path: Path, st: os.stat_result) -> str:
    """A file's batch id: its name plus what tells this file from a later one of that name.

    Stable across the claim into a slot and across restarts (a rename keeps inode and mtime).
    A long or odd name is replaced by a hash of it (``internal_stem``).
    """
    ident = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return f"{internal_stem(path.name)}-{hashlib.blake2b(ident, digest_size=4).hexdigest()}"


def _printable(name: str) -> str:
    """A file name for one log line: control characters (a newline) escaped, quoted."""
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name) + '"'


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


@dataclass
class Group:
    """A decided group, ready to commit."""

    intent: Intent
    outcomes: list[FileOutcome]
    started: float
    timings: dict[str, float] = field(default_factory=dict)


class Consumer:
    """Lands the spool files of one slot in the lake's Delta tables, exactly once."""

    def __init__(
        self,
        settings: Settings,
        cache: KeyCache,
        *,
        location: LakeLocation | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.settings = settings
        self.layout = Layout(settings.data_dir)
        self.layout.ensure()
        self.location = location or LakeLocation.from_settings(settings)
        self.cache = cache
        self.clock = clock
        self.window_ms = int(settings.dedupe_window * 1000)
        self.slice_ms = int(settings.dedupe_slice * 1000)
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.durable = settings.fsync
        self.slot = Slot(
            self.layout.incoming, self.layout.state, settings.consumer_slot, durable=self.durable
        )
        self.app_id = app_id_for(spool_id(self.layout.state), settings.consumer_slot)
        self.totals = Totals()
        self.status = StatusBoard(self.layout.state, self.name)
        #: Largest spool file read; bigger ones are quarantined as ``file_too_large``.
        self.max_file_bytes = MAX_FILE_BYTES
        self._tables: dict[str, DeltaTable] = {}
        self._campaigns = empty_campaigns()
        self._campaigns_mtime: float | None = -1.0
        self._lock_files: list[IO[str]] = []
        self._next_allowed = 0.0
        self._next_sweep = 0.0
        self._next_version = 0
        self._decided_watermark: int | None = None
        self._last_group = 0.0
        self._in_flight: tuple[Future[list[LedgerRow]], Group] | None = None
        #: Entries that cannot leave incoming/ (a mount point): passed over, logged once.
        self._stuck: set[str] = set()

    # -- start-up ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take this consumer's place, or fail with a clear message.

        ``state/consumer.lock`` is held by every consumer of DATA_DIR: exclusively with the
        embedded key cache (it lives in one process, and a Redis consumer beside it could not
        see its claims), shared with Redis, where each also holds its slot's lock exclusively.
        """
        shared = self.settings.redis_url is not None
        whole = self._flock("consumer.lock", exclusive=not shared)
        if whole is None:
            raise self._locked("consumer.lock", slot=False)
        self._lock_files = [whole]
        if shared:
            slot = self._flock(f"consumer-slot-{self.slot.number}.lock", exclusive=True)
            if slot is None:
                raise self._locked(f"consumer-slot-{self.slot.number}.lock", slot=True)
            self._lock_files.append(slot)
        for fh in self._lock_files[-1:]:  # the lock this process holds alone names it
            fh.seek(0)
            fh.truncate()
            fh.write(f"{self.name} pid={os.getpid()}\n")
            fh.flush()

    def _flock(self, name: str, *, exclusive: bool) -> IO[str] | None:
        fh = open(self.layout.state / name, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def _locked(self, name: str, *, slot: bool) -> ConsumerLockedError:
        for fh in self._lock_files:
            fh.close()
        self._lock_files = []
        try:
            holder = (self.layout.state / name).read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        if slot:
            where, hint = (
                f"slot {self.slot.number} of ",
                ", or give this one another CONSUMER_SLOT.",
            )
        else:
            where, hint = "", " (a consumer with the embedded key cache needs DATA_DIR alone)."
        return ConsumerLockedError(
            f"another consumer ({holder}) is already running on {where}{self.layout.root}; "
            f"two consumers there would write duplicates. Stop it first{hint}"
        )

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
        self._tables = ensure_tables(self.location)
        self.ensure_cache()
        self.slot.drop_partial_records()
        intents = self.slot.pending()
        committed = [
            v for t in self._tables.values() if (v := committed_version(t, self.app_id)) is not None
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
            return window_keys(self.location, self.window_ms, self.slice_ms, since)

        if self.cache.ensure(loader):
            log.info(
                "rebuilt the key cache from the events table in %.1fs",
                time.perf_counter() - started,
            )

    def campaigns(self) -> pl.DataFrame:
        try:
            mtime: float | None = self.layout.campaigns.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._campaigns_mtime:
            self._campaigns = load_campaigns(self.layout.campaigns)
            self._campaigns_mtime = mtime
        return self._campaigns

    # -- reading and deciding ------------------------------------------------------------------
    def _claim_id(self, version: int) -> str:
        return f"{self.app_id}:{version}"

    def _read(self, path: Path, *, in_place: bool = False) -> FileInput | None:
        """One owned file as a decide input; None if it vanished."""
        try:
            st = os.lstat(path)  # the entry itself: a link is never followed
        except FileNotFoundError:
            return None
        file = GroupFile(path.name, batch_id_for(path, st), in_place)
        arrived_ms = int(st.st_mtime * 1000)
        started = time.perf_counter()
        try:
            table = read_spool_file(path, st, max_bytes=self.max_file_bytes)
        except FileNotFoundError:
            return None
        except PoisonInputError as exc:
            return FileInput(file, arrived_ms, None, exc)
        faults.point("after_read")
        meta = table.schema.metadata or {}
        if ARRIVED_AT_KEY in meta:
            with contextlib.suppress(ValueError):
                arrived_ms = int(meta[ARRIVED_AT_KEY])
        return FileInput(file, arrived_ms, table, read_ms=(time.perf_counter() - started) * 1000)

    def _decide(self, intent: Intent, inputs: Sequence[FileInput], *, claim: bool) -> Group:
        started = time.perf_counter()
        claim_id = self._claim_id(intent.version)
        timings: dict[str, float] = {}

        def claim_keys(keys: Keys) -> Mask:
            t = time.perf_counter()
            won = self.cache.claim(claim_id, keys) if claim else self._not_claimed(keys)
            timings["dedupe_ms"] = (time.perf_counter() - t) * 1000
            return won

        outcomes = decide(
            inputs,
            now=datetime.fromtimestamp(intent.now_ms / 1000, UTC),
            watermark_ms=intent.watermark_ms,
            window_ms=self.window_ms,
            slice_ms=self.slice_ms,
            campaigns=self.campaigns(),
            claim=claim_keys,
        )
        total = (time.perf_counter() - started) * 1000
        timings["validate_ms"] = total - timings.get("dedupe_ms", 0.0)
        return Group(intent, outcomes, started, timings)

    @staticmethod
    def _not_claimed(keys: Keys) -> Mask:
        """The claim of a redo whose events are committed: only its quarantine rows count."""
        return np.zeros(len(keys), dtype=bool)

    def _watermark(self) -> int | None:
        # Groups decided but still being written count too, so that the decisions are the
        # same whether or not writing overlaps the next group's deciding.
        marks = [m for m in (self.cache.watermark(), self._decided_watermark) if m is not None]
        return max(marks, default=None)

    def _gather(self, once: bool, stop: threading.Event) -> list[FileInput]:
        """Files for the next group, read: owned ones first, then claimed from incoming/ in
        name order, until COMMIT_TARGET_ROWS rows or COMMIT_INTERVAL since the last group."""
        in_flight = self._in_flight
        busy = set() if in_flight is None else {f.name for f in in_flight[1].intent.files}
        target = self.settings.commit_target_rows
        deadline = self._last_group + self.settings.commit_interval
        chosen: list[FileInput] = []
        taken: set[str] = set()
        rows = 0

        def take(path: Path, *, in_place: bool = False) -> None:
            nonlocal rows
            taken.add(path.name)
            inp = self._read(path, in_place=in_place)
            if inp is not None:
                chosen.append(inp)
                rows += 0 if inp.table is None else inp.table.num_rows

        while True:
            for path in self.slot.owned():
                if path.name not in busy and path.name not in taken and rows < target:
                    take(path)
            for path in list_incoming(self.layout.incoming):
                if rows >= target or stop.is_set():
                    break
                if path.name in self._stuck:
                    continue
                claimed = self._claim(path)
                if claimed is not None:
                    take(claimed)
                elif path.name in self._stuck:
                    take(path, in_place=True)  # recorded once, then passed over
            if once or rows >= target or stop.is_set() or time.monotonic() >= deadline:
                break
            stop.wait(min(self.settings.poll_interval, max(0.0, deadline - time.monotonic())))
        if chosen:
            self.slot.sync()
        return chosen

    def _claim(self, path: Path) -> Path | None:
        try:
            return self.slot.claim(path)
        except OSError as exc:
            if classify(exc) is not None:
                raise
            # EBUSY (a mount point), EXDEV, EPERM: it cannot leave incoming/, so no slot can
            # own it. It gets its ledger row where it is, and is passed over from then on.
            shown = _printable(display_name(path.name))
            log.error("cannot move %s out of incoming/: %s; recorded and passed over", shown, exc)
            self._stuck.add(path.name)
            return None

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
        self.slot.record(intent)
        self._next_version += 1
        faults.point("after_intent")
        group = self._decide(intent, inputs, claim=True)
        faults.point("after_claim")
        top = _max_event_ms(group.outcomes)
        if top is not None:
            self._decided_watermark = max(self._decided_watermark or top, top)
        return group

    # -- committing ----------------------------------------------------------------------------
    def _commit(self, spec: TableSpec, frame: pl.DataFrame, version: int) -> None:
        table = self._tables[spec.name]
        seen = committed_version(table, self.app_id)
        if seen is not None and seen >= version:
            return
        files = write_files(self.location, spec, frame, version=version, fsync=self.durable)
        faults.point(f"after_{spec.name}_parquet")
        commit_files(table, spec, files, self.app_id, version)
        faults.point(f"after_{spec.name}_commit")

    def _land(self, group: Group) -> list[LedgerRow]:
        """Commit a decided group to the three tables, finish its claim, retire its inputs."""
        t0 = time.perf_counter()
        intent = group.intent
        claim_id = self._claim_id(intent.version)
        events = _concat([o.events for o in group.outcomes], ENRICHED_SCHEMA)
        if not self.cache.valid(claim_id):
            # Redis lost its data after these keys were claimed: another consumer may have
            # claimed them since. Committing now could duplicate; the redo decides again.
            raise CacheLostError(f"group {intent.version}: the key cache lost its claims")
        rows = [replace(o.ledger) for o in group.outcomes]
        for row in rows:
            row.validate_ms = group.timings.get("validate_ms")
            row.dedupe_ms = group.timings.get("dedupe_ms")
        self.slot.record_decided(intent.version, rows)
        self._commit(EVENTS, events, intent.version)
        quarantine = _concat([o.quarantine for o in group.outcomes], QUARANTINE_SCHEMA)
        self._commit(QUARANTINE, quarantine, intent.version)
        write_ms = (time.perf_counter() - t0) * 1000
        return self._finish(group, rows, write_ms=write_ms, started=group.started)

    def _finish(
        self,
        group: Group,
        rows: list[LedgerRow],
        *,
        write_ms: float | None,
        started: float | None,
    ) -> list[LedgerRow]:
        """The ledger commit, then finish the claim and retire the inputs."""
        intent = group.intent
        committed_at = self.clock()
        for row in rows:
            row.committed_at = _ms(committed_at)
            row.lag_ms = row.committed_at - (row.arrived_at or row.committed_at)
            row.consumer = self.name
            if write_ms is not None:
                row.write_ms = write_ms
            if started is not None:
                row.processing_ms = (time.perf_counter() - started) * 1000
        self._commit(LEDGER, ledger_frame(rows), intent.version)
        top = _max_event_ms(group.outcomes)
        self.cache.finish(self._claim_id(intent.version), top)
        faults.point("after_finish")
        self.totals.commits += 1
        for outcome in group.outcomes:
            self._retire(outcome, intent)
        faults.point("after_retire")
        self.slot.forget(intent.version)
        return rows

    def _redo(self, intent: Intent) -> None:
        """Land a group left by a crash exactly as its first attempt would have."""
        inputs = []
        for f in intent.files:
            inp = self._read((self.layout.incoming if f.in_place else self.slot.dir) / f.name)
            if inp is None:
                continue  # retired already (the crash came mid-retire)
            if inp.file.batch_id != f.batch_id:
                log.error(
                    "%s changed since group %d was recorded", _printable(f.name), intent.version
                )
            inputs.append(FileInput(f, inp.arrived_ms, inp.table, inp.poison, inp.read_ms))
        events_done = (
            committed_version(self._tables["events"], self.app_id) or -1
        ) >= intent.version
        if not events_done:
            group = self._decide(intent, inputs, claim=True)
            self._account(self._land(group))
            return
        if intent.ledger is None:
            raise RuntimeError(
                f"group {intent.version}: its events are committed but its decided ledger rows "
                f"are missing from {self.slot.intents}; the ledger cannot be written exactly"
            )
        group = self._decide(intent, inputs, claim=False) if inputs else Group(intent, [], 0.0)
        self._restore_claims(intent)
        self._commit(
            QUARANTINE,
            _concat([o.quarantine for o in group.outcomes], QUARANTINE_SCHEMA),
            intent.version,
        )
        self._account(
            self._finish(group, [replace(r) for r in intent.ledger], write_ms=None, started=None)
        )

    def _restore_claims(self, intent: Intent) -> None:
        """Put a committed group's keys (back) into the key cache, as its claim left them."""
        assert intent.ledger is not None
        lows = [r.min_event_time for r in intent.ledger if r.min_event_time is not None]
        highs = [r.max_event_time for r in intent.ledger if r.max_event_time is not None]
        if not lows:
            return
        ids = {r.batch_id for r in intent.ledger}
        keys, top = batch_keys(self.location, ids, (min(lows), max(highs)), self.slice_ms)
        self.cache.restore(self._claim_id(intent.version), keys, top)

    # -- retiring inputs -----------------------------------------------------------------------
    def _retire(self, outcome: FileOutcome, intent: Intent) -> None:
        if outcome.file.in_place:
            return  # it cannot be moved (logged when it could not be claimed)
        path = self.slot.dir / outcome.file.name
        if outcome.poison is not None:
            self._quarantine_file(path, outcome, intent)
            return
        if not os.path.lexists(path):
            return
        if self.settings.keep_processed:
            self.layout.processed.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.layout.processed / path.name)
        else:
            path.unlink(missing_ok=True)
        if self.durable:
            fsync(path.parent)

    def _quarantine_file(self, path: Path, outcome: FileOutcome, intent: Intent) -> None:
        """Move an entry that cannot be processed to ``quarantine/files/<batch_id>/``, as is
        (a link or a directory is moved, not followed), with ``reason.json`` beside it.

        One directory per batch: two bad files of one name keep both copies and sidecars. The
        sidecar carries the original name, escaped; only the copy keeps its exact bytes. A
        crash before the move redoes it into the same directory.
        """
        if not os.path.lexists(path):
            return
        poison = outcome.poison
        assert poison is not None
        shown = display_name(path.name)
        log.warning("quarantined %s: %s: %s", _printable(shown), poison.reason, poison.message)
        sidecar: dict[str, Any] = {
            "file": shown,
            "reason": poison.reason,
            "message": poison.message,
            "quarantined_at": datetime.fromtimestamp(intent.now_ms / 1000, UTC).isoformat(),
            "batch_id": outcome.file.batch_id,
        }
        if shown != path.name:  # undecodable bytes: keep the exact name too
            sidecar["file_bytes_hex"] = os.fsencode(path.name).hex()
        dest_dir = self._quarantine_dir(outcome.file.batch_id, path.name)
        dest_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps(sidecar, indent=2).encode()
        atomic_write_bytes(dest_dir / "reason.json", body, durable=self.durable)
        faults.point("after_quarantine_sidecar")
        try:
            os.replace(path, dest_dir / path.name)
        except OSError as exc:
            if classify(exc) is not None:
                raise  # a full disk: wait, and quarantine it then
            log.error(
                "cannot move %s to quarantine/files/: %s; left in place", _printable(shown), exc
            )
            return
        if self.durable:
            fsync(dest_dir)
            fsync(path.parent)

    def _quarantine_dir(self, batch_id: str, name: str) -> Path:
        """``quarantine/files/<batch_id>/``, or a numbered sibling if it already holds a copy."""
        base = self.layout.quarantine_files / batch_id
        for n in itertools.count(1):
            candidate = base if n == 1 else base.with_name(f"{batch_id}~{n}")
            if not os.path.lexists(candidate / name):
                return candidate
        raise AssertionError("unreachable")

    # -- the loop ------------------------------------------------------------------------------
    def _pace(self, rows: int) -> None:
        cap = self.settings.max_events_per_second
        if cap <= 0:
            return
        now = time.monotonic()
        self._next_allowed = max(self._next_allowed, now) + rows / cap
        delay = self._next_allowed - time.monotonic()
        if delay > 0:
            time.sleep(delay)

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
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adevents-writer") as writer:
                self._supervised(writer, supervisor, once, stop)
        finally:
            self.status.stop()
        return self.totals

    def _supervised(
        self, writer: ThreadPoolExecutor, supervisor: Supervisor, once: bool, stop: threading.Event
    ) -> None:
        resumed = False
        while not stop.is_set():
            try:
                if not resumed:
                    self.resume()
                    resumed = True
                more = self._pass(writer, once, stop)
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

    def _pass(self, writer: ThreadPoolExecutor, once: bool, stop: threading.Event) -> bool:
        """Decide the next group and hand it to the writer; False when ``once`` and done."""
        self._sweep_temp_files()
        group = self._next_group(once, stop)
        if group is None:
            if once and self._in_flight is None:
                return False
            self._settle()
            if not once:
                stop.wait(self.settings.poll_interval)
            return True
        self._settle()  # one group in the writer at a time: commits stay in order
        self._in_flight = (writer.submit(self._land, group), group)
        return True

    def _sweep_temp_files(self) -> None:
        """Every few minutes, remove temp files that producers killed mid-write left behind."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        for name in sweep_stale_temp_files(self.layout.incoming):
            log.warning("removed %r: a producer's temp file untouched for an hour", name)

    def _abandon(self) -> None:
        """After a fault: let the group in the writer finish or fail, and forget decisions made
        since, so that the next try starts from what is durable, as a restart would."""
        in_flight, self._in_flight = self._in_flight, None
        self._decided_watermark = None
        if in_flight is None:
            return
        try:
            self._account(in_flight[0].result())
        except Exception as exc:
            if classify(exc) is None and not isinstance(exc, CacheLostError):
                raise
            log.debug("the group being written failed too: %s", exc)

    def _settle(self) -> bool:
        """Wait for the group in the writer, if any; True if it landed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return False
        return self._account(in_flight[0].result())

    def _account(self, rows: list[LedgerRow]) -> bool:
        for row in rows:
            self.totals.add(row)
        self._pace(sum(r.rows_in for r in rows))
        return bool(rows)

    def close(self) -> None:
        try:
            self.cache.close()
        except Exception as exc:
            if classify(exc) is None:
                raise
            # E.g. no room for the embedded cache's closing snapshot: its segments are on disk,
            # so the next start loads them; nothing is lost by skipping it.
            log.warning("closing the key cache: %s", exc)
        for fh in self._lock_files:
            fh.close()
        self._lock_files = []


def _max_event_ms(outcomes: Sequence[FileOutcome]) -> int | None:
    tops = [o.ledger.max_event_time for o in outcomes if o.ledger.max_event_time is not None]
    return max(tops, default=None)


def _concat(frames: Sequence[pl.DataFrame], schema: pl.Schema) -> pl.DataFrame:
    frames = [f for f in frames if len(f)]
    return pl.concat(frames) if frames else schema.to_frame()
