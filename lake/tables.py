"""The lake's Delta tables: names, Arrow schemas (from ``pipeline.schema``), partitions, creation.

``events`` and ``ledger`` are partitioned by ``date`` and ``hour``, ``quarantine`` by ``date``:
string columns ``YYYY-MM-DD`` and ``HH`` derived in UTC from one time column per table (the
event's time, the quarantine time, the commit time), laid out as ``date=…/hour=…/`` like v1.
Partition columns live in the Delta log, not in the Parquet files.

``ensure_table`` creates a missing table and is idempotent and race-safe: when several
processes create the same table at once, the log's put-if-absent of version 0 lets exactly one
win, and every loser finds the table and carries on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from lake.location import LakeLocation
from pipeline.schema import (
    ENRICHED_SCHEMA,
    EVENT_SCHEMA,
    LEDGER_SCHEMA,
    QUARANTINE_SCHEMA,
    SORT_KEYS,
    TIME_COLUMN,
)

#: Delta stores timestamps in microseconds; files carry them so, and readers get them so.
TIMESTAMP: Final = pa.timestamp("us", tz="UTC")
DATE_FORMAT: Final = "%Y-%m-%d"
HOUR_FORMAT: Final = "%H"
PARTITION_FORMATS: Final = {"date": DATE_FORMAT, "hour": HOUR_FORMAT}


#: Commits between checkpoints. Opening or refreshing a table replays every commit since the
#: last checkpoint, and a consumer refreshes each of its three tables twice a commit: at
#: delta-rs's default of 100 a refresh cost 12 ms on average and a commit 14 (20 and 25 just
#: before a checkpoint), against 3.7 and 7 at 10, the Delta protocol's own default (two files
#: a commit, local disk: ``python bench/delta_commits.py``). A checkpoint rewrites the table's
#: list of live files, which compaction keeps short.
CHECKPOINT_INTERVAL: Final = 10
TABLE_PROPERTIES: Final = {"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)}


class TableSchemaError(RuntimeError):
    """An existing table's columns differ from the ones this code writes."""


def _arrow_type(dtype: pl.DataType) -> pa.DataType:
    if isinstance(dtype, pl.Datetime):
        return TIMESTAMP
    mapping: dict[type[pl.DataType], pa.DataType] = {
        pl.String: pa.string(),
        pl.Int64: pa.int64(),
        pl.Float64: pa.float64(),
        pl.Boolean: pa.bool_(),
    }
    return mapping[type(dtype)]


def arrow_schema(schema: pl.Schema, *, required: frozenset[str] = frozenset()) -> pa.Schema:
    """The Arrow form of a Polars schema from ``pipeline.schema``; ``required`` are non-null."""
    return pa.schema(
        [pa.field(n, _arrow_type(t), nullable=n not in required) for n, t in schema.items()]
    )


@dataclass(frozen=True)
class TableSpec:
    """One Delta table: its data columns, partition columns and the time they derive from."""

    name: str
    columns: pa.Schema
    partition_by: tuple[str, ...]
    partition_time: str
    sort_keys: tuple[str, ...] = ()

    @property
    def schema(self) -> pa.Schema:
        """The table's schema: data columns, then the partition columns (strings)."""
        extra = [pa.field(p, pa.string(), nullable=False) for p in self.partition_by]
        return pa.schema([*self.columns, *extra])

    def partition_exprs(self) -> list[pl.Expr]:
        """Polars expressions deriving the partition columns from ``partition_time`` in UTC."""
        utc = pl.col(self.partition_time).dt.convert_time_zone("UTC")
        return [utc.dt.strftime(PARTITION_FORMATS[p]).alias(p) for p in self.partition_by]


_REQUIRED_EVENT: Final = frozenset(f.name for f in EVENT_SCHEMA if not f.nullable)

EVENTS: Final = TableSpec(
    "events",
    arrow_schema(ENRICHED_SCHEMA, required=_REQUIRED_EVENT),
    ("date", "hour"),
    TIME_COLUMN,
    SORT_KEYS,
)
QUARANTINE: Final = TableSpec(
    "quarantine", arrow_schema(QUARANTINE_SCHEMA), ("date",), "ingested_at"
)
LEDGER: Final = TableSpec("ledger", arrow_schema(LEDGER_SCHEMA), ("date", "hour"), "committed_at")
#: Every table, in the order a batch commits them (the ledger last: it records a finished batch).
TABLES: Final[Mapping[str, TableSpec]] = {t.name: t for t in (EVENTS, QUARANTINE, LEDGER)}


def open_table(location: LakeLocation, spec: TableSpec) -> DeltaTable:
    """The table at its latest version; ``TableNotFoundError`` if it does not exist."""
    return DeltaTable(location.table_uri(spec.name), storage_options=location.storage_options())


def ensure_table(location: LakeLocation, spec: TableSpec) -> DeltaTable:
    """Open the table, creating it first if missing; safe when many processes race to create."""
    uri, options = location.table_uri(spec.name), location.storage_options()
    try:
        table = DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        try:
            DeltaTable.create(
                uri,
                spec.schema,
                mode="ignore",
                partition_by=list(spec.partition_by),
                name=spec.name,
                configuration=TABLE_PROPERTIES,
                storage_options=options,
                # A loser of the race for version 0 must fail, not retry: delta-rs would
                # commit its CREATE TABLE again as version 1, replacing the table's metadata
                # (seen on S3 with three processes creating at once).
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except DeltaError:
            # Lost the race for version 0: fine if the winner's table is there.
            if not DeltaTable.is_deltatable(uri, options):
                raise
        table = DeltaTable(uri, storage_options=options)
    _check_columns(table, spec)
    _ensure_properties(table)
    return table


def _ensure_properties(table: DeltaTable) -> None:
    """Set ``TABLE_PROPERTIES`` on a table created without them (by an older version): one
    metadata commit, once. A writer committing at the same moment sees a conflict and retries
    its batch, as after any failed commit; two processes setting them at once: one wins."""
    have = table.metadata().configuration
    if all(have.get(k) == v for k, v in TABLE_PROPERTIES.items()):
        return
    # Failing (another process set them first) is harmless: they only make refreshes cheaper.
    with contextlib.suppress(DeltaError):
        table.alter.set_table_properties(dict(TABLE_PROPERTIES), raise_if_not_exists=False)
    table.update_incremental()


def ensure_tables(
    location: LakeLocation, specs: Mapping[str, TableSpec] = TABLES
) -> dict[str, DeltaTable]:
    """``ensure_table`` for each spec, by name."""
    return {name: ensure_table(location, spec) for name, spec in specs.items()}


def _check_columns(table: DeltaTable, spec: TableSpec) -> None:
    have = [f.name for f in table.schema().fields]
    want = list(spec.schema.names)
    if have != want:
        raise TableSchemaError(
            f"table {spec.name} at {table.table_uri} has columns {have}, this code writes {want}"
        )
