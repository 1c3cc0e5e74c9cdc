"""The spool: producers drop Arrow IPC files into incoming/ atomically; consumers list them."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pyarrow as pa
from pyarrow import ipc

SUFFIX = ".arrow"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` under a temporary name, fsync, then rename to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class SpoolWriter:
    """Writes micro-batches into ``incoming/`` as Arrow IPC files that sort in arrival order.

    A reader never sees a partial file: each is written as ``.<name>.tmp`` and renamed to
    ``<epoch_ms:015d>-<producer>-<seq:09d>.arrow``; with ``durable`` the file and the rename are
    fsynced before :meth:`write` returns.
    """

    def __init__(self, incoming: Path, producer: str, *, durable: bool = False) -> None:
        if not producer or "-" in producer or "/" in producer:
            raise ValueError("producer name must be non-empty and contain no '-' or '/'")
        self.incoming = Path(incoming)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.producer = producer
        self.durable = durable
        self._seq = itertools.count()

    def next_name(self) -> str:
        return f"{int(time.time() * 1000):015d}-{self.producer}-{next(self._seq):09d}{SUFFIX}"

    def write(self, table: pa.Table | pa.RecordBatch) -> Path:
        """Write one micro-batch; return its final path."""
        final = self.incoming / self.next_name()
        tmp = self.incoming / f".{final.name}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write(table)
        if self.durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        if self.durable:
            fsync_dir(self.incoming)
        return final


def list_incoming(incoming: Path) -> list[Path]:
    """The committed-by-producer files waiting in ``incoming/``, in name (= arrival) order."""
    try:
        names = [e.name for e in os.scandir(incoming) if e.name.endswith(SUFFIX) and e.is_file()]
    except FileNotFoundError:
        return []
    names.sort()
    return [incoming / n for n in names]


def oldest_waiting_age(incoming: Path, now: float | None = None) -> float:
    """Seconds since the oldest waiting file arrived (by mtime); 0 when the spool is empty."""
    now = time.time() if now is None else now
    oldest = None
    for path in list_incoming(incoming)[:64]:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        oldest = mtime if oldest is None else min(oldest, mtime)
    return 0.0 if oldest is None else max(0.0, now - oldest)
