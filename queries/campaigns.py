"""Campaign performance: time series per campaign and leaderboards, from events or rollups."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from pipeline.schema import MINUTE_MS
from queries import event_sums, rollups
from queries.lake import FileStats, Lake, View
from queries.rollups import Coverage

Granularity = Literal["minute", "hour", "day"]
GRANULARITIES: Final[tuple[Granularity, ...]] = ("minute", "hour", "day")
BUCKET_MS: Final[dict[str, int]] = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
Metric = Literal["spend", "revenue", "clicks", "conversions", "ctr", "roas"]
METRICS: Final[tuple[Metric, ...]] = ("spend", "revenue", "clicks", "conversions", "ctr", "roas")

#: What each leaderboard metric orders by; fixed SQL keyed by a validated name, never user text.
_ORDER: Final[dict[str, str]] = {
    "spend": "spend_micros",
    "revenue": "revenue_micros",
    "clicks": "clicks",
    "conversions": "conversions",
    "ctr": "clicks / nullif(impressions, 0)",
    "roas": "revenue_micros / nullif(spend_micros, 0)",
}

_TOTALS: Final = """
    count(*) FILTER (WHERE event_type = 'impression') AS impressions,
    count(*) FILTER (WHERE event_type = 'click') AS clicks,
    count(*) FILTER (WHERE event_type = 'conversion') AS conversions,
    CAST(coalesce(sum(cost_micros), 0) AS BIGINT) AS spend_micros,
    CAST(coalesce(sum(revenue_micros), 0) AS BIGINT) AS revenue_micros"""


@dataclass(frozen=True)
class Totals:
    """Counts and money (integer micros) of some set of events."""

    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    spend_micros: int = 0
    revenue_micros: int = 0


@dataclass(frozen=True)
class Ratios:
    """The standard derived metrics; None where the denominator is zero. Cost ones in micros."""

    ctr: float | None
    cvr: float | None
    cpm_micros: float | None
    cpc_micros: float | None
    cpa_micros: float | None
    roas: float | None


def _div(num: float, den: float) -> float | None:
    return num / den if den else None


def ratios(t: Totals) -> Ratios:
    """CTR=clicks/impressions, CVR=conversions/clicks, CPM=spend/impressions*1000,
    CPC=spend/clicks, CPA=spend/conversions, ROAS=revenue/spend."""
    cpm = _div(t.spend_micros, t.impressions)
    return Ratios(
        ctr=_div(t.clicks, t.impressions),
        cvr=_div(t.conversions, t.clicks),
        cpm_micros=None if cpm is None else cpm * 1000,
        cpc_micros=_div(t.spend_micros, t.clicks),
        cpa_micros=_div(t.spend_micros, t.conversions),
        roas=_div(t.revenue_micros, t.spend_micros),
    )


@dataclass(frozen=True)
class Bucket:
    """One point of a campaign's time series: the bucket's start (epoch ms) and its totals."""

    start_ms: int
    totals: Totals


@dataclass(frozen=True)
class CampaignTotals:
    """One leaderboard row."""

    campaign_id: str
    campaign_name: str | None
    advertiser_id: str | None
    totals: Totals


class StatsSource(Protocol):
    """Where a campaign's time series comes from. Every source gives the same answer."""

    def series(
        self, lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
    ) -> list[Bucket]:
        """Non-empty buckets of [since, until), oldest first (since is rounded down to a bucket)."""


def _bucket_floor(ms: int, granularity: Granularity) -> int:
    width = BUCKET_MS[granularity]
    return ms - ms % width


Run = tuple[int, int]
#: A plan split into more [start, end) runs than this is read from events alone (still exact).
MAX_RUNS: Final = 64


@dataclass(frozen=True)
class Plan:
    """Where each part of a series' [since, until) is read from: disjoint runs that cover it."""

    #: Whole buckets, from ``rollups_<granularity>``.
    rollup: tuple[Run, ...] = ()
    #: Whole minutes, from ``rollups_minute`` (parts of buckets the coarser level cannot answer).
    minutes: tuple[Run, ...] = ()
    #: The rest, from ``events``: dirty minutes, minutes older than the rollups, a partial minute.
    raw: tuple[Run, ...] = ()


