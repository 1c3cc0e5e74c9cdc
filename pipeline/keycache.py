"""The key cache interface and the embedded one (in-process, persisted under DATA_DIR)."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import polars as pl

from pipeline.fingerprint import Keys, empty_keys, fingerprint_check
from pipeline.keytable import SEGMENT_BITS, KeySet
from pipeline.spool import atomic_write_bytes, fsync, remove_quietly

log = logging.getLogger("adevents.keycache")
Mask = npt.NDArray[np.bool_]
T = TypeVar("T")
#: Reads the window's keys and the watermark from the lake; with a time, only files written
#: since then (epoch seconds).
Loader = Callable[[float | None], tuple[Keys, "int | None"]]


class CacheLostError(RuntimeError):
    """The key cache lost its data (e.g. Redis restarted empty); rebuild it from the events table
    first."""


@dataclass(frozen=True)
class CacheStats:
    keys: int
    bytes: int

    @property
    def bytes_per_key(self) -> float:
        return self.bytes / self.keys if self.keys else 0.0


class KeyCache(Protocol):
    """What the consumer needs of a key cache: the event_ids seen within the dedupe window,
    claimed a batch at a time, and the watermark.

    Guarantees: :meth:`claim` is atomic per key (of two batches claiming the same key, exactly
    one gets True) and **idempotent per source position**: a key a claim of ``stream`` won at
    a position (a spool group's row, a Kafka partition's offset) is True again for any later
    claim of that stream holding it at that position, whatever its batch and its boundaries
    (a batch redone after a crash or a rebalance by another consumer), until :meth:`finish`
    forgot it. After a loss, :meth:`claim` raises :class:`CacheLostError` until :meth:`ensure`
    rebuilt the cache, and :meth:`valid` tells a batch whose claims the loss took.
    :meth:`finish` and :meth:`restore` are idempotent. Not guaranteed: that a key outlives the
    window (a finish may expire it), or that claims outlive the process (embedded cache).
    """

    def watermark(self) -> int | None:
        """Greatest event_time (epoch ms) committed so far, or None when nothing was."""

    def ensure(self, loader: Loader) -> bool:
        """Rebuild from ``loader`` if the cache lost its state; True if it rebuilt."""

    def valid(self, batch_id: str | None = None) -> bool:
        """True while the claims ``batch_id`` made still stand (no loss since); without a
        batch, those made since the last ensure()."""

    def claim(
        self,
        batch_id: str,
        keys: Keys,
        positions: Positions | None = None,
        *,
        stream: str | None = None,
        fresh: bool = True,
    ) -> Mask:
        """Per key, True when this claim holds it: no claim had it, or ``stream`` (default:
        ``batch_id``) won it before at the same position (``positions``, aligned with
        ``keys``; default: the key's index). ``fresh``: look at every claim of ``stream`` not
        finished yet, as after a restart or a reassignment; otherwise only at those this
        process made since its last fresh claim. Raises CacheLostError."""

    def finish(
        self,
        batch_id: str,
        max_event_time_ms: int | None,
        *,
        stream: str | None = None,
        through: Mapping[int, int] | None = None,
    ) -> None:
        """The batch is committed: advance the watermark, expire keys, forget its claim (and,
        with ``through``, any claim of ``stream`` whose positions are all committed:
        ``through`` maps a position's :func:`position_source` to its last committed offset)."""

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        """Re-add the keys of a batch committed before a crash (idempotent), then finish it."""

    def stats(self) -> CacheStats:
        """Keys held and memory used (the consumer's exit line reports them)."""

    def close(self) -> None:
        """Release connections and flush state."""


class RebuildableKeyCache(KeyCache, Protocol):
    """A key cache that ``pipeline.rebuild`` can make whole from the events table (its
    :meth:`KeyCache.ensure` runs that orchestration over these primitives); tests and benches
    start from a known state with :meth:`rebuild`.

    Guarantees: after :meth:`replace` the cache holds exactly the given keys of the window,
    and :meth:`needs_rebuild` stays True (a shared cache refuses claims) until
    :meth:`open_epoch`, which makes it whole in a new epoch: ``valid`` is False from then on for
    every claim made before. :meth:`KeyCache.restore` adds keys in either state. Not
    guaranteed: that two rebuilders of a shared cache do not interleave; they take a
    ``pipeline.rebuild.RebuildLock``.
    """

    def needs_rebuild(self) -> bool:
        """True when the cache lost (or never had) the state that the events table holds."""

    def replace(self, keys: Keys, watermark_ms: int | None) -> None:
        """Drop the whole content, then hold ``keys`` (those of the window) and the watermark."""

    def open_epoch(self) -> None:
        """The content is whole: claims succeed again, in a new epoch."""

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        """:meth:`replace` then :meth:`open_epoch`, in one step."""


#: A key's source position: ``position_source`` in the top bits (a Kafka partition), an offset
#: (or a spool group's row) in the low POSITION_BITS.
Positions = npt.NDArray[np.int64]
POSITION_BITS: Final = 47


def position_of(source: int, offsets: npt.NDArray[np.int64]) -> Positions:
    """Positions of ``offsets`` of one source (a partition): both in one int64."""
    result: Positions = (np.int64(source) << np.int64(POSITION_BITS)) | offsets.astype(np.int64)
    return result


def position_source(positions: Positions) -> npt.NDArray[np.int64]:
    result: npt.NDArray[np.int64] = positions >> np.int64(POSITION_BITS)
    return result


def position_offset(positions: Positions) -> npt.NDArray[np.int64]:
    result: npt.NDArray[np.int64] = positions & np.int64((1 << POSITION_BITS) - 1)
    return result


def default_positions(keys: Keys, positions: Positions | None) -> Positions:
    return np.arange(len(keys), dtype=np.int64) if positions is None else positions


def committed(positions: Positions, through: Mapping[int, int]) -> Mask:
    """Per position, whether its source is in ``through`` with its offset at or below it."""
    sources = position_source(positions)
    limit = np.full(len(positions), -1, dtype=np.int64)
    for source, last in through.items():
        limit[sources == source] = last
    result: Mask = position_offset(positions) <= limit
    return result


class Claimed:
    """What the claims of one stream won, by (fingerprint ``lo``, position), kept until those
    positions are committed: a later claim holding a key at a position recorded here gets
    True, as the claim that won it did (a redo with other batch boundaries)."""

    __slots__ = ("frame",)

    def __init__(self, frame: pl.DataFrame | None = None) -> None:
        self.frame = frame if frame is not None else pl.DataFrame(schema=_CLAIMED)

    def add(self, lo: npt.NDArray[np.uint64], positions: Positions) -> None:
        if len(lo):
            new = pl.DataFrame({"lo": lo.view(np.int64), "position": positions}, schema=_CLAIMED)
            self.frame = pl.concat([self.frame, new])

    def holds(self, lo: npt.NDArray[np.uint64], positions: Positions) -> Mask:
        if not len(self.frame) or not len(lo):
            return np.zeros(len(lo), dtype=bool)
        asked = pl.DataFrame({"lo": lo.view(np.int64), "position": positions}, schema=_CLAIMED)
        # A pair held twice only repeats a row index: no unique() pass over the whole frame.
        hit = asked.with_row_index("i").join(self.frame, on=["lo", "position"])["i"]
        found = np.zeros(len(lo), dtype=bool)
        found[hit.to_numpy()] = True
        return found

    def forget(self, through: Mapping[int, int] | None) -> None:
        """Drop what is committed (everything without ``through``)."""
        if through is None:
            self.frame = self.frame.clear()
        elif len(self.frame):
            done = committed(self.frame["position"].to_numpy(), through)
            self.frame = self.frame.filter(pl.Series(~done))

    def __len__(self) -> int:
        return len(self.frame)


_CLAIMED: Final = pl.Schema({"lo": pl.Int64(), "position": pl.Int64()})


def expired_before(watermark_ms: int | None, window_ms: int, slice_ms: int) -> int | None:
    """Slices numbered below this hold only events that are late now: they can be dropped."""
    if watermark_ms is None:
        return None
    # Slice s spans [s*w, (s+1)*w); all of it is late once (s+1)*w <= W - window.
    return (watermark_ms - window_ms) // slice_ms


_SEGMENT = re.compile(r"^seg-(\d{12})\.keys$")
_SNAPSHOT = re.compile(r"^snap-(\d{12})\.keys$")
#: First bytes of a key file; a directory written in another format is rebuilt from the lake.
#: A table tells keys apart by ``lo`` and the top SEGMENT_BITS of ``hi`` (``pipeline.keytable``),
#: so version 3 writes those bits of ``hi`` as 16 bits: 10 bytes a key, where version 2 wrote
#: ``hi`` whole but for them (16 bytes; the segment files were 40 % of what the consumer wrote
#: and fsynced). Versions 1 (whole fingerprints) and 2 read as they are, so an upgrade needs
#: no rebuild (and an older adevents rebuilds rather than misread version 3).
KEY_FILE_MAGIC = b"adevents-keys-3\n"
_V2_MAGIC: Final = b"adevents-keys-2\n"
_V1_MAGIC: Final = b"adevents-keys-1\n"
_READABLE: Final = (_V1_MAGIC, _V2_MAGIC, KEY_FILE_MAGIC)
#: Each record of a key file: its slice and key count, then the ``hi`` and ``lo`` arrays; or,
#: with ``MIXED`` for the slice, the keys of any slices: their slices, then ``hi`` and ``lo``.
_RECORD = np.dtype([("slice", "<i8"), ("n", "<i8")])
_MIXED: Final = np.iinfo(np.int64).min
#: Version 3's ``hi``: its top SEGMENT_BITS, in 16 bits.
_HI_SHIFT: Final = np.uint64(64 - SEGMENT_BITS)
assert SEGMENT_BITS <= 16
#: A version 2 or 3 directory's keys only fit tables of the segment bits they were written from.
_FORMAT: Final = {"format": KEY_FILE_MAGIC.decode().strip(), "segment_bits": SEGMENT_BITS}
Chunk = tuple[int, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]


def write_key_file(
    path: Path, watermark_ms: int | None, chunks: Iterable[Chunk], mixed: Keys | None = None
) -> None:
    """Write ``chunks`` (slice, hi, lo) and ``mixed`` keys as a key file: to a temporary file,
    fsynced, renamed.

    Streamed chunk by chunk as they come (a snapshot's are pieces of the tables, copied a few
    MB at a time), so that a snapshot of a large window needs no second copy of it in memory.
    A batch's keys (``mixed``) go as one chunk when they share a generation (the usual case),
    else as they are, with a generation a key: grouping them would cost the writer a pass per
    batch, where a reader groups them once at start.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(KEY_FILE_MAGIC)
            fh.write(np.int64(-1 if watermark_ms is None else watermark_ms).tobytes())
            if mixed is not None and len(mixed) and mixed.slice.min() == mixed.slice.max():
                # The usual batch, one generation: a chunk, 10 bytes a key instead of 18.
                chunks = [*chunks, (int(mixed.slice[0]), mixed.hi, mixed.lo)]
                mixed = None
            for sl, hi, lo in chunks:
                fh.write(np.array([(sl, len(lo))], _RECORD).tobytes())
                fh.write(_top_bits(hi).data)
                fh.write(np.ascontiguousarray(lo, "<u8").data)
            if mixed is not None and len(mixed):
                fh.write(np.array([(_MIXED, len(mixed))], _RECORD).tobytes())
                fh.write(np.ascontiguousarray(mixed.slice, "<i8").data)
                fh.write(_top_bits(mixed.hi).data)
                fh.write(np.ascontiguousarray(mixed.lo, "<u8").data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)  # a full disk must not keep a partial file's space
        raise
    fsync(path.parent)


def _top_bits(hi: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint16]:
    """The bits of ``hi`` a table looks at, as version 3 writes them."""
    return (np.asarray(hi, np.uint64) >> _HI_SHIFT).astype("<u2")


def read_key_file(path: Path) -> tuple[int | None, list[Chunk], Keys]:
    """The watermark, the chunks and the mixed keys of a key file; ValueError when it is not a
    whole one."""

    def read_array(fh: io.BufferedReader, n: int, dtype: str) -> Any:
        out = np.empty(n, dtype)
        if fh.readinto(out.data.cast("B")) != out.nbytes:
            raise ValueError(f"{path.name}: truncated")
        return out

    def read_hi(fh: io.BufferedReader, n: int) -> npt.NDArray[np.uint64]:
        if whole_hi:
            return read_array(fh, n, "<u8")  # type: ignore[no-any-return]
        return read_array(fh, n, "<u2").astype(np.uint64) << _HI_SHIFT  # type: ignore[no-any-return]

    chunks: list[Chunk] = []
    mixed: list[Keys] = []
    with open(path, "rb") as fh:
        magic = fh.read(len(KEY_FILE_MAGIC))
        if magic not in _READABLE:
            raise ValueError(f"{path.name}: not a key file")
        whole_hi = magic != KEY_FILE_MAGIC
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name}: truncated")
        watermark = int(np.frombuffer(head, "<i8")[0])
        while record := fh.read(_RECORD.itemsize):
            if len(record) != _RECORD.itemsize:
                raise ValueError(f"{path.name}: truncated")
            sl, n = (int(v) for v in np.frombuffer(record, _RECORD)[0])
            if sl == _MIXED:
                slices = read_array(fh, n, "<i8")
                mixed.append(Keys(slices, read_hi(fh, n), read_array(fh, n, "<u8")))
            else:
                chunks.append((sl, read_hi(fh, n), read_array(fh, n, "<u8")))
    return (None if watermark < 0 else watermark), chunks, Keys.concat(mixed)


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """Run an EmbeddedKeyCache method under its lock: the consumer claims on its main thread
    while its writer thread finishes (and snapshots) the group before."""

    @functools.wraps(method)
    def wrapper(self: EmbeddedKeyCache, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class EmbeddedKeyCache:
    """In-process key cache persisted under ``state/embedded/``; thread-safe.

    Each finished batch appends a segment file holding its keys and watermark. Once
    ``snapshot_every`` segments have been written and the keys they hold reach those of the
    last snapshot (half the live ones), the live (unexpired) keys are written as one snapshot
    and older files are removed: disk use, like memory, follows the window and not the total
    volume; a snapshot costs at most two writes per key (not one per ``snapshot_every``
    batches: with a one-hour window that was 3 GB every 25 s), and a restart reads at most
    twice the live keys. A batch committed before a crash but whose segment was never written
    is restored by the consumer from its events files (:meth:`restore`). A file that cannot be
    read marks the cache for a rebuild from the lake.
    """

    def __init__(
        self, state_dir: Path, *, window_ms: int, slice_ms: int, snapshot_every: int = 256
    ) -> None:
        self.dir = Path(state_dir) / "embedded"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.window_ms = window_ms
        self.slice_ms = slice_ms
        self.snapshot_every = snapshot_every
        self._set = KeySet()
        self._watermark: int | None = None
        #: Per stream, per batch: the keys it holds and their positions, until it finishes.
        self._pending: dict[str, dict[str, tuple[Keys, Positions]]] = {}
        #: Per stream, what its claims won by position (see :class:`Claimed`).
        self._claimed: dict[str, Claimed] = {}
        self._seq = 0
        self._segments_since_snapshot = 0
        self._keys_since_snapshot = 0
        self._stale = False
        self._lock = threading.RLock()
        #: Held while a snapshot is written outside ``_lock`` (claims go on meanwhile).
        self._snapshot_lock = threading.Lock()
        self._load()

    # -- persistence -----------------------------------------------------------------------
    def _meta_path(self) -> Path:
        return self.dir / "meta.json"

    def _meta(self) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint_check(),
            "slice_ms": self.slice_ms,
            **_FORMAT,
        }

    def _load(self) -> None:
        files = sorted(os.listdir(self.dir))
        # Numbered past every file, stale ones included, so rebuild()'s snapshot supersedes them.
        self._seq = max(
            (int(m.group(1)) for f in files if (m := _SEGMENT.match(f) or _SNAPSHOT.match(f))),
            default=0,
        )
        meta_path = self._meta_path()
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is not None and meta.get("format") == _V1_MAGIC.decode().strip():
            meta = {**meta, **_FORMAT}  # whole fingerprints: they fit tables of any bits
        elif meta is not None and meta.get("format") == _V2_MAGIC.decode().strip():
            meta = {**meta, "format": _FORMAT["format"]}  # if of these segment bits
        if meta != self._meta():
            self._stale = True
            return
        snaps = [(int(m.group(1)), f) for f in files if (m := _SNAPSHOT.match(f))]
        start = 0
        try:
            if snaps:
                start, name = snaps[-1]
                self._apply_file(self.dir / name)
            for f in files:
                m = _SEGMENT.match(f)
                if m and int(m.group(1)) > start:
                    self._keys_since_snapshot += self._apply_file(self.dir / f)
                    self._segments_since_snapshot += 1
        except (OSError, ValueError) as exc:
            log.error("the embedded key cache cannot read %s; rebuilding it from the lake", exc)
            self._set, self._watermark, self._stale = KeySet(), None, True
            return
        self._expire()

    def _apply_file(self, path: Path) -> int:
        """Add a key file's keys and watermark; how many keys it held."""
        watermark, chunks, mixed = read_key_file(path)
        for generation, hi, lo in chunks:
            self._set.hold(generation, hi, lo)
        self._set.add(mixed)
        if watermark is not None:
            self._raise_watermark(watermark)
        return sum(len(lo) for _, _, lo in chunks) + len(mixed)

    def _write_meta(self) -> None:
        atomic_write_bytes(self._meta_path(), json.dumps(self._meta()).encode())

    def _snapshot_due(self) -> bool:
        if self._segments_since_snapshot < self.snapshot_every:
            return False
        return 2 * self._keys_since_snapshot >= self._set.size()

    def _snapshot(self) -> None:
        """Write the live keys as one snapshot, then remove the files it supersedes.

        The keys are copied a piece at a time under ``_lock`` and written outside it, so claims
        are not held up for the seconds a large window takes, and the snapshot never copies the
        whole window at once (one once took the consumer from 4 to 8.7 GB in the soak). A key
        claimed meanwhile may or may not be in it: it is in a later segment file either way.
        """
        with self._snapshot_lock:
            with self._lock:
                self._seq += 1
                seq, watermark, pieces = self._seq, self._watermark, self._set.pieces()
                self._segments_since_snapshot = self._keys_since_snapshot = 0
            write_key_file(
                self.dir / f"snap-{seq:012d}.keys", watermark, self._one_at_a_time(pieces)
            )
            for f in os.listdir(self.dir):
                m = _SEGMENT.match(f) or _SNAPSHOT.match(f)
                if m and int(m.group(1)) < seq:
                    (self.dir / f).unlink(missing_ok=True)

    def _one_at_a_time(self, pieces: Iterator[Chunk]) -> Iterator[Chunk]:
        """``pieces``, each step taken under ``_lock`` (the set changes between steps)."""
        while True:
            with self._lock:
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece

    def _raise_watermark(self, value: int) -> None:
        if self._watermark is None or value > self._watermark:
            self._watermark = value

    def _expire(self) -> None:
        cutoff = expired_before(self._watermark, self.window_ms, self.slice_ms)
        if cutoff is not None:
            self._set.drop_below(cutoff)

    # -- KeyCache ------------------------------------------------------------------------------
    @_locked
    def watermark(self) -> int | None:
        return self._watermark

    @_locked
    def needs_rebuild(self) -> bool:
        return self._stale

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        self.replace(keys, watermark_ms)
        self.open_epoch()

    @_locked
    def replace(self, keys: Keys, watermark_ms: int | None) -> None:
        self._stale = True
        self._set = KeySet(keys)
        self._pending.clear()
        self._claimed.clear()
        self._watermark = watermark_ms
        self._expire()

    def open_epoch(self) -> None:
        # Snapshot (removing older files) before the meta says the directory is valid again.
        self._snapshot()
        with self._lock:
            self._write_meta()
            self._stale = False

    def ensure(self, loader: Loader) -> bool:
        from pipeline import rebuild  # it imports this module's Protocols

        return rebuild.ensure(self, loader)

    def valid(self, batch_id: str | None = None) -> bool:
        return True

    @_locked
    def claim(
        self,
        batch_id: str,
        keys: Keys,
        positions: Positions | None = None,
        *,
        stream: str | None = None,
        fresh: bool = True,
    ) -> Mask:
        # Claims live in this process only, so every one it made is known: ``fresh`` changes
        # nothing here.
        positions = default_positions(keys, positions)
        stream = stream or batch_id
        claimed = self._claimed.setdefault(stream, Claimed())
        already_mine = claimed.holds(keys.lo, positions)
        new_now = self._set.add_new(keys)
        claimed.add(keys.lo[new_now], positions[new_now])
        won: Mask = new_now | already_mine
        batches = self._pending.setdefault(stream, {})
        held, at = batches.get(batch_id, (empty_keys(), np.empty(0, np.int64)))
        # A batch may claim more than once (a retry, or other copies of refused keys): keep
        # each key it holds once, for its segment.
        more = won & ~Claimed(pl.DataFrame({"lo": held.lo.view(np.int64), "position": at})).holds(
            keys.lo, positions
        )
        # Kept as given when all are kept (a batch's usual first claim): no copy.
        kept = (keys, positions) if more.all() else (keys.take(more), positions[more])
        if len(held):
            kept = (Keys.concat([held, kept[0]]), np.concatenate([at, kept[1]]))
        batches[batch_id] = kept
        return won

    def finish(
        self,
        batch_id: str,
        max_event_time_ms: int | None,
        *,
        stream: str | None = None,
        through: Mapping[int, int] | None = None,
    ) -> None:
        stream = stream or batch_id
        with self._lock:
            batches = self._pending.get(stream, {})
            won, _ = batches.pop(batch_id, (empty_keys(), np.empty(0, np.int64)))
            if through is None:
                self._pending.pop(stream, None)
                self._claimed.pop(stream, None)
            else:
                # Other batches of the stream whose positions are all committed (a redo took
                # their keys into its own segment): nothing of theirs is left to commit.
                for other, (_, pos) in list(batches.items()):
                    if committed(pos, through).all():
                        del batches[other]
                self._claimed.get(stream, Claimed()).forget(through)
            if max_event_time_ms is not None:
                self._raise_watermark(max_event_time_ms)
            self._seq += 1
            write_key_file(self.dir / f"seg-{self._seq:012d}.keys", self._watermark, (), won)
            self._segments_since_snapshot += 1
            self._keys_since_snapshot += len(won)
            self._expire()
            due = self._snapshot_due()
        if due:  # written outside the lock: see _snapshot
            self._snapshot()

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        with self._lock:
            self._set.add_new(keys)  # the keys no generation holds yet, each in its own
            self._pending[batch_id] = {batch_id: (keys, np.arange(len(keys), dtype=np.int64))}
        self.finish(batch_id, max_event_time_ms)

    @_locked
    def stats(self) -> CacheStats:
        return CacheStats(keys=self._set.size(), bytes=self._set.bytes())

    def close(self) -> None:
        with self._lock:
            due = self._segments_since_snapshot > 0
        if due:
            self._snapshot()
