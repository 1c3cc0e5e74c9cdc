"""Incremental rollups per campaign per minute, hour and day, recomputed where new batches landed.

Layout under ``rollups/`` (one file per partition, each replaced atomically):

- ``minute/date=D/hour=HH/rollup.parquet``, ``hour/date=D/rollup.parquet``,
  ``day/date=D/rollup.parquet``: ROLLUP_SCHEMA rows (:mod:`pipeline.schema`; the paths are
  :class:`pipeline.tables.RollupPaths`), one per campaign per bucket.
- ``_hll/hour/date=D/hour=HH.parquet``, ``_hll/day/date=D.parquet``: the unique-user sketches
  of each hour and day (``_`` keeps them out of ``rollups/<granularity>/`` readers).
- ``_state.json``: which ledger files were already seen.

A run reads the ledger files written since the last run, takes the minutes their batches'
[min, max] event_time span, and recomputes exactly those minute buckets from the live events
files. Hour and day counts are sums of the finer level; their unique users come from sketches
that only ever grow by register-wise maximum, which is idempotent. So a run over the same
batches again (after a crash, or twice) changes nothing, and a late event re-does its own old
minute, hour and day.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import polars as pl

from jobs import hll
from jobs.storage import (
    job_lock,
    ledger_files_since,
    read_json,
    read_ledger,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.livefiles import live_files, partition_of
from pipeline.schema import ENRICHED_SCHEMA, MINUTE_MS, ROLLUP_SCHEMA, UTC_MS, Layout
from pipeline.tables import LEDGER_LAG_S, RollupPaths, read_parquet_or

log = logging.getLogger("adevents.jobs.rollup")

GRANULARITIES: Final = ("minute", "hour", "day")
_EVERY: Final = {"minute": "1m", "hour": "1h", "day": "1d"}

SKETCH_SCHEMA: Final = pl.Schema(
    {"campaign_id": pl.String(), "bucket": UTC_MS, "reg": pl.UInt16(), "rho": pl.UInt8()}
)
_KEYS: Final = ("campaign_id", "bucket")
_SUMS: Final = ("impressions", "clicks", "conversions", "spend_micros", "revenue_micros")
_EVENT_COLUMNS: Final = (
    "campaign_id",
    "event_type",
    "event_time",
    "cost_micros",
    "revenue_micros",
    "user_id",
)


# -- pure rollup maths -------------------------------------------------------------------------
def _bucket(granularity: str) -> pl.Expr:
    return pl.col("event_time").dt.truncate(_EVERY[granularity]).alias("bucket")


def totals(events: pl.LazyFrame, granularity: str) -> pl.LazyFrame:
    """Counts and money per campaign per bucket of ``granularity``."""
    kind = pl.col("event_type")
    return events.group_by("campaign_id", _bucket(granularity)).agg(
        impressions=(kind == "impression").sum().cast(pl.Int64),
        clicks=(kind == "click").sum().cast(pl.Int64),
        conversions=(kind == "conversion").sum().cast(pl.Int64),
        spend_micros=pl.col("cost_micros").sum().cast(pl.Int64),
        revenue_micros=pl.col("revenue_micros").sum().cast(pl.Int64),
    )


def sketches(events: pl.LazyFrame, granularity: str) -> pl.LazyFrame:
    """Unique-user sketches per campaign per bucket of ``granularity``."""
    return hll.registers(events.with_columns(_bucket(granularity)), _KEYS).select(
        SKETCH_SCHEMA.names()
    )


def coarsen(sketch: pl.DataFrame, granularity: str) -> pl.DataFrame:
    """Sketches of finer buckets merged into buckets of ``granularity``."""
    out = sketch.with_columns(pl.col("bucket").dt.truncate(_EVERY[granularity]))
    return hll.merge([out], _KEYS, sort=False).cast(SKETCH_SCHEMA)


def with_uniques(sums: pl.DataFrame, sketch: pl.DataFrame) -> pl.DataFrame:
    """Rollup rows: ``sums`` with each bucket's unique-user estimate (0 with no known user)."""
    uniques = hll.estimate(sketch.lazy(), _KEYS).collect()
    return (
        sums.join(uniques, on=list(_KEYS), how="left")
        .with_columns(pl.col("unique_users").fill_null(0))
        .select(ROLLUP_SCHEMA.names())
        .cast(ROLLUP_SCHEMA)
        .sort(*_KEYS)
    )


def sum_up(rows: pl.DataFrame, granularity: str) -> pl.DataFrame:
    """Counts and money of finer rollup rows summed into buckets of ``granularity``."""
    return rows.group_by("campaign_id", pl.col("bucket").dt.truncate(_EVERY[granularity])).agg(
        *(pl.col(c).sum().cast(pl.Int64) for c in _SUMS)
    )


