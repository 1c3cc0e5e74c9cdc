"""The charts' data as JSON: what each chart draws, built from ``queries.dashboard`` answers.

The browser (``static/dashboard.js``) draws every chart the same way from these records, so
which charts a page has, their units and their series are decided here, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

from msgspec import Struct

from pipeline.schema import DAY_MS
from queries.campaigns import BUCKET_MS, Bucket, Totals, ratios
from queries.dashboard import CampaignInfo, DaySpend, PipelineSeries, TimeRange

#: How the browser formats a chart's values: events/s and counts as 45k or 1.2M, ms as
#: "250 ms", usd as "$1.2k", percent as "2.5%", ratio as "1.35".
Unit = Literal["per_s", "count", "ms", "usd", "percent", "ratio"]


class Line(Struct):
    """One series: its points' times (epoch ms, UTC) and values (null: no value there)."""

    name: str
    x: list[int]
    y: list[float | None]
    dash: Literal["solid", "dash", "dot"] = "solid"


class Chart(Struct):
    """A line chart, or a funnel (``labels`` are its stages; one line, x unused)."""

    id: str
    unit: Unit
    kind: Literal["lines", "funnel"] = "lines"
    lines: list[Line] = []
    labels: list[str] = []
    #: [start, end] of the x axis (epoch ms) when it is not the page's range.
    x_range: list[int] | None = None


class ChartSet(Struct):
    """Every chart of a page, over one time range."""

    range: str
    since: int
    until: int
    charts: list[Chart]


def pipeline_charts(r: TimeRange, s: PipelineSeries) -> ChartSet:
    """Throughput and batch latency over the range."""
    x = s.steps
    return ChartSet(
        range=r.name,
        since=s.start_ms,
        until=s.until_ms,
        charts=[
            Chart(
                "chart-throughput",
                "per_s",
                lines=[
                    Line("events in", x, list[float | None](s.events_in_per_s)),
                    Line("accepted", x, list[float | None](s.accepted_per_s)),
                    Line("duplicates", x, list[float | None](s.duplicates_per_s), "dot"),
                    Line("quarantined", x, list[float | None](s.quarantined_per_s), "dash"),
                ],
            ),
            Chart(
                "chart-latency",
                "ms",
                lines=[
                    Line("p50", x, s.latency_p50_ms),
                    Line("p95", x, s.latency_p95_ms),
                    Line("p99", x, s.latency_p99_ms),
                ],
            ),
        ],
    )


def total_of(buckets: Sequence[Bucket]) -> Totals:
    """The sum of a series' buckets."""
    return Totals(
        *(sum(getattr(b.totals, f) for b in buckets) for f in Totals.__dataclass_fields__)
    )


def _usd(micros: float | None) -> float | None:
    return None if micros is None else micros / 1e6


#: (chart id, unit, name of the ratio) for the campaign's ratio charts.
_RATIO_CHARTS: Final[tuple[tuple[str, Unit, str], ...]] = (
    ("chart-ctr", "percent", "CTR"),
    ("chart-cvr", "percent", "CVR"),
    ("chart-cpa", "usd", "CPA"),
    ("chart-roas", "ratio", "ROAS"),
)


def campaign_charts(
    r: TimeRange,
    *,
    since_ms: int,
    until_ms: int,
    buckets: Sequence[Bucket],
    info: CampaignInfo,
    day: DaySpend,
) -> ChartSet:
    """The funnel over the range, today's spend against the budget, and the ratios per bucket."""
    total = total_of(buckets)
    funnel = Chart(
        "chart-funnel",
        "count",
        kind="funnel",
        labels=["impressions", "clicks", "conversions"],
        lines=[
            Line(
                "events",
                [],
                [float(total.impressions), float(total.clicks), float(total.conversions)],
            )
        ],
    )
    spend_x = [day.day_start_ms, *day.minute_ends_ms]
    spend = [Line("spend today", spend_x, [0.0, *(m / 1e6 for m in day.cumulative_micros)])]
    day_end = day.day_start_ms + DAY_MS
    if info.daily_budget_micros is not None:
        budget = info.daily_budget_micros / 1e6
        spend += [
            Line("daily budget", [day.day_start_ms, day_end], [budget, budget], "dash"),
            # Even pacing: the budget spread evenly over the day.
            Line("pacing", [day.day_start_ms, day_end], [0.0, budget], "dot"),
        ]
    # Every bucket of the range, empty ones as gaps (null), so that a line never bridges
    # hours without events.
    width = BUCKET_MS[r.granularity]
    x = list(range(since_ms - since_ms % width, until_ms, width))
    by_start = {b.start_ms: b.totals for b in buckets}
    per_bucket = [ratios(by_start.get(start, Totals())) for start in x]
    values: dict[str, list[float | None]] = {
        "CTR": [p.ctr for p in per_bucket],
        "CVR": [p.cvr for p in per_bucket],
        "CPA": [_usd(p.cpa_micros) for p in per_bucket],
        "ROAS": [p.roas for p in per_bucket],
    }
    ratio_charts = [
        Chart(chart_id, unit, lines=[Line(name, x, values[name])])
        for chart_id, unit, name in _RATIO_CHARTS
    ]
    return ChartSet(
        range=r.name,
        since=since_ms,
        until=until_ms,
        charts=[
            funnel,
            Chart("chart-spend", "usd", lines=spend, x_range=[day.day_start_ms, day_end]),
            *ratio_charts,
        ],
    )
