"""The spool: producers drop Arrow IPC files into incoming/ atomically; consumers list them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import mmap
import os
import re
import stat
import time
from pathlib import Path
from typing import Final

import pyarrow as pa
from pyarrow import ipc

SUFFIX: Final = ".arrow"
#: A spool file of rows the HTTP ingest rejected (event columns plus ``reason``): the consumer
#: commits them to quarantine with a ledger row, so that only the consumer writes the lake.
REJECTED_SUFFIX: Final = ".rejected.arrow"
#: Schema metadata of a rejected-rows file: when its request arrived (epoch ms, decimal).
ARRIVED_AT_KEY: Final = b"adevents.arrived_at_ms"


def fsync(path: Path) -> None:
    """Flush ``path`` to disk: a file's bytes (before a rename publishes it), or a directory's
    entries (so that a rename or unlink inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove a temporary file on a failure path; never raise over the error being handled."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` under a temporary name, fsync, then rename to ``path``.

    On any failure (a full disk above all) the temporary file is removed before the error
    propagates, so failed writes leave nothing behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        fsync(path.parent)


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
        try:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write(table)
            if self.durable:
                fsync(tmp)
            os.replace(tmp, final)
        except BaseException:
            # A full disk (or a kill between write and rename) must not leave partial files
            # behind: nothing reads them, and they hold the space the next write needs.
            remove_quietly(tmp)
            raise
        if self.durable:
            fsync(self.incoming)
        return final


#: A temporary spool file (``.<name>.tmp``, SpoolWriter's convention) untouched for this long
#: was left by a producer killed while writing it: no live writer keeps a file open that long.
STALE_TEMP_SECONDS: Final = 3600.0
_TEMP_NAME: Final = re.compile(r"^\..+\.tmp$", re.DOTALL)


def sweep_stale_temp_files(
    incoming: Path, *, older_than: float = STALE_TEMP_SECONDS, pattern: re.Pattern[str] = _TEMP_NAME
) -> list[str]:
    """Remove regular files named like ``pattern`` not modified for ``older_than`` seconds.

    Producers killed mid-write (``kill -9``, a crash, a lost machine) leave ``.<name>.tmp``
    files that nobody will rename; without a sweep they pile up until the disk is full.
    Links and directories are never touched. Returns the names removed.
    """
    cutoff = time.time() - older_than
    removed = []
    try:
        with os.scandir(incoming) as entries:
            for e in entries:
                try:
                    if (
                        pattern.match(e.name)
                        and e.is_file(follow_symlinks=False)
                        and e.stat(follow_symlinks=False).st_mtime < cutoff
                    ):
                        os.unlink(e.path)
                        removed.append(e.name)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        pass
    return removed


def list_incoming(incoming: Path) -> list[Path]:
    """Every entry waiting in ``incoming/`` under a final name (``*.arrow``), in name order.

    Whatever its kind: a directory, a link or a FIFO under a final name is listed too (and
    counted as waiting), so that the consumer quarantines it instead of skipping it forever.
    Nothing is followed or opened here.
    """
    try:
        names = [e.name for e in os.scandir(incoming) if e.name.endswith(SUFFIX)]
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
            mtime = os.lstat(path).st_mtime  # never follow a link out of DATA_DIR
        except OSError:
            continue
        oldest = mtime if oldest is None else min(oldest, mtime)
    return 0.0 if oldest is None else max(0.0, now - oldest)


# -- reading what producers left: names and entries that may be hostile ---------------------------
#: Largest spool file the consumer reads (1 GiB: 10x a 1M-row file). A file is memory-mapped,
#: and its decoded batch takes a few times its size in memory: this bounds a consumer's memory
#: whatever a producer writes, far above what any producer of micro-batches needs.
MAX_FILE_BYTES: Final = 1 << 30
#: Longest spool-file stem used as is in derived names (batch ids, staging directories, leases).
MAX_PLAIN_STEM: Final = 100
_PLAIN_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class PoisonInputError(Exception):
    """An entry of ``incoming/`` that can never be processed; ``reason`` is its quarantine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def internal_stem(name: str) -> str:
    """The name a spool file goes by inside adevents: its stem when short and plain, else a hash.

    Every name derived from a file (staging directories, ``<batch_id>.parquet``, ledger files,
    leases) starts with this, so a producer's 255-byte or odd name (non-UTF-8 bytes, newlines,
    a leading dash, dots) never pushes a derived name over NAME_MAX nor into a surprising shape.
    The hashed form keeps a readable prefix and is marked by ``~``, which plain stems never hold.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if len(stem) <= MAX_PLAIN_STEM and _PLAIN_STEM.fullmatch(stem):
        return stem
    digest = hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9_]", "_", stem[:32])
    return f"{readable or 'file'}~{digest}"


def display_name(name: str) -> str:
    """``name`` as valid UTF-8 text (for Parquet, JSON and logs): undecodable bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_spool_file(path: Path, listed: os.stat_result, *, max_bytes: int) -> pa.Table:
    """Read one spool entry as an Arrow table, never following a link.

    ``listed`` is the entry's ``lstat``. Raises :class:`PoisonInputError` for an entry that can
    never be read, FileNotFoundError when it vanished or was replaced since it was listed (take
    it again), and other OSErrors as they come (a failing disk is not the file's fault).
    The file is opened with O_NOFOLLOW and checked on the open descriptor (fstat), so swapping
    it for a link or a FIFO between the check and the read changes nothing.
    """
    if stat.S_ISLNK(listed.st_mode):
        try:
            target = display_name(os.readlink(path))
        except OSError:
            target = "?"
        raise PoisonInputError("symlink", f"a symbolic link (to {target!r}) is never followed")
    if not stat.S_ISREG(listed.st_mode):
        raise PoisonInputError("not_a_regular_file", f"{_kind(listed.st_mode)}, not a file")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except PermissionError as exc:
        raise PoisonInputError("permission_denied", f"cannot be opened: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link since it was listed
            raise PoisonInputError("symlink", "a symbolic link is never followed") from None
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO with no writer) swapped in
            raise PoisonInputError("not_a_regular_file", "not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
            raise FileNotFoundError(errno.ENOENT, "replaced since it was listed", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise PoisonInputError("not_a_regular_file", f"{_kind(st.st_mode)}, not a file")
        if st.st_nlink > 1:
            raise PoisonInputError(
                "hard_link", f"has {st.st_nlink} names; a hard link is never read"
            )
        if st.st_size > max_bytes:
            raise PoisonInputError(
                "file_too_large", f"{st.st_size} bytes, above the limit of {max_bytes} bytes"
            )
        if st.st_size == 0:
            raise PoisonInputError(
                "unreadable_file", "the file is empty, not Arrow IPC file format"
            )
        # Mapped, not read: pages come from the page cache as the decoder touches them.
        mapped = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        table = ipc.open_file(pa.py_buffer(mapped)).read_all()
        # Offsets, lengths and UTF-8 checked before any kernel reads them: a file whose
        # buffers lie (truncated, or crafted) is quarantined, never a crash, as a Kafka
        # message's or an HTTP body's is.
        table.validate(full=True)
        return table
    except pa.ArrowException as exc:  # whatever the decoder makes of it, the bytes are bad
        raise PoisonInputError(
            "unreadable_file", f"the file cannot be read as Arrow IPC file format: {exc}"
        ) from None
