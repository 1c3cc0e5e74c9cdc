"""Where a consumer's input batches wait: the :class:`Source` Protocol, and the spool's slot as one.

A source names itself with an ``app_id``, the Delta application id its groups commit under, and
each batch with its position (:class:`pipeline.groups.GroupFile`): a file of the spool today,
whose rows are positions ``(file, row)``; a partition's offset range with Kafka. The consumer
records the positions of a group in its intent before deciding, and reads them again on a redo.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from pipeline import faults
from pipeline.decide import FileInput
from pipeline.groups import GroupFile, Slot, app_id_for, spool_id
from pipeline.retry import classify
from pipeline.schema import Layout
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
#: How often a spool source sweeps incoming/ for producers' stale temp files.
SWEEP_INTERVAL_SECONDS = 300.0


class Source(Protocol):
    """Where input batches wait for one consumer: its slot of the spool (Kafka partitions next).

    Guarantees: at least once, in order. :meth:`take` yields, read, first the batches this
    consumer took and has not retired (those a crash left), then new ones, oldest first. After
    :meth:`hold` returns, the batches taken so far stay this consumer's across a crash, and no
    other consumer takes them. :meth:`read` of a taken position returns the same rows (or the
    same poison) each time until it is retired, then None. :meth:`retire` is idempotent; a
    poison batch is set aside with its reason for a human, never dropped. Not guaranteed: that
    a batch taken but not held is still this consumer's after a crash. Landing each batch
    exactly once is the consumer's job (its intents and the lake's app transactions).
    """

    @property
    def app_id(self) -> str:
        """The Delta application id of this source's groups: stable across restarts."""

    def take(self, skip: Collection[str]) -> Iterator[FileInput]:
        """Batches to land, read, oldest first; ``skip`` names those in a group being written.
        A caller stops iterating when its group is full; batches not yielded stay waiting."""

    def hold(self) -> None:
        """Make every batch taken so far this consumer's across a crash."""

    def read(self, batch: GroupFile) -> FileInput | None:
        """The taken batch at ``batch``'s position again; None if it was retired."""

    def retire(self, batch: GroupFile, poison: PoisonInputError | None, at_ms: int) -> None:
        """The batch landed: stop yielding it; a poison one is set aside, stamped ``at_ms``."""


def arrived_ms(table: pa.Table, default_ms: int) -> int:
    """When a batch arrived: its ``adevents.arrived_at_ms`` metadata (the HTTP ingest's
    rejected rows carry their request's time), else ``default_ms``."""
    meta = table.schema.metadata or {}
    with contextlib.suppress(KeyError, ValueError):
        return int(meta[ARRIVED_AT_KEY])
    return default_ms


def batch_id_for(path: Path, st: os.stat_result) -> str:
    """A file's batch id: its name plus what tells this file from a later one of that name.

    Stable across the claim into a slot and across restarts (a rename keeps inode and mtime).
    A long or odd name is replaced by a hash of it (``internal_stem``).
    """
    ident = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return f"{internal_stem(path.name)}-{hashlib.blake2b(ident, digest_size=4).hexdigest()}"


def printable(name: str) -> str:
    """A file name for one log line: control characters (a newline) escaped, quoted."""
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name) + '"'