def _extend(runs: list[Run], start: int, end: int) -> None:
    if start >= end:
        return
    if runs and runs[-1][1] == start:
        runs[-1] = (runs[-1][0], end)
    else:
        runs.append((start, end))


def _split_minutes(
    start: int, stop: int, cov: Coverage, minutes: list[Run], raw: list[Run]
) -> None:
    """[start, stop) minute by minute: minute rollups where they answer, events elsewhere."""
    whole_end = stop - stop % MINUTE_MS
    horizon = cov.since_ms.get("minute")
    at = whole_end if horizon is None else min(max(start, horizon), whole_end)
    _extend(raw, start, at)  # older than the minute rollups kept
    i = bisect.bisect_left(cov.dirty, at)
    while at < whole_end:
        dirty = min(cov.dirty[i], whole_end) if i < len(cov.dirty) else whole_end
        _extend(minutes, at, dirty)
        _extend(raw, dirty, min(dirty + MINUTE_MS, whole_end))
        at, i = dirty + MINUTE_MS, i + 1
    _extend(raw, whole_end, stop)  # the partial minute at until


def plan(since_ms: int, until_ms: int, granularity: Granularity, cov: Coverage | None) -> Plan:
    """How to answer [since, until) (since rounded down to a bucket) given what rollups cover.

    A bucket comes from its own level when that level answers it whole; otherwise minute by
    minute, from minute rollups where they answer and from events where they do not (minutes
    batches not rolled up yet touched, and the partial minute at ``until``).
    """
    since_ms = _bucket_floor(since_ms, granularity)
    if cov is None:
        return Plan(raw=((since_ms, until_ms),))
    width = BUCKET_MS[granularity]
    rollup: list[Run] = []
    minutes: list[Run] = []
    raw: list[Run] = []
    bucket = since_ms
    while bucket < until_ms:
        end = bucket + width
        if end <= until_ms and cov.answers(granularity, bucket, end):
            _extend(rollup, bucket, end)
        else:
            _split_minutes(bucket, min(end, until_ms), cov, minutes, raw)
        bucket = end
    if len(rollup) + len(minutes) + len(raw) > MAX_RUNS:
        return Plan(raw=((since_ms, until_ms),))
    return Plan(tuple(rollup), tuple(minutes), tuple(raw))


def _within(column: str, runs: Sequence[Run], key: str, params: dict[str, object]) -> str:
    """``column`` in any of ``runs``, as SQL with the bounds bound under ``key``."""
    clauses = []
    for i, (lo, hi) in enumerate(runs):
        params[f"{key}_lo{i}"], params[f"{key}_hi{i}"] = lo, hi
        clauses.append(
            f"({column} >= make_timestamptz(${key}_lo{i} * 1000) "
            f"AND {column} < make_timestamptz(${key}_hi{i} * 1000))"
        )
    return "(" + " OR ".join(clauses) + ")"


_ROLLUP_PART: Final = """
    SELECT epoch_ms(date_trunc($granularity, bucket)) AS b, impressions AS i, clicks AS c,
           conversions AS v, spend_micros AS s, revenue_micros AS r
    FROM {{{table}}} WHERE campaign_id = $campaign_id AND {where}"""
_RAW_PART: Final = """
    SELECT epoch_ms(date_trunc($granularity, event_time)) AS b,
           count(*) FILTER (WHERE event_type = 'impression') AS i,
           count(*) FILTER (WHERE event_type = 'click') AS c,
           count(*) FILTER (WHERE event_type = 'conversion') AS v,
           coalesce(sum(cost_micros), 0) AS s, coalesce(sum(revenue_micros), 0) AS r
    FROM {{events}} WHERE campaign_id = $campaign_id AND {where} GROUP BY b"""


