"""The pipeline's own vital signs, from the ledger: throughput, latency, rates, totals, alerts."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.schema import FILE_REASONS, REASONS
from pipeline.tables import Alert, list_alerts
from queries.lake import Lake

#: Upper bounds (seconds) of the batch processing latency histogram.
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def recent_ledger_files(lake: Lake, since_ms: int) -> list[str]:
    """Ledger files of batches committed at or after ``since_ms`` (by footer statistics)."""
    files = lake.files("ledger", since_ms=since_ms)
    stats = lake.stats("ledger", files)
    return [f for f in files if _newer(stats[f].max_ms, since_ms)]


def _newer(max_ms: int | None, since_ms: int) -> bool:
    return max_ms is None or max_ms >= since_ms


def processing_rate(lake: Lake, now_ms: int, window_ms: int = 10_000) -> float:
    """Events per second the consumer took in over the last ``window_ms`` (0 when idle)."""
    since = now_ms - window_ms
    sql = """
        SELECT coalesce(sum(rows_in), 0) FROM {ledger}
        WHERE committed_at >= make_timestamptz($since_ms * 1000)
          AND committed_at <= make_timestamptz($now_ms * 1000)"""

    def attempt() -> float:
        files = recent_ledger_files(lake, since)
        if not files:
            return 0.0
        rows = lake.query(sql, {"since_ms": since, "now_ms": now_ms}, sources={"ledger": files})
        return float(rows[0][0]) / (window_ms / 1000)

    return lake.read(attempt)


def last_commit_ms(lake: Lake, now_ms: int) -> int | None:
    """When the newest batch was committed (epoch ms), or None when none ever was."""

    def attempt() -> int | None:
        for since in (now_ms - 2 * 86_400_000, None):
            files = lake.files("ledger", since_ms=since)
            times = [s.max_ms for s in lake.stats("ledger", files).values() if s.max_ms]
            if times:
                return max(times)
        return None

    return lake.read(attempt)


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

    def attempt() -> Overview:
        src = {"ledger": recent_ledger_files(lake, start)}
        events_in, accepted = [0.0] * steps, [0.0] * steps
        for i, rows_in, acc in lake.query(per_step, params, sources=src):
            if 0 <= i < steps:
                events_in[i] = rows_in / (step_ms / 1000)
                accepted[i] = acc / (step_ms / 1000)
        latency: list[Percentiles | None] = [None] * minutes
        for i, q in lake.query(per_minute, {"start_ms": start}, sources=src):
            if 0 <= i < minutes:
                latency[i] = _percentiles(q)
        (n, rows_in, acc, dups, quar, q, lag) = lake.query(
            totals, {"start_ms": start}, sources=src
        )[0]
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

    return lake.read(attempt)


@dataclass
class LedgerTotals:
    """All-time totals of the ledger, for Prometheus counters."""

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

    def copy(self) -> LedgerTotals:
        return LedgerTotals(
            dict(self.batches_by_status),
            self.rows_in,
            self.accepted,
            self.duplicates,
            dict(self.quarantined_by_reason),
            list(self.latency_counts),
            self.latency_sum_s,
        )


class LedgerCounter:
    """Keeps :class:`LedgerTotals` up to date by reading each new ledger file once."""

    _SQL: Final = f"""
        SELECT status, rows_in, accepted, duplicates, quarantined, processing_ms,
               {", ".join(f"quarantined_{r}" for r in REASONS)}
        FROM {{ledger}}"""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self._seen: set[str] = set()
        self._totals = LedgerTotals()
        self._lock = threading.Lock()

    def update(self) -> LedgerTotals:
        """Add the ledger files committed since the last call; return a copy of the totals."""
        with self._lock:

            def attempt() -> tuple[list[str], list[tuple[Any, ...]]]:
                new = [f for f in self.lake.files("ledger") if f not in self._seen]
                return new, self.lake.query(self._SQL, sources={"ledger": new}) if new else []

            new, rows = self.lake.read(attempt)
            t = self._totals
            for status, rows_in, accepted, dups, quarantined, ms, *by_reason in rows:
                t.batches_by_status[status] = t.batches_by_status.get(status, 0) + 1
                t.rows_in += rows_in or 0
                t.accepted += accepted or 0
                t.duplicates += dups or 0
                if status in FILE_REASONS:
                    t.quarantined_by_reason[status] += quarantined or 0
                for reason, n in zip(REASONS, by_reason, strict=True):
                    t.quarantined_by_reason[reason] += n or 0
                seconds = (ms or 0.0) / 1000
                t.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
                t.latency_sum_s += seconds
            self._seen.update(new)
            return t.copy()


def alerts(lake: Lake, *, open_only: bool = False, limit: int = 100) -> list[Alert]:
    """Stored alerts: open ones first (critical, then newest), then resolved ones, most recently
    ended first; the order of :func:`pipeline.tables.list_alerts`, which reads the store."""
    return list_alerts(lake.layout, open_only=open_only, limit=limit)
