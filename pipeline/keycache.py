"""The key cache interface and the embedded one (in-process, persisted under DATA_DIR)."""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.fingerprint import Keys, empty_keys, fingerprint_check
from pipeline.spool import atomic_write_bytes, fsync, remove_quietly

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
    one gets True) and idempotent per batch (a retry after a crash gets True again for the keys
    that batch won); after a loss, :meth:`claim` raises :class:`CacheLostError` until
    :meth:`ensure` rebuilt the cache, and :meth:`valid` tells a batch whose claims the loss took.
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

    def claim(self, batch_id: str, keys: Keys) -> Mask:
        """Per key, True when this batch is the first to claim it. Raises CacheLostError."""

    def finish(self, batch_id: str, max_event_time_ms: int | None) -> None:
        """The batch is committed: advance the watermark, expire keys, forget its claim record."""

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        """Re-add the keys of a batch committed before a crash (idempotent), then finish it."""

    def stats(self) -> CacheStats:
        """Keys held and memory used (the consumer's exit line reports them)."""

    def close(self) -> None:
        """Release connections and flush state."""


class RebuildableKeyCache(KeyCache, Protocol):
    """A key cache whose content can be replaced directly: by :meth:`KeyCache.ensure`'s rebuild,
    and by tests and benches that start from a known state."""

    def needs_rebuild(self) -> bool:
        """True when the cache lost (or never had) the state that the events table holds."""

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        """Replace the cache's content with these keys (all committed events in the window)."""


def expired_before(watermark_ms: int | None, window_ms: int, slice_ms: int) -> int | None:
    """Slices numbered below this hold only events that are late now: they can be dropped."""
    if watermark_ms is None:
        return None
    # Slice s spans [s*w, (s+1)*w); all of it is late once (s+1)*w <= W - window.
    return (watermark_ms - window_ms) // slice_ms