def _overlapping(view: View, name: str, runs: Sequence[Run]) -> list[str]:
    """Files of ``name`` that can hold rows in one of ``runs``."""
    lo, hi = runs[0][0], runs[-1][1]
    if name != "events":
        return view.local_files(name, lo, hi)
    stats = view.table(name).stats
    ends = [end for _, end in runs]

    def overlaps(s: FileStats) -> bool:
        if s.min_ms is None or s.max_ms is None:
            return True
        i = bisect.bisect_right(ends, s.min_ms)  # the first run that ends after the file begins
        return i < len(runs) and runs[i][0] <= s.max_ms

    return [f for f in view.files(name, lo, hi) if overlaps(stats[f])]


def _plan_parts(
    view: View,
    p: Plan,
    rollup_table: str,
    templates: tuple[str, str],
    params: dict[str, object],
    *,
    events: list[str] | None = None,
) -> tuple[list[str], dict[str, list[str]]]:
    """One SQL part per source a plan reads (``templates``: for rollups, for events), with the
    runs' bounds bound in ``params``, and the files each source needs (``events``: these
    events files rather than every one the raw runs overlap)."""
    parts: list[str] = []
    files: dict[str, set[str]] = {}
    for table, runs, key in (
        (rollup_table, p.rollup, "r"),
        ("rollups_minute", p.minutes, "m"),
        ("events", p.raw, "e"),
    ):
        if table == "events" and events is not None:
            chosen = events if runs else []
        else:
            chosen = _overlapping(view, table, runs) if runs else []
        if not chosen:
            continue
        files.setdefault(table, set()).update(chosen)
        column = "event_time" if table == "events" else "bucket"
        template = templates[table == "events"]
        parts.append(template.format(table=table, where=_within(column, runs, key, params)))
    return parts, {k: sorted(v) for k, v in files.items()}


@dataclass(frozen=True)
class _RawFiles:
    """The events files that can hold a campaign in a plan's raw runs, by how they are read."""

    #: Local files on disk, read by their row groups (:func:`event_sums.from_row_groups`).
    disk: list[str]
    #: Files held in memory (the uncompacted tail), summed from their campaign order.
    memory: list[str]
    #: The rest (on S3, not held), read by DuckDB.
    others: list[str]


def _raw_files(view: View, campaign_id: str, runs: Sequence[Run]) -> _RawFiles:
    """Where the events files that can hold the campaign in ``runs`` are read from."""
    if not runs:
        return _RawFiles([], [], [])
    table = view.table("events")
    bounds = table.bounds("campaign_id")

    def may_hold(path: str) -> bool:
        low, high = bounds.get(path, (None, None))
        return (low is None or low <= campaign_id) and (high is None or campaign_id <= high)

    chosen = [f for f in _overlapping(view, "events", runs) if may_hold(f)]
    memory = [f for f in chosen if f in table.small]
    stored = [f for f in chosen if f not in table.small]
    if table.local_root is None:
        return _RawFiles([], memory, stored)
    return _RawFiles(stored, memory, [])


def _rollups_from_memory(
    view: View, campaign_id: str, granularity: Granularity, p: Plan, sums: event_sums.Sums
) -> bool:
    """Add the plan's rollup parts to ``sums`` from the rollup files' rows kept in memory
    (:mod:`queries.rollup_rows`), the same totals as ``_ROLLUP_PART`` sums; False, ``sums``
    unchanged, when DuckDB must read them."""
    width = BUCKET_MS[granularity]
    rows = view.lake.rollup_rows
    found: event_sums.Sums = {}
    for table, runs in ((f"rollups_{granularity}", p.rollup), ("rollups_minute", p.minutes)):
        if runs and not rows.add(found, _overlapping(view, table, runs), campaign_id, runs, width):
            return False
    for bucket, values in found.items():
        event_sums.add(sums, bucket, values)
    return True


