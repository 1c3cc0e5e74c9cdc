"""The pipeline's own vital signs, from the ledger: throughput, latency, rates, totals, alerts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Final

from pipeline.schema import FILE_REASONS, REASONS
from pipeline.tables import Alert, list_alerts
from queries.lake import Lake

#: Upper bounds (seconds) of the batch processing latency histogram.
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def processing_rate(lake: Lake, now_ms: int, window_ms: int = 10_000) -> float:
    """Events per second the consumer took in over the last ``window_ms`` (0 when idle)."""
    since = now_ms - window_ms
    sql = """
        SELECT coalesce(sum(rows_in), 0) FROM {ledger}
        WHERE committed_at >= make_timestamptz($since_ms * 1000)
          AND committed_at <= make_timestamptz($now_ms * 1000)"""
    view = lake.view("ledger")
    # Only files whose commit times (log statistics) reach the window: usually the newest few,
    # and none at all on an idle lake. The window moves with every call, so the answer itself
    # is never remembered.
    recent = view.files("ledger", since, now_ms + 1)
    if not recent:
        return 0.0
    rows = view.query(sql, {"since_ms": since, "now_ms": now_ms}, files={"ledger": recent})
    return float(rows[0][0]) / (window_ms / 1000)


def last_commit_ms(lake: Lake) -> int | None:
    """When the newest batch was committed (epoch ms, from the ledger's log statistics), or
    None when none ever was."""
    stats = lake.view("ledger").table("ledger").stats.values()
    times = [s.max_ms for s in stats if s.max_ms is not None]
    return max(times) if times else None


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True)
class Overview:
    """The last ``window_ms`` of the pipeline, for the dashboard."""

    start_ms: int
    step_ms: int
    #: Per step: events taken in and accepted, per second.
    events_in_per_s: list[float]
    accepted_per_s: list[float]
    #: Per minute: batch processing latency percentiles (ms); None where no batch committed.
    latency_minutes: list[Percentiles | None]
    batches: int
    rows_in: int
    accepted: int
    duplicates: int
    quarantined: int
    latency_ms: Percentiles | None
    lag_p95_ms: float | None

    @property
    def duplicate_rate(self) -> float | None:
        return self.duplicates / self.rows_in if self.rows_in else None

    @property
    def quarantine_rate(self) -> float | None:
        return self.quarantined / self.rows_in if self.rows_in else None


def _percentiles(values: Any) -> Percentiles | None:
    if values is None or any(v is None for v in values):
        return None
    return Percentiles(*(float(v) for v in values))


def overview(lake: Lake, now_ms: int, window_ms: int = 900_000, step_ms: int = 10_000) -> Overview:
    """Throughput per ``step_ms``, latency percentiles, duplicate and quarantine rates."""
    start = now_ms - window_ms
    start -= start % step_ms
    steps = -(-(now_ms - start) // step_ms)
    minutes = -(-(now_ms - start) // 60_000)
    params = {"start_ms": start, "step_ms": step_ms}
    in_window = "committed_at >= make_timestamptz($start_ms * 1000)"
    per_step = f"""
        SELECT (epoch_ms(committed_at) - $start_ms) // $step_ms AS i,
               sum(rows_in), sum(accepted)
        FROM {{ledger}} WHERE {in_window} GROUP BY i"""
    per_minute = f"""
        SELECT (epoch_ms(committed_at) - $start_ms) // 60000 AS i,
               quantile_cont(processing_ms, [0.5, 0.95, 0.99])
        FROM {{ledger}} WHERE {in_window} GROUP BY i"""
    totals = f"""
        SELECT count(*), coalesce(sum(rows_in), 0), coalesce(sum(accepted), 0),
               coalesce(sum(duplicates), 0), coalesce(sum(quarantined), 0),
               quantile_cont(processing_ms, [0.5, 0.95, 0.99]), quantile_cont(lag_ms, 0.95)
        FROM {{ledger}} WHERE {in_window}"""

    view = lake.view("ledger")
    events_in, accepted = [0.0] * steps, [0.0] * steps
    for i, rows_in, acc in view.query(per_step, params):
        if 0 <= i < steps:
            events_in[i] = rows_in / (step_ms / 1000)
            accepted[i] = acc / (step_ms / 1000)
    latency: list[Percentiles | None] = [None] * minutes
    for i, q in view.query(per_minute, {"start_ms": start}):
        if 0 <= i < minutes:
            latency[i] = _percentiles(q)
    (n, rows_in, acc, dups, quar, q, lag) = view.query(totals, {"start_ms": start})[0]
    return Overview(
        start_ms=start,
        step_ms=step_ms,
        events_in_per_s=events_in,
        accepted_per_s=accepted,
        latency_minutes=latency,
        batches=int(n),
        rows_in=int(rows_in),
        accepted=int(acc),
        duplicates=int(dups),
        quarantined=int(quar),
        latency_ms=_percentiles(q) if n else None,
        lag_p95_ms=None if lag is None else float(lag),
    )


@dataclass(frozen=True)
class LedgerTotals:
    """All-time totals of the ledger (rows retention has not removed), for Prometheus counters."""

    batches_by_status: dict[str, int] = field(default_factory=dict)
    rows_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined_by_reason: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REASONS + FILE_REASONS, 0)
    )
    #: Non-cumulative counts per LATENCY_BUCKETS_S bound, plus one for +Inf.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0


_BUCKETS: Final = len(LATENCY_BUCKETS_S) + 1
#: A batch's latency bucket: the first bound it does not exceed (bisect_left), else +Inf.
_LATENCY_BUCKET: Final = (
    "CASE "
    + " ".join(
        f"WHEN coalesce(processing_ms, 0) <= {bound * 1000!r} THEN {i}"
        for i, bound in enumerate(LATENCY_BUCKETS_S)
    )
    + f" ELSE {len(LATENCY_BUCKETS_S)} END"
)
_TOTALS_SQL: Final = f"""
    SELECT status, count(*), coalesce(sum(rows_in), 0), coalesce(sum(accepted), 0),
           coalesce(sum(duplicates), 0), coalesce(sum(quarantined), 0),
           coalesce(sum(processing_ms), 0) / 1000,
           [{", ".join(f"count(*) FILTER (WHERE bucket = {i})" for i in range(_BUCKETS))}],
           {", ".join(f"coalesce(sum(quarantined_{r}), 0)" for r in REASONS)}
    FROM (SELECT *, {_LATENCY_BUCKET} AS bucket FROM {{ledger}})
    GROUP BY status ORDER BY status"""


def ledger_totals(lake: Lake) -> LedgerTotals:
    """Totals over every ledger row of the latest version, computed once per version.

    Rows that retention deletes leave the totals, which Prometheus takes as a counter reset.
    """
    view = lake.view("ledger")
    return view.remember("ledger_totals", lambda: _totals(view.query(_TOTALS_SQL)))


def _totals(rows: list[tuple[Any, ...]]) -> LedgerTotals:
    t = LedgerTotals()
    rows_in = accepted = duplicates = 0
    latency_sum = 0.0
    for status, n, r_in, acc, dups, quarantined, seconds, buckets, *by_reason in rows:
        t.batches_by_status[status] = int(n)
        rows_in, accepted, duplicates = rows_in + r_in, accepted + acc, duplicates + dups
        latency_sum += float(seconds)
        if status in FILE_REASONS:
            t.quarantined_by_reason[status] += int(quarantined)
        for reason, q in zip(REASONS, by_reason, strict=True):
            t.quarantined_by_reason[reason] += int(q)
        for i, count in enumerate(buckets):
            t.latency_counts[i] += int(count)
    return replace(
        t,
        rows_in=int(rows_in),
        accepted=int(accepted),
        duplicates=int(duplicates),
        latency_sum_s=latency_sum,
    )


def alerts(lake: Lake, *, open_only: bool = False, limit: int = 100) -> list[Alert]:
    """Stored alerts: open ones first (critical, then newest), then resolved ones, most recently
    ended first; the order of :func:`pipeline.tables.list_alerts`, which reads the store."""
    layout = lake.layout
    return [] if layout is None else list_alerts(layout, open_only=open_only, limit=limit)