def full_rollups(events: pl.LazyFrame) -> dict[str, pl.DataFrame]:
    """Every level computed from scratch from ``events``: what the incremental job must equal."""
    out = {}
    for g in GRANULARITIES:
        sums = totals(events, g).collect()
        out[g] = with_uniques(sums, sketches(events, g).collect())
    return out


def touched_minutes(ledger: pl.DataFrame) -> pl.Series:
    """Minute starts (epoch ms) spanned by the accepted events of each ledger row, sorted."""
    rows = ledger.filter(
        (pl.col("status") == "ok")
        & (pl.col("accepted") > 0)
        & pl.col("min_event_time").is_not_null()
    )
    first = pl.col("min_event_time").dt.epoch("ms") // MINUTE_MS
    last = pl.col("max_event_time").dt.epoch("ms") // MINUTE_MS
    minutes = rows.select(pl.int_ranges(first, last + 1).alias("m")).explode("m").unique().sort("m")
    return (minutes["m"] * MINUTE_MS).cast(pl.Int64).alias("minute_ms")


def minute_ranges(minutes_ms: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted minute starts as [start, end) runs of consecutive minutes."""
    runs: list[tuple[int, int]] = []
    for m in minutes_ms:
        if runs and runs[-1][1] == m:
            runs[-1] = (runs[-1][0], m + MINUTE_MS)
        else:
            runs.append((m, m + MINUTE_MS))
    return runs


def replace_buckets(stored: pl.DataFrame, fresh: pl.DataFrame, buckets: pl.Series) -> pl.DataFrame:
    """``stored`` rows outside ``buckets`` plus the recomputed ``fresh`` rows, sorted."""
    keep = stored.filter(~pl.col("bucket").is_in(buckets.implode()))
    return pl.concat([keep, fresh.select(stored.columns).cast(stored.schema)]).sort(*_KEYS)


# -- the job -----------------------------------------------------------------------------------
@dataclass
class RollupReport:
    batches: int = 0
    minutes: int = 0
    hours: int = 0
    days: int = 0
    rebuilt: bool = False
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"rollup batches={self.batches} minutes={self.minutes} hours={self.hours} "
            f"days={self.days}{' rebuilt=true' if self.rebuilt else ''} seconds={self.seconds:.2f}"
        )


@dataclass
class _State:
    hll_check: str
    cursor: float | None = None
    recent: dict[str, float] = field(default_factory=dict)


def _load_state(paths: RollupPaths) -> _State:
    raw = read_json(paths.state)
    if not isinstance(raw, dict):
        return _State(hll.check())
    return _State(str(raw.get("hll_check")), raw.get("cursor"), dict(raw.get("recent") or {}))


def _read_minutes(layout: Layout, date: str, hour: int, minutes: list[int]) -> pl.DataFrame:
    """The events of ``minutes`` (epoch ms starts) in one hour partition, from live files."""
    directory = layout.events / f"date={date}" / f"hour={hour:02d}"
    runs = minute_ranges(minutes)
    window = pl.any_horizontal(
        *(
            pl.col("event_time").is_between(
                datetime.fromtimestamp(lo / 1000, UTC),
                datetime.fromtimestamp(hi / 1000, UTC),
                closed="left",
            )
            for lo, hi in runs
        )
    )
    schema = pl.Schema({c: ENRICHED_SCHEMA[c] for c in _EVENT_COLUMNS})
    for attempt in range(50):
        files = live_files(layout, directory)
        if not files:
            return pl.DataFrame(schema=schema)
        try:
            # Filtering on event_time lets row-group statistics skip most micro-batch files.
            return (
                pl.scan_parquet(files, hive_partitioning=False, schema=ENRICHED_SCHEMA)
                .select(_EVENT_COLUMNS)
                .filter(window)
                .collect()
            )
        except FileNotFoundError:
            # A compaction swapped files between listing and reading: list again.
            if attempt == 49:
                raise
            time.sleep(0.005)
    raise AssertionError("unreachable")


def _update_hour(
    layout: Layout, paths: RollupPaths, date: str, hour: int, *, minutes: list[int], durable: bool
) -> pl.DataFrame:
    """Recompute ``minutes`` of one hour and the hour's row; returns the hour's sketch delta."""
    events = _read_minutes(layout, date, hour, minutes).lazy()
    minute_sketch = sketches(events, "minute").collect()
    fresh = with_uniques(totals(events, "minute").collect(), minute_sketch)
    buckets = pl.Series([datetime.fromtimestamp(m / 1000, UTC) for m in minutes]).cast(UTC_MS)
    stored = read_parquet_or(paths.minute(date, hour), ROLLUP_SCHEMA)
    minute_rows = replace_buckets(stored, fresh, buckets)
    if not minute_rows.equals(stored):
        write_parquet_atomic(minute_rows, paths.minute(date, hour), durable=durable)

    delta = coarsen(minute_sketch, "hour")
    hour_sketch = read_parquet_or(paths.hour_sketch(date, hour), SKETCH_SCHEMA)
    grown = hll.merge_into(hour_sketch, delta, _KEYS)
    if grown is not None:
        hour_sketch = grown.cast(SKETCH_SCHEMA)
        write_parquet_atomic(hour_sketch, paths.hour_sketch(date, hour), durable=durable)

    hour_rows = with_uniques(sum_up(minute_rows, "hour"), hour_sketch)
    start = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() * 1000
    this_hour = pl.Series([datetime.fromtimestamp(start / 1000 + hour * 3600, UTC)]).cast(UTC_MS)
    stored_hours = read_parquet_or(paths.hour(date), ROLLUP_SCHEMA)
    all_hours = replace_buckets(stored_hours, hour_rows, this_hour)
    if not all_hours.equals(stored_hours):
        write_parquet_atomic(all_hours, paths.hour(date), durable=durable)
    return delta


def _update_day(paths: RollupPaths, date: str, deltas: list[pl.DataFrame], durable: bool) -> None:
    delta = coarsen(pl.concat(deltas), "day") if deltas else pl.DataFrame(schema=SKETCH_SCHEMA)
    day_sketch = read_parquet_or(paths.day_sketch(date), SKETCH_SCHEMA)
    grown = hll.merge_into(day_sketch, delta, _KEYS)
    if grown is not None:
        day_sketch = grown.cast(SKETCH_SCHEMA)
        write_parquet_atomic(day_sketch, paths.day_sketch(date), durable=durable)
    hours = read_parquet_or(paths.hour(date), ROLLUP_SCHEMA)
    day_rows = with_uniques(sum_up(hours, "day"), day_sketch)
    stored = read_parquet_or(paths.day(date), ROLLUP_SCHEMA)
    if not day_rows.equals(stored):
        write_parquet_atomic(day_rows, paths.day(date), durable=durable)


def run_rollup(layout: Layout, *, durable: bool = True, rebuild: bool = False) -> RollupReport:
    """Bring every rollup level up to date with the batches committed since the last run."""
    started = time.perf_counter()
    report = RollupReport()
    paths = RollupPaths(layout)
    with job_lock(layout, "rollup"):
        state = _load_state(paths)
        if rebuild or state.hll_check != hll.check():
            # Sketches made by another hash cannot be merged with new ones: start over from the
            # events still in the lake.
            # Rollups of hours whose events are gone (retention) are kept as they are.
            log.warning("rebuilding rollups from events/ (requested or the hash changed)")
            shutil.rmtree(paths.sketches, ignore_errors=True)
            state = _State(hll.check())
            report.rebuilt = True
        listed_at = time.time()
        since = None if state.cursor is None else state.cursor - LEDGER_LAG_S
        listed = ledger_files_since(layout, since)
        new = [(b, m, p) for b, m, p in listed if b not in state.recent]
        ledger = read_ledger(
            [p for _, _, p in new],
            ["batch_id", "status", "accepted", "min_event_time", "max_event_time"],
        )
        minutes = touched_minutes(ledger).to_list()
        by_hour: dict[tuple[str, int], list[int]] = {}
        for m in minutes:
            by_hour.setdefault(partition_of(m), []).append(m)
        deltas: dict[str, list[pl.DataFrame]] = {}
        for (date, hour), group in sorted(by_hour.items()):
            if not (layout.events / f"date={date}" / f"hour={hour:02d}").is_dir():
                # No events to recompute from (gone by retention): keep the rollups there are.
                continue
            delta = _update_hour(layout, paths, date, hour, minutes=group, durable=durable)
            deltas.setdefault(date, []).append(delta)
        for date, day_deltas in sorted(deltas.items()):
            _update_day(paths, date, day_deltas, durable)
        if new or report.rebuilt or not paths.state.exists():
            # Nothing new: the state stays as it is, so a run after a run writes nothing.
            keep_after = listed_at - LEDGER_LAG_S
            recent = {b: m for b, m in state.recent.items() if m >= keep_after}
            recent.update({b: m for b, m, _ in new if m >= keep_after})
            write_json_atomic(
                {"hll_check": state.hll_check, "cursor": listed_at, "recent": recent},
                paths.state,
                durable=durable,
            )
        report.batches = len(new)
        report.minutes = len(minutes)
        report.hours = sum(len(d) for d in deltas.values())
        report.days = len(deltas)
    report.seconds = time.perf_counter() - started
    return report


def read_rollups(layout: Layout, granularity: str) -> pl.DataFrame:
    """Every stored row of one level, sorted (for tests and ad-hoc use)."""
    files = sorted(RollupPaths(layout).level(granularity).rglob("rollup.parquet"))
    if not files:
        return pl.DataFrame(schema=ROLLUP_SCHEMA)
    frame = pl.read_parquet(files, hive_partitioning=False).cast(ROLLUP_SCHEMA)
    return frame.sort(*_KEYS)