class SpoolSource:
    """One slot of a machine's spool as a :class:`Source`: files claimed from ``incoming/`` into
    the slot by rename (``pipeline.groups.Slot``), retired by unlink (or to ``processed/``), a
    poison one moved to ``quarantine/files/<batch_id>/`` with ``reason.json`` beside it.

    An entry that cannot leave ``incoming/`` (a mount point) is read where it is, once, and
    passed over from then on.
    """

    def __init__(
        self,
        layout: Layout,
        slot: int,
        *,
        durable: bool = True,
        keep_processed: bool = False,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        self.layout = layout
        self.slot = Slot(layout.incoming, slot, durable=durable)
        self.durable = durable
        self.keep_processed = keep_processed
        #: Largest spool file read; bigger ones are poison (``file_too_large``).
        self.max_bytes = max_bytes
        self._app_id = app_id_for(spool_id(layout.state), slot)
        #: Entries that cannot leave incoming/ (a mount point): passed over, logged once.
        self._stuck: set[str] = set()
        self._next_sweep = 0.0

    @property
    def app_id(self) -> str:
        return self._app_id

    def take(self, skip: Collection[str]) -> Iterator[FileInput]:
        self._sweep_temp_files()
        owned = self.slot.owned()
        for path in owned:
            if path.name not in skip and (inp := self._read(path)) is not None:
                yield inp
        # A new file of an owned name waits: claiming it would replace the owned one.
        names = {path.name for path in owned}
        for path in list_incoming(self.layout.incoming):
            if path.name in self._stuck or path.name in names:
                continue
            claimed = self._claim(path)
            if claimed is not None:
                if (inp := self._read(claimed)) is not None:
                    yield inp
            elif path.name in self._stuck and (inp := self._read(path, in_place=True)):
                yield inp  # recorded once, then passed over

    def hold(self) -> None:
        self.slot.sync()

    def read(self, batch: GroupFile) -> FileInput | None:
        inp = self._read(self._path(batch), in_place=batch.in_place)
        if inp is not None and inp.file.batch_id != batch.batch_id:
            log.error("%s changed since it was taken", printable(batch.name))
        if inp is None:
            return None
        return FileInput(batch, inp.arrived_ms, inp.table, inp.poison, inp.read_ms)

    def retire(self, batch: GroupFile, poison: PoisonInputError | None, at_ms: int) -> None:
        if batch.in_place:
            return  # it cannot be moved (logged when it could not be claimed)
        path = self._path(batch)
        if poison is not None:
            self._quarantine_file(path, batch, poison, at_ms)
            return
        if not os.path.lexists(path):
            return
        if self.keep_processed:
            self.layout.processed.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.layout.processed / path.name)
        else:
            path.unlink(missing_ok=True)
        if self.durable:
            fsync(path.parent)

    # -- reading -----------------------------------------------------------------------------
    def _path(self, batch: GroupFile) -> Path:
        return (self.layout.incoming if batch.in_place else self.slot.dir) / batch.name

    def _read(self, path: Path, *, in_place: bool = False) -> FileInput | None:
        """One entry as a decide input; None if it vanished."""
        try:
            st = os.lstat(path)  # the entry itself: a link is never followed
        except FileNotFoundError:
            return None
        file = GroupFile(path.name, batch_id_for(path, st), in_place)
        mtime_ms = int(st.st_mtime * 1000)
        started = time.perf_counter()
        try:
            table = read_spool_file(path, st, max_bytes=self.max_bytes)
        except FileNotFoundError:
            return None
        except PoisonInputError as exc:
            return FileInput(file, mtime_ms, None, exc)
        read_ms = (time.perf_counter() - started) * 1000
        return FileInput(file, arrived_ms(table, mtime_ms), table, read_ms=read_ms)

    def _claim(self, path: Path) -> Path | None:
        try:
            return self.slot.claim(path)
        except OSError as exc:
            if classify(exc) is not None:
                raise
            # EBUSY (a mount point), EXDEV, EPERM: it cannot leave incoming/, so no slot can
            # own it. It gets its ledger row where it is, and is passed over from then on.
            shown = printable(display_name(path.name))
            log.error("cannot move %s out of incoming/: %s; recorded and passed over", shown, exc)
            self._stuck.add(path.name)
            return None

    def _sweep_temp_files(self) -> None:
        """Every few minutes, remove temp files that producers killed mid-write left behind."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        for name in sweep_stale_temp_files(self.layout.incoming):
            log.warning("removed %r: a producer's temp file untouched for an hour", name)

    # -- setting poison aside ------------------------------------------------------------------
    def _quarantine_file(
        self, path: Path, batch: GroupFile, poison: PoisonInputError, at_ms: int
    ) -> None:
        """Move an entry that cannot be processed to ``quarantine/files/<batch_id>/``, as is
        (a link or a directory is moved, not followed), with ``reason.json`` beside it.

        One directory per batch: two bad files of one name keep both copies and sidecars. The
        sidecar carries the original name, escaped; only the copy keeps its exact bytes. A
        crash before the move redoes it into the same directory.
        """
        if not os.path.lexists(path):
            return
        shown = display_name(path.name)
        log.warning("quarantined %s: %s: %s", printable(shown), poison.reason, poison.message)
        sidecar: dict[str, Any] = {
            "file": shown,
            "reason": poison.reason,
            "message": poison.message,
            "quarantined_at": datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(),
            "batch_id": batch.batch_id,
        }
        if shown != path.name:  # undecodable bytes: keep the exact name too
            sidecar["file_bytes_hex"] = os.fsencode(path.name).hex()
        dest_dir = self._quarantine_dir(batch.batch_id, path.name)
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
                "cannot move %s to quarantine/files/: %s; left in place", printable(shown), exc
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
