"""Helpers for tests of adevents and of users' producers: build contract tables, read the lake,
and in-memory fakes of the core's edges (:class:`MemoryKeyCache`, :class:`MemorySource`).

The fakes pass the same contract tests as the real edges (``tests/test_keycache.py``,
``tests/test_source.py``), so a test of the pure core can use them without drifting from what
the real ones do.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import rebuild
from pipeline.decide import FileInput
from pipeline.fingerprint import Keys
from pipeline.groups import GroupFile
from pipeline.keycache import (
    CacheLostError,
    CacheStats,
    Claimed,
    Loader,
    Mask,
    Positions,
    default_positions,
    expired_before,
)
from pipeline.schema import EVENT_SCHEMA
from pipeline.source import arrived_ms
from pipeline.spool import PoisonInputError, internal_stem

if TYPE_CHECKING:
    from lake.location import LakeLocation
    from pipeline.settings import Settings


def consume_once(settings: Settings) -> None:
    """A real consumer with the configured key cache, run until incoming/ is empty, then
    closed (tests that want the spool landed, not the consumer's internals)."""
    from pipeline.consumer import Consumer  # the consumer imports this module's neighbours
    from pipeline.factory import make_key_cache

    consumer = Consumer(settings, make_key_cache(settings))
    consumer.start()
    try:
        consumer.run(once=True)
    finally:
        consumer.close()


def event_table(
    event_ids: Sequence[str | None], *, time_ms: int | Sequence[int | None], **columns: Any
) -> pa.Table:
    """A contract-shaped table of valid impressions; ``columns`` override any column's values."""
    n = len(event_ids)
    times = [time_ms] * n if isinstance(time_ms, int) else list(time_ms)
    values: dict[str, Any] = {
        "event_id": list(event_ids),
        "event_type": ["impression"] * n,
        "event_time": times,
        "campaign_id": ["cmp-0001"] * n,
        "ad_id": ["ad-1"] * n,
        "publisher_id": ["pub-1"] * n,
        "user_id": [f"user-{i}" for i in range(n)],
        "device_type": ["mobile"] * n,
        "country": ["US"] * n,
        "cost_micros": [1500] * n,
        "revenue_micros": [0] * n,
    }
    extra = {k: v for k, v in columns.items() if k not in values}
    values.update({k: v for k, v in columns.items() if k in values})
    arrays = [pa.array(values[f.name], type=f.type) for f in EVENT_SCHEMA]
    schema = pa.schema([pa.field(f.name, f.type) for f in EVENT_SCHEMA])
    table = pa.Table.from_arrays(arrays, schema=schema)
    for name, col in extra.items():
        table = table.append_column(name, pa.array(col))
    return table


def lake_contents(data_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, quarantine rows) of the default lake (DATA_DIR/lake) without per-run columns,
    in a canonical order, for comparing two runs."""
    from lake.location import LakeLocation

    return tables_contents(LakeLocation.from_env({}, data_dir=str(data_dir)))


def tables_contents(location: LakeLocation) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, quarantine rows) of the lake at ``location``; see :func:`lake_contents`."""
    from lake.snapshot import snapshot

    per_run = ("ingested_at", "batch_id", "date", "hour")
    snap = snapshot(location)
    out = []
    for name in ("events", "quarantine"):
        frame = pl.from_arrow(snap.datasets[name].to_table())
        assert isinstance(frame, pl.DataFrame)
        frame = frame.drop([c for c in per_run if c in frame.columns])
        out.append(frame.sort(frame.columns, nulls_last=True))
    return out[0], out[1]


@dataclass
class MemoryKeyState:
    """What a :class:`MemoryKeyCache` holds; two caches over one state are two consumers sharing
    one Redis, or one consumer restarted over it."""

    slices: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    watermark: int | None = None
    #: Claim records: per stream, the keys its unfinished claims won by position; per batch,
    #: the epoch it claimed in.
    claims: dict[str, Claimed] = field(default_factory=dict)
    claim_epochs: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    lost: bool = True  # a fresh cache has never been built
    guard: threading.Lock = field(default_factory=threading.Lock)


class MemoryKeyCache:
    """An in-memory :class:`pipeline.keycache.RebuildableKeyCache`: one Python set per generation.

    Keeps claim records like the Redis cache, so a retried batch gets the same answers; call
    :meth:`lose` to make it forget everything as a flushed Redis does.
    """

    def __init__(
        self, state: MemoryKeyState | None = None, *, window_ms: int, slice_ms: int
    ) -> None:
        self.state = state or MemoryKeyState()
        self.window_ms = window_ms
        self.slice_ms = slice_ms

    def lose(self) -> None:
        """Forget every key and claim: the next claim raises CacheLostError until rebuilt."""
        with self.state.guard:
            self.state.slices.clear()
            self.state.claims.clear()
            self.state.watermark = None
            self.state.lost = True

    def watermark(self) -> int | None:
        return self.state.watermark

    def needs_rebuild(self) -> bool:
        return self.state.lost

    def rebuild(self, keys: Keys, watermark_ms: int | None) -> None:
        self.replace(keys, watermark_ms)
        self.open_epoch()

    def replace(self, keys: Keys, watermark_ms: int | None) -> None:
        with self.state.guard:
            self.state.slices.clear()
            self.state.claims.clear()
            self.state.watermark = watermark_ms
            cutoff = expired_before(watermark_ms, self.window_ms, self.slice_ms)
            for key in _triples(keys):
                if cutoff is None or key[0] >= cutoff:
                    self.state.slices.setdefault(key[0], set()).add(key[1:])
            self.state.lost = True  # closed until open_epoch

    def open_epoch(self) -> None:
        with self.state.guard:
            self.state.epoch += 1
            self.state.lost = False

    def ensure(self, loader: Loader) -> bool:
        return rebuild.ensure(self, loader)

    def valid(self, batch_id: str | None = None) -> bool:
        state = self.state
        if state.lost:
            return False
        return batch_id is None or state.claim_epochs.get(batch_id, state.epoch) == state.epoch

    def claim(
        self,
        batch_id: str,
        keys: Keys,
        positions: Positions | None = None,
        *,
        stream: str | None = None,
        fresh: bool = True,
    ) -> Mask:
        positions = default_positions(keys, positions)
        with self.state.guard:
            state = self.state
            if state.lost:
                raise CacheLostError("the in-memory key cache was lost; rebuild it")
            # The state is shared like a Redis server: every claim of the stream is in it, so
            # ``fresh`` changes nothing.
            claimed = state.claims.setdefault(stream or batch_id, Claimed())
            state.claim_epochs[batch_id] = state.epoch
            won = claimed.holds(keys.lo, positions)
            new = np.zeros(len(keys), dtype=bool)
            for i, key in enumerate(_triples(keys)):
                # By fingerprint in every generation: a copy may carry another event_time.
                if not any(key[1:] in held for held in state.slices.values()):
                    state.slices.setdefault(key[0], set()).add(key[1:])
                    new[i] = True
            claimed.add(keys.lo[new], positions[new])
            result: Mask = won | new
            return result

    def finish(
        self,
        batch_id: str,
        max_event_time_ms: int | None,
        *,
        stream: str | None = None,
        through: Mapping[int, int] | None = None,
    ) -> None:
        with self.state.guard:
            state = self.state
            state.claim_epochs.pop(batch_id, None)
            if through is None:
                state.claims.pop(stream or batch_id, None)
            elif (claimed := state.claims.get(stream or batch_id)) is not None:
                claimed.forget(through)
            if max_event_time_ms is not None and (
                state.watermark is None or max_event_time_ms > state.watermark
            ):
                state.watermark = max_event_time_ms
            cutoff = expired_before(state.watermark, self.window_ms, self.slice_ms)
            if cutoff is not None:
                for sl in [s for s in state.slices if s < cutoff]:
                    del state.slices[sl]

    def restore(self, batch_id: str, keys: Keys, max_event_time_ms: int | None) -> None:
        with self.state.guard:
            for key in _triples(keys):
                self.state.slices.setdefault(key[0], set()).add(key[1:])
        self.finish(batch_id, max_event_time_ms)

    def stats(self) -> CacheStats:
        n = sum(len(held) for held in self.state.slices.values())
        return CacheStats(keys=n, bytes=16 * n)

    def close(self) -> None:
        """Nothing to release: the state lives as long as its owner keeps it."""


def _triples(keys: Keys) -> list[tuple[int, int, int]]:
    """(slice, hi, lo) per key, as Python ints."""
    return list(zip(keys.slice.tolist(), keys.hi.tolist(), keys.lo.tolist(), strict=True))


class MemorySource:
    """An in-memory :class:`pipeline.source.Source`: batches put by name, taken in name order.

    Taking holds a batch at once (there is no crash to survive in memory); two consumers over
    one source are one consumer restarted. Poison batches retired land in :attr:`set_aside`.
    """

    def __init__(self, app_id: str = "memory:0") -> None:
        self._app_id = app_id
        self._waiting: dict[str, tuple[GroupFile, pa.Table | PoisonInputError, int]] = {}
        self._taken: dict[str, tuple[GroupFile, pa.Table | PoisonInputError, int]] = {}
        self._puts = itertools.count()
        #: Poison batches retired, by name: (reason, when set aside in epoch ms).
        self.set_aside: dict[str, tuple[str, int]] = {}

    @property
    def app_id(self) -> str:
        return self._app_id

    def put(self, name: str, batch: pa.Table | PoisonInputError) -> None:
        """Make ``batch`` wait under ``name``; a PoisonInputError stands for an unreadable one."""
        position = GroupFile(name, f"{internal_stem(name)}-{next(self._puts)}")
        self._waiting[name] = (position, batch, int(time.time() * 1000))

    def waiting(self) -> list[str]:
        """Names of the batches not retired yet, taken or not, in name order."""
        return sorted({*self._waiting, *self._taken})

    def take(self, skip: Collection[str]) -> Iterator[FileInput]:
        for name in sorted(self._taken):
            if name not in skip:
                yield self._input(*self._taken[name])
        for name in sorted(self._waiting):
            if name in self._waiting and name not in self._taken:
                self._taken[name] = self._waiting.pop(name)
                yield self._input(*self._taken[name])

    def hold(self) -> None:
        """Nothing to do: a batch taken is held at once."""

    def read(self, batch: GroupFile) -> FileInput | None:
        taken = self._taken.get(batch.name)
        if taken is None or taken[0].batch_id != batch.batch_id:
            return None
        return self._input(*taken)

    def retire(self, batch: GroupFile, poison: PoisonInputError | None, at_ms: int) -> None:
        taken = self._taken.get(batch.name)
        if taken is None or taken[0].batch_id != batch.batch_id:
            return
        del self._taken[batch.name]
        if poison is not None:
            self.set_aside[batch.name] = (poison.reason, at_ms)

    @staticmethod
    def _input(position: GroupFile, batch: pa.Table | PoisonInputError, put_ms: int) -> FileInput:
        if isinstance(batch, PoisonInputError):
            return FileInput(position, put_ms, None, PoisonInputError(batch.reason, batch.message))
        return FileInput(position, arrived_ms(batch, put_ms), batch)


class MemoryRebuildLock:
    """An in-memory :class:`pipeline.rebuild.RebuildLock` shared by the caches of one test;
    :meth:`lose` drops it as an expired lease (or a flushed Redis) would."""

    def __init__(self) -> None:
        self._holder: object | None = None
        self._guard = threading.Lock()

    def acquire(self) -> object | None:
        with self._guard:
            if self._holder is not None:
                return None
            self._holder = object()
            return self._holder

    def held(self, token: object) -> bool:
        return self._holder is token

    def release(self, token: object) -> None:
        with self._guard:
            if self._holder is token:
                self._holder = None

    def lose(self) -> None:
        self._holder = None
