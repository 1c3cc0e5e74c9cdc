"""Stored events, newest first: the latest, a campaign's, and how many there are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from queries.lake import FileStats, Lake, View
from queries.ordered import Cursor, OrderedRows
from queries.row_groups import RowGroups

#: Columns of an event as the API shows it, with event_time as epoch milliseconds.
_COLUMNS: Final = """event_id, event_type, epoch_ms(event_time) AS time_ms, campaign_id, ad_id,
    publisher_id, advertiser_id, device_type, country, cost_micros, revenue_micros"""


@dataclass(frozen=True)
class Event:
    """One stored event; money in integer micros."""

    event_id: str
    event_type: str
    time_ms: int
    campaign_id: str
    ad_id: str
    publisher_id: str
    advertiser_id: str | None
    device_type: str | None
    country: str | None
    cost_micros: int
    revenue_micros: int


@dataclass(frozen=True)
class Position:
    """Where a newest-first page ended: the last event's (event_time, event_id)."""

    time_ms: int
    event_id: str


#: The condition each optional filter field adds, with the field as its parameter.
_CLAUSES: Final = {
    "campaign_id": "campaign_id = $campaign_id",
    "event_type": "event_type = $event_type",
    "since_ms": "event_time >= make_timestamptz($since_ms * 1000)",
    "until_ms": "event_time < make_timestamptz($until_ms * 1000)",
}


@dataclass(frozen=True)
class EventFilter:
    """Which events: all arguments optional; since inclusive, until exclusive (epoch ms)."""

    campaign_id: str | None = None
    event_type: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    before: Position | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = ["true"]
        params: dict[str, Any] = {}
        for name, clause in _CLAUSES.items():
            value = getattr(self, name)
            if value is not None:
                clauses.append(clause)
                params[name] = value
        if self.before is not None:
            clauses.append(
                "(event_time < make_timestamptz($before_ms * 1000) OR "
                "(event_time = make_timestamptz($before_ms * 1000) AND event_id < $before_id))"
            )
            params["before_ms"] = self.before.time_ms
            params["before_id"] = self.before.event_id
        return " AND ".join(clauses), params

    def window(self) -> tuple[int | None, int | None]:
        """[since, until) in epoch ms that can hold matching events, for pruning files."""
        until = self.until_ms
        if self.before is not None:
            until = (
                self.before.time_ms + 1 if until is None else min(until, self.before.time_ms + 1)
            )
        return self.since_ms, until


#: The newest event time of a file whose footer does not say: newer than anything.
_UNKNOWN: Final = 1 << 62


def _newest(stats: FileStats) -> int:
    """The file's newest event time; unknown counts as newer than anything."""
    return _UNKNOWN if stats.max_ms is None else stats.max_ms


#: The first band of a chunk's newest events read; each next band reaches 8 times further back.
PROBE_MS: Final = 5_000


def newest(lake: Lake, limit: int, where: EventFilter | None = None) -> list[Event]:
    """Up to ``limit`` matching events by (event_time, event_id), newest first, from one
    snapshot of ``events``.

    Reads as few files as it can, each once: files by newest event first (for a campaign, only
    those whose log statistics say they can hold it), a growing chunk at a time, keeping the
    best ``limit`` rows; it stops once the next file's newest event is older than the last of
    them, as every file after it is too: the answer is exact. Within a chunk that spans a long
    time (compacted files, clustered by campaign), bands of time are read newest first, so that
    row groups older than what is needed are skipped by their statistics.
    """
    where = where or EventFilter()
    view = lake.view("events")
    clause, params = where.where()
    key = ("newest", limit, clause, tuple(sorted(params.items())))
    return view.remember(key, lambda: _search(view, limit, where))


