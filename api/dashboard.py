"""The dashboard's home page and the page frame every dashboard page shares.

A page is HTML rendered here with its numbers in it (tiles, tables: they paint at once), plus
charts that ``static/dashboard.js`` draws with plotly.js from JSON (the first data embedded in
the page, the next ones fetched every REFRESH_MS). The refreshing part of each page (its
*panel*) is fetched as HTML from the same functions that rendered it the first time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Final
from urllib.parse import quote

import msgspec

from api import dashboard_assets as assets
from api.dashboard_data import ChartSet
from api.models import AlertInfo, Health, LeaderboardRow, PartitionLagHealth
from queries.dashboard import RANGE_NAMES, RANGES, TimeRange
from queries.ops import Overview

REFRESH_MS: Final = 5_000
DEFAULT_RANGE: Final = "1h"
#: Open alerts shown (the tile says "N+" when there are at least this many).
MAX_ALERTS: Final = 20
#: Kafka partitions listed, most behind first (a topic may have hundreds).
MAX_PARTITIONS: Final = 20


@dataclass(frozen=True)
class Snapshot:
    """Everything the home page's panel shows, gathered by the handler from queries and checks."""

    now_ms: int
    range: TimeRange
    overview: Overview
    top: Sequence[LeaderboardRow]
    health: Health
    total_events: int
    #: Open alerts, most severe and newest first.
    alerts: Sequence[AlertInfo]


def num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def usd(value: float | None) -> str:
    return "–" if value is None else f"${value:,.2f}"


def clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def campaign_href(campaign_id: str, r: TimeRange | None = None) -> str:
    """The campaign page's URL (keeping the range the user chose)."""
    query = "" if r is None else f"?range={r.name}"
    return f"/campaigns/{quote(campaign_id, safe='')}{query}"


def tile(tile_id: str, label: str, value: str, note: str = "", bad: bool = False) -> str:
    cls = ' class="bad"' if bad else ""
    return (
        f'<div class="tile" id="{tile_id}"><small>{escape(label)}</small>'
        f"<b{cls}>{escape(value)}</b><small>{escape(note)}</small></div>"
    )


def chart_card(chart_id: str, title: str, wide: bool = False) -> str:
    """A card holding one chart, drawn by the browser from the page's ChartSet."""
    cls = "card wide" if wide else "card"
    return (
        f'<section class="{cls}"><h2>{escape(title)}</h2>'
        f'<div class="chart" id="{chart_id}"></div></section>'
    )


def _range_buttons(selected: TimeRange) -> str:
    buttons = "".join(
        f'<button type="button" data-range="{name}" '
        f'aria-pressed="{"true" if name == selected.name else "false"}">'
        f"{escape(RANGES[name].label)}</button>"
        for name in RANGE_NAMES
    )
    return f'<div class="ranges" role="group" aria-label="time range">{buttons}</div>'


def frame(
    title: str,
    panel_html: str,
    *,
    panel_url: str,
    charts_html: str = "",
    series: ChartSet | None = None,
    series_url: str = "",
    selected: TimeRange | None = None,
) -> str:
    """A whole dashboard page: header with navigation and range buttons, the panel, the charts.

    ``series`` is embedded as JSON so the charts draw without another round trip.
    """
    data = ""
    if series is not None:
        # "</" cannot close the script element early once escaped as "<\/" (same JSON value).
        encoded = msgspec.json.encode(series).decode().replace("</", "<\\/")
        data = f'<script type="application/json" id="initial-series">{encoded}</script>'
    ranges = "" if selected is None else _range_buttons(selected)
    # A page without charts does without plotly.js. Where it is needed, it is fetched at once
    # (preload) but run only after the first paint (dashboard.js adds it then): evaluating its
    # 4.8 MB, even from the cache, would otherwise hold the page's numbers back.
    plotly_url = "" if series is None else assets.url(assets.PLOTLY)
    plotly = "" if series is None else f'<link rel="preload" href="{plotly_url}" as="script">'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · adevents</title>"
        # No favicon request (its 404 would be a console error).
        '<link rel="icon" href="data:,">'
        f"<style>{assets.text('dashboard.css')}</style>"
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_MS // 1000}"></noscript>'
        f"{plotly}"
        f'<script defer src="{assets.url("dashboard.js")}"></script>'
        "</head><body>"
        # No DATA_DIR nor host names here: the page may be open to anyone.
        '<header><h1><a href="/">adevents</a></h1><nav>'
        '<a href="/">dashboard</a><a href="/dashboard/alerts">alerts</a>'
        '<a href="/docs">API</a><a href="/metrics">metrics</a></nav>'
        f"{ranges}</header>"
        f'<main id="page" data-refresh-ms="{REFRESH_MS}" data-refreshes="0" '
        f'data-panel-url="{escape(panel_url)}" data-series-url="{escape(series_url)}" '
        f'data-range="{"" if selected is None else selected.name}" '
        f'data-plotly-url="{plotly_url}">'
        f'<h1 class="title">{escape(title)}</h1>'
        f'<div id="panel">{panel_html}</div>'
        f'<div class="charts">{charts_html}</div></main>{data}</body></html>'
    )


