"""Incremental rollups per campaign per minute, hour and day, folded from the rows each commit adds.

Layout under ``rollups/`` (one file per partition, each replaced atomically):

- ``minute/date=D/hour=HH/rollup.parquet``, ``hour/date=D/rollup.parquet``,
  ``day/date=D/rollup.parquet``: ROLLUP_SCHEMA rows (:mod:`pipeline.schema`; the paths are
  :class:`pipeline.tables.RollupPaths`), one per campaign per bucket.
- ``_hll/hour/date=D/hour=HH.parquet``, ``_hll/day/date=D.parquet``: the unique-user sketches
  of each hour and day (``_`` keeps them out of ``rollups/<granularity>/`` readers).
- ``_state.json``: ``events_version``, the version of the events table every row of which is
  folded in; ``ledger_version``, a ledger version opened before it (every batch with a ledger
  row up to it is folded in: a batch's events commit before its ledger row), which readers use
  to tell which minutes newer batches touched (:mod:`queries.rollups`); the sketches' hash check.

A run reads the rows the events table gained since ``events_version`` (its change feed,
:mod:`lake.changes`: appends only; compaction and clustering add no rows, retention deletes are
left out) and folds them in: minute counts and money are *added* to the stored minute rows,
sketches grow by register-wise maximum. Cost and memory follow the new rows (streamed, folded
into per-campaign partial sums every :data:`FOLD_ROWS` rows), never the size of the hour or of
the table, however late the events.

Exactly once, without a transaction across files: each minute file records in its Parquet
metadata the events version it includes (:data:`VERSION_KEY`), and takes only rows of newer
commits. A crash between two files' writes, or a run over the same commits again, adds nothing
twice; sketches are idempotent anyway, and hour and day rows are recomputed from the level below.

A full recomputation from a snapshot replaces the hours the events table has: on the first run,
with ``--rebuild`` or a changed hash, and when the feed since ``events_version`` can no longer be
read (the job was down for longer than VACUUM_RETENTION). Rollups of hours whose events are gone
(retention) are kept as they are.

Unique users are counted per hour and per day. A minute row's ``unique_users`` is null: an exact
fold of late events into a minute would need a sketch per campaign per minute, about as many
rows as the events themselves (docs/decisions/0003-incremental-rollups.md).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from jobs import hll
from jobs.storage import job_lock, read_json, write_json_atomic, write_parquet_atomic
from lake.changes import COMMIT_VERSION, FeedUnavailableError, inserted
from lake.location import LakeLocation
from lake.snapshot import table_dataset
from lake.tables import EVENTS, LEDGER, TableSpec, open_table
from pipeline.schema import ENRICHED_SCHEMA, HOUR_MS, ROLLUP_SCHEMA, UTC_MS, Layout
from pipeline.tables import RollupPaths, read_parquet_or

log = logging.getLogger("adevents.jobs.rollup")

GRANULARITIES: Final = ("minute", "hour", "day")
_EVERY: Final = {"minute": "1m", "hour": "1h", "day": "1d"}

SKETCH_SCHEMA: Final = pl.Schema(
    {"campaign_id": pl.String(), "bucket": UTC_MS, hll.COLUMN: pl.Binary()}
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
_EVENTS_SCHEMA: Final = pl.Schema({c: ENRICHED_SCHEMA[c] for c in _EVENT_COLUMNS})
#: Parquet metadata key of a minute file: the events version whose rows it includes.
VERSION_KEY: Final = "adevents.events_version"
#: Rows gathered before they are folded into partial sums (bounds the job's memory).
FOLD_ROWS: Final = 1_000_000
_NO_VERSION: Final = -1


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


def sketches(events: pl.LazyFrame, granularity: str) -> pl.DataFrame:
    """Unique-user sketches per campaign per bucket of ``granularity``."""
    sketch = hll.registers(events.with_columns(_bucket(granularity)), _KEYS)
    return sketch.select(SKETCH_SCHEMA.names()).cast(SKETCH_SCHEMA)


def coarsen(sketch: pl.DataFrame, granularity: str) -> pl.DataFrame:
    """Sketches of finer buckets merged into buckets of ``granularity``."""
    out = sketch.with_columns(pl.col("bucket").dt.truncate(_EVERY[granularity]))
    return hll.merge([out], _KEYS).cast(SKETCH_SCHEMA)


def sum_up(rows: pl.DataFrame, granularity: str) -> pl.DataFrame:
    """Counts and money of finer rows summed into buckets of ``granularity`` (also how partial
    sums of one bucket add up)."""
    return rows.group_by("campaign_id", pl.col("bucket").dt.truncate(_EVERY[granularity])).agg(
        *(pl.col(c).sum().cast(pl.Int64) for c in _SUMS)
    )


def with_uniques(sums: pl.DataFrame, sketch: pl.DataFrame | None) -> pl.DataFrame:
    """Rollup rows: ``sums`` with each bucket's unique-user estimate (0 with no known user),
    or a null ``unique_users`` without a sketch (the minute level)."""
    if sketch is None:
        rows = sums.with_columns(unique_users=pl.lit(None, pl.Int64))
    else:
        uniques = hll.estimate(sketch, _KEYS)
        rows = sums.join(uniques, on=list(_KEYS), how="left").with_columns(
            pl.col("unique_users").fill_null(0)
        )
    return rows.select(ROLLUP_SCHEMA.names()).cast(ROLLUP_SCHEMA).sort(*_KEYS)


def full_rollups(events: pl.LazyFrame) -> dict[str, pl.DataFrame]:
    """Every level computed from scratch from ``events``: what the incremental job must equal."""
    out = {"minute": with_uniques(totals(events, "minute").collect(), None)}
    for g in GRANULARITIES[1:]:
        out[g] = with_uniques(totals(events, g).collect(), sketches(events, g))
    return out


def add_minutes(stored: pl.DataFrame, delta: pl.DataFrame) -> pl.DataFrame:
    """Minute rows ``stored`` plus the partial sums ``delta`` of new rows (ROLLUP_SCHEMA)."""
    sums = stored.drop("unique_users")
    both = pl.concat([sums, delta.select(sums.columns).cast(sums.schema)])
    return with_uniques(sum_up(both, "minute"), None)


def replace_buckets(stored: pl.DataFrame, fresh: pl.DataFrame, buckets: pl.Series) -> pl.DataFrame:
    """``stored`` rows outside ``buckets`` plus the recomputed ``fresh`` rows, sorted."""
    keep = stored.filter(~pl.col("bucket").is_in(buckets.implode()))
    return pl.concat([keep, fresh.select(stored.columns).cast(stored.schema)]).sort(*_KEYS)


class Fold:
    """Minute sums and hour sketches of a stream of event frames, in memory bounded by campaigns
    x buckets touched, never by rows: frames are gathered up to :data:`FOLD_ROWS` rows, then
    folded into the partial results (sums add up, sketches merge by maximum).

    A frame's rows count in the sketches; in the sums only where its ``fresh`` column is true
    (rows of commits the minute file already includes are not added again).
    """

    def __init__(self) -> None:
        self._frames: list[pl.DataFrame] = []
        self._rows = 0
        self.sums = pl.DataFrame(schema=ROLLUP_SCHEMA).drop("unique_users")
        self.sketch = pl.DataFrame(schema=SKETCH_SCHEMA)
        self.rows = 0

    def add(self, frame: pl.DataFrame) -> None:
        self._frames.append(frame)
        self._rows += len(frame)
        self.rows += len(frame)
        if self._rows >= FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if not self._frames:
            return
        frame = pl.concat(self._frames).lazy()
        self._frames, self._rows = [], 0
        fresh = totals(frame.filter(pl.col("fresh")), "minute").collect()
        self.sums = sum_up(pl.concat([self.sums, fresh.select(self.sums.columns)]), "minute")
        self.sketch = hll.merge([self.sketch, sketches(frame, "hour")], _KEYS).cast(SKETCH_SCHEMA)

    def done(self) -> Fold:
        self._fold()
        return self


# -- the job -----------------------------------------------------------------------------------
@dataclass
class RollupReport:
    """What one run did: commits and rows folded in, buckets written, hours recomputed."""

    commits: int = 0
    rows: int = 0
    minutes: int = 0
    hours: int = 0
    days: int = 0
    recomputed: int = 0
    rebuilt: bool = False
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"rollup commits={self.commits} rows={self.rows} minutes={self.minutes} "
            f"hours={self.hours} days={self.days} recomputed_hours={self.recomputed}"
            f"{' rebuilt=true' if self.rebuilt else ''} seconds={self.seconds:.2f}"
        )


@dataclass
class _State:
    hll_check: str
    ledger_version: int | None = None
    events_version: int | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "hll_check": self.hll_check,
            "ledger_version": self.ledger_version,
            "events_version": self.events_version,
        }


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _load_state(paths: RollupPaths) -> _State:
    raw = read_json(paths.state)
    if not isinstance(raw, dict):
        return _State(hll.check())
    return _State(
        str(raw.get("hll_check")),
        _optional_int(raw.get("ledger_version")),
        _optional_int(raw.get("events_version")),
    )


def minute_version(path: Path) -> int:
    """The events version a minute file includes (-1: no file, so every row is new)."""
    try:
        metadata = pq.read_metadata(path).metadata or {}
    except FileNotFoundError:
        return _NO_VERSION
    return int(metadata.get(VERSION_KEY.encode(), _NO_VERSION))


def _hour_of(hour_ms: int) -> tuple[str, int]:
    start = datetime.fromtimestamp(hour_ms / 1000, UTC)
    return f"{start:%Y-%m-%d}", start.hour


def _hour_ms(column: str) -> pl.Expr:
    return pl.col(column).dt.epoch("ms") // HOUR_MS * HOUR_MS


class _Files:
    """The rollup files of one run: each hour's minutes and sketch, each date's hours and day."""

    def __init__(self, paths: RollupPaths, report: RollupReport, *, durable: bool) -> None:
        self.paths, self.report, self.durable = paths, report, durable

    def apply(self, fold: Fold, version: int, *, replace: bool) -> None:
        """Write what ``fold`` holds into the hours it touched, minute files stamped with
        ``version``; ``replace``: the fold holds whole hours (a recomputation), else new rows."""
        hours = pl.concat(
            [fold.sums.select(_hour_ms("bucket")), fold.sketch.select(_hour_ms("bucket"))]
        )["bucket"]
        by_date: dict[str, list[int]] = {}
        for hour_ms in sorted(set(hours.to_list())):
            by_date.setdefault(_hour_of(hour_ms)[0], []).append(hour_ms)
        for date, date_hours in by_date.items():
            rows = [self._hour(fold, hour_ms, version, replace=replace) for hour_ms in date_hours]
            self._date(date, date_hours, [r for r, _ in rows], [s for _, s in rows])

    def _hour(
        self, fold: Fold, hour_ms: int, version: int, *, replace: bool
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Update one hour's minute file and sketch; its hour rows and its sketch delta."""
        date, hour = _hour_of(hour_ms)
        in_hour = _hour_ms("bucket") == hour_ms
        sums = fold.sums.filter(in_hour)
        path = self.paths.minute(date, hour)
        stored = read_parquet_or(path, ROLLUP_SCHEMA)
        minutes = stored
        if replace:
            minutes = with_uniques(sums, None)
        elif len(sums):
            minutes = add_minutes(stored, sums)
        if replace or len(sums):
            write_parquet_atomic(
                minutes, path, durable=self.durable, metadata={VERSION_KEY: str(version)}
            )
            self.report.minutes += sums["bucket"].n_unique()

        delta = fold.sketch.filter(in_hour)
        sketch_path = self.paths.hour_sketch(date, hour)
        sketch = read_parquet_or(sketch_path, SKETCH_SCHEMA)
        grown = hll.merge([delta], _KEYS) if replace else hll.merge_into(sketch, delta, _KEYS)
        if grown is not None and not grown.equals(sketch):
            sketch = grown.cast(SKETCH_SCHEMA)
            write_parquet_atomic(sketch, sketch_path, durable=self.durable)
        self.report.hours += 1
        return with_uniques(sum_up(minutes, "hour"), sketch), delta

    def _date(
        self, date: str, hours_ms: list[int], rows: list[pl.DataFrame], deltas: list[pl.DataFrame]
    ) -> None:
        """Replace the date's rows of ``hours_ms``, then recompute its day row."""
        buckets = pl.Series([datetime.fromtimestamp(h / 1000, UTC) for h in hours_ms]).cast(UTC_MS)
        stored = read_parquet_or(self.paths.hour(date), ROLLUP_SCHEMA)
        hours = replace_buckets(stored, pl.concat(rows), buckets)
        if not hours.equals(stored):
            write_parquet_atomic(hours, self.paths.hour(date), durable=self.durable)

        day_sketch = read_parquet_or(self.paths.day_sketch(date), SKETCH_SCHEMA)
        grown = hll.merge_into(day_sketch, coarsen(pl.concat(deltas), "day"), _KEYS)
        if grown is not None:
            day_sketch = grown.cast(SKETCH_SCHEMA)
            write_parquet_atomic(day_sketch, self.paths.day_sketch(date), durable=self.durable)
        days = with_uniques(sum_up(hours, "day"), day_sketch)
        if not days.equals(read_parquet_or(self.paths.day(date), ROLLUP_SCHEMA)):
            write_parquet_atomic(days, self.paths.day(date), durable=self.durable)
        self.report.days += 1


