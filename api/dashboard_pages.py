"""The campaign page (``/campaigns/{id}``) and the alerts page (``/dashboard/alerts``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from api.dashboard import (
    alert_subject,
    chart_card,
    clock,
    frame,
    num,
    pct,
    stamp,
    tile,
    usd,
)
from api.dashboard_data import ChartSet
from api.models import AdEvent, AlertInfo, Performance
from queries.dashboard import CampaignInfo, TimeRange


@dataclass(frozen=True)
class CampaignSnapshot:
    """What the campaign page's panel shows."""

    now_ms: int
    range: TimeRange
    info: CampaignInfo
    #: Totals and ratios over the range.
    total: Performance
    spent_today_usd: float
    #: The newest events, newest first.
    events: Sequence[AdEvent]


def _budget_tile(s: CampaignSnapshot) -> str:
    budget = s.info.daily_budget_micros
    if budget is None:
        return tile("tile-budget", "spent today (UTC)", usd(s.spent_today_usd), "no daily budget")
    share = s.spent_today_usd / (budget / 1e6)
    return tile(
        "tile-budget",
        "spent today (UTC)",
        usd(s.spent_today_usd),
        f"{share:.0%} of {usd(budget / 1e6)} daily budget",
        bad=share > 1,
    )


def event_usd(value: float) -> str:
    """An event's money to the micro: an impression often costs less than a cent ($0.0021)."""
    whole, _, fraction = f"{value:,.6f}".rstrip("0").partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def _events_table(events: Sequence[AdEvent]) -> str:
    if not events:
        return '<p class="muted" id="no-events">No events yet.</p>'
    head = (
        "<tr><th>event time (UTC)</th><th>type</th><th>event_id</th><th>ad</th>"
        "<th>publisher</th><th>device</th><th>country</th><th>cost</th><th>revenue</th></tr>"
    )
    body = "".join(
        f'<tr data-event="{escape(e.event_id)}"><td>{stamp(e.timestamp)}</td>'
        f"<td>{escape(e.event_type)}</td><td>{escape(e.event_id)}</td><td>{escape(e.ad_id)}</td>"
        f"<td>{escape(e.publisher_id)}</td><td>{escape(e.device_type or '–')}</td>"
        f"<td>{escape(e.country or '–')}</td><td>{event_usd(e.cost_usd)}</td>"
        f"<td>{event_usd(e.revenue_usd)}</td></tr>"
        for e in events
    )
    return f'<table id="latest-events">{head}{body}</table>'


def campaign_panel(s: CampaignSnapshot) -> str:
    """The refreshing part of the campaign page: totals over the range and the latest events."""
    t, info = s.total, s.info
    about = " · ".join(
        escape(part)
        for part in (
            info.campaign_name or "",
            f"advertiser {info.advertiser_id}" if info.advertiser_id else "",
        )
        if part
    )
    if not info.listed:
        about = "not in the campaign dimension"
    tiles = [
        tile("tile-impressions", f"impressions ({s.range.label})", num(t.impressions)),
        tile("tile-clicks", f"clicks ({s.range.label})", num(t.clicks)),
        tile("tile-conversions", f"conversions ({s.range.label})", num(t.conversions)),
        tile("tile-spend", f"spend ({s.range.label})", usd(t.spend_usd)),
        tile("tile-revenue", f"revenue ({s.range.label})", usd(t.revenue_usd)),
        tile("tile-ctr", "CTR", pct(t.ctr)),
        tile("tile-cvr", "CVR", pct(t.cvr)),
        tile("tile-cpa", "CPA", usd(t.cpa_usd)),
        tile("tile-roas", "ROAS", num(t.roas, 2)),
        _budget_tile(s),
    ]
    return (
        f'<div class="muted" id="updated" data-now-ms="{s.now_ms}">'
        f'<span id="campaign-about">{about}</span> · updated {clock(s.now_ms)} UTC</div>'
        f'<div class="tiles">{"".join(tiles)}</div>'
        '<section class="card" id="events"><h2>Latest events</h2>'
        f"{_events_table(s.events)}</section>"
    )


def campaign_page(s: CampaignSnapshot, series: ChartSet) -> str:
    """The whole campaign page."""
    path = quote(s.info.campaign_id, safe="")
    charts = (
        chart_card("chart-funnel", "Funnel over the range")
        + chart_card("chart-spend", "Spend today (UTC) against the daily budget")
        + chart_card("chart-ctr", "CTR")
        + chart_card("chart-cvr", "CVR")
        + chart_card("chart-cpa", "CPA")
        + chart_card("chart-roas", "ROAS")
    )
    return frame(
        f"Campaign {s.info.campaign_id}",
        campaign_panel(s),
        panel_url=f"/dashboard/campaigns/{path}/panel",
        charts_html=charts,
        series=series,
        series_url=f"/dashboard/campaigns/{path}/series",
        selected=s.range,
    )


def _alert_rows(alerts: Sequence[AlertInfo], *, resolved: bool) -> str:
    last = "resolved (UTC)" if resolved else "last checked (UTC)"
    head = (
        "<tr><th>severity</th><th>alert</th><th>message</th><th>value</th><th>threshold</th>"
        f"<th>firing since (UTC)</th><th>{last}</th></tr>"
    )
    body = "".join(
        f'<tr data-alert="{escape(a.alert_id)}" data-rule="{escape(a.rule)}" '
        f'data-status="{escape(a.status)}" data-severity="{escape(a.severity)}">'
        f'<td class="{"bad" if a.severity == "critical" else "warn"}">{escape(a.severity)}</td>'
        f"<td>{alert_subject(a)}</td><td>{escape(a.message)}</td>"
        f"<td>{a.value:,.4g}</td><td>{a.threshold:,.4g}</td><td>{stamp(a.started_at)}</td>"
        f"<td>{stamp(a.ended_at if resolved and a.ended_at else a.updated_at)}</td></tr>"
        for a in alerts
    )
    return f"{head}{body}"


def alerts_panel(now_ms: int, alerts: Sequence[AlertInfo]) -> str:
    """Open alerts (critical, then newest) and recently resolved ones."""
    firing = [a for a in alerts if a.status != "resolved"]
    resolved = [a for a in alerts if a.status == "resolved"]
    open_html = (
        f'<table id="open-alerts" class="alerts">{_alert_rows(firing, resolved=False)}</table>'
        if firing
        else '<p class="muted ok" id="no-open-alerts">No open alerts.</p>'
    )
    resolved_html = (
        f'<table id="resolved-alerts" class="alerts">{_alert_rows(resolved, resolved=True)}</table>'
        if resolved
        else '<p class="muted" id="no-resolved-alerts">No resolved alerts.</p>'
    )
    return (
        f'<div class="muted" id="updated" data-now-ms="{now_ms}">updated {clock(now_ms)} UTC · '
        f"{len(firing)} open, {len(resolved)} resolved shown</div>"
        f'<section class="card"><h2>Open</h2>{open_html}</section>'
        f'<section class="card"><h2>Resolved</h2>{resolved_html}</section>'
    )


def alerts_page(now_ms: int, alerts: Sequence[AlertInfo]) -> str:
    return frame("Alerts", alerts_panel(now_ms, alerts), panel_url="/dashboard/alerts/panel")
