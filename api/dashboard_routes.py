"""The dashboard's routes: three pages, their refreshing panels (HTML) and chart data (JSON).

Thin handlers: parameters validated by their types, answers from ``queries``; none is in the
OpenAPI schema (the JSON API is ``/campaigns/{id}/stats``, ``/campaigns/top``, ``/alerts``).
"""

from __future__ import annotations

from typing import Annotated, Final

from litestar import MediaType, get
from litestar.di import NamedDependency
from litestar.params import PathParameter, QueryParameter

from api import dashboard, dashboard_pages, params
from api.dashboard_assets import dashboard_asset
from api.dashboard_data import ChartSet, campaign_charts, pipeline_charts, total_of
from api.health import HealthChecker
from api.models import AdEvent, AlertInfo, LeaderboardRow, Performance
from pipeline.schema import MINUTE_MS
from queries import campaigns, events, ops
from queries.dashboard import (
    RANGES,
    RangeName,
    TimeRange,
    campaign_info,
    campaign_series,
    pipeline_series,
    spend_today,
)
from queries.lake import Lake

#: Events the campaign page lists; alerts (open and resolved) the alerts page lists.
LATEST_EVENTS: Final = 20
ALERTS_SHOWN: Final = 200

RangeParam = Annotated[
    RangeName, QueryParameter(name="range", description="how far back the page looks")
]
CampaignId = Annotated[str, PathParameter(min_length=1, max_length=256)]


def _snapshot(lake: Lake, checker: HealthChecker, r: TimeRange) -> dashboard.Snapshot:
    now = params.now_ms()
    # Whole minutes back, which the minute (and hour) rollups answer without reading events.
    since = now - r.window_ms
    top = campaigns.top(lake, "spend", 10, since - since % MINUTE_MS)
    firing = ops.alerts(lake, open_only=True, limit=dashboard.MAX_ALERTS)
    return dashboard.Snapshot(
        now_ms=now,
        range=r,
        overview=ops.overview(lake, now),
        top=[LeaderboardRow.of(i, c) for i, c in enumerate(top, 1)],
        health=checker.cached(),
        total_events=events.count(lake),
        alerts=[AlertInfo.of(a) for a in firing],
    )


def _pipeline(lake: Lake, r: TimeRange) -> ChartSet:
    return pipeline_charts(r, pipeline_series(lake, params.now_ms(), r.window_ms, r.step_ms))


@get("/", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=True)
def dashboard_page(
    lake: NamedDependency[Lake],
    checker: NamedDependency[HealthChecker],
    range_name: RangeParam = dashboard.DEFAULT_RANGE,
) -> str:
    """The dashboard."""
    r = RANGES[range_name]
    return dashboard.page(_snapshot(lake, checker, r), _pipeline(lake, r))


@get("/dashboard/panel", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=True)
def dashboard_panel(
    lake: NamedDependency[Lake],
    checker: NamedDependency[HealthChecker],
    range_name: RangeParam = dashboard.DEFAULT_RANGE,
) -> str:
    """The dashboard's refreshing part."""
    return dashboard.panel(_snapshot(lake, checker, RANGES[range_name]))


@get("/dashboard/series", include_in_schema=False, sync_to_thread=True)
def dashboard_series(
    lake: NamedDependency[Lake], range_name: RangeParam = dashboard.DEFAULT_RANGE
) -> ChartSet:
    """The dashboard's charts: throughput and latency over the range."""
    return _pipeline(lake, RANGES[range_name])


def _campaign(
    lake: Lake, campaign_id: str, r: TimeRange
) -> tuple[dashboard_pages.CampaignSnapshot, ChartSet]:
    now = params.now_ms()
    info = campaign_info(lake, campaign_id)
    buckets = campaign_series(lake, campaign_id, now, r)
    day = spend_today(lake, campaign_id, now)
    found = events.newest(lake, LATEST_EVENTS, events.EventFilter(campaign_id=campaign_id))
    snapshot = dashboard_pages.CampaignSnapshot(
        now_ms=now,
        range=r,
        info=info,
        total=Performance.of(total_of(buckets)),
        spent_today_usd=(day.cumulative_micros[-1] if day.cumulative_micros else 0) / 1e6,
        events=[AdEvent.of(e) for e in found],
    )
    return snapshot, campaign_charts(
        r, since_ms=now - r.window_ms, until_ms=now, buckets=buckets, info=info, day=day
    )


@get(
    "/campaigns/{campaign_id:str}",
    media_type=MediaType.HTML,
    include_in_schema=False,
    sync_to_thread=True,
)
def campaign_page(
    lake: NamedDependency[Lake],
    campaign_id: CampaignId,
    range_name: RangeParam = dashboard.DEFAULT_RANGE,
) -> str:
    """A campaign's page: funnel, spend against budget, ratios over time, latest events."""
    return dashboard_pages.campaign_page(*_campaign(lake, campaign_id, RANGES[range_name]))


@get(
    "/dashboard/campaigns/{campaign_id:str}/panel",
    media_type=MediaType.HTML,
    include_in_schema=False,
    sync_to_thread=True,
)
def campaign_panel(
    lake: NamedDependency[Lake],
    campaign_id: CampaignId,
    range_name: RangeParam = dashboard.DEFAULT_RANGE,
) -> str:
    """The campaign page's refreshing part."""
    snapshot, _ = _campaign(lake, campaign_id, RANGES[range_name])
    return dashboard_pages.campaign_panel(snapshot)


@get("/dashboard/campaigns/{campaign_id:str}/series", include_in_schema=False, sync_to_thread=True)
def campaign_series_data(
    lake: NamedDependency[Lake],
    campaign_id: CampaignId,
    range_name: RangeParam = dashboard.DEFAULT_RANGE,
) -> ChartSet:
    """The campaign page's charts."""
    r = RANGES[range_name]
    now = params.now_ms()
    buckets = campaign_series(lake, campaign_id, now, r)
    info = campaign_info(lake, campaign_id)
    day = spend_today(lake, campaign_id, now)
    return campaign_charts(
        r, since_ms=now - r.window_ms, until_ms=now, buckets=buckets, info=info, day=day
    )


def _alerts(lake: Lake) -> list[AlertInfo]:
    return [AlertInfo.of(a) for a in ops.alerts(lake, limit=ALERTS_SHOWN)]


@get("/dashboard/alerts", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=True)
def alerts_page(lake: NamedDependency[Lake]) -> str:
    """Open and resolved alerts."""
    return dashboard_pages.alerts_page(params.now_ms(), _alerts(lake))


@get(
    "/dashboard/alerts/panel",
    media_type=MediaType.HTML,
    include_in_schema=False,
    sync_to_thread=True,
)
def alerts_panel(lake: NamedDependency[Lake]) -> str:
    """The alerts page's refreshing part."""
    return dashboard_pages.alerts_panel(params.now_ms(), _alerts(lake))


ROUTES: Final = [
    dashboard_page,
    dashboard_panel,
    dashboard_series,
    campaign_page,
    campaign_panel,
    campaign_series_data,
    alerts_page,
    alerts_panel,
    dashboard_asset,
]