def _event_frame(rows: pl.DataFrame, *extra: str) -> pl.DataFrame:
    """Rows read from the lake (microsecond times) in the job's types, plus ``extra`` columns."""
    return rows.select(*_EVENT_COLUMNS, *extra).cast(dict(_EVENTS_SCHEMA))  # type: ignore[arg-type]


def _fold_feed(files: _Files, table: DeltaTable, after: int) -> tuple[Fold, int]:
    """The rows ``table`` gained after version ``after``, folded; and how many commits they
    came in. A row counts in the sums only if its minute file does not include its commit."""
    fold = Fold()
    stamps: dict[int, int] = {}
    commits: set[int] = set()
    for batch in inserted(table, after, table.version(), _EVENT_COLUMNS):
        frame = _event_frame(batch, COMMIT_VERSION).with_columns(_hour=_hour_ms("event_time"))
        for hour_ms in frame["_hour"].unique().to_list():
            if hour_ms not in stamps:
                stamps[hour_ms] = minute_version(files.paths.minute(*_hour_of(hour_ms)))
        known = pl.DataFrame(
            {"_hour": list(stamps), "_stamp": list(stamps.values())},
            schema={"_hour": pl.Int64, "_stamp": pl.Int64},
        )
        commits.update(frame[COMMIT_VERSION].unique().to_list())
        fold.add(
            frame.join(known, on="_hour", how="left")
            .with_columns(fresh=pl.col(COMMIT_VERSION) > pl.col("_stamp"))
            .select(*_EVENT_COLUMNS, "fresh")
        )
    return fold.done(), len(commits)