def top_table(rows: Sequence[LeaderboardRow], r: TimeRange) -> str:
    head = (
        "<tr><th>#</th><th>campaign</th><th>impressions</th><th>clicks</th><th>conversions</th>"
        "<th>spend</th><th>revenue</th><th>CTR</th><th>CVR</th><th>CPA</th><th>ROAS</th></tr>"
    )
    body = []
    for row in rows:
        name = f" <span class=muted>{escape(row.campaign_name)}</span>" if row.campaign_name else ""
        body.append(
            f'<tr data-campaign="{escape(row.campaign_id)}"><td>{row.rank}</td>'
            f'<td><a href="{escape(campaign_href(row.campaign_id, r))}">'
            f"{escape(row.campaign_id)}</a>{name}</td>"
            f'<td data-value="{row.impressions}">{row.impressions:,}</td>'
            f'<td data-value="{row.clicks}">{row.clicks:,}</td>'
            f'<td data-value="{row.conversions}">{row.conversions:,}</td>'
            f'<td data-value="{row.spend_usd}">{usd(row.spend_usd)}</td>'
            f'<td data-value="{row.revenue_usd}">{usd(row.revenue_usd)}</td>'
            f"<td>{pct(row.ctr)}</td><td>{pct(row.cvr)}</td><td>{usd(row.cpa_usd)}</td>"
            f"<td>{num(row.roas, 2)}</td></tr>"
        )
    if not body:
        body.append(
            f'<tr><td colspan="11" class="muted">No events in the last {r.label}.</td></tr>'
        )
    return f'<table id="top-campaigns">{head}{"".join(body)}</table>'


def alert_subject(a: AlertInfo) -> str:
    """The alert's rule and subject; a budget alert's subject links to its campaign."""
    subject = escape(a.subject)
    if a.rule == "budget":
        subject = f'<a href="{escape(campaign_href(a.subject))}">{subject}</a>'
    return f"{escape(a.rule)} · {subject}"


def _alerts(alerts: Sequence[AlertInfo]) -> str:
    if not alerts:
        return '<p class="muted" id="no-alerts">No open alerts.</p>'
    head = (
        "<tr><th>severity</th><th>alert</th><th>message</th><th>value</th><th>threshold</th>"
        "<th>firing since (UTC)</th></tr>"
    )
    body = "".join(
        f'<tr data-alert="{escape(a.alert_id)}" data-rule="{escape(a.rule)}" '
        f'data-subject="{escape(a.subject)}" data-severity="{escape(a.severity)}">'
        f'<td class="{"bad" if a.severity == "critical" else "warn"}">{escape(a.severity)}</td>'
        f"<td>{alert_subject(a)}</td><td>{escape(a.message)}</td>"
        f"<td>{a.value:,.4g}</td><td>{a.threshold:,.4g}</td><td>{stamp(a.started_at)}</td></tr>"
        for a in alerts
    )
    return f'<table id="alerts-table" class="alerts">{head}{body}</table>'


