"""Event-id fingerprints held for the dedupe window, whatever their event_time: 14 bytes a key.

A key is 96 bits of the event_id's 128-bit fingerprint (``hi`` and the top half of ``lo``)
and a 16-bit tag: the tick of its first copy's event_time (a tick is 1/4096 of the window;
tags count ticks modulo 2**16). A key is *held* when the set has its 96 bits with a live tag,
whatever the event_time of the copy asking: a copy re-stamped by an SDK retry, or a pixel fired
twice and stamped by the server 300 ms apart across a second boundary, is a duplicate as long
as its original's time is inside the window. Live means at most one window (plus a tick) older
than the watermark, which :meth:`FingerprintSet.add` raises to the newest key it adds. Two
event_ids share 96 bits with probability 2**-96 per pair: at 100M keys held, one false
duplicate in about 8e20 events.

Layout: keys are spread over ``2**PARTITION_BITS`` partitions by the top bits of ``hi``; each
partition is log-structured: one large run and up to ``SMALL_RUNS`` small ones, each a sorted
array of ``hi`` with ``lo`` and tags aligned. A batch's new keys become one small run per
partition; too many small runs merge into one, and a small run merges into the large run once
it holds ``1/FOLD`` of it. Merges drop expired keys, and a sweep drops the rest whenever the
watermark has moved ``SWEEP_WINDOWS`` windows; so memory holds at most 1.5 windows of keys,
and a merge's or a sweep's transient memory is about a partition, not the whole set.
Tags stay exact because every key held is within a few windows of the watermark: a sweep
reads ages against the watermark before a move, never after a jump that could wrap them.

Status: issue 12's building block, not used by a key cache yet. Searching the whole window
costs more than searching the one-second slices a batch falls in (``bench/keyset_layouts.py``,
10M keys in 100k batches, a first window: 500 against 125 ns a key; 16 ms to test a batch, 34
to add it). Vectorised NumPy pays a pass over the batch per step (bit masks, gathers, merges);
a compiled hash table per generation (numba) is the next thing to measure before it replaces
``pipeline.keycache.KeySet``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from pipeline.fingerprint import U64, Keys

PARTITION_BITS: Final = 4
SMALL_RUNS: Final = 4
FOLD: Final = 4
#: Ticks in a window at least: tags count ticks modulo 2**16.
WINDOW_TICKS: Final = 4096
#: The watermark moves this far between sweeps: memory holds at most 1.5 windows of keys.
SWEEP_WINDOWS: Final = 0.5
_WRAP: Final = 1 << 16
#: Bytes a key takes in its run: 8 of ``hi``, 4 of ``lo``, 2 of tag (the Bloom filters add
#: about BLOOM_BITS_PER_KEY / 8 more).
KEY_BYTES: Final = 14
#: Each generation of keys (half a window of event time) has Bloom filters in front of the
#: runs: a lookup searches the runs only for keys some filter cannot rule out (a few in 100).
GENERATION_WINDOWS: Final = 0.5
BLOOM_BITS: Final = 5
BLOOM_BITS_PER_KEY: Final = 8
FIRST_BLOOM_KEYS: Final = 1 << 16

U32 = npt.NDArray[np.uint32]
U16 = npt.NDArray[np.uint16]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Run:
    """Keys sorted by ``hi``; arrays never change once built (merges build new ones)."""

    hi: U64
    lo: U32
    tag: U16

    def __len__(self) -> int:
        return len(self.hi)

    def take(self, index: npt.NDArray[np.intp] | Mask) -> Run:
        return Run(self.hi[index], self.lo[index], self.tag[index])

    @staticmethod
    def concat(runs: list[Run]) -> Run:
        return Run(
            np.concatenate([r.hi for r in runs]),
            np.concatenate([r.lo for r in runs]),
            np.concatenate([r.tag for r in runs]),
        )

    def sorted(self) -> Run:
        return self.take(np.argsort(self.hi))

    def merged(self, other: Run) -> Run:
        """This sorted run and another, merged in linear time (no sort)."""
        at = np.searchsorted(self.hi, other.hi) + np.arange(len(other))
        mine = np.ones(len(self) + len(other), dtype=bool)
        mine[at] = False
        out = Run(
            np.empty(len(mine), np.uint64),
            np.empty(len(mine), np.uint32),
            np.empty(len(mine), np.uint16),
        )
        for column in ("hi", "lo", "tag"):
            getattr(out, column)[mine] = getattr(self, column)
            getattr(out, column)[at] = getattr(other, column)
        return out


EMPTY: Final = Run(np.empty(0, np.uint64), np.empty(0, np.uint32), np.empty(0, np.uint16))


class _Bloom:
    """A blocked Bloom filter: each key sets BLOOM_BITS bits of one 64-bit word, so a test costs
    one memory access. Built from the bits a run keeps (``hi`` and 32 of ``lo``), so it can be
    built again from the runs alone."""

    __slots__ = ("capacity", "count", "words")

    def __init__(self, capacity: int) -> None:
        self.words = np.zeros(max(1, -(-capacity * BLOOM_BITS_PER_KEY // 64)), np.uint64)
        self.capacity = capacity
        self.count = 0

    @staticmethod
    def masks(lo: U32) -> U64:
        """The bits each key sets in its word (the same in every filter): from ``lo``."""
        mask = np.zeros(len(lo), np.uint64)
        for j in range(BLOOM_BITS):
            mask |= np.uint64(1) << ((lo >> np.uint32(6 * j)) & np.uint32(63)).astype(np.uint64)
        return mask

    def _word(self, hi: U64) -> npt.NDArray[np.intp]:
        # ``hi``'s top bits pick the partition and ``lo`` is compared exactly: the word comes
        # from ``hi``'s low half (uniform bits, independent of the mask's).
        word = ((hi & np.uint64(0xFFFF_FFFF)) * np.uint64(len(self.words))) >> np.uint64(32)
        return word.astype(np.intp)

    def add(self, hi: U64, mask: U64) -> None:
        word = self._word(hi)
        pending = np.arange(len(word))
        # Keys sharing a word in one assignment would lose bits (the last write wins): set what
        # did not stick again, until all did (a few passes; ufunc.at is 10x slower).
        while len(pending):
            self.words[word[pending]] |= mask[pending]
            pending = pending[(self.words[word[pending]] & mask[pending]) != mask[pending]]
        self.count += len(word)

    def maybe(self, hi: U64, mask: U64) -> Mask:
        result: Mask = (self.words[self._word(hi)] & mask) == mask
        return result


class _Partition:
    __slots__ = ("large", "small")

    def __init__(self) -> None:
        self.large: Run = EMPTY
        self.small: list[Run] = []

    def runs(self) -> list[Run]:
        return [r for r in (self.large, *self.small) if len(r)]

    def size(self) -> int:
        return sum(len(r) for r in self.runs())


class FingerprintSet:
    """The keys of one dedupe window; not thread-safe (the key cache serialises calls)."""

    def __init__(self, window_ms: int, slice_ms: int) -> None:
        # 16 windows fit in 2**16 ticks: a key is dropped within SWEEP_WINDOWS + 1 windows of
        # expiring (or a jump's sweep), far from wrapping into the window ahead of the
        # watermark (none is ahead: see add).
        self.tick_ms = max(1, -(-window_ms // WINDOW_TICKS))
        self.window_ticks = -(-window_ms // self.tick_ms)
        # No key is ahead of the watermark (add raises it first); a window of slack anyway.
        self.ahead_ticks = self.window_ticks
        #: For keys without an event_time: the last millisecond of their slice (held longest).
        self.slice_ms = slice_ms
        self._parts = [_Partition() for _ in range(1 << PARTITION_BITS)]
        self._now: int | None = None  # the watermark's tick
        self._swept: int | None = None
        self.generation_ticks = max(1, int(self.window_ticks * GENERATION_WINDOWS))
        #: Bloom filters by generation (absolute tick // generation_ticks), oldest first; a
        #: generation that outgrows its filter gets another, twice as large.
        self._blooms: dict[int, list[_Bloom]] = {}

    # -- time --------------------------------------------------------------------------------
    def _times(self, keys: Keys) -> npt.NDArray[np.int64]:
        if keys.ms is not None:
            return keys.ms
        # Without an event_time, the slice's last millisecond: the key is held the longest.
        return keys.slice * self.slice_ms + self.slice_ms - 1

    def _live(self, tag: U16) -> Mask:
        if self._now is None:
            return np.ones(len(tag), dtype=bool)
        age = (np.int64(self._now) - tag.astype(np.int64)) & 0xFFFF
        result: Mask = (age <= self.window_ticks + 1) | (age >= _WRAP - self.ahead_ticks)
        return result

    def set_watermark(self, watermark_ms: int | None) -> None:
        """Keys older than ``watermark_ms`` minus the window are no longer held."""
        if watermark_ms is None:
            return
        now = watermark_ms // self.tick_ms
        if self._now is None or self._swept is None:
            self._now = self._swept = now
            return
        if now <= self._now:
            return
        if now - self._swept >= SWEEP_WINDOWS * self.window_ticks:
            # Ages are read against the old watermark, where they are still exact (every key
            # is within a few windows of it): against the new one, after a jump, an expired
            # key's age could have wrapped around into the live range.
            self._sweep(self._now, now)
            self._swept = now
        self._now = now
        oldest = (now - self.window_ticks - 1) // self.generation_ticks
        for gen in [g for g in self._blooms if g < oldest]:
            del self._blooms[gen]  # every key of it expired: it can only answer "maybe"

    def _sweep(self, before: int, now: int) -> None:
        def kept(run: Run) -> Run:
            age = (np.int64(before) - run.tag.astype(np.int64)) & 0xFFFF
            ahead = age >= _WRAP - self.ahead_ticks
            tick = before - np.where(ahead, age - _WRAP, age)
            live = tick >= now - self.window_ticks - 1
            return run if live.all() else run.take(live)

        for part in self._parts:
            part.large = kept(part.large)
            part.small = [k for r in part.small if len(k := kept(r))]

    def _kept(self, run: Run) -> Run:
        live = self._live(run.tag)
        return run if live.all() else run.take(live)

    # -- keys --------------------------------------------------------------------------------
    @staticmethod
    def _by_partition(hi: U64) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """The order sorting ``hi``, and where each partition's keys start in it."""
        order = np.argsort(hi)  # quicksort: 4x faster than the stable sort on 100k keys
        bounds = np.arange(1 << PARTITION_BITS, dtype=np.uint64) << np.uint64(64 - PARTITION_BITS)
        starts = np.searchsorted(hi[order], bounds)
        return order, np.append(starts, len(hi))

    def contains(self, keys: Keys) -> Mask:
        """Per key, whether the set holds it (its 96 bits with a live tag)."""
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return found
        hi, lo = keys.hi, (keys.lo >> np.uint64(32)).astype(np.uint32)
        maybe = np.zeros(len(keys), dtype=bool)
        mask = _Bloom.masks(lo)
        for bloom in (b for blooms in self._blooms.values() for b in blooms):
            maybe |= bloom.maybe(hi, mask)
        candidates = np.flatnonzero(maybe)
        if not len(candidates):
            return found
        found[candidates] = self._search(hi[candidates], lo[candidates])
        return found

    def _search(self, hi: U64, lo: U32) -> Mask:
        """The exact test: binary searches in every run of each key's partition."""
        found = np.zeros(len(hi), dtype=bool)
        order, starts = self._by_partition(hi)
        for p, part in enumerate(self._parts):
            index = order[starts[p] : starts[p + 1]]
            if not len(index):
                continue
            q_hi, q_lo = hi[index], lo[index]
            hit = np.zeros(len(index), dtype=bool)
            for run in part.runs():
                hit |= self._find(run, q_hi, q_lo)
            found[index] = hit
        return found

    def _find(self, run: Run, hi: U64, lo: U32) -> Mask:
        pos = np.searchsorted(run.hi, hi)
        inside = pos < len(run)
        pos = np.where(inside, pos, 0)
        same_hi = inside & (run.hi[pos] == hi)
        found: Mask = same_hi & (run.lo[pos] == lo) & self._live(run.tag[pos])
        # Another key with the same ``hi`` (one in 2**64 per pair), or an expired copy not
        # swept yet, may sit first: look at every key of that ``hi``.
        for i in np.flatnonzero(same_hi & ~found):
            end = np.searchsorted(run.hi, hi[i], side="right")
            window = slice(int(pos[i]), int(end))
            found[i] = bool(np.any((run.lo[window] == lo[i]) & self._live(run.tag[window])))
        return found

    def add(self, keys: Keys) -> None:
        """Add keys the set does not hold (callers check with :meth:`contains` first)."""
        if not len(keys):
            return
        ms = self._times(keys)
        # The watermark moves up to the newest key first, as the committed one will once the
        # batch lands: no key held is ever ahead of it, however far ahead of the last commit
        # an event may be (a consumer catching up a backlog; MAX_FUTURE_MS ahead of the clock).
        self.set_watermark(int(ms.max()))
        lo = (keys.lo >> np.uint64(32)).astype(np.uint32)
        tags = (np.floor_divide(ms, self.tick_ms) & 0xFFFF).astype(np.uint16)
        self.add_run(Run(keys.hi, lo, tags))

    def add_run(self, run: Run, *, is_sorted: bool = False) -> None:
        """Add a run of keys (read back from a key file: sorted when it was a run); keys not
        live are left out."""
        if not len(run):
            return
        run = self._kept(run)
        if not len(run):
            return
        self._remember(run)
        if is_sorted:
            order, starts = np.arange(len(run)), self._bounds(run.hi)
        else:
            order, starts = self._by_partition(run.hi)
        for p, part in enumerate(self._parts):
            index = order[starts[p] : starts[p + 1]]
            if len(index):
                part.small.append(run.take(index))
                self._maintain(part)

    def _remember(self, run: Run) -> None:
        """Put ``run``'s keys in the Bloom filters of their generations."""
        assert self._now is not None
        # No key is ahead of the watermark (see add), so ages give absolute ticks.
        age = (np.int64(self._now) - run.tag.astype(np.int64)) & 0xFFFF
        gens = (self._now - age) // self.generation_ticks
        for gen in np.unique(gens).tolist():
            mine = gens == gen
            hi, lo = run.hi[mine], run.lo[mine]
            blooms = self._blooms.setdefault(gen, [])
            if not blooms or blooms[-1].count + len(hi) > blooms[-1].capacity:
                # Sized like the largest generation so far (its keys, with a tenth to spare): one
                # filter a generation once the window has turned over once.
                seen = max((sum(b.count for b in bs) for bs in self._blooms.values()), default=0)
                blooms.append(_Bloom(max(FIRST_BLOOM_KEYS, 2 * len(hi), seen + seen // 10)))
            blooms[-1].add(hi, _Bloom.masks(lo))

    @staticmethod
    def _bounds(hi: U64) -> npt.NDArray[np.intp]:
        bounds = np.arange(1 << PARTITION_BITS, dtype=np.uint64) << np.uint64(64 - PARTITION_BITS)
        return np.append(np.searchsorted(hi, bounds), len(hi))

    def _maintain(self, part: _Partition) -> None:
        if len(part.small) > SMALL_RUNS:
            part.small = [self._kept(Run.concat(part.small).sorted())]
        if part.small and FOLD * len(part.small[-1]) >= len(part.large):
            small = part.small[0] if len(part.small) == 1 else Run.concat(part.small).sorted()
            part.large = self._kept(part.large.merged(small))
            part.small = []

    # -- size and persistence ----------------------------------------------------------------
    def size(self) -> int:
        """Keys stored (expired ones not dropped yet included)."""
        return sum(p.size() for p in self._parts)

    def nbytes(self) -> int:
        runs = sum(r.hi.nbytes + r.lo.nbytes + r.tag.nbytes for p in self._parts for r in p.runs())
        return runs + sum(b.words.nbytes for bs in self._blooms.values() for b in bs)

    def runs(self) -> Iterator[Run]:
        """Every stored run, live keys only: references or filtered copies, one partition at a
        time (a snapshot writes them as they come)."""
        for part in self._parts:
            for run in part.runs():
                kept = self._kept(run)
                if len(kept):
                    yield kept

    def add_runs(self, runs: Iterable[Run]) -> None:
        for run in runs:
            self.add_run(run, is_sorted=True)