def _recompute(
    files: _Files, location: LakeLocation, table: DeltaTable, hours: Iterable[tuple[str, str]]
) -> None:
    """Replace ``hours`` (date, HH) from a snapshot of ``table``, one hour at a time."""
    dataset = table_dataset(location, EVENTS, table)
    for date, hour in hours:
        fold = Fold()
        where = (pads.field("date") == date) & (pads.field("hour") == hour)
        # Little read-ahead: pyarrow's default (4 files, 16 batches) held 2.3 GB for a 49.5M-
        # event hour in 6 files, against 0.9 GB this way (and 44 s -> 31 s).
        for batch in dataset.to_batches(
            columns=list(_EVENT_COLUMNS), filter=where, batch_readahead=2, fragment_readahead=1
        ):
            if batch.num_rows:
                rows = pl.from_arrow(batch)
                assert isinstance(rows, pl.DataFrame)
                fold.add(_event_frame(rows).with_columns(fresh=pl.lit(True)))
        files.apply(fold.done(), table.version(), replace=True)
        files.report.rows += fold.rows
        files.report.recomputed += 1


def _table_or_none(location: LakeLocation, spec: TableSpec) -> DeltaTable | None:
    try:
        return open_table(location, spec)
    except TableNotFoundError:
        return None  # nothing committed yet


