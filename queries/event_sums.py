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
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from cachetools import LRUCache

from pipeline.schema import MINUTE_MS
from pipeline.settings import QuerySettings
from queries.ordered import coded, event_values
from queries.row_groups import Group, RowGroups

#: Bytes of per-minute running totals a MinuteSums keeps by default (QUERY_MINUTE_SUMS_BYTES; a
#: Lake passes its setting).
CACHE_BYTES: Final = QuerySettings.query_minute_sums_bytes

#: Columns the totals are computed from.
COLUMNS: Final = ("campaign_id", "event_time", "event_type", "cost_micros", "revenue_micros")

#: A bucket's start (epoch ms) -> [impressions, clicks, conversions, spend, revenue].
Sums = dict[int, list[int]]


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    stamps = column.cast(pa.timestamp("us", "UTC")).cast(pa.int64())
    # Nulls (none in the schema) become a time no run holds.
    return np.asarray(stamps.fill_null(np.iinfo(np.int64).min).to_numpy(), dtype=np.int64)


def add(out: Sums, bucket: int, values: Iterable[int]) -> None:
    """Add one bucket's five totals to ``out``."""
    known = out.setdefault(bucket, [0, 0, 0, 0, 0])
    for k, v in enumerate(values):
        known[k] += int(v)


def _is(value: str) -> Callable[[pa.Array], npt.NDArray[np.bool_]]:
    return lambda values: np.asarray(
        pc.equal(values, pa.scalar(value)).fill_null(False).to_numpy(zero_copy_only=False),
        dtype=bool,
    )


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
        keep &= coded(table.column("campaign_id"), _is(campaign_id), False)
    rows = np.flatnonzero(keep)
    return all_times[rows], event_values(table, rows)


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


@dataclass(frozen=True)
class _GroupTotals:
    """Each campaign's totals over a whole row group. A question whose run holds the group's
    every time (its statistics say so) needs no more of it: in a compacted open hour, a
    partial minute meets a dozen consumer files' groups, and all but the one or two at the
    run's ends lie inside it. Built for every campaign from one decode, so the next campaign's
    question in the group finds it; without it, each campaign's first question in a minute
    decoded its ~11 groups (13 ms), and at the start of a minute every question was such a
    first one (stats p99 85 ms, 50M-event lake)."""

    totals: dict[str, list[int]]

    @classmethod
    def of(cls, table: pa.Table, only: str | None) -> _GroupTotals:
        """From the group's rows (``only``: the one campaign they all are, read without their
        campaign_id column)."""
        rows = table.num_rows
        values = event_values(table, np.arange(rows))
        if only is not None:
            return cls({only: values.sum(axis=0).tolist()} if rows else {})
        index: dict[str, int] = {}

        def codes(dictionary: pa.Array) -> npt.NDArray[np.int64]:
            return np.asarray(
                [
                    -1 if v is None else index.setdefault(v, len(index))
                    for v in dictionary.to_pylist()
                ],
                dtype=np.int64,
            )

        code = coded(table.column("campaign_id"), codes, -1)
        names = list(index)
        keep = np.flatnonzero(code >= 0)
        code, values = code[keep], values[keep]
        if len(code) > 1 and bool((code[1:] < code[:-1]).any()):
            order = np.argsort(code, kind="stable")
            code, values = code[order], values[order]
        starts = np.flatnonzero(np.diff(code, prepend=-1) != 0)
        sums = np.add.reduceat(values, starts, axis=0) if len(starts) else values[:0]
        found = zip(code[starts].tolist(), sums.tolist(), strict=True)
        return cls({names[c]: row for c, row in found})

    @property
    def nbytes(self) -> int:
        # A name, a list and five ints a campaign: tracemalloc measured 240-310 bytes each (10k
        # to 100 campaigns a group); 400 keeps the cache within its setting.
        return 400 * len(self.totals) + 64


