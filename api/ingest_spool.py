"""The ingest's edge on DATA_DIR: group commit into incoming/, and the backlog.

Accepted rows of many requests are written as one Arrow IPC file per micro-batch (by size or
interval, whichever comes first); the micro-batch's rejected rows go beside them as one
``<stem>.rejected.arrow`` file, which the consumer commits to the lake's quarantine table (with
its ledger row). The ingest never writes the lake itself. A request is answered only after the
micro-batch holding its rows is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow as pa
from pyarrow import ipc

from pipeline.schema import EVENT_SCHEMA, Layout
from pipeline.spool import (
    ARRIVED_AT_KEY,
    REJECTED_SUFFIX,
    SUFFIX,
    SpoolWriter,
    atomic_write_bytes,
    fsync,
    sweep_stale_temp_files,
)

log = logging.getLogger("adevents.ingest")

#: How long a listing of incoming/ is reused by the backlog check.
BACKLOG_TTL: Final = 0.25
#: Bytes per event assumed for a spool file whose footer cannot be read.
BYTES_PER_EVENT: Final = 100
#: A rejected file's columns: ``QUARANTINE_SCHEMA``'s, in its order and types, less those the
#: consumer fills in when it commits them (``source_file`` = ``<stem>.http``, ``batch_id``,
#: ``ingested_at``).
REJECTED_SCHEMA: Final = pa.schema(
    [
        *(field.with_nullable(True) for field in EVENT_SCHEMA),  # rejected rows may lack any
        pa.field("reason", pa.string()),
    ]
)
#: Temporary spool files of an ingest process: ``SpoolWriter``'s (producer ``http…``) and
#: ``atomic_write_bytes``'s for rejected files.
_INGEST_TMP: Final = re.compile(
    rf"^\.\d{{15}}-http[0-9a-f]+-\d{{9}}"
    rf"(?:{re.escape(SUFFIX)}|{re.escape(REJECTED_SUFFIX)}\.\d+)\.tmp$"
)
#: A temporary file this old was left by an ingest killed while writing it.
STALE_TMP_SECONDS: Final = 600.0


@dataclass(frozen=True)
class Written:
    """What one group commit made durable: the files in incoming/ and their rows."""

    spool_file: str | None
    spooled_rows: int
    rejected_file: str | None
    quarantined_rows: int


def _mkdir_durable(path: Path) -> None:
    """Create ``path`` (and parents) so that the new entries survive a crash."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync(d.parent)


def rejected_table(rejected: pl.DataFrame, arrived_ms: int) -> pa.Table:
    """The rows of a rejected file, in ``REJECTED_SCHEMA``, stamped with their arrival time
    (epoch ms, a decimal string under ``ARRIVED_AT_KEY``)."""
    table = rejected.select(REJECTED_SCHEMA.names).to_arrow().cast(REJECTED_SCHEMA)
    return table.replace_schema_metadata({ARRIVED_AT_KEY: str(arrived_ms).encode()})


def _ipc_file_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class SpoolBatchWriter:
    """Writes one micro-batch into incoming/: accepted rows as a spool file, rejected rows as a
    ``.rejected.arrow`` file. Every file is fsynced and renamed into place, and the rename
    fsynced, before :meth:`write` returns; on an error nothing may be acknowledged (a retry may
    repeat rows, which the consumer deduplicates)."""

    def __init__(self, layout: Layout, producer: str) -> None:
        self.incoming = layout.incoming
        _mkdir_durable(self.incoming)
        self.spool = SpoolWriter(self.incoming, producer, durable=True)
        # Temporary files of ingest processes killed mid-write (other producers' are the
        # consumer's to sweep, after longer).
        sweep_stale_temp_files(self.incoming, older_than=STALE_TMP_SECONDS, pattern=_INGEST_TMP)

    def write(
        self, accepted: list[pa.Table], rejected: list[pl.DataFrame], arrived_ms: int
    ) -> Written:
        """Make the micro-batch durable, or raise having left no temporary file behind.

        Accepted rows go first: if the rejected file then fails, the accepted file stays in
        incoming/ and the client's retry repeats rows the consumer deduplicates; the other way
        round, a retry would repeat rejected rows, which nothing deduplicates.
        """
        rows = sum(t.num_rows for t in accepted)
        path = None
        if rows:
            table = pa.concat_tables(accepted) if len(accepted) > 1 else accepted[0]
            # SpoolWriter removes its temporary file on any failure (ENOSPC included).
            path = self.spool.write(table)
        quarantined = sum(len(r) for r in rejected)
        rejected_path = None
        if quarantined:
            rejected_path = self._write_rejected(pl.concat(rejected), arrived_ms)
        return Written(
            None if path is None else path.name,
            rows,
            None if rejected_path is None else rejected_path.name,
            quarantined,
        )

    def _write_rejected(self, rejected: pl.DataFrame, arrived_ms: int) -> Path:
        # ``<stem>.rejected.arrow`` with the spool writer's next stem: unique, and right after
        # the accepted sibling in name order. Stamped with the earliest arrival of the
        # micro-batch's requests (``ARRIVED_AT_KEY``), which the ledger's lag is measured from.
        stem = self.spool.next_name().removesuffix(SUFFIX)
        path = self.incoming / f"{stem}{REJECTED_SUFFIX}"
        # Like SpoolWriter: temporary file, fsync, rename, fsync of incoming/; a failure
        # removes the temporary file.
        atomic_write_bytes(path, _ipc_file_bytes(rejected_table(rejected, arrived_ms)))
        return path


