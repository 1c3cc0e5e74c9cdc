"""A campaign's newest events in local Parquet files, read a row group at a time.

Every file of a table version is immutable (Delta never rewrites a path), so each file's footer
is read once, and a decoded row group, ordered by (campaign_id, event_time, event_id)
(:class:`queries.ordered.OrderedRows`), stays right for as long as it is kept. A question then
reads only the row groups whose footer statistics say they can hold the campaign in its time
range, and a row group asked again (the newest ones of an unclustered hour hold every campaign,
so every campaign's question asks for them) is a binary search and a take. Measured on a
50M-event lake (the open hour compacted but not clustered, 122,880-row groups): 2.3 ms a
question at the median against 24 ms for DuckDB's scan of the same files. A clustered hour gives
each campaign row groups of its own, which such a cache would churn through: those files are
left to DuckDB (:meth:`RowGroups.clustered`).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq
from cachetools import LRUCache

from pipeline.settings import QuerySettings
from queries.ordered import EVENT_FIELDS, OrderedRows, plain

#: Arrow bytes of decoded row groups a RowGroups keeps by default (QUERY_ROW_GROUPS_BYTES; a
#: Lake passes its setting).
CACHE_BYTES: Final = QuerySettings.query_row_groups_bytes
#: Files whose footers one process keeps.
FOOTERS: Final = 4096
#: Row groups whose per-campaign time spans one process keeps (a few hundred bytes each).
SPANS: Final = 65_536
#: Row groups of a clustered file at most this big are read here too: a campaign's newest
#: group then costs ~3 ms to decode and ~1.5 MB to keep, where DuckDB's scan of the file cost
#: 30 ms (16,384-row groups, 50M-event lake). Bigger ones (122,880 rows: 11 MB, 38 ms to decode
#: and order) would churn through the cache: DuckDB reads those.
SMALL_GROUP_ROWS: Final = 32_768
#: A time later than any: the newest a group of unknown span can hold.
_UNKNOWN: Final = 1 << 62
#: Columns read from a row group.
_COLUMNS: Final = (*(n for n in EVENT_FIELDS if n != "time_ms"), "event_time")
#: String columns read as dictionaries (less memory; the order decodes what it needs).
_DICTIONARIES: Final = (
    "event_type",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "advertiser_id",
    "device_type",
    "country",
)


@dataclass(frozen=True)
class Group:
    """One row group's footer statistics; None where the footer does not say."""

    index: int
    rows: int
    min_campaign: str | None
    max_campaign: str | None
    min_us: int | None
    max_us: int | None
    #: Rows without a campaign_id (None: the footer does not say).
    campaign_nulls: int | None = None
    #: Rows without an event_time (None: the footer does not say).
    time_nulls: int | None = None

    def holds_only(self, campaign_id: str) -> bool:
        """Whether every row of the group is the campaign's (its statistics say so)."""
        return self.campaign_nulls == 0 and self.min_campaign == self.max_campaign == campaign_id

    def within(self, since_us: int, until_us: int) -> bool:
        """Whether every row of the group has a time in [since, until) (its statistics say so)."""
        return (
            self.time_nulls == 0
            and self.min_us is not None
            and self.max_us is not None
            and since_us <= self.min_us
            and self.max_us < until_us
        )

    def may_hold(self, campaign_id: str, since_us: int | None, until_us: int | None) -> bool:
        """Whether the group can hold the campaign's rows with times in [since, until)."""
        if self.rows == 0:
            return False
        if self.min_campaign is not None and campaign_id < self.min_campaign:
            return False
        if self.max_campaign is not None and campaign_id > self.max_campaign:
            return False
        if since_us is not None and self.max_us is not None and self.max_us < since_us:
            return False
        return not (until_us is not None and self.min_us is not None and self.min_us >= until_us)


def _bounds(meta: pq.RowGroupMetaData, column: int | None) -> tuple[object, object]:
    if column is None:
        return None, None
    stats = meta.column(column).statistics
    if stats is None or not stats.has_min_max:
        return None, None
    if stats.physical_type == "INT64":
        return stats.min_raw, stats.max_raw
    return stats.min, stats.max


#: Microseconds per unit of a Parquet timestamp whose statistics bound a row group exactly.
_UNITS: Final = {"microseconds": 1, "milliseconds": 1000}