class _SliceSet:
    """Fingerprints of one slice: sorted ``lo`` chunks with ``hi`` aligned, merged lazily."""

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

    def add(self, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> None:
        if len(lo) == 0:
            return
        order = np.argsort(lo, kind="stable")
        self.chunks.append((lo[order], hi[order]))
        if len(self.chunks) > 8:
            all_lo = np.concatenate([c[0] for c in self.chunks])
            all_hi = np.concatenate([c[1] for c in self.chunks])
            order = np.argsort(all_lo, kind="stable")
            self.chunks = [(all_lo[order], all_hi[order])]

    def size(self) -> int:
        return sum(len(c[0]) for c in self.chunks)

    def arrays(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        if not self.chunks:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        return np.concatenate([c[1] for c in self.chunks]), np.concatenate(
            [c[0] for c in self.chunks]
        )


class KeySet:
    """A set of fingerprints partitioned by slice, with vectorised membership tests."""

    def __init__(self, keys: Keys | None = None) -> None:
        self.slices: dict[int, _SliceSet] = {}
        if keys is not None:
            self.add(keys)

    @staticmethod
    def _groups(keys: Keys) -> list[npt.NDArray[np.intp]]:
        order = np.argsort(keys.slice, kind="stable")
        bounds = np.flatnonzero(np.diff(keys.slice[order])) + 1
        return np.split(order, bounds)

    def add(self, keys: Keys) -> None:
        if len(keys) == 0:
            return
        for idx in self._groups(keys):
            sl = int(keys.slice[idx[0]])
            self.slices.setdefault(sl, _SliceSet()).add(keys.hi[idx], keys.lo[idx])

    def contains(self, keys: Keys) -> Mask:
        found = np.zeros(len(keys), dtype=bool)
        if len(keys) == 0:
            return found
        for idx in self._groups(keys):
            slice_set = self.slices.get(int(keys.slice[idx[0]]))
            if slice_set is not None:
                found[idx] = slice_set.contains(keys.hi[idx], keys.lo[idx])
        return found

    def drop_below(self, cutoff: int) -> None:
        for sl in [s for s in self.slices if s < cutoff]:
            del self.slices[sl]

    def all_keys(self) -> Keys:
        parts = []
        for sl, slice_set in self.slices.items():
            hi, lo = slice_set.arrays()
            parts.append(Keys(np.full(len(lo), sl, np.int64), hi, lo))
        return Keys.concat(parts)

    def size(self) -> int:
        return sum(s.size() for s in self.slices.values())

    def chunk_count(self) -> int:
        return sum(len(s.chunks) for s in self.slices.values())


_SEGMENT = re.compile(r"^seg-(\d{12})\.npz$")
_SNAPSHOT = re.compile(r"^snap-(\d{12})\.npz$")


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

    Each finished batch appends a segment file holding its keys and watermark; past
    ``snapshot_every`` segments, the live (unexpired) keys are written as one snapshot and older
    files are removed, so disk use, like memory, follows the window and not the total volume.
    A batch committed before a crash but whose segment was never written is restored by the
    consumer from its events files (:meth:`restore`).
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
        self._pending: dict[str, Keys] = {}
        self._seq = 0
        self._segments_since_snapshot = 0
        self._stale = False
        self._lock = threading.RLock()
        self._load()

    # -- persistence -----------------------------------------------------------------------
    def _meta_path(self) -> Path:
        return self.dir / "meta.json"

    def _load(self) -> None:
        files = sorted(os.listdir(self.dir))
        # Numbered past every file, stale ones included, so rebuild()'s snapshot supersedes them.
        self._seq = max(
            (int(m.group(1)) for f in files if (m := _SEGMENT.match(f) or _SNAPSHOT.match(f))),
            default=0,
        )
        meta_path = self._meta_path()
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if (
            meta is None
            or meta.get("fingerprint") != fingerprint_check()
            or meta.get("slice_ms") != self.slice_ms
        ):
            self._stale = True
            return
        snaps = [(int(m.group(1)), f) for f in files if (m := _SNAPSHOT.match(f))]
        start = 0
        if snaps:
            start, name = snaps[-1]
            self._apply_file(self.dir / name)
        for f in files:
            m = _SEGMENT.match(f)
            if m and int(m.group(1)) > start:
                self._apply_file(self.dir / f)
                self._segments_since_snapshot += 1
        self._expire()

    def _apply_file(self, path: Path) -> None:
        with np.load(path) as data:
            self._set.add(Keys(data["slice"], data["hi"], data["lo"]))
            wm = int(data["watermark"])
            if wm >= 0:
                self._raise_watermark(wm)

    def _write_npz(self, path: Path, keys: Keys) -> None:
        # Streamed to a temporary file (not built in memory first: a snapshot of a large
        # window would otherwise need several copies of it at once), fsynced, then renamed.
        wm = -1 if self._watermark is None else self._watermark
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, slice=keys.slice, hi=keys.hi, lo=keys.lo, watermark=np.int64(wm))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)  # a full disk must not keep a partial snapshot's space
            raise
        fsync(path.parent)

    def _write_meta(self) -> None:
        meta = {"fingerprint": fingerprint_check(), "slice_ms": self.slice_ms}
        atomic_write_bytes(self._meta_path(), json.dumps(meta).encode())

    def _snapshot(self) -> None:
        self._seq += 1
        self._write_npz(self.dir / f"snap-{self._seq:012d}.npz", self._set.all_keys())
        for f in os.listdir(self.dir):
            m = _SEGMENT.match(f) or _SNAPSHOT.match(f)
            if m and int(m.group(1)) < self._seq:
                (self.dir / f).unlink(missing_ok=True)
        self._segments_since_snapshot = 0

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

    @_locked
    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        self._set = KeySet(keys)
        self._pending.clear()
        self._watermark = watermark_ms
        self._expire()
        # Snapshot (removing older files) before the meta says the directory is valid again.
        self._snapshot()
        self._write_meta()
        self._stale = False

    @_locked
    def ensure(self, loader: Loader) -> bool:
        if not self._stale:
            return False
        keys, watermark = loader(None)
        self.rebuild(keys, watermark)
        return True

    def valid(self, batch_id: str | None = None) -> bool:
        return True

    @_locked
    def claim(self, batch_id: str, keys: Keys) -> Mask:
        mine = self._pending.get(batch_id, empty_keys())
        # A retry within this process: the keys this batch already won are still its own.
        already_mine = KeySet(mine).contains(keys) if len(mine) else np.zeros(len(keys), bool)
        new_now = ~self._set.contains(keys)
        won = keys.take(new_now)
        self._set.add(won)
        self._pending[batch_id] = Keys.concat([mine, won])
        result: Mask = new_now | already_mine
        return result

    @_locked
    def finish(self, batch_id: str, max_event_time_ms: int | None) -> None:
        won = self._pending.pop(batch_id, empty_keys())
        if max_event_time_ms is not None:
            self._raise_watermark(max_event_time_ms)
        self._seq += 1
        self._write_npz(self.dir / f"seg-{self._seq:012d}.npz", won)
        self._segments_since_snapshot += 1
        self._expire()
        if self._segments_since_snapshot >= self.snapshot_every:
            self._snapshot()

    @_locked
    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        self._set.add(keys.take(~self._set.contains(keys)))
        self._pending[batch_id] = keys
        self.finish(batch_id, max_event_time_ms)

    @_locked
    def stats(self) -> CacheStats:
        n = self._set.size()
        # 16 bytes of fingerprint per key, plus numpy's header per chunk array.
        overhead = 2 * 112 * self._set.chunk_count() + 232 * len(self._set.slices)
        return CacheStats(keys=n, bytes=16 * n + overhead)

    @_locked
    def close(self) -> None:
        if self._segments_since_snapshot:
            self._snapshot()
