"""Stored events, newest first: the latest, a campaign's, and how many there are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from queries.lake import FileStats, Lake

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
        if self.campaign_id is not None:
            clauses.append("campaign_id = $campaign_id")
            params["campaign_id"] = self.campaign_id
        if self.event_type is not None:
            clauses.append("event_type = $event_type")
            params["event_type"] = self.event_type
        if self.since_ms is not None:
            clauses.append("event_time >= make_timestamptz($since_ms * 1000)")
            params["since_ms"] = self.since_ms
        if self.until_ms is not None:
            clauses.append("event_time < make_timestamptz($until_ms * 1000)")
            params["until_ms"] = self.until_ms
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


def _newest(stats: FileStats) -> int:
    """The file's newest event time; unknown counts as newer than anything."""
    return 1 << 62 if stats.max_ms is None else stats.max_ms


def newest(lake: Lake, limit: int, where: EventFilter | None = None) -> list[Event]:
    """Up to ``limit`` matching events by (event_time, event_id), newest first.

    Reads as few files as it can: files by newest event first, enough to hold ``limit`` rows;
    once ``limit`` rows are found, any other file whose newest event is at least as new as the
    last row found is added and the query run once more, which makes the answer exact.
    """
    where = where or EventFilter()
    since, until = where.window()
    clause, params = where.where()
    params["limit"] = limit
    sql = f"""
        SELECT {_COLUMNS} FROM {{events}} WHERE {clause}
        ORDER BY event_time DESC, event_id DESC LIMIT $limit"""

    def attempt() -> list[Event]:
        files = lake.files("events", since_ms=since, until_ms=until)
        stats = lake.stats("events", files)
        candidates = sorted(
            (f for f in files if stats[f].overlaps(since, until)),
            key=lambda f: -_newest(stats[f]),
        )
        take, rows = 0, 0
        while take < len(candidates) and rows < limit:
            rows += stats[candidates[take]].rows
            take += 1
        take = max(take, 1)
        while True:
            chosen = candidates[:take]
            found = [Event(*r) for r in lake.query(sql, params, sources={"events": chosen})]
            if take >= len(candidates):
                return found
            if len(found) == limit:
                last = found[-1].time_ms
                more = [f for f in candidates[take:] if _newest(stats[f]) >= last]
                if not more:
                    return found
                chosen = chosen + more
                return [Event(*r) for r in lake.query(sql, params, sources={"events": chosen})]
            take *= 2

    return lake.read(attempt)


def page(lake: Lake, limit: int, where: EventFilter) -> tuple[list[Event], Position | None]:
    """A newest-first page and where the next one starts (None when there is no more)."""
    found = newest(lake, limit + 1, where)
    if len(found) <= limit:
        return found, None
    last = found[limit - 1]
    return found[:limit], Position(last.time_ms, last.event_id)


def count(lake: Lake) -> int:
    """How many events the lake holds (from Parquet footers: no data is read)."""

    def attempt() -> int:
        files = lake.files("events")
        return sum(s.rows for s in lake.stats("events", files).values())

    return lake.read(attempt)
