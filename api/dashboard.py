"""The dashboard: one self-refreshing HTML page with charts drawn as SVG on the server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Final

from api.models import AlertInfo, Health, LeaderboardRow
from queries.ops import Overview

REFRESH_MS: Final = 5_000
TOP_WINDOW_MS: Final = 3_600_000
#: Open alerts shown (the tile says "N+" when there are at least this many).
MAX_ALERTS: Final = 20
COLORS: Final = ("#2563eb", "#16a34a", "#dc2626", "#9333ea")

_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#111}
header{background:#111827;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{color:#9ca3af}
main{padding:16px 20px;display:grid;gap:16px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
.tile,.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px}
.tile b{display:block;font-size:22px}.tile small{color:#6b7280}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
h2{font-size:15px;margin:0 0 8px}table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
.legend span{margin-right:12px}.bad{color:#dc2626}.muted{color:#6b7280}.warn{color:#b45309}
#alerts-table td:nth-child(3),#alerts-table th:nth-child(3){text-align:left}
svg text{font-size:11px;fill:#6b7280}
"""

_SCRIPT: Final = """
const panel = document.getElementById('panel');
async function refresh() {
  try {
    const r = await fetch('/dashboard/panel', {cache: 'no-store'});
    if (r.ok) {
      panel.innerHTML = await r.text();
      panel.dataset.refreshes = String(Number(panel.dataset.refreshes || 0) + 1);
    }
  } catch (e) { /* keep the last panel; the next tick tries again */ }
}
setInterval(refresh, Number(panel.dataset.refreshMs));
"""


@dataclass(frozen=True)
class Snapshot:
    """Everything the panel shows, gathered by the handler from queries and checks."""

    now_ms: int
    overview: Overview
    top: Sequence[LeaderboardRow]
    health: Health
    total_events: int
    #: Open alerts, most severe and newest first.
    alerts: Sequence[AlertInfo]


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${value:,.2f}"


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def line_chart(
    chart_id: str,
    series: dict[str, Sequence[float | None]],
    *,
    start_ms: int,
    step_ms: int,
    unit: str,
    width: int = 560,
    height: int = 180,
) -> str:
    """An SVG line chart; each series' values ride along in ``data-values`` for scripts/tests."""
    left, right, top, bottom = 48, 8, 8, 20
    w, h = width - left - right, height - top - bottom
    n = max((len(v) for v in series.values()), default=0)
    peak = max((x for v in series.values() for x in v if x is not None), default=0.0)
    y_max = peak * 1.1 if peak > 0 else 1.0
    parts = [
        f'<svg id="{chart_id}" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'data-max="{peak:g}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#e5e7eb"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + h - frac * h
        parts.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#f0f0f0"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{y_max * frac:,.4g}</text>'
        )
    if n:
        for i in (0, n // 2, n - 1):
            x = left + (i / max(n - 1, 1)) * w
            parts.append(
                f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle">'
                f"{_clock(start_ms + i * step_ms)}</text>"
            )
    for (name, values), color in zip(series.items(), COLORS, strict=False):
        points: list[str] = []
        runs: list[list[str]] = []
        for i, v in enumerate(values):
            if v is None:
                if points:
                    runs.append(points)
                points = []
                continue
            x = left + (i / max(n - 1, 1)) * w
            y = top + h - (v / y_max) * h
            points.append(f"{x:.1f},{y:.1f}")
        if points:
            runs.append(points)
        data = ",".join("" if v is None else f"{v:g}" for v in values)
        parts.append(
            f'<g class="series" data-name="{escape(name)}" data-values="{data}" '
            f'data-unit="{escape(unit)}">'
        )
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            else:
                parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(run)}"/>'
                )
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(
        f'<span style="color:{c}">■ {escape(name)}</span>'
        for name, c in zip(series, COLORS, strict=False)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _tile(tile_id: str, label: str, value: str, note: str = "", bad: bool = False) -> str:
    cls = ' class="bad"' if bad else ""
    return (
        f'<div class="tile" id="{tile_id}"><small>{escape(label)}</small>'
        f"<b{cls}>{escape(value)}</b><small>{escape(note)}</small></div>"
    )


def _top_table(rows: Sequence[LeaderboardRow]) -> str:
    head = (
        "<tr><th>#</th><th>campaign</th><th>impressions</th><th>clicks</th><th>conversions</th>"
        "<th>spend</th><th>revenue</th><th>CTR</th><th>CVR</th><th>CPA</th><th>ROAS</th></tr>"
    )
    body = []
    for r in rows:
        name = f" <span class=muted>{escape(r.campaign_name)}</span>" if r.campaign_name else ""
        body.append(
            f'<tr data-campaign="{escape(r.campaign_id)}"><td>{r.rank}</td>'
            f"<td>{escape(r.campaign_id)}{name}</td>"
            f'<td data-value="{r.impressions}">{r.impressions:,}</td>'
            f'<td data-value="{r.clicks}">{r.clicks:,}</td>'
            f'<td data-value="{r.conversions}">{r.conversions:,}</td>'
            f'<td data-value="{r.spend_usd}">{_usd(r.spend_usd)}</td>'
            f'<td data-value="{r.revenue_usd}">{_usd(r.revenue_usd)}</td>'
            f"<td>{_pct(r.ctr)}</td><td>{_pct(r.cvr)}</td><td>{_usd(r.cpa_usd)}</td>"
            f"<td>{_num(r.roas, 2)}</td></tr>"
        )
    if not body:
        body.append('<tr><td colspan="11" class="muted">No events in the last hour.</td></tr>')
    return f'<table id="top-campaigns">{head}{"".join(body)}</table>'


def _stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


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
        f"<td>{escape(a.rule)} · {escape(a.subject)}</td><td>{escape(a.message)}</td>"
        f"<td>{a.value:,.4g}</td><td>{a.threshold:,.4g}</td><td>{_stamp(a.started_at)}</td></tr>"
        for a in alerts
    )
    return f'<table id="alerts-table">{head}{body}</table>'