class Backlog:
    """Events waiting in incoming/. Rows of files this process wrote are known; other files'
    rows are read from their footers once (files never change after their rename). Used only
    from the event loop's thread."""

    def __init__(self, incoming: Path, *, ttl: float = BACKLOG_TTL) -> None:
        self.incoming = incoming
        self.ttl = ttl
        self._rows: dict[str, int] = {}
        self._total = 0
        self._listed_at = -float("inf")

    def add(self, name: str, rows: int) -> None:
        """Count a file this process has just written."""
        if name not in self._rows:
            self._rows[name] = rows
            self._total += rows

    @staticmethod
    def _rows_of(entry: os.DirEntry[str]) -> int:
        try:
            with pa.memory_map(entry.path) as source:
                reader = ipc.open_file(source)
                return sum(
                    reader.get_record_batch(i).num_rows for i in range(reader.num_record_batches)
                )
        except FileNotFoundError:
            return 0
        except (pa.ArrowException, OSError):  # not ours to judge: estimate from the size
            try:
                return entry.stat().st_size // BYTES_PER_EVENT
            except FileNotFoundError:
                return 0

    def _list(self) -> None:
        rows: dict[str, int] = {}
        try:
            with os.scandir(self.incoming) as entries:
                for e in entries:
                    if e.name.endswith(SUFFIX):
                        known = self._rows.get(e.name)
                        rows[e.name] = self._rows_of(e) if known is None else known
        except FileNotFoundError:
            pass
        self._rows = rows
        self._total = sum(rows.values())
        self._listed_at = time.monotonic()

    def events(self) -> int:
        """Events in incoming/ (listed at most once per ``ttl``)."""
        if time.monotonic() - self._listed_at >= self.ttl:
            self._list()
        return self._total


class CommitterClosedError(RuntimeError):
    """The server is shutting down; the request was not taken."""


@dataclass
class _Waiter:
    accepted: pa.Table | None
    rejected: pl.DataFrame | None
    rows: int
    arrived_ms: int
    future: asyncio.Future[Written]


@dataclass
class CommitStats:
    """Running totals of one committer, for logs and tests."""

    commits: int = 0
    requests: int = 0
    spooled_rows: int = 0
    quarantined_rows: int = 0


class GroupCommitter:
    """Shares one durable write among all requests waiting when it starts.

    :meth:`commit` returns when the micro-batch holding the caller's rows is durable, and raises
    if writing it failed. A micro-batch is written when it reaches ``max_rows`` rows or
    ``interval`` seconds after its first request, whichever comes first; one write runs at a
    time, on a thread of its own, while the next micro-batch fills.
    """

    def __init__(
        self,
        write: Callable[[list[pa.Table], list[pl.DataFrame], int], Written],
        *,
        max_rows: int,
        interval: float,
        on_written: Callable[[Written], None] = lambda w: None,
    ) -> None:
        self._write = write
        self.max_rows = max_rows
        self.interval = interval
        self._on_written = on_written
        self.stats = CommitStats()
        self._waiting: list[_Waiter] = []
        self._rows = 0
        self._in_flight_rows = 0
        self._first_at = 0.0
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._flush_now: asyncio.Event | None = None

    @property
    def pending_rows(self) -> int:
        """Rows taken but not yet durable (waiting or being written)."""
        return self._rows + self._in_flight_rows

    def start(self) -> None:
        """Start the flusher on the running event loop."""
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-commit")
        self._wake, self._flush_now = asyncio.Event(), asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ingest-commit")

    async def commit(
        self, accepted: pa.Table | None, rejected: pl.DataFrame | None, arrived_ms: int
    ) -> Written:
        """Wait until these rows are durable; return what the shared write made durable."""
        if self._task is None or self._closing:
            raise CommitterClosedError("the server is shutting down")
        assert self._wake is not None and self._flush_now is not None
        rows = (0 if accepted is None else accepted.num_rows) + (
            0 if rejected is None else len(rejected)
        )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(accepted, rejected, rows, arrived_ms, loop.create_future())
        if not self._waiting:
            self._first_at = loop.time()
        self._waiting.append(waiter)
        self._rows += rows
        self._wake.set()
        if self._rows >= self.max_rows:
            self._flush_now.set()
        return await waiter.future

    async def _run(self) -> None:
        assert self._wake is not None and self._flush_now is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiting:
                if self._closing:
                    return
                continue
            delay = self._first_at + self.interval - loop.time()
            if delay > 0 and self._rows < self.max_rows and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), delay)
            batch, self._waiting = self._waiting, []
            self._in_flight_rows, self._rows = self._rows, 0
            self._flush_now.clear()
            await self._flush(loop, batch)
            self._in_flight_rows = 0
            if self._waiting or self._closing:
                self._wake.set()

    async def _flush(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiter]) -> None:
        accepted = [w.accepted for w in batch if w.accepted is not None and w.accepted.num_rows]
        rejected = [w.rejected for w in batch if w.rejected is not None and len(w.rejected)]
        arrived = min(w.arrived_ms for w in batch)
        try:
            written = await loop.run_in_executor(
                self._executor, self._write, accepted, rejected, arrived
            )
        except Exception as exc:  # every waiter hears of it; none is acknowledged
            log.error("ingest: writing a micro-batch of %d requests failed: %s", len(batch), exc)
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        self.stats.commits += 1
        self.stats.requests += len(batch)
        self.stats.spooled_rows += written.spooled_rows
        self.stats.quarantined_rows += written.quarantined_rows
        self._on_written(written)
        for w in batch:
            if not w.future.done():  # the client may have gone; its rows are durable anyway
                w.future.set_result(written)

    async def close(self) -> None:
        """Write what is waiting, then stop."""
        self._closing = True
        if self._task is not None:
            assert self._wake is not None and self._flush_now is not None
            self._wake.set()
            self._flush_now.set()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