class MinuteSums:
    """Each asked campaign's rows of a row group within one minute, as running totals, and each
    campaign's totals over a whole row group; thread-safe. A stats question with rollups reads
    raw only the partial minute at ``until``, and the next question on the campaign (a later
    ``until``) mostly falls in the same minute: it is then two binary searches, not a row group
    decoded again (4 ms at 122,880 rows). Kept per row group, not per file and minute: a busy
    campaign's minute spans dozens of a clustered hour's 16,384-row groups, and reading the
    whole minute at its first question (331 ms for 540k rows) cost more than reading, question
    by question, the groups each ``until`` needs."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._kept: LRUCache[tuple[object, ...], _Minute | _GroupTotals] = LRUCache(
            cache_bytes, getsizeof=lambda m: m.nbytes
        )
        self._lock = threading.Lock()

    def _keep(self, key: tuple[object, ...], value: _Minute | _GroupTotals) -> None:
        with self._lock:
            if value.nbytes <= self._kept.maxsize:
                self._kept[key] = value

    def minute(
        self, groups: RowGroups, path: str, group: Group, campaign_id: str, minute_ms: int
    ) -> _Minute:
        """The campaign's rows of ``group`` of ``path`` in the minute (kept while it fits)."""
        key = (path, group.index, campaign_id, minute_ms)
        with self._lock:
            known = self._kept.get(key)
        if isinstance(known, _Minute):
            return known
        # A clustered hour's busy campaign has row groups of its own: no campaign_id then.
        only = group.holds_only(campaign_id)
        names = [n for n in COLUMNS if n != "campaign_id"] if only else COLUMNS
        table = groups.columns(path, [group.index], names)
        found = _Minute.of(table, None if only else campaign_id, minute_ms)
        self._keep(key, found)
        return found

    def whole(
        self, groups: RowGroups, path: str, group: Group, campaign_id: str
    ) -> list[int] | None:
        """The campaign's totals over all of ``group`` of ``path`` (None when it has no row)."""
        key = (path, group.index)
        with self._lock:
            known = self._kept.get(key)
        if not isinstance(known, _GroupTotals):
            single = group.campaign_nulls == 0 and group.min_campaign == group.max_campaign
            only = group.min_campaign if single else None
            skip = ("event_time",) if only is None else ("event_time", "campaign_id")
            names = [n for n in COLUMNS if n not in skip]
            known = _GroupTotals.of(groups.columns(path, [group.index], names), only)
            self._keep(key, known)
        return known.totals.get(campaign_id)


def _whole_bucket(group: Group, lo_ms: int, hi_ms: int, width_ms: int) -> int | None:
    """The one bucket every row of ``group`` falls in, when all of them lie in [lo, hi)."""
    if not group.within(lo_ms * 1000, hi_ms * 1000):
        return None
    assert group.min_us is not None and group.max_us is not None
    first, last = group.min_us // 1000, group.max_us // 1000
    bucket = first - first % width_ms
    return bucket if last - last % width_ms == bucket else None


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
    groups whose statistics (or known per-campaign spans) can hold it in a run are read; with
    ``minutes``, a group the run holds whole (within one bucket) from its totals, and a run
    within one minute from its running totals."""
    out: Sums = {}
    for path in paths:
        for lo, hi in runs:
            minute = lo - lo % MINUTE_MS
            rest = []
            for _, group in groups.candidates(path, campaign_id, lo * 1000, hi * 1000):
                bucket = _whole_bucket(group, lo, hi, width_ms)
                if minutes is None or bucket is None:
                    rest.append(group)
                    continue
                found = minutes.whole(groups, path, group, campaign_id)
                if found is not None:  # rows that count nothing still make their bucket
                    add(out, bucket, found)
            if minutes is not None and hi <= minute + MINUTE_MS:
                for group in rest:
                    rows = minutes.minute(groups, path, group, campaign_id, minute)
                    within = rows.between(lo * 1000, hi * 1000)
                    if within is not None:
                        # Buckets are whole minutes: the run lies in the minute's bucket.
                        add(out, minute - minute % width_ms, within)
                continue
            # One run at a time so a group between two runs is not read; a group two runs
            # share is read once per run, each counting only its own rows.
            if rest:
                table = groups.columns(path, sorted(g.index for g in rest), COLUMNS)
                add_table(out, table, campaign_id, ((lo, hi),), width_ms)
    return out
