"""Campaign performance: time series per campaign and leaderboards, from events or rollups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

from queries.lake import Lake

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


class RawEventsSource:
    """Aggregates events/ at query time."""

    def series(
        self, lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
    ) -> list[Bucket]:
        since_ms = _bucket_floor(since_ms, granularity)
        sql = f"""
            SELECT epoch_ms(date_trunc($granularity, event_time)) AS bucket, {_TOTALS}
            FROM {{events}}
            WHERE campaign_id = $campaign_id
              AND event_time >= make_timestamptz($since_ms * 1000)
              AND event_time < make_timestamptz($until_ms * 1000)
            GROUP BY bucket ORDER BY bucket"""
        params = {
            "granularity": granularity,
            "campaign_id": campaign_id,
            "since_ms": since_ms,
            "until_ms": until_ms,
        }

        def attempt() -> list[Bucket]:
            files = lake.files("events", since_ms=since_ms, until_ms=until_ms)
            stats = lake.stats("events", files)
            files = [f for f in files if stats[f].overlaps(since_ms, until_ms)]
            rows = lake.query(sql, params, sources={"events": files})
            return [Bucket(int(r[0]), Totals(*map(int, r[1:]))) for r in rows]

        return lake.read(attempt)


class RollupSource:
    """Reads ``rollups/<granularity>/`` once another issue writes it.

    Expects one row per campaign per bucket with ``campaign_id``, ``bucket`` (timestamp, UTC),
    ``impressions``, ``clicks``, ``conversions``, ``spend_micros`` and ``revenue_micros``, in a
    table registered as ``rollups_<granularity>`` (see :func:`queries.lake.register_table`).
    """

    def series(
        self, lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
    ) -> list[Bucket]:
        since_ms = _bucket_floor(since_ms, granularity)
        name = f"rollups_{granularity}"
        sql = f"""
            SELECT epoch_ms(bucket) AS b,
                   CAST(sum(impressions) AS BIGINT), CAST(sum(clicks) AS BIGINT),
                   CAST(sum(conversions) AS BIGINT), CAST(sum(spend_micros) AS BIGINT),
                   CAST(sum(revenue_micros) AS BIGINT)
            FROM {{{name}}}
            WHERE campaign_id = $campaign_id
              AND bucket >= make_timestamptz($since_ms * 1000)
              AND bucket < make_timestamptz($until_ms * 1000)
            GROUP BY b ORDER BY b"""
        params = {"campaign_id": campaign_id, "since_ms": since_ms, "until_ms": until_ms}

        def attempt() -> list[Bucket]:
            files = lake.files(name, since_ms=since_ms, until_ms=until_ms)
            rows = lake.query(sql, params, sources={name: files})
            return [Bucket(int(r[0]), Totals(*map(int, r[1:]))) for r in rows]

        return lake.read(attempt)


def stats_source(lake: Lake, granularity: Granularity) -> StatsSource:
    """Rollups when a rollup table for ``granularity`` is registered and has files, else events."""
    from queries.lake import TABLES

    name = f"rollups_{granularity}"
    if name in TABLES and lake.files(name):
        return RollupSource()
    return RawEventsSource()


def series(
    lake: Lake, campaign_id: str, since_ms: int, until_ms: int, granularity: Granularity
) -> list[Bucket]:
    """A campaign's time series; an unknown campaign has none."""
    source = stats_source(lake, granularity)
    return source.series(lake, campaign_id, since_ms, until_ms, granularity)


def top(
    lake: Lake, metric: Metric, limit: int, since_ms: int | None = None
) -> list[CampaignTotals]:
    """The ``limit`` best campaigns by ``metric`` over events since ``since_ms`` (or all time)."""
    order = _ORDER[metric]
    since_clause = (
        "event_time >= make_timestamptz($since_ms * 1000)" if since_ms is not None else "true"
    )
    sql = f"""
        SELECT * FROM (
            SELECT campaign_id, any_value(campaign_name) AS campaign_name,
                   any_value(advertiser_id) AS advertiser_id, {_TOTALS}
            FROM {{events}} WHERE {since_clause}
            GROUP BY campaign_id)
        ORDER BY {order} DESC NULLS LAST, campaign_id LIMIT $limit"""
    params: dict[str, object] = {"limit": limit}
    if since_ms is not None:
        params["since_ms"] = since_ms

    def attempt() -> list[CampaignTotals]:
        files = lake.files("events", since_ms=since_ms)
        if since_ms is not None:
            stats = lake.stats("events", files)
            files = [f for f in files if stats[f].overlaps(since_ms, None)]
        rows = lake.query(sql, params, sources={"events": files})
        return [CampaignTotals(r[0], r[1], r[2], Totals(*map(int, r[3:]))) for r in rows]

    return lake.read(attempt)