def _unit(column: pq.ColumnSchema) -> str:
    text = str(column.logical_type)
    return text.split("timeUnit=", 1)[1].split(",", 1)[0] if "timeUnit=" in text else ""


def _nulls(meta: pq.RowGroupMetaData, column: int | None) -> int | None:
    stats = None if column is None else meta.column(column).statistics
    return stats.null_count if stats is not None and stats.has_null_count else None


def _groups(metadata: pq.FileMetaData) -> list[Group]:
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    campaign = names.index("campaign_id") if "campaign_id" in names else None
    time = names.index("event_time") if "event_time" in names else None
    # Raw statistics of a timestamp are in its unit: microseconds per unit (none: unbounded).
    scale = None if time is None else _UNITS.get(_unit(metadata.schema.column(time)))
    out = []
    for i in range(metadata.num_row_groups):
        meta = metadata.row_group(i)
        low, high = _bounds(meta, campaign)
        first, last = _bounds(meta, time if scale is not None else None)
        if scale is not None and isinstance(first, int) and isinstance(last, int):
            first, last = first * scale, last * scale
        out.append(
            Group(
                i,
                meta.num_rows,
                low if isinstance(low, str) else None,
                high if isinstance(high, str) else None,
                first if isinstance(first, int) else None,
                last if isinstance(last, int) else None,
                _nulls(meta, campaign),
                _nulls(meta, time),
            )
        )
    return out


@dataclass(frozen=True)
class _Footer:
    """A file's footer and what every question of it needs, worked out once."""

    metadata: pq.FileMetaData
    groups: list[Group]
    #: Whether the groups follow one another in campaign_id (see :meth:`RowGroups.clustered`).
    clustered: bool
    #: Clustered files: the max_campaign of each group but the last, ascending (all known).
    highs: list[str]
    largest: int

    @classmethod
    def of(cls, metadata: pq.FileMetaData, groups: list[Group] | None = None) -> _Footer:
        """The footer and its groups (read from it unless given)."""
        groups = _groups(metadata) if groups is None else groups
        clustered = len(groups) > 1 and all(
            a.max_campaign is not None
            and b.min_campaign is not None
            and a.max_campaign <= b.min_campaign
            for a, b in itertools.pairwise(groups)
        )
        highs = [g.max_campaign or "" for g in groups[:-1]] if clustered else []
        return cls(metadata, groups, clustered, highs, max((g.rows for g in groups), default=0))

    def holding(self, campaign_id: str) -> Sequence[Group]:
        """The groups whose campaign range can hold ``campaign_id`` (a superset)."""
        if not self.clustered:
            return self.groups
        # Both bounds ascend: from the first group whose max is not below the campaign (the
        # last group's max may be unknown: it is the first when all others are below), on
        # while the min is not above it (an unknown min, the first group's, is below all).
        first = bisect.bisect_left(self.highs, campaign_id)
        last = first
        while last < len(self.groups) and (self.groups[last].min_campaign or "") <= campaign_id:
            last += 1
        return self.groups[first:last]


