"""A campaign's event totals per time bucket, summed from local row groups without a DuckDB scan.

A stats question whose ``until`` falls inside a compacted hour reads the partial minute at
``until`` from events. Through DuckDB that cost 17 ms (122,880-row groups) to 30 ms (16,384-row
groups) of a 2-core machine a question, for one row group read: most of it the scan's set-up and
its pruning of every row group of the hour's files (5 ms for 777 groups that all fail). Here the
footers are cached (:class:`queries.row_groups.RowGroups`) and only the five columns the totals
need are decoded from the groups that can hold the campaign in the runs asked: 4 ms for a
122,880-row group, 0.7 ms for a 16,384-row one (50M-event lake).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from cachetools import LRUCache

from pipeline.schema import MINUTE_MS
from pipeline.settings import QuerySettings
from queries.row_groups import Group, RowGroups

#: Bytes of per-minute running totals a MinuteSums keeps by default (QUERY_MINUTE_SUMS_BYTES; a
#: Lake passes its setting).
CACHE_BYTES: Final = QuerySettings.query_minute_sums_bytes

#: Columns the totals are computed from.
COLUMNS: Final = ("campaign_id", "event_time", "event_type", "cost_micros", "revenue_micros")
#: The counted event types, in the order of a total's first three fields.
_COUNTED: Final = ("impression", "click", "conversion")
_KIND: Final = {kind: k for k, kind in enumerate(_COUNTED)}

#: A bucket's start (epoch ms) -> [impressions, clicks, conversions, spend, revenue].
Sums = dict[int, list[int]]


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    stamps = column.cast(pa.timestamp("us", "UTC")).cast(pa.int64())
    # Nulls (none in the schema) become a time no run holds.
    return np.asarray(stamps.fill_null(np.iinfo(np.int64).min).to_numpy(), dtype=np.int64)


def _money(column: pa.ChunkedArray | None, rows: int) -> np.ndarray:
    if column is None:
        return np.zeros(rows, dtype=np.int64)
    return np.asarray(column.fill_null(0).to_numpy(), dtype=np.int64)


def add(out: Sums, bucket: int, values: Iterable[int]) -> None:
    """Add one bucket's five totals to ``out``."""
    known = out.setdefault(bucket, [0, 0, 0, 0, 0])
    for k, v in enumerate(values):
        known[k] += int(v)


def _coded(
    column: pa.ChunkedArray, codes: Callable[[pa.Array], npt.NDArray[Any]], null: object
) -> npt.NDArray[Any]:
    """Per row, a code computed once per distinct value (``codes`` of a chunk's dictionary, the
    ``null`` code for nulls): on the dictionary columns a row group is read as, a lookup by
    index. Three ``pc.equal`` of event_type, one per counted type, took 1.1 ms of a 16,384-row
    group; the whole of its totals now costs less than one of them."""
    out = []
    for chunk in column.chunks:
        coded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
        known = codes(coded.dictionary)
        table = np.append(known, np.asarray([null], dtype=known.dtype))
        out.append(table[coded.indices.fill_null(len(known)).to_numpy()])
    return np.concatenate(out) if out else codes(pa.array([], pa.string()))


def _is(value: str) -> Callable[[pa.Array], npt.NDArray[np.bool_]]:
    return lambda values: np.asarray(
        pc.equal(values, pa.scalar(value)).fill_null(False).to_numpy(zero_copy_only=False),
        dtype=bool,
    )


def _kinds(values: pa.Array) -> npt.NDArray[np.int8]:
    """Each value's column among the totals' first three, or 3 (not counted)."""
    return np.asarray([_KIND.get(v, 3) for v in values.to_pylist()], dtype=np.int8)