def read_plan(view: View, campaign_id: str, granularity: Granularity, p: Plan) -> list[Bucket]:
    """The series a plan describes, summed per bucket: rollups from their files' rows kept in
    memory (:mod:`queries.rollup_rows`; else through DuckDB), local events files by their row
    groups (:mod:`queries.event_sums`), events in memory from each file's campaign order, events
    on S3 through DuckDB."""
    params: dict[str, object] = {"campaign_id": campaign_id, "granularity": granularity}
    templates = (_ROLLUP_PART, _RAW_PART)
    raw = _raw_files(view, campaign_id, p.raw)
    table, lake, width = view.table("events"), view.lake, BUCKET_MS[granularity]
    sums: event_sums.Sums = {}
    if raw.disk:
        paths = [f"{table.local_root}/{f}" for f in raw.disk]
        sums = event_sums.from_row_groups(
            lake.row_groups, paths, campaign_id, p.raw, width, minutes=lake.minute_sums
        )
    for f in raw.memory:
        rows = table.ordered(f)
        for lo, hi in p.raw:
            for bucket, values in rows.totals(campaign_id, lo * 1000, hi * 1000, width).items():
                event_sums.add(sums, bucket, values)
    if _rollups_from_memory(view, campaign_id, granularity, p, sums):
        p = Plan(raw=p.raw)  # what is left: events on S3 not held in memory, for DuckDB
    parts, files = _plan_parts(
        view, p, f"rollups_{granularity}", templates, params, events=raw.others
    )
    if parts:
        sql = f"""
            SELECT b, CAST(sum(i) AS BIGINT), CAST(sum(c) AS BIGINT), CAST(sum(v) AS BIGINT),
                   CAST(sum(s) AS BIGINT), CAST(sum(r) AS BIGINT)
            FROM ({" UNION ALL ".join(parts)}) GROUP BY b ORDER BY b"""
        for r in view.query(sql, params, files=files):
            event_sums.add(sums, int(r[0]), r[1:])
    return [Bucket(b, Totals(*sums[b])) for b in sorted(sums)]


class RawEventsSource:
    """Aggregates events at query time."""

    def series(
        self, lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
    ) -> list[Bucket]:
        p = plan(since_ms, until_ms, granularity, None)
        return read_plan(lake.view("events"), campaign_id, granularity, p)


class RollupSource:
    """Rollups (``rollups_<granularity>``, ``rollups_minute``) for what they answer exactly, and
    events for the rest: minutes that batches the job has not rolled up touched,
    minutes older than the rollups kept, and the partial minute at ``until``. The same answer as
    :class:`RawEventsSource`, to the micro, while reading a fraction of the data."""

    def series(
        self, lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
    ) -> list[Bucket]:
        view = lake.view("ledger", "events")
        p = plan(since_ms, until_ms, granularity, rollups.coverage(lake, view))
        return read_plan(view, campaign_id, granularity, p)


def stats_source(lake: Lake) -> StatsSource:
    """Rollups once the rollup job has finished a run, else events."""
    return RollupSource() if rollups.has_rollups(lake) else RawEventsSource()


def series(
    lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
) -> list[Bucket]:
    """A campaign's time series; an unknown campaign has none."""
    source = stats_source(lake)
    return source.series(lake, campaign_id, since_ms, until_ms, granularity)