def _kafka_lag(lags: Sequence[PartitionLagHealth], limit: int) -> str:
    """Each Kafka partition's lag, most behind first; none without a Kafka consumer. No
    consumer names: their default holds the host name, and the page may be open to anyone."""
    if not lags:
        return ""
    head = "<tr><th>partition</th><th>reported (UTC)</th><th>messages behind</th></tr>"
    rows = []
    for lag in lags[:MAX_PARTITIONS]:
        key = f"{lag.topic}/{lag.partition}"
        when = clock(lag.updated_at)
        if not lag.current:
            when += " · consumer stopped reporting: last known"
        cls = "bad" if lag.messages > limit else "" if lag.current else "muted"
        rows.append(
            f'<tr data-partition="{escape(key)}" data-lag="{lag.messages}" '
            f'data-current="{str(lag.current).lower()}"><td>{escape(key)}</td>'
            f'<td>{escape(when)}</td><td class="{cls}">{lag.messages:,}</td></tr>'
        )
    if len(lags) > MAX_PARTITIONS:
        rows.append(
            f'<tr><td colspan="3" class="muted">and {len(lags) - MAX_PARTITIONS} more '
            "partition(s), all less behind</td></tr>"
        )
    return (
        f'<section class="card" id="kafka-lag"><h2>Kafka consumer lag (KAFKA_LAG_MAX '
        f'{limit:,})</h2><table id="kafka-lag-table">{head}{"".join(rows)}</table></section>'
    )


def _kafka_tile(h: Health) -> list[str]:
    """The most behind Kafka partition; no tile without a Kafka consumer."""
    if not h.kafka_lag:
        return []
    worst = h.kafka_lag[0]
    return [
        tile(
            "tile-kafka-lag",
            "Kafka lag (most behind)",
            num(worst.messages, suffix=" msgs"),
            f"{worst.topic}/{worst.partition} of {len(h.kafka_lag)} partition(s)",
            bad=worst.messages > h.kafka_lag_max_messages,
        )
    ]


def _health_status(h: Health) -> str:
    reasons = escape("; ".join(h.messages))
    if h.status == "ok":
        return '<span id="health-status">healthy</span>'
    if h.status == "degraded":
        return f'<span id="health-status" class="warn">degraded: {reasons}</span>'
    return f'<span id="health-status" class="bad">unhealthy: {reasons}</span>'


def panel(s: Snapshot) -> str:
    """The part of the home page that refreshes: tiles and tables."""
    o, h = s.overview, s.health
    last_minute = o.events_in_per_s[-6:]
    rate = sum(last_minute) / len(last_minute) if last_minute else 0.0
    lat = o.latency_ms
    p50, p95, p99 = (None, None, None) if lat is None else (lat.p50, lat.p95, lat.p99)
    tiles = [
        tile("tile-rate", "events/s (last minute)", num(rate)),
        tile("tile-total", "events stored", num(s.total_events)),
        tile("tile-p50", "batch latency p50", num(p50, 1, " ms")),
        tile("tile-p95", "batch latency p95", num(p95, 1, " ms")),
        tile("tile-p99", "batch latency p99", num(p99, 1, " ms")),
        tile("tile-dup", "duplicate rate (15 min)", pct(o.duplicate_rate)),
        tile("tile-quarantine", "quarantine rate (15 min)", pct(o.quarantine_rate)),
        tile(
            "tile-lag",
            "consumer lag",
            num(h.consumer_lag_seconds, 1, " s"),
            f"{h.files_waiting} file(s) waiting",
            bad=h.status == "unhealthy",
        ),
        *_kafka_tile(h),
        tile(
            "tile-alerts",
            "open alerts",
            f"{len(s.alerts)}{'+' if len(s.alerts) >= MAX_ALERTS else ''}",
            f"{sum(a.severity == 'critical' for a in s.alerts)} critical",
            bad=any(a.severity == "critical" for a in s.alerts),
        ),
    ]
    return (
        f'<div class="muted" id="updated" data-now-ms="{s.now_ms}">updated {clock(s.now_ms)}'
        f" UTC · {_health_status(h)} · {o.batches:,} batches in 15 min</div>"
        f'<div class="tiles">{"".join(tiles)}</div>'
        f'<section class="card"><h2>Top campaigns by spend, last {escape(s.range.label)}</h2>'
        f"{top_table(s.top, s.range)}</section>"
        f'<section class="card" id="alerts"><h2>Open alerts '
        f'<a class="more" href="/dashboard/alerts">all alerts →</a></h2>{_alerts(s.alerts)}'
        "</section>"
        f"{_kafka_lag(h.kafka_lag, h.kafka_lag_max_messages)}"
    )


def page(s: Snapshot, series: ChartSet) -> str:
    """The whole home page."""
    charts = chart_card("chart-throughput", "Events/s") + chart_card(
        "chart-latency", "Batch processing latency"
    )
    return frame(
        "Pipeline",
        panel(s),
        panel_url="/dashboard/panel",
        charts_html=charts,
        series=series,
        series_url="/dashboard/series",
        selected=s.range,
    )


def now_ms() -> int:
    return int(time.time() * 1000)
