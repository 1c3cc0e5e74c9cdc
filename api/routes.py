"""Every route of the API: validate parameters, call a queries function, return a typed model."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import PathParameter, QueryParameter

from api import dashboard_routes, docs, params
from api.health import HealthChecker
from api.ingest import ApiKeys
from api.metrics import Metrics
from api.models import (
    AdEvent,
    AlertInfo,
    Alerts,
    CampaignEvents,
    CampaignStats,
    Health,
    LatestEvents,
    Leaderboard,
    LeaderboardRow,
    Performance,
    PublicHealth,
    StatsPoint,
)
from queries import campaigns, events, ops
from queries.campaigns import BUCKET_MS, Totals
from queries.lake import Lake

MAX_LIMIT: Final = 1000
#: The most buckets one stats answer may span (a week of minutes).
MAX_BUCKETS: Final = 10_080
#: The range a stats request covers when since/until are not given.
DEFAULT_SPAN_MS: Final = {"minute": 3_600_000, "hour": 86_400_000, "day": 30 * 86_400_000}

Limit = Annotated[
    int, QueryParameter(ge=1, le=MAX_LIMIT, description=f"how many, 1 to {MAX_LIMIT}")
]
Since = Annotated[
    str | None,
    QueryParameter(description=f"start of the range, inclusive: {params.TIME_HELP}", max_length=64),
]
Until = Annotated[
    str | None,
    QueryParameter(description=f"end of the range, exclusive: {params.TIME_HELP}", max_length=64),
]
CampaignId = Annotated[
    str, PathParameter(min_length=1, max_length=256, description="the campaign's campaign_id")
]
EventTypeParam = Annotated[
    Literal["impression", "click", "conversion"] | None,
    QueryParameter(description="only events of this type"),
]
Cursor = Annotated[
    str | None,
    QueryParameter(description="next_cursor of the previous page", max_length=1024),
]
GranularityParam = Annotated[
    campaigns.Granularity, QueryParameter(description="bucket width of the series")
]
MetricParam = Annotated[campaigns.Metric, QueryParameter(description="what to rank by")]
OpenOnly = Annotated[
    bool, QueryParameter(name="open", description="only alerts that are still firing")
]


@get("/health", responses={503: ResponseSpec(PublicHealth, description="unhealthy")})
async def health(checker: NamedDependency[HealthChecker]) -> Response[PublicHealth]:
    """200 (ok or degraded) or 503 (unhealthy), with reason codes (e.g. ``disk_low``,
    ``consumer_lag``, ``consumer_retrying:redis_unavailable``, ``kafka_lag``). Always open:
    load balancers probe it."""
    report = await checker.report()
    return Response(report.public(), status_code=report.http_status())


@get("/health/detail", responses={503: ResponseSpec(Health, description="unhealthy")})
async def health_detail(
    request: Request[Any, Any, Any],
    checker: NamedDependency[HealthChecker],
    api_keys: NamedDependency[ApiKeys],
) -> Response[Health]:
    """Every check's result. Needs an API key when API_KEYS_REQUIRED_FOR_READ; otherwise open,
    but raw errors and DATA_DIR's path are shown only to a caller that sends a valid key."""
    report = await checker.report()
    if not api_keys.valid(request):
        report = report.redacted()
    return Response(report, status_code=report.http_status())


@get("/ad_events/latest", sync_to_thread=True)
def latest(lake: NamedDependency[Lake], limit: Limit = 100) -> LatestEvents:
    """The most recent events by event_time, with the lake's size and the consumer's rate."""
    found = events.newest(lake, limit)
    return LatestEvents(
        events=[AdEvent.of(e) for e in found],
        total_count=events.count(lake),
        processing_rate_per_sec=ops.processing_rate(lake, params.now_ms()),
    )


@get("/ad_events/by_campaign/{campaign_id:str}", sync_to_thread=True)
def by_campaign(
    *,
    lake: NamedDependency[Lake],
    campaign_id: CampaignId,
    limit: Limit = 100,
    since: Since = None,
    until: Until = None,
    event_type: EventTypeParam = None,
    cursor: Cursor = None,
) -> CampaignEvents:
    """A campaign's events, newest first, a page at a time."""
    start, end = params.time_range(since, until)
    where = events.EventFilter(campaign_id, event_type, start, end, params.decode_cursor(cursor))
    found, position = events.page(lake, limit, where)
    return CampaignEvents(
        campaign_id=campaign_id,
        events=[AdEvent.of(e) for e in found],
        next_cursor=None if position is None else params.encode_cursor(position),
    )


@get("/campaigns/{campaign_id:str}/stats", sync_to_thread=True)
def campaign_stats(
    lake: NamedDependency[Lake],
    campaign_id: CampaignId,
    since: Since = None,
    until: Until = None,
    granularity: GranularityParam = "hour",
) -> CampaignStats:
    """A time series of the campaign's counts, money and ratios (default: the last day by hour)."""
    start, end = params.time_range(since, until, default_span_ms=DEFAULT_SPAN_MS[granularity])
    assert start is not None and end is not None
    buckets = -(-(end - start) // BUCKET_MS[granularity])
    if buckets > MAX_BUCKETS:
        raise ValidationException(
            f"since..until spans {buckets:,} {granularity} buckets; at most {MAX_BUCKETS:,} "
            "are allowed: narrow the range or use a coarser granularity"
        )
    series = campaigns.series(lake, campaign_id, start, end, granularity)
    total = Totals(
        *(sum(getattr(b.totals, f) for b in series) for f in Totals.__dataclass_fields__)
    )
    return CampaignStats(
        campaign_id=campaign_id,
        granularity=granularity,
        since=start,
        until=end,
        series=[StatsPoint.of(b) for b in series],
        total=Performance.of(total),
    )


@get("/campaigns/top", sync_to_thread=True)
def top_campaigns(
    lake: NamedDependency[Lake],
    metric: MetricParam = "spend",
    limit: Limit = 10,
    since: Since = None,
) -> Leaderboard:
    """The best campaigns by a metric, over events since ``since`` (default: all time)."""
    start = params.parse_time("since", since)
    rows = campaigns.top(lake, metric, limit, start)
    return Leaderboard(
        metric=metric,
        since=start,
        campaigns=[LeaderboardRow.of(i, c) for i, c in enumerate(rows, 1)],
    )


@get("/alerts", sync_to_thread=True)
def alerts(lake: NamedDependency[Lake], open_only: OpenOnly = False, limit: Limit = 100) -> Alerts:
    """Threshold alerts: open ones first (critical, then newest), then recently resolved ones."""
    found = ops.alerts(lake, open_only=open_only, limit=limit)
    return Alerts(alerts=[AlertInfo.of(a) for a in found])


@get("/metrics", sync_to_thread=True, media_type="text/plain; version=0.0.4")
def metrics(metrics: NamedDependency[Metrics]) -> bytes:
    """Prometheus text exposition."""
    return metrics.render()


ROUTES: Final = [
    health,
    health_detail,
    latest,
    by_campaign,
    campaign_stats,
    top_campaigns,
    alerts,
    metrics,
    docs.docs_asset,
    *dashboard_routes.ROUTES,
]