def _campaign_rows(
    table: pa.Table, campaign_id: str | None, runs: Sequence[tuple[int, int]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The campaign's rows of ``table`` with times in ``runs`` (epoch ms, [start, end)): their
    times in microseconds and, per row, [impression, click, conversion, cost, revenue]. With
    ``campaign_id`` None, every row is the campaign's (a row group that holds only it, read
    without its campaign_id column)."""
    all_times = _micros(table.column("event_time"))
    keep = np.zeros(len(all_times), dtype=bool)
    for lo, hi in runs:
        keep |= (all_times >= lo * 1000) & (all_times < hi * 1000)
    if campaign_id is not None:
        keep &= _coded(table.column("campaign_id"), _is(campaign_id), False)
    rows = np.flatnonzero(keep)
    times, n = all_times[rows], len(rows)
    values = np.zeros((n, 5), dtype=np.int64)
    if n:
        names = set(table.column_names)
        if "event_type" in names:
            kinds = _coded(table.column("event_type"), _kinds, 3)[rows]
            counted = np.flatnonzero(kinds < 3)
            values[counted, kinds[counted]] = 1
        for k, name in ((3, "cost_micros"), (4, "revenue_micros")):
            column = table.column(name) if name in names else None
            values[:, k] = _money(column, table.num_rows)[rows]
    return times, values


def add_table(
    out: Sums,
    table: pa.Table,
    campaign_id: str,
    runs: Sequence[tuple[int, int]],
    width_ms: int,
) -> None:
    """Add the campaign's rows of ``table`` with times in ``runs`` (epoch ms, [start, end)) to
    ``out``, by bucket of ``width_ms`` (UTC: a bucket is a floor of the epoch), as the SQL
    ``count(*) FILTER (...)``/``coalesce(sum(...), 0)`` of ``queries.campaigns`` would."""
    times, values = _campaign_rows(table, campaign_id, runs)
    if not len(times):
        return
    buckets, at = np.unique((times // 1000) // width_ms * width_ms, return_inverse=True)
    # Summed in int64 (np.bincount's float weights would round large money sums).
    totals = np.zeros((len(buckets), 5), dtype=np.int64)
    np.add.at(totals, at, values)
    for bucket, row in zip(buckets.tolist(), totals.tolist(), strict=True):
        add(out, int(bucket), row)


@dataclass(frozen=True)
class _Minute:
    """One campaign's rows of one row group within one minute, as running totals at each
    distinct event time: ``running[k]`` holds the totals of the rows before ``times_us[k]``
    (one more entry than times: the totals of all of them). A busy campaign's minute holds far
    fewer distinct times than rows (event times are in ms: at most 60,000 a minute); kept per
    row, the 100 busiest campaigns' minute of a 50M-event hour took 110 MB, more than the
    cache, and every question decoded its row groups again."""

    times_us: npt.NDArray[np.int64]
    running: npt.NDArray[np.int64]

    @classmethod
    def of(cls, table: pa.Table, campaign_id: str | None, minute_ms: int) -> _Minute:
        """From the rows of ``table`` (``campaign_id`` None: all the campaign's) in the minute."""
        times, values = _campaign_rows(table, campaign_id, ((minute_ms, minute_ms + MINUTE_MS),))
        if len(times) > 1 and bool((times[1:] < times[:-1]).any()):
            # A clustered group is in (campaign, time) order already: no sort then.
            order = np.argsort(times, kind="stable")
            times, values = times[order], values[order]
        running = np.zeros((len(times) + 1, 5), dtype=np.int64)
        running[1:] = np.cumsum(values, axis=0)
        # The totals before each distinct time's first row, then the totals of all rows.
        first = np.flatnonzero(np.diff(times, prepend=np.iinfo(np.int64).min) != 0)
        return cls(times[first], running[np.append(first, len(times))])

    @property
    def nbytes(self) -> int:
        return int(self.times_us.nbytes + self.running.nbytes) + 64

    def between(self, lo_us: int, hi_us: int) -> list[int] | None:
        """The totals of the rows in [lo, hi); None when there are none."""
        a = int(np.searchsorted(self.times_us, lo_us, "left"))
        b = int(np.searchsorted(self.times_us, hi_us, "left"))
        if b <= a:
            return None
        return [int(v) for v in self.running[b] - self.running[a]]


class MinuteSums:
    """Each asked campaign's rows of a row group within one minute, as running totals; thread-
    safe. A stats question with rollups reads raw only the partial minute at ``until``, and the
    next question on the campaign (a later ``until``) mostly falls in the same minute: it is
    then two binary searches, not a row group decoded again (4 ms at 122,880 rows). Kept per
    row group, not per file and minute: a busy campaign's minute spans dozens of a clustered
    hour's 16,384-row groups, and reading the whole minute at its first question (331 ms for
    540k rows) cost more than reading, question by question, the groups each ``until`` needs."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._kept: LRUCache[tuple[str, int, str, int], _Minute] = LRUCache(
            cache_bytes, getsizeof=lambda m: m.nbytes
        )
        self._lock = threading.Lock()

    def minute(
        self, groups: RowGroups, path: str, group: Group, campaign_id: str, minute_ms: int
    ) -> _Minute:
        """The campaign's rows of ``group`` of ``path`` in the minute (kept while it fits)."""
        key = (path, group.index, campaign_id, minute_ms)
        with self._lock:
            known = self._kept.get(key)
        if known is None:
            # A clustered hour's busy campaign has row groups of its own: no campaign_id then.
            only = group.holds_only(campaign_id)
            names = [n for n in COLUMNS if n != "campaign_id"] if only else COLUMNS
            table = groups.columns(path, [group.index], names)
            known = _Minute.of(table, None if only else campaign_id, minute_ms)
            with self._lock:
                if known.nbytes <= self._kept.maxsize:
                    self._kept[key] = known
        return known


def from_row_groups(
    groups: RowGroups,
    paths: Iterable[str],
    campaign_id: str,
    runs: Sequence[tuple[int, int]],
    width_ms: int,
    *,
    minutes: MinuteSums | None = None,
) -> Sums:
    """The campaign's totals by bucket in ``runs`` over the local files ``paths``: only the row
    groups whose statistics (or known per-campaign spans) can hold it in a run are read, and a
    run within one minute from ``minutes`` when given."""
    out: Sums = {}
    for path in paths:
        for lo, hi in runs:
            minute = lo - lo % MINUTE_MS
            chosen = groups.candidates(path, campaign_id, lo * 1000, hi * 1000)
            if minutes is not None and hi <= minute + MINUTE_MS:
                for _, group in chosen:
                    rows = minutes.minute(groups, path, group, campaign_id, minute)
                    found = rows.between(lo * 1000, hi * 1000)
                    if found is not None:
                        # Buckets are whole minutes: the run lies in the minute's bucket.
                        add(out, minute - minute % width_ms, found)
                continue
            # One run at a time so a group between two runs is not read; a group two runs
            # share is read once per run, each counting only its own rows.
            if chosen:
                table = groups.columns(path, sorted(g.index for _, g in chosen), COLUMNS)
                add_table(out, table, campaign_id, ((lo, hi),), width_ms)
    return out