class RowGroups:
    """Footers and decoded row groups of local files, by path; thread-safe."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self._footers: LRUCache[str, _Footer] = LRUCache(FOOTERS)
        self._decoded: LRUCache[tuple[str, int], OrderedRows] = LRUCache(
            cache_bytes, getsizeof=lambda rows: rows.nbytes
        )
        #: Each decoded group's campaigns and their (first, last) event time, kept after the
        #: rows are evicted: a group seen once is skipped or ordered by its exact span.
        self._spans: LRUCache[tuple[str, int], dict[str, tuple[int, int]]] = LRUCache(SPANS)
        self._lock = threading.Lock()

    def groups(self, path: str) -> list[Group]:
        """The file's row groups (footer read on first use)."""
        return self._footer(path).groups

    def _footer(self, path: str) -> _Footer:
        with self._lock:
            known = self._footers.get(path)
        if known is None:
            known = _Footer.of(pq.read_metadata(path))
            with self._lock:
                self._footers[path] = known
        return known

    def candidates(
        self, path: str, campaign_id: str, since_us: int | None, until_us: int | None
    ) -> list[tuple[int, Group]]:
        """The file's groups that can hold the campaign in [since, until), each with the newest
        time it can hold there (unknown: newer than anything). A clustered file's are found by
        bisection: testing each of a 50M-event hour's ~3,000 groups was a quarter of a warm
        stats question."""
        footer = self._footer(path)
        out = []
        for group in footer.holding(campaign_id):
            if not group.may_hold(campaign_id, since_us, until_us):
                continue
            with self._lock:
                spans = self._spans.get((path, group.index))
            if spans is None and footer.clustered and not group.holds_only(campaign_id):
                # Where one campaign's rows end and the next one's begin: the group's times
                # span both campaigns' (the whole hour), so it came first in every newest-first
                # search and was decoded whole (11 columns and an order, ~4 ms) for rows it
                # mostly did not have. Two columns say each campaign's span instead.
                spans = self._learn_spans(path, group.index)
            if spans is None:
                out.append((_UNKNOWN if group.max_us is None else group.max_us, group))
                continue
            span = spans.get(campaign_id)
            if span is None or (since_us is not None and span[1] < since_us):
                continue
            if until_us is not None and span[0] >= until_us:
                continue
            out.append((span[1], group))
        return out

    def cacheable(self, path: str) -> bool:
        """Whether the file is read here: unclustered, or clustered in small row groups."""
        footer = self._footer(path)
        return not footer.clustered or footer.largest <= SMALL_GROUP_ROWS

    def clustered(self, path: str) -> bool:
        """Whether the file's row groups follow one another in campaign_id (a clustered hour):
        each campaign then has row groups of its own, which a cache shared by every
        campaign's questions would only churn through."""
        return self._footer(path).clustered

    def columns(self, path: str, indices: Sequence[int], names: Sequence[str]) -> pa.Table:
        """Row groups ``indices`` of the file, in that order, only the ``names`` it has (read
        together, not kept: one open of the file for all of them)."""
        metadata = self._footer(path).metadata
        present = set(metadata.schema.names)
        dictionaries = [c for c in _DICTIONARIES if c in present]
        reader = pq.ParquetFile(path, metadata=metadata, read_dictionary=dictionaries)
        wanted = [n for n in names if n in present]
        # One thread: Arrow's pool, shared by every request thread of the worker, made a
        # 16,384-row group cost 6 ms at the median (2 ms alone) and far more under load.
        return reader.read_row_groups(list(indices), columns=wanted, use_threads=False)

    def _learn_spans(self, path: str, index: int) -> dict[str, tuple[int, int]]:
        """Each campaign's (first, last) event time in row group ``index``, from its
        campaign_id and event_time columns alone (kept as :meth:`ordered` keeps them)."""
        table = self.columns(path, [index], ("campaign_id", "event_time"))
        spans = _spans(table)
        with self._lock:
            self._spans[(path, index)] = spans
        return spans

    def ordered(self, path: str, index: int) -> OrderedRows:
        """Row group ``index`` of the file, decoded and ordered (kept while it fits)."""
        key = (path, index)
        with self._lock:
            known = self._decoded.get(key)
        if known is not None:
            return known
        rows = OrderedRows(_with_all_columns(self.columns(path, [index], _COLUMNS)))
        with self._lock:
            self._spans[key] = rows.spans()
            if rows.nbytes <= self._decoded.maxsize:
                self._decoded[key] = rows
        return rows


def _spans(table: pa.Table) -> dict[str, tuple[int, int]]:
    """Each campaign's (first, last) event time in microseconds, in any row order."""
    if "campaign_id" not in table.column_names or "event_time" not in table.column_names:
        return {}
    stamps = table.column("event_time").cast(pa.timestamp("us", "UTC")).cast(pa.int64())
    by_campaign = (
        pa.table({"campaign_id": plain(table.column("campaign_id")), "t": stamps})
        .group_by("campaign_id")
        .aggregate([("t", "min"), ("t", "max")])
    )
    return {
        c: (lo, hi)
        for c, lo, hi in zip(
            by_campaign.column("campaign_id").to_pylist(),
            by_campaign.column("t_min").to_pylist(),
            by_campaign.column("t_max").to_pylist(),
            strict=True,
        )
        if c is not None and lo is not None
    }


def _with_all_columns(table: pa.Table) -> pa.Table:
    """``table`` with any event column its file lacks added as nulls (older files)."""
    for name in _COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), pa.string()))
    return table
