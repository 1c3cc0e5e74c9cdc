"""What the dashboard's pages chart: the pipeline per step of a time range, a campaign's day."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import polars as pl

from pipeline.schema import DAY_MS, MINUTE_MS
from queries import campaigns
from queries.campaigns import Bucket, Granularity
from queries.lake import Lake

RangeName = Literal["15m", "1h", "6h", "24h"]
RANGE_NAMES: Final[tuple[RangeName, ...]] = ("15m", "1h", "6h", "24h")


@dataclass(frozen=True)
class TimeRange:
    """A range the pages offer: how far back, the pipeline charts' step and the campaign
    series' bucket width (about a hundred points each, whatever the range)."""

    name: RangeName
    label: str
    window_ms: int
    step_ms: int
    granularity: Granularity


RANGES: Final[dict[str, TimeRange]] = {
    r.name: r
    for r in (
        TimeRange("15m", "15 min", 15 * MINUTE_MS, 10_000, "minute"),
        TimeRange("1h", "1 h", 60 * MINUTE_MS, 30_000, "minute"),
        TimeRange("6h", "6 h", 360 * MINUTE_MS, 3 * MINUTE_MS, "minute"),
        TimeRange("24h", "24 h", DAY_MS, 10 * MINUTE_MS, "hour"),
    )
}


@dataclass(frozen=True)
class PipelineSeries:
    """The pipeline over [start, until) in steps of ``step_ms``: rates per second and batch
    processing latency percentiles (ms; None in a step where no batch committed)."""

    start_ms: int
    until_ms: int
    step_ms: int
    events_in_per_s: list[float]
    accepted_per_s: list[float]
    duplicates_per_s: list[float]
    quarantined_per_s: list[float]
    latency_p50_ms: list[float | None]
    latency_p95_ms: list[float | None]
    latency_p99_ms: list[float | None]

    @property
    def steps(self) -> list[int]:
        """The start (epoch ms) of every step."""
        return list(range(self.start_ms, self.until_ms, self.step_ms))


_PER_STEP: Final = """
    SELECT (epoch_ms(committed_at) - $start_ms) // $step_ms AS i,
           sum(rows_in), sum(accepted), sum(duplicates), sum(quarantined),
           quantile_cont(processing_ms, [0.5, 0.95, 0.99])
    FROM {ledger}
    WHERE committed_at >= make_timestamptz($start_ms * 1000)
      AND committed_at < make_timestamptz($until_ms * 1000)
    GROUP BY i"""


def pipeline_series(lake: Lake, now_ms: int, window_ms: int, step_ms: int) -> PipelineSeries:
    """The ledger's batches committed in the last ``window_ms``, summed per ``step_ms``."""
    start = now_ms - window_ms
    start -= start % step_ms
    until = now_ms - now_ms % step_ms + step_ms
    steps = (until - start) // step_ms
    per_s = step_ms / 1000
    rates: list[list[float]] = [[0.0] * steps for _ in range(4)]
    latency: list[list[float | None]] = [[None] * steps for _ in range(3)]
    view = lake.view("ledger")
    # Only files whose commit times (log statistics) reach the range: a day of the ledger is
    # about 86k rows per consumer, read as few files as the range needs.
    files = view.files("ledger", start, until)
    if files:
        params = {"start_ms": start, "until_ms": until, "step_ms": step_ms}
        for i, *sums, quantiles in view.query(_PER_STEP, params, files={"ledger": files}):
            if not 0 <= i < steps:
                continue
            for rate, total in zip(rates, sums, strict=True):
                rate[i] = float(total) / per_s
            if quantiles is not None and all(q is not None for q in quantiles):
                for percentile, q in zip(latency, quantiles, strict=True):
                    percentile[i] = float(q)
    events_in, accepted, duplicates, quarantined = rates
    p50, p95, p99 = latency
    return PipelineSeries(
        start, until, step_ms, events_in, accepted, duplicates, quarantined, p50, p95, p99
    )


@dataclass(frozen=True)
class CampaignInfo:
    """A campaign as the dimension describes it (all None for one it does not list)."""

    campaign_id: str
    campaign_name: str | None
    advertiser_id: str | None
    daily_budget_micros: int | None
    listed: bool


def campaign_info(lake: Lake, campaign_id: str) -> CampaignInfo:
    """The campaign's row of the dimension (DATA_DIR/dimensions/campaigns.parquet)."""
    layout = lake.layout
    unknown = CampaignInfo(campaign_id, None, None, None, listed=False)
    if layout is None or not layout.campaigns.is_file():
        return unknown
    # Polars rather than the {campaigns} view: the budget column is optional in the file.
    frame = pl.scan_parquet(layout.campaigns)
    names = frame.collect_schema().names()
    wanted = [c for c in ("campaign_name", "advertiser_id", "daily_budget_micros") if c in names]
    rows = frame.filter(pl.col("campaign_id") == campaign_id).select(wanted).head(1).collect()
    if rows.is_empty():
        return unknown
    row = rows.row(0, named=True)
    budget = row.get("daily_budget_micros")
    return CampaignInfo(
        campaign_id,
        row.get("campaign_name"),
        row.get("advertiser_id"),
        None if budget is None or budget <= 0 else int(budget),
        listed=True,
    )


def campaign_series(lake: Lake, campaign_id: str, now_ms: int, r: TimeRange) -> list[Bucket]:
    """The campaign's buckets over the range (whole buckets from its start to now)."""
    start = now_ms - r.window_ms
    return campaigns.series(lake, campaign_id, start, now_ms, r.granularity)


@dataclass(frozen=True)
class DaySpend:
    """The campaign's spend since midnight UTC, cumulative at the end of each minute."""

    day_start_ms: int
    minute_ends_ms: list[int]
    cumulative_micros: list[int]


def spend_today(lake: Lake, campaign_id: str, now_ms: int) -> DaySpend:
    """Cumulative spend per minute of today (UTC), for the budget chart and its pacing line."""
    day = now_ms - now_ms % DAY_MS
    ends: list[int] = []
    cumulative: list[int] = []
    total = 0
    for b in campaigns.series(lake, campaign_id, day, now_ms, "minute"):
        total += b.totals.spend_micros
        ends.append(min(b.start_ms + MINUTE_MS, now_ms))
        cumulative.append(total)
    return DaySpend(day, ends, cumulative)