def run_rollup(
    layout: Layout, location: LakeLocation, *, durable: bool = True, rebuild: bool = False
) -> RollupReport:
    """Fold every row the events table gained since the last run into every rollup level.

    Rollup files live under ``layout`` (DATA_DIR); events and ledger are read from the lake
    at ``location``.
    """
    started = time.perf_counter()
    report = RollupReport()
    paths = RollupPaths(layout)
    files = _Files(paths, report, durable=durable)
    with job_lock(layout, "rollup"):
        state = _load_state(paths)
        if rebuild or state.hll_check != hll.check():
            # Sketches made by another hash cannot be merged with new ones: start over from the
            # events still in the lake.
            log.warning("rebuilding rollups from the events table (requested or the hash changed)")
            shutil.rmtree(paths.sketches, ignore_errors=True)
            state = _State(hll.check())
            report.rebuilt = True
        # The ledger first: every batch with a ledger row up to this version has its events in
        # the events version opened after it.
        ledger = _table_or_none(location, LEDGER)
        events = _table_or_none(location, EVENTS)
        version = None if events is None else events.version()
        after = state.events_version
        if events is not None and version != after:
            if after is None or version is None or version < after:
                _recompute(files, location, events, _hours(events))
            else:
                try:
                    fold, report.commits = _fold_feed(files, events, after)
                except FeedUnavailableError as exc:
                    log.warning("rollups recompute every hour: %s", location.redact(str(exc)))
                    _recompute(files, location, events, _hours(events))
                else:
                    files.apply(fold, version, replace=False)
                    report.rows = fold.rows
        new = _State(state.hll_check, None if ledger is None else ledger.version(), version)
        if new != state or report.rebuilt or not paths.state.exists():
            # Nothing new: the state stays as it is, so a run after a run writes nothing.
            write_json_atomic(new.as_json(), paths.state, durable=durable)
    report.seconds = time.perf_counter() - started
    return report


def _hours(table: DeltaTable) -> list[tuple[str, str]]:
    return sorted({(p["date"], p["hour"]) for p in table.partitions()})


def read_rollups(layout: Layout, granularity: str) -> pl.DataFrame:
    """Every stored row of one level, sorted (for tests and ad-hoc use)."""
    files = sorted(RollupPaths(layout).level(granularity).rglob("rollup.parquet"))
    if not files:
        return pl.DataFrame(schema=ROLLUP_SCHEMA)
    frame = pl.read_parquet(files, hive_partitioning=False).cast(ROLLUP_SCHEMA)
    return frame.sort(*_KEYS)