def range_plan(since_ms: int, until_ms: int, cov: Coverage | None) -> Plan:
    """How to read exactly [since, until) for every campaign: hour rollups for whole hours
    they answer, minute rollups for whole minutes, events for the rest (the partial minutes
    at both ends, minutes batches not rolled up yet touched, what the rollups do not cover)."""
    if cov is None:
        return Plan(raw=((since_ms, until_ms),))
    first = -(-since_ms // MINUTE_MS) * MINUTE_MS
    raw: list[Run] = []
    minutes: list[Run] = []
    hours: list[Run] = []
    _extend(raw, since_ms, min(first, until_ms))
    if first >= until_ms:
        return Plan(raw=tuple(raw))
    width = BUCKET_MS["hour"]
    first_hour = -(-first // width) * width
    last_hour = until_ms - until_ms % width
    if first_hour >= last_hour:
        _split_minutes(first, until_ms, cov, minutes, raw)
    else:
        _split_minutes(first, first_hour, cov, minutes, raw)
        for hour in range(first_hour, last_hour, width):
            if cov.answers("hour", hour, hour + width):
                _extend(hours, hour, hour + width)
            else:
                _split_minutes(hour, hour + width, cov, minutes, raw)
        _split_minutes(last_hour, until_ms, cov, minutes, raw)
    if len(hours) + len(minutes) + len(raw) > MAX_RUNS:
        return Plan(raw=((since_ms, until_ms),))
    return Plan(tuple(hours), tuple(minutes), tuple(raw))


_TOP_ROLLUP_PART: Final = """
    SELECT campaign_id, impressions AS i, clicks AS c, conversions AS v, spend_micros AS s,
           revenue_micros AS r
    FROM {{{table}}} WHERE {where}"""
_TOP_RAW_PART: Final = """
    SELECT campaign_id, count(*) FILTER (WHERE event_type = 'impression') AS i,
           count(*) FILTER (WHERE event_type = 'click') AS c,
           count(*) FILTER (WHERE event_type = 'conversion') AS v,
           coalesce(sum(cost_micros), 0) AS s, coalesce(sum(revenue_micros), 0) AS r
    FROM {{events}} WHERE {where} GROUP BY campaign_id"""


def top(
    lake: Lake, metric: Metric, limit: int, since_ms: int | None = None
) -> list[CampaignTotals]:
    """The ``limit`` best campaigns by ``metric`` over events since ``since_ms`` (or all time).

    Read like a time series (see :class:`RollupSource`): rollups for what they answer exactly,
    events for the rest, so the cost follows the minutes not rolled up yet rather than the
    table's size. Names come from the campaigns dimension.
    """
    view = lake.view("ledger", "events")
    stats = [s for s in view.table("events").stats.values() if s.rows]
    lows = [s.min_ms for s in stats if s.min_ms is not None]
    highs = [s.max_ms for s in stats if s.max_ms is not None]
    if not stats or len(lows) < len(stats) or len(highs) < len(stats):
        return _top_of(view, Plan(raw=((since_ms or 0, 2**53),)), metric, limit)
    # No event lies before the first or after the last, so widening the range to whole minutes
    # there changes no total, and lets rollups answer those minutes instead of the events
    # (whose oldest minute may sit in a large compacted file).
    first, last = min(lows), max(highs)
    until = last - last % MINUTE_MS + MINUTE_MS
    since = first - first % MINUTE_MS if since_ms is None or since_ms <= first else since_ms
    if since >= until:
        return []
    cov = rollups.coverage(lake, view) if rollups.has_rollups(lake) else None
    return _top_of(view, range_plan(since, until, cov), metric, limit)


def _top_of(view: View, p: Plan, metric: Metric, limit: int) -> list[CampaignTotals]:
    params: dict[str, object] = {"limit": limit}
    templates = (_TOP_ROLLUP_PART, _TOP_RAW_PART)
    parts, files = _plan_parts(view, p, "rollups_hour", templates, params)
    if not parts:
        return []
    files["campaigns"] = view.local_files("campaigns")
    sql = f"""
        SELECT t.campaign_id, d.campaign_name, d.advertiser_id, t.impressions, t.clicks,
               t.conversions, t.spend_micros, t.revenue_micros
        FROM (
            SELECT campaign_id, CAST(sum(i) AS BIGINT) AS impressions,
                   CAST(sum(c) AS BIGINT) AS clicks, CAST(sum(v) AS BIGINT) AS conversions,
                   CAST(sum(s) AS BIGINT) AS spend_micros, CAST(sum(r) AS BIGINT) AS revenue_micros
            FROM ({" UNION ALL ".join(parts)}) GROUP BY campaign_id) t
        LEFT JOIN {{campaigns}} d USING (campaign_id)
        ORDER BY {_ORDER[metric]} DESC NULLS LAST, t.campaign_id LIMIT $limit"""
    rows = view.query(sql, params, files=files)
    return [CampaignTotals(r[0], r[1], r[2], Totals(*map(int, r[3:]))) for r in rows]
