"""Incremental rollups per campaign per minute, hour and day, recomputed where new batches landed.

Layout under ``rollups/`` (one file per partition, each replaced atomically):

- ``minute/date=D/hour=HH/rollup.parquet``, ``hour/date=D/rollup.parquet``,
  ``day/date=D/rollup.parquet``: ROLLUP_SCHEMA rows (:mod:`pipeline.schema`; the paths are
  :class:`pipeline.tables.RollupPaths`), one per campaign per bucket.
- ``_hll/hour/date=D/hour=HH.parquet``, ``_hll/day/date=D.parquet``: the unique-user sketches
  of each hour and day (``_`` keeps them out of ``rollups/<granularity>/`` readers).
- ``_state.json``: ``ledger_version``, the version of the lake's ledger table up to which every
  batch is rolled up (absent: none is), and the hash check of the sketches.

A run reads the ledger rows appended after ``ledger_version`` (the table's change feed over
its append commits; compaction commits add no rows and are skipped by it), takes the minutes
their batches' [min, max] event_time span, and recomputes exactly those minute buckets from a
snapshot of the events table (pruned to those hours) opened after the ledger: a batch's events
commit before its ledger row, so the snapshot holds every event of every batch read. Hour and
day counts are sums of the finer level; their unique users come from sketches that only ever
grow by register-wise maximum, which is idempotent. So a run over the same batches again (after
a crash, or twice) changes nothing, and a late event re-does its own old minute, hour and day.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from jobs import hll
from jobs.storage import arrow_frame, job_lock, read_json, write_json_atomic, write_parquet_atomic
from lake.location import LakeLocation
from lake.snapshot import table_dataset
from lake.tables import EVENTS, LEDGER, TIMESTAMP, open_table
from pipeline.schema import ENRICHED_SCHEMA, LEDGER_SCHEMA, MINUTE_MS, ROLLUP_SCHEMA, UTC_MS, Layout
from pipeline.tables import RollupPaths, read_parquet_or

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


def appended_ranges(
    history: Sequence[Mapping[str, Any]], after: int, upto: int
) -> list[tuple[int, int]] | None:
    """Inclusive runs of the versions in (after, upto] whose change feed can be read: all but
    deletes (a delete's feed would read the removed files, which vacuum may have taken).

    None when ``history`` (``DeltaTable.history``) lacks a version of the span (its log was
    cleaned up): the caller then reads the whole table instead.
    """
    operations = {int(commit["version"]): commit.get("operation") for commit in history}
    runs: list[tuple[int, int]] = []
    for version in range(after + 1, upto + 1):
        if version not in operations:
            return None
        if operations[version] == "DELETE":
            continue
        if runs and runs[-1][1] == version - 1:
            runs[-1] = (runs[-1][0], version)
        else:
            runs.append((version, version))
    return runs


@dataclass
class _State:
    hll_check: str
    ledger_version: int | None = None


def _load_state(paths: RollupPaths) -> _State:
    raw = read_json(paths.state)
    if not isinstance(raw, dict):
        return _State(hll.check())
    version = raw.get("ledger_version")
    return _State(str(raw.get("hll_check")), None if version is None else int(version))


_LEDGER_COLUMNS: Final = ("status", "accepted", "min_event_time", "max_event_time")


def _ledger_since(location: LakeLocation, table: DeltaTable, after: int | None) -> pl.DataFrame:
    """The ledger rows of ``table`` (at its loaded version) appended after version ``after``;
    every row when ``after`` is None or the change feed since it can no longer be read."""
    schema = pl.Schema({c: LEDGER_SCHEMA[c] for c in _LEDGER_COLUMNS})
    upto = table.version()
    if after is not None and after >= upto:
        return pl.DataFrame(schema=schema)
    if after is not None:
        runs = appended_ranges(table.history(upto - after), after, upto)
        try:
            if runs is not None:
                return _change_feed(table, runs, schema)
        except (DeltaError, OSError, pa.ArrowException) as exc:
            # A compacted ledger file vacuumed since (a rollup behind by more than
            # VACUUM_RETENTION): recompute from every row, which is idempotent.
            log.warning("ledger change feed after version %d unreadable (%s)", after, exc)
        log.warning("rollups recompute every batch in the ledger (from version %d on)", after)
    rows = table_dataset(location, LEDGER, table).to_table(columns=list(_LEDGER_COLUMNS))
    return arrow_frame(rows, schema)


def _change_feed(table: DeltaTable, runs: list[tuple[int, int]], schema: pl.Schema) -> pl.DataFrame:
    frames = [pl.DataFrame(schema=schema)]
    for start, end in runs:
        feed = pa.RecordBatchReader.from_stream(
            table.load_cdf(
                starting_version=start,
                ending_version=end,
                columns=[*_LEDGER_COLUMNS, "_change_type"],
            )
        ).read_all()
        rows = arrow_frame(feed, schema | {"_change_type": pl.String()})
        frames.append(rows.filter(pl.col("_change_type") == "insert").drop("_change_type"))
    return pl.concat(frames)


def _hour_of(minute_ms: int) -> tuple[str, str]:
    start = datetime.fromtimestamp(minute_ms / 1000, UTC)
    return f"{start:%Y-%m-%d}", f"{start:%H}"


def _read_minutes(events: pads.Dataset, date: str, hour: str, minutes: list[int]) -> pl.DataFrame:
    """The events of ``minutes`` (epoch ms starts) of one hour partition of ``events``."""
    time_column = pc.field("event_time")
    window = None
    for lo, hi in minute_ranges(minutes):
        start = pa.scalar(datetime.fromtimestamp(lo / 1000, UTC), TIMESTAMP)
        end = pa.scalar(datetime.fromtimestamp(hi / 1000, UTC), TIMESTAMP)
        run = (time_column >= start) & (time_column < end)
        window = run if window is None else window | run
    # The partition test prunes to the hour's files, the event_time window row groups in them.
    where = (pc.field("date") == date) & (pc.field("hour") == hour)
    rows = events.to_table(columns=list(_EVENT_COLUMNS), filter=where & window)
    return arrow_frame(rows, pl.Schema({c: ENRICHED_SCHEMA[c] for c in _EVENT_COLUMNS}))


def _update_hour(
    events: pads.Dataset,
    paths: RollupPaths,
    date: str,
    hour: str,
    *,
    minutes: list[int],
    durable: bool,
) -> pl.DataFrame:
    """Recompute ``minutes`` of one hour and the hour's row; returns the hour's sketch delta."""
    hour_number = int(hour)
    frame = _read_minutes(events, date, hour, minutes).lazy()
    minute_sketch = sketches(frame, "minute").collect()
    fresh = with_uniques(totals(frame, "minute").collect(), minute_sketch)
    buckets = pl.Series([datetime.fromtimestamp(m / 1000, UTC) for m in minutes]).cast(UTC_MS)
    stored = read_parquet_or(paths.minute(date, hour_number), ROLLUP_SCHEMA)
    minute_rows = replace_buckets(stored, fresh, buckets)
    if not minute_rows.equals(stored):
        write_parquet_atomic(minute_rows, paths.minute(date, hour_number), durable=durable)

    delta = coarsen(minute_sketch, "hour")
    hour_sketch = read_parquet_or(paths.hour_sketch(date, hour_number), SKETCH_SCHEMA)
    grown = hll.merge_into(hour_sketch, delta, _KEYS)
    if grown is not None:
        hour_sketch = grown.cast(SKETCH_SCHEMA)
        write_parquet_atomic(hour_sketch, paths.hour_sketch(date, hour_number), durable=durable)

    hour_rows = with_uniques(sum_up(minute_rows, "hour"), hour_sketch)
    start = datetime.strptime(f"{date} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC)
    this_hour = pl.Series([start]).cast(UTC_MS)
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


#: Above this many hours (a rebuild), the snapshot lists every file: each hour's read still
#: prunes to its own files by partition.
_PRUNED_HOURS_MAX: Final = 240


def _events_snapshot(
    location: LakeLocation, hours: Sequence[tuple[str, str]]
) -> tuple[pads.Dataset, set[tuple[str, str]]] | None:
    """The events table now, pruned to ``hours``, and which of them have events (None: no
    table yet)."""
    try:
        table = open_table(location, EVENTS)
    except TableNotFoundError:
        return None
    present = {(p["date"], p["hour"]) for p in table.partitions()}
    wanted = [(d, h) for d, h in hours if (d, h) in present]
    prune = None
    if 0 < len(wanted) <= _PRUNED_HOURS_MAX:
        prune = " OR ".join(f"(date = '{d}' AND hour = '{h}')" for d, h in wanted)
    return table_dataset(location, EVENTS, table, prune), present


def run_rollup(
    layout: Layout, location: LakeLocation, *, durable: bool = True, rebuild: bool = False
) -> RollupReport:
    """Bring every rollup level up to date with the batches committed since the last run.

    Rollup files live under ``layout`` (DATA_DIR); events and ledger are read from the lake
    at ``location``.
    """
    started = time.perf_counter()
    report = RollupReport()
    paths = RollupPaths(layout)
    with job_lock(layout, "rollup"):
        state = _load_state(paths)
        if rebuild or state.hll_check != hll.check():
            # Sketches made by another hash cannot be merged with new ones: start over from the
            # events still in the lake.
            # Rollups of hours whose events are gone (retention) are kept as they are.
            log.warning("rebuilding rollups from the events table (requested or the hash changed)")
            shutil.rmtree(paths.sketches, ignore_errors=True)
            state = _State(hll.check())
            report.rebuilt = True
        try:
            ledger_table = open_table(location, LEDGER)
        except TableNotFoundError:
            ledger_table = None  # nothing committed yet
        version = None if ledger_table is None else ledger_table.version()
        ledger = (
            pl.DataFrame(schema=LEDGER_SCHEMA)
            if ledger_table is None
            else _ledger_since(location, ledger_table, state.ledger_version)
        )
        minutes = touched_minutes(ledger).to_list()
        by_hour: dict[tuple[str, str], list[int]] = {}
        for m in minutes:
            by_hour.setdefault(_hour_of(m), []).append(m)
        events = _events_snapshot(location, sorted(by_hour)) if by_hour else None
        deltas: dict[str, list[pl.DataFrame]] = {}
        for (date, hour), group in sorted(by_hour.items()):
            if events is None or (date, hour) not in events[1]:
                # No events to recompute from (gone by retention): keep the rollups there are.
                continue
            delta = _update_hour(events[0], paths, date, hour, minutes=group, durable=durable)
            deltas.setdefault(date, []).append(delta)
        for date, day_deltas in sorted(deltas.items()):
            _update_day(paths, date, day_deltas, durable)
        if version != state.ledger_version or report.rebuilt or not paths.state.exists():
            # Nothing new: the state stays as it is, so a run after a run writes nothing.
            write_json_atomic(
                {"hll_check": state.hll_check, "ledger_version": version},
                paths.state,
                durable=durable,
            )
        report.batches = len(ledger)
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
