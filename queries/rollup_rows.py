"""A campaign's rollup rows, from the rollup job's files read once each, without DuckDB.

A stats question reads the rollups of every whole bucket and minute it spans, then the events
of what they do not cover. Through DuckDB, the rollup part cost 3-4 ms alone (a query's set-up
and a scan of every row of the hour's minute file: 18,000 rows for one campaign's 18), and it
was asked again for each campaign at each new minute: 6.5 ms of the 15.6 ms of such a question
on a 50M-event lake. Here each file is read once into per-campaign slices, sorted by bucket;
a question takes its campaign's slice and adds up the buckets its runs hold: exactly what the
SQL sums, in microseconds.

A file is known by its identity (device, inode, mtime, size), taken from the open file that is
read: the rollup job replaces files whole, by rename, so a new file is a new identity and a
stale listing reads either the old file or the new, never a mix. Memory is bounded by
QUERY_ROLLUPS_BYTES (a file that does not fit is left to DuckDB).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cachetools import LRUCache

from pipeline.settings import QuerySettings
from queries.event_sums import Sums, add

#: Bytes of rollup rows a RollupRows keeps by default (QUERY_ROLLUPS_BYTES; a Lake passes its
#: setting).
CACHE_BYTES: Final = QuerySettings.query_rollups_bytes
#: The summed columns, in the order of a total's five fields.
VALUES: Final = ("impressions", "clicks", "conversions", "spend_micros", "revenue_micros")

Run = tuple[int, int]


@dataclass(frozen=True)
class _File:
    """One rollup file's rows in (campaign_id, bucket) order."""

    buckets: npt.NDArray[np.int64]
    values: npt.NDArray[np.int64]
    #: Each campaign's [start, stop) in that order.
    runs: dict[str, tuple[int, int]]

    @property
    def nbytes(self) -> int:
        # The slices' dictionary: ~100 bytes an entry (key, tuple, two ints).
        return self.buckets.nbytes + self.values.nbytes + 100 * len(self.runs)


def _read(handle: BinaryIO) -> _File:
    table = pq.read_table(handle, columns=["campaign_id", "bucket", *VALUES])
    table = table.sort_by([("campaign_id", "ascending"), ("bucket", "ascending")])
    stamps = table.column("bucket").cast(pa.timestamp("ms", "UTC")).cast(pa.int64())
    # A null bucket (none in the schema) falls in no run.
    buckets = np.asarray(stamps.fill_null(np.iinfo(np.int64).min).to_numpy(), dtype=np.int64)
    columns = [np.asarray(table.column(c).fill_null(0).to_numpy(), dtype=np.int64) for c in VALUES]
    values = np.stack(columns, axis=1) if len(table) else np.zeros((0, 5), dtype=np.int64)
    campaigns = table.column("campaign_id").combine_chunks()
    runs: dict[str, tuple[int, int]] = {}
    if len(campaigns):
        encoded = pc.run_end_encode(campaigns)
        stops = encoded.run_ends.to_pylist()
        for name, start, stop in zip(
            encoded.values.to_pylist(), [0, *stops[:-1]], stops, strict=True
        ):
            if name is not None:
                runs[name] = (start, stop)
    return _File(buckets, values, runs)


def _in_runs(buckets: npt.NDArray[np.int64], runs: Sequence[Run]) -> npt.NDArray[np.bool_]:
    """Which buckets fall in one of ``runs`` (disjoint, ascending, [start, end))."""
    starts = np.fromiter((s for s, _ in runs), dtype=np.int64, count=len(runs))
    ends = np.fromiter((e for _, e in runs), dtype=np.int64, count=len(runs))
    i = np.searchsorted(ends, buckets, "right")  # the first run that ends after the bucket
    inside = i < len(runs)
    inside[inside] &= starts[i[inside]] <= buckets[inside]
    return inside


class RollupRows:
    """Rollup files' rows by campaign, kept per file identity; thread-safe."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._kept: LRUCache[tuple[str, int, int, int, int], _File] = LRUCache(
            max(cache_bytes, 1), getsizeof=lambda f: max(f.nbytes, 1)
        )
        self._enabled = cache_bytes > 0
        self._lock = threading.Lock()

    def _file(self, path: str) -> _File | None:
        """The file's rows (read now unless known); None when it is gone or too big to keep."""
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                with self._lock:
                    known = self._kept.get(key)
                if known is not None:
                    return known
                read = _read(handle)
        except FileNotFoundError:
            return None
        if read.nbytes > self._kept.maxsize:
            return None
        with self._lock:
            self._kept[key] = read
        return read

    def add(
        self,
        out: Sums,
        files: Sequence[str],
        campaign_id: str,
        runs: Sequence[Run],
        width: int,
    ) -> bool:
        """Add the campaign's rows of ``files`` whose bucket is in ``runs`` to ``out``, each in
        its ``width`` bucket (epoch ms). False, with ``out`` unchanged, when a file cannot be
        read here (gone since it was listed, or bigger than the memory allowed): the caller
        reads them through DuckDB instead."""
        if not self._enabled:
            return False
        read = [self._file(f) for f in files]
        if any(r is None for r in read):
            return False
        for known in read:
            assert known is not None
            span = known.runs.get(campaign_id)
            if span is None or not runs:
                continue
            buckets = known.buckets[span[0] : span[1]]
            chosen = _in_runs(buckets, runs)
            if not chosen.any():
                continue
            starts = buckets[chosen] - buckets[chosen] % width
            values = known.values[span[0] : span[1]][chosen]
            for bucket, row in zip(starts.tolist(), values.tolist(), strict=True):
                add(out, bucket, row)
        return True