def _search(view: View, limit: int, where: EventFilter) -> list[Event]:
    since, until = where.window()
    clause, params = where.where()
    params["limit"] = limit
    order = "ORDER BY event_time DESC, event_id DESC LIMIT $limit"
    lower = "event_time >= make_timestamptz($band_lo * 1000)"
    upper = "event_time < make_timestamptz($band_hi * 1000)"
    at_or_after = "event_time >= make_timestamptz($cut * 1000)"

    def band(chunk: list[str], lo: int | None, hi: int | None) -> list[Event]:
        if where.campaign_id is None:
            return on_storage(chunk, lo, hi)
        # A campaign's rows in memory come from each file's campaign order, not a scan, and
        # on local disk from the row groups that can hold them (queries.row_groups).
        limits = _Limits.of(where, lo, hi)
        memory = [f for f in chunk if f in table.small]
        disk = [f for f in chunk if f not in table.small]
        found = [e for f in memory for e in limits.newest(table.ordered(f), limit)]
        root, groups = table.local_root, view.lake.row_groups
        shared = [] if root is None else [f for f in disk if groups.cacheable(f"{root}/{f}")]
        if shared:
            found += _from_row_groups(groups, [f"{root}/{f}" for f in shared], limits, limit)
        if len(shared) < len(disk):
            found += on_storage([f for f in disk if f not in shared], lo, hi)
        return found

    def on_storage(chunk: list[str], lo: int | None, hi: int | None) -> list[Event]:
        bounds = [c for c, v in ((lower, lo), (upper, hi)) if v is not None]
        where = " AND ".join([clause, *bounds])
        values = {**params, **({"band_lo": lo} if lo is not None else {})}
        values |= {"band_hi": hi} if hi is not None else {}
        # Through Arrow (S3), late materialisation by hand: the band's limit-th newest time
        # from the time column alone, then whole rows at or after it only. A busy campaign
        # has 500k events a minute, and reading every column of them to keep 100 cost 1.8 s
        # a question; ties at the cut are all read, so the answer stays exact.
        if not view.lake.location.is_s3:
            # On local disk DuckDB's Parquet reader does this itself (top-N on the order
            # columns, then only those rows' other columns): one query, half the cost.
            sql = f"SELECT {_COLUMNS} FROM {{events}} WHERE {where} {order}"
            return [Event(*r) for r in view.query(sql, values, files={"events": chunk})]
        cut_sql = f"""SELECT epoch_ms(min(event_time)) FROM (
            SELECT event_time FROM {{events}} WHERE {where}
            ORDER BY event_time DESC LIMIT $limit)"""
        cut = view.query(cut_sql, values, files={"events": chunk})[0][0]
        if cut is None:
            return []
        sql = f"SELECT {_COLUMNS} FROM {{events}} WHERE {where} AND {at_or_after} {order}"
        rows = view.query(sql, {**values, "cut": cut}, files={"events": chunk})
        return [Event(*r) for r in rows]

    table = view.table("events")
    stats = table.stats
    candidates = view.files("events", since, until)
    if where.campaign_id is not None:
        bounds = table.bounds("campaign_id")
        candidates = [f for f in candidates if _may_hold(bounds[f], where.campaign_id)]
    candidates.sort(key=lambda f: -_newest(stats[f]))
    found: list[Event] = []
    at, step, rows = 0, 0, 0
    while step < len(candidates) and rows < limit:
        rows += stats[candidates[step]].rows
        step += 1
    step = max(step, 1)
    while at < len(candidates):
        if len(found) >= limit and _newest(stats[candidates[at]]) < found[-1].time_ms:
            break  # every file left holds only older events
        chunk = candidates[at : at + step]
        at, step = at + step, step * 2
        top = _newest(stats[chunk[0]]) if until is None else min(_newest(stats[chunk[0]]), until)
        oldest = min((stats[f].min_ms for f in chunk), key=lambda m: -1 if m is None else m)
        hi: int | None = None
        width = PROBE_MS
        while True:
            lo: int | None = top - width
            if oldest is None or top == _UNKNOWN or lo is None or lo <= oldest:
                lo = None  # the rest of the chunk
            found = sorted([*found, *band(chunk, lo, hi)], key=_order, reverse=True)[:limit]
            if lo is None or (len(found) >= limit and found[-1].time_ms >= lo):
                break  # what is left of the chunk is older than the last row kept
            hi, width = lo, width * 8
    return found


@dataclass(frozen=True)
class _Limits:
    """A campaign filter within a band [lo, hi), in the units of :mod:`queries.ordered`."""

    campaign_id: str
    since_us: int | None
    until_us: int | None
    event_type: str | None
    before: Cursor | None

    @classmethod
    def of(cls, where: EventFilter, lo: int | None, hi: int | None) -> _Limits:
        assert where.campaign_id is not None
        since = max((v for v in (where.since_ms, lo) if v is not None), default=None)
        until = min((v for v in (where.until_ms, hi) if v is not None), default=None)
        before = where.before
        return cls(
            where.campaign_id,
            None if since is None else since * 1000,
            None if until is None else until * 1000,
            where.event_type,
            None if before is None else Cursor(before.time_ms * 1000, before.event_id),
        )

    @property
    def newest_us(self) -> int | None:
        """The end of the range (exclusive) that can hold matching rows, cursor included."""
        ends = [self.until_us, None if self.before is None else self.before.time_us + 1]
        return min((e for e in ends if e is not None), default=None)

    def newest(self, rows: OrderedRows, limit: int) -> list[Event]:
        """The newest ``limit`` matching events of ``rows``."""
        found = rows.newest(
            self.campaign_id,
            limit,
            since_us=self.since_us,
            until_us=self.until_us,
            event_type=self.event_type,
            before=self.before,
        )
        return [Event(*r) for r in found]


def _from_row_groups(
    groups: RowGroups, paths: list[str], limits: _Limits, limit: int
) -> list[Event]:
    """The newest ``limit`` matching events of local files: their row groups that can hold
    them, newest first, until the next one holds only events older than the last row kept."""
    chosen = [
        (newest, group, path)
        for path in paths
        for newest, group in groups.candidates(
            path, limits.campaign_id, limits.since_us, limits.newest_us
        )
    ]
    chosen.sort(key=lambda c: -c[0])
    found: list[Event] = []
    for newest, group, path in chosen:
        # Sorted newest first (unknown first): every group left holds only older events.
        if len(found) >= limit and newest < found[-1].time_ms * 1000:
            break
        more = limits.newest(groups.ordered(path, group.index), limit)
        found = sorted([*found, *more], key=_order, reverse=True)[:limit]
    return found


def _order(e: Event) -> tuple[int, str]:
    """The sort key of the queries: (event_time, event_id); ids compare as UTF-8 bytes do."""
    return e.time_ms, e.event_id


def _may_hold(bounds: tuple[str | None, str | None], value: str) -> bool:
    low, high = bounds
    return (low is None or low <= value) and (high is None or value <= high)


def page(lake: Lake, limit: int, where: EventFilter) -> tuple[list[Event], Position | None]:
    """A newest-first page and where the next one starts (None when there is no more)."""
    found = newest(lake, limit + 1, where)
    if len(found) <= limit:
        return found, None
    last = found[limit - 1]
    return found[:limit], Position(last.time_ms, last.event_id)


def count(lake: Lake) -> int:
    """How many events the lake holds (from the Delta log: no data is read)."""
    return lake.view("events").count("events")