def panel(s: Snapshot) -> str:
    """The part of the page that refreshes: tiles, charts, tables."""
    o, h = s.overview, s.health
    last_minute = o.events_in_per_s[-6:]
    rate = sum(last_minute) / len(last_minute) if last_minute else 0.0
    lat = o.latency_ms
    p50, p95, p99 = (None, None, None) if lat is None else (lat.p50, lat.p95, lat.p99)
    tiles = [
        _tile("tile-rate", "events/s (last minute)", _num(rate)),
        _tile("tile-total", "events stored", _num(s.total_events)),
        _tile("tile-p50", "batch latency p50", _num(p50, 1, " ms")),
        _tile("tile-p95", "batch latency p95", _num(p95, 1, " ms")),
        _tile("tile-p99", "batch latency p99", _num(p99, 1, " ms")),
        _tile("tile-dup", "duplicate rate (15 min)", _pct(o.duplicate_rate)),
        _tile("tile-quarantine", "quarantine rate (15 min)", _pct(o.quarantine_rate)),
        _tile(
            "tile-lag",
            "consumer lag",
            _num(h.consumer_lag_seconds, 1, " s"),
            f"{h.files_waiting} file(s) waiting",
            bad=h.status != "ok",
        ),
        _tile(
            "tile-alerts",
            "open alerts",
            f"{len(s.alerts)}{'+' if len(s.alerts) >= MAX_ALERTS else ''}",
            f"{sum(a.severity == 'critical' for a in s.alerts)} critical",
            bad=any(a.severity == "critical" for a in s.alerts),
        ),
    ]
    throughput = line_chart(
        "chart-throughput",
        {"events in": o.events_in_per_s, "accepted": o.accepted_per_s},
        start_ms=o.start_ms,
        step_ms=o.step_ms,
        unit="events/s",
    )
    latency = line_chart(
        "chart-latency",
        {
            "p50": [None if p is None else p.p50 for p in o.latency_minutes],
            "p95": [None if p is None else p.p95 for p in o.latency_minutes],
            "p99": [None if p is None else p.p99 for p in o.latency_minutes],
        },
        start_ms=o.start_ms,
        step_ms=60_000,
        unit="ms",
    )
    reasons = escape("; ".join(h.messages))
    status = (
        '<span id="health-status">healthy</span>'
        if h.status == "ok"
        else f'<span id="health-status" class="bad">unhealthy: {reasons}</span>'
    )
    return (
        f'<div class="muted" id="updated" data-now-ms="{s.now_ms}">updated {_clock(s.now_ms)}'
        f" UTC · {status} · {o.batches:,} batches in 15 min</div>"
        f'<div class="tiles">{"".join(tiles)}</div>'
        f'<div class="charts"><section class="card"><h2>Events/s, last 15 minutes</h2>'
        f"{throughput}</section>"
        f'<section class="card"><h2>Batch processing latency (ms), per minute</h2>{latency}'
        "</section></div>"
        f'<section class="card"><h2>Top campaigns by spend, last hour</h2>{_top_table(s.top)}'
        "</section>"
        f'<section class="card" id="alerts"><h2>Open alerts</h2>{_alerts(s.alerts)}</section>'
    )


def page(s: Snapshot) -> str:
    """The whole dashboard page."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>adevents dashboard</title><style>{_STYLE}</style>"
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_MS // 1000}"></noscript>'
        "</head><body>"
        # No DATA_DIR here: the page may be open to anyone, and a path is an internal.
        "<header><h1>adevents</h1>"
        '<span><a style="color:#93c5fd" href="/docs">API</a> · '
        '<a style="color:#93c5fd" href="/metrics">metrics</a></span></header>'
        f'<main id="panel" data-refresh-ms="{REFRESH_MS}" data-refreshes="0">{panel(s)}</main>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


def now_ms() -> int:
    return int(time.time() * 1000)
