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


class _Runs:
    """Fingerprints of one partition of a slice: sorted ``lo`` chunks with ``hi`` aligned,
    merged lazily."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]] = []

    def contains(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> Mask:
        found = np.zeros(len(lo), dtype=bool)
        for c_lo, c_hi in self.chunks:
            pos = np.searchsorted(c_lo, lo)
            pos_ok = pos < len(c_lo)
            hit = np.zeros(len(lo), dtype=bool)
            hit[pos_ok] = c_lo[pos[pos_ok]] == lo[pos_ok]
            exact = hit.copy()
            exact[hit] = c_hi[pos[hit]] == hi[hit]
            found |= exact
            # Two stored keys may share ``lo`` (one in 2**64 per pair): check the whole run.
            for i in np.flatnonzero(hit & ~exact):
                end = np.searchsorted(c_lo, lo[i], side="right")
                found[i] |= bool(np.any(c_hi[pos[i] : end] == hi[i]))
        return found

    def add_sorted(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> None:
        """Add keys already sorted by ``lo`` (a chunk read back from a key file).

        Chunks are merged size-tiered, like a binary counter: a chunk no more than twice the
        size of the one after it absorbs it. A generation holds a whole window's keys, so a
        merge of everything every few batches (what a one-second slice could afford) would
        cost O(window) per batch; this way each key is merged O(log(keys / batch)) times and
        a lookup searches O(log(keys / batch)) chunks.
        """
        if len(lo) == 0:
            return
        self.chunks.append((lo, hi))
        while len(self.chunks) > 1 and len(self.chunks[-2][0]) <= 2 * len(self.chunks[-1][0]):
            (lo_a, hi_a), (lo_b, hi_b) = self.chunks[-2], self.chunks[-1]
            all_lo = np.concatenate([lo_a, lo_b])
            # Two sorted runs: the stable sort (timsort) merges them in linear time.
            order = np.argsort(all_lo, kind="stable")
            self.chunks[-2:] = [(all_lo[order], np.concatenate([hi_a, hi_b])[order])]

    def size(self) -> int:
        return sum(len(c[0]) for c in self.chunks)


#: A slice's keys are spread over ``2**_PART_BITS`` partitions by the top bits of ``lo``, each
#: with runs of its own: merges and searches then work on arrays 1/64 of a generation's size,
#: which stay in cache, and a merge cascade touches one partition's runs at a time, not the
#: whole window's at once (10M keys added in 100k batches, ``python bench/keyset_layouts.py``:
#: 503 → 343 ns a key, the slowest batch 873 → 65 ms, peak RSS 659 → 249 MB).
_PART_BITS: Final = 6
_PART_EDGES: Final = np.arange(1, 1 << _PART_BITS, dtype=np.uint64) << np.uint64(64 - _PART_BITS)


class _SliceSet:
    """Fingerprints of one slice, partitioned by the top bits of ``lo`` (see ``_PART_BITS``)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: dict[int, _Runs] = {}

    @staticmethod
    def _ranges(lo: npt.NDArray[np.uint64]) -> Iterator[tuple[int, int, int]]:
        """(partition, start, end) of each partition's keys in ``lo``, which is sorted."""
        bounds = np.concatenate([[0], np.searchsorted(lo, _PART_EDGES), [len(lo)]]).tolist()
        for part in range(len(bounds) - 1):
            if bounds[part + 1] > bounds[part]:
                yield part, bounds[part], bounds[part + 1]

    def contains(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> Mask:
        """Per key (sorted by ``lo``), whether it is held."""
        found = np.zeros(len(lo), dtype=bool)
        for part, start, end in self._ranges(lo):
            runs = self.parts.get(part)
            if runs is not None:
                found[start:end] = runs.contains(hi[start:end], lo[start:end])
        return found

    def add_sorted(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> None:
        """Add keys sorted by ``lo``."""
        for part, start, end in self._ranges(lo):
            self.parts.setdefault(part, _Runs()).add_sorted(hi[start:end], lo[start:end])

    def chunks(self) -> list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]:
        """Every run as (lo, hi), each sorted by ``lo``."""
        return [chunk for part in sorted(self.parts) for chunk in self.parts[part].chunks]

    def size(self) -> int:
        return sum(runs.size() for runs in self.parts.values())


class KeySet:
    """A set of fingerprints stored by generation (``Keys.slice``), with vectorised membership
    tests over every generation held.

    A key's generation only says when it may be dropped (:meth:`drop_below`): membership is by
    fingerprint alone, so a copy of an event that carries another event_time (a re-stamping
    SDK, a pixel stamped on receipt) is still found, whatever generation holds the original.
    """

    def __init__(self, keys: Keys | None = None) -> None:
        self.slices: dict[int, _SliceSet] = {}
        if keys is not None:
            self.add(keys)

    @staticmethod
    def groups(keys: Keys) -> list[npt.NDArray[np.intp]]:
        order = np.argsort(keys.slice, kind="stable")
        bounds = np.flatnonzero(np.diff(keys.slice[order])) + 1
        return np.split(order, bounds)

    def add(self, keys: Keys) -> None:
        self._add_ordered(keys.take(np.argsort(keys.lo)))  # unique keys: quicksort, 4x stable

    def _add_ordered(self, keys: Keys) -> None:
        """Add keys sorted by ``lo`` to their generations (the stable grouping keeps the order)."""
        if len(keys) == 0:
            return
        for idx in self.groups(keys):
            sl = int(keys.slice[idx[0]])
            self.slices.setdefault(sl, _SliceSet()).add_sorted(keys.hi[idx], keys.lo[idx])

    def contains(self, keys: Keys) -> Mask:
        """Per key, whether its fingerprint is held, in any generation."""
        order = np.argsort(keys.lo)
        found = np.empty(len(keys), dtype=bool)
        found[order] = self._contains_ordered(keys.take(order))
        return found

    def _contains_ordered(self, keys: Keys) -> Mask:
        """:meth:`contains` of keys sorted by ``lo``: each chunk's binary searches then walk it
        forwards (NumPy starts a search where the previous, smaller key's ended) instead of
        jumping across a window's keys at random."""
        found = np.zeros(len(keys), dtype=bool)
        for slice_set in self.slices.values():
            if len(keys):
                found |= slice_set.contains(keys.hi, keys.lo)
        return found

    def add_new(self, keys: Keys) -> Mask:
        """Add the keys not held yet (in any generation) to their own generations; per key,
        whether it was new (keys must be distinct). One sort serves the lookups and the adds."""
        order = np.argsort(keys.lo)  # keys are unique: quicksort, 4x the stable sort
        ordered = keys.take(order)
        new_ordered = ~self._contains_ordered(ordered)
        self._add_ordered(ordered.take(new_ordered))
        new = np.empty(len(keys), dtype=bool)
        new[order] = new_ordered
        return new

    def drop_below(self, cutoff: int) -> None:
        for sl in [s for s in self.slices if s < cutoff]:
            del self.slices[sl]

    def add_chunks(self, chunks: Iterable[Chunk]) -> None:
        """Add the sorted chunks of :meth:`chunks` (as a key file holds them)."""
        for sl, hi, lo in chunks:
            self.slices.setdefault(sl, _SliceSet()).add_sorted(hi, lo)

    def chunks(self) -> list[Chunk]:
        """Every key as (slice, hi, lo) chunks sorted by ``lo``: references to the arrays held,
        not copies. They stay valid after later changes, which replace arrays, never write
        into them."""
        return [(sl, hi, lo) for sl, s in self.slices.items() for lo, hi in s.chunks()]

    def size(self) -> int:
        return sum(s.size() for s in self.slices.values())

    def chunk_count(self) -> int:
        return sum(len(s.chunks()) for s in self.slices.values())


_SEGMENT = re.compile(r"^seg-(\d{12})\.keys$")
_SNAPSHOT = re.compile(r"^snap-(\d{12})\.keys$")
#: First bytes of a key file; a directory written in another format is rebuilt from the lake.
KEY_FILE_MAGIC = b"adevents-keys-1\n"
#: Each record of a key file: its slice and key count, then the ``hi`` and ``lo`` arrays; or,
#: with ``MIXED`` for the slice, the keys of any slices: their slices, then ``hi`` and ``lo``.
_RECORD = np.dtype([("slice", "<i8"), ("n", "<i8")])
_MIXED: Final = np.iinfo(np.int64).min
Chunk = tuple[int, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]


def write_key_file(
    path: Path, watermark_ms: int | None, chunks: Iterable[Chunk], mixed: Keys | None = None
) -> None:
    """Write ``chunks`` (slice, hi, lo) and ``mixed`` keys as a key file: to a temporary file,
    fsynced, renamed.

    Streamed chunk by chunk from the arrays the cache holds, so that a snapshot of a large
    window needs no second copy of it in memory (a whole-window copy once took the consumer
    from 4 to 8.7 GB in the soak). A batch's keys go as they are (``mixed``): grouping them by
    slice would cost its writer a sort per batch, where a reader sorts them once at start.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(KEY_FILE_MAGIC)
            fh.write(np.int64(-1 if watermark_ms is None else watermark_ms).tobytes())
            for sl, hi, lo in chunks:
                fh.write(np.array([(sl, len(lo))], _RECORD).tobytes())
                fh.write(np.ascontiguousarray(hi, "<u8").data)
                fh.write(np.ascontiguousarray(lo, "<u8").data)
            if mixed is not None and len(mixed):
                fh.write(np.array([(_MIXED, len(mixed))], _RECORD).tobytes())
                for array, dtype in ((mixed.slice, "<i8"), (mixed.hi, "<u8"), (mixed.lo, "<u8")):
                    fh.write(np.ascontiguousarray(array, dtype).data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)  # a full disk must not keep a partial file's space
        raise
    fsync(path.parent)


def read_key_file(path: Path) -> tuple[int | None, list[Chunk], Keys]:
    """The watermark, the chunks and the mixed keys of a key file; ValueError when it is not a
    whole one."""

    def read_array(fh: io.BufferedReader, n: int, dtype: str) -> Any:
        out = np.empty(n, dtype)
        if fh.readinto(out.data.cast("B")) != out.nbytes:
            raise ValueError(f"{path.name}: truncated")
        return out

    chunks: list[Chunk] = []
    mixed: list[Keys] = []
    with open(path, "rb") as fh:
        if fh.read(len(KEY_FILE_MAGIC)) != KEY_FILE_MAGIC:
            raise ValueError(f"{path.name}: not a key file")
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
                mixed.append(Keys(slices, read_array(fh, n, "<u8"), read_array(fh, n, "<u8")))
            else:
                chunks.append((sl, read_array(fh, n, "<u8"), read_array(fh, n, "<u8")))
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
            "format": KEY_FILE_MAGIC.decode().strip(),
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
        self._set.add_chunks(chunks)
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

        The keys are taken under ``_lock`` as references to the arrays held (no copy) and
        written outside it, so claims are not held up for the seconds a large window takes.
        """
        with self._snapshot_lock:
            with self._lock:
                self._seq += 1
                seq, watermark, chunks = self._seq, self._watermark, self._set.chunks()
                self._segments_since_snapshot = self._keys_since_snapshot = 0
            write_key_file(self.dir / f"snap-{seq:012d}.keys", watermark, chunks)
            for f in os.listdir(self.dir):
                m = _SEGMENT.match(f) or _SNAPSHOT.match(f)
                if m and int(m.group(1)) < seq:
                    (self.dir / f).unlink(missing_ok=True)

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
        batches[batch_id] = (
            Keys.concat([held, keys.take(more)]),
            np.concatenate([at, positions[more]]),
        )
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
            self._set.add(keys.take(~self._set.contains(keys)))
            self._pending[batch_id] = {batch_id: (keys, np.arange(len(keys), dtype=np.int64))}
        self.finish(batch_id, max_event_time_ms)

    @_locked
    def stats(self) -> CacheStats:
        n = self._set.size()
        # 16 bytes of fingerprint per key, plus numpy's header per chunk array.
        overhead = 2 * 112 * self._set.chunk_count() + 232 * len(self._set.slices)
        return CacheStats(keys=n, bytes=16 * n + overhead)

    def close(self) -> None:
        with self._lock:
            due = self._segments_since_snapshot > 0
        if due:
            self._snapshot()
