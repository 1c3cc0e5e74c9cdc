"""The event contract: columns, types, reason codes and the DATA_DIR layout, stated once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final

import polars as pl
import pyarrow as pa

#: Columns every producer sends, with their storage type. The order is the storage order.
EVENT_SCHEMA: Final = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("publisher_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("device_type", pa.string()),
        pa.field("country", pa.string()),
        pa.field("cost_micros", pa.int64(), nullable=False),
        pa.field("revenue_micros", pa.int64(), nullable=False),
    ]
)
EVENT_COLUMNS: Final = tuple(EVENT_SCHEMA.names)
#: Columns a file may omit; they are read as null.
OPTIONAL_COLUMNS: Final = frozenset({"user_id", "device_type", "country"})
REQUIRED_COLUMNS: Final = tuple(c for c in EVENT_COLUMNS if c not in OPTIONAL_COLUMNS)
STRING_COLUMNS: Final = tuple(f.name for f in EVENT_SCHEMA if pa.types.is_string(f.type))
MONEY_COLUMNS: Final = ("cost_micros", "revenue_micros")
TIME_COLUMN: Final = "event_time"
KEY_COLUMN: Final = "event_id"

EVENT_TYPES: Final = ("impression", "click", "conversion")
DEVICE_TYPES: Final = ("mobile", "desktop", "tablet", "ctv", "other")
MAX_EVENT_ID_BYTES: Final = 128
#: Largest cost_micros or revenue_micros of one event (``invalid_money`` above): 1,000,000 USD.
#: Sums of money are 64-bit everywhere (rollups, stats, SQL); without a bound, two hostile
#: events of 5e18 wrapped a campaign's totals negative (numpy) or made every question on it
#: fail (DuckDB's BIGINT cast). At this bound an overflow takes 9.2M such events.
MAX_MONEY_MICROS: Final = 10**12
#: Longest campaign_id, ad_id, publisher_id and user_id in bytes of UTF-8 (``field_too_long``
#: above): ids are keys for joins, sorting and the dashboard, and one 150 KB value would bloat
#: every row group and answer it lands in.
MAX_ID_BYTES: Final = 256
#: The columns MAX_ID_BYTES applies to.
ID_COLUMNS: Final = ("campaign_id", "ad_id", "publisher_id", "user_id")
#: An event this far ahead of the consumer's clock is quarantined as ``future_event``.
MAX_FUTURE_MS: Final = 5 * 60 * 1000

#: Row-level quarantine reasons, in the order a row is tested: a row gets the first that applies.
REASONS: Final = (
    "invalid_event_id",
    "invalid_event_type",
    "missing_field",
    "field_too_long",
    "invalid_money",
    "invalid_country",
    "invalid_device_type",
    "future_event",
    "late_event",
)
#: Whole-file quarantine reasons for entries of ``incoming/`` that are not a readable regular
#: file that belongs to DATA_DIR (the entry is moved as it is, never followed).
ENTRY_REASONS: Final = (
    "symlink",  # a symbolic link (dangling or not): never followed
    "hard_link",  # a regular file with other names, possibly outside DATA_DIR: never read
    "not_a_regular_file",  # a directory, FIFO, socket or device under a *.arrow name
    "permission_denied",  # the consumer may not open it
    "file_too_large",  # larger than the spool's size limit: never mapped
)
#: Whole-file quarantine reasons (the file is moved to ``quarantine/files/<batch_id>/``).
FILE_REASONS: Final = ("unreadable_file", "unreadable_message", "schema_mismatch", *ENTRY_REASONS)

UTC_MS: Final = pl.Datetime("ms", "UTC")
#: Epoch-millisecond lengths of the lake's time buckets and partitions (UTC minutes, hours, days).
MINUTE_MS: Final = 60_000
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS


def _polars_type(name: str) -> pl.DataType:
    if name == TIME_COLUMN:
        return UTC_MS
    return pl.Int64() if name in MONEY_COLUMNS else pl.String()


POLARS_EVENT_SCHEMA: Final = pl.Schema({name: _polars_type(name) for name in EVENT_COLUMNS})

#: Event columns with few distinct values: spool files carry them as Arrow dictionaries, and
#: readers that keep rows in memory read them as dictionaries too.
LOW_CARDINALITY_COLUMNS: Final = (
    "event_type",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "device_type",
    "country",
)
#: Columns the consumer adds to every stored event.
ENRICHED_SCHEMA: Final = pl.Schema(
    {
        **dict(POLARS_EVENT_SCHEMA),
        "advertiser_id": pl.String(),
        "campaign_name": pl.String(),
        "ingested_at": UTC_MS,
        "batch_id": pl.String(),
    }
)
#: Columns of an accepted event with few distinct values in a group: the event's own
#: low-cardinality columns, then what enrichment adds per campaign and per file.
CATEGORICAL_COLUMNS: Final = (
    *LOW_CARDINALITY_COLUMNS,
    "advertiser_id",
    "campaign_name",
    "batch_id",
)
#: The consumer's accepted events between the spool file and the Parquet writer:
#: ENRICHED_SCHEMA with CATEGORICAL_COLUMNS as Polars categoricals. They arrive as Arrow
#: dictionaries and leave as Parquet dictionary pages, so the consumer never decodes them
#: into strings: the sort gathers 4-byte codes, and the writer hashes no string again
#: (``bench/stage_costs.py``). Readers of the lake see strings, its Delta schema's type.
IN_FLIGHT_SCHEMA: Final = pl.Schema(
    {n: pl.Categorical() if n in CATEGORICAL_COLUMNS else t for n, t in ENRICHED_SCHEMA.items()}
)
#: Stored quarantine rows: the event's values as received, then why and where from.
QUARANTINE_SCHEMA: Final = pl.Schema(
    {
        **dict(POLARS_EVENT_SCHEMA),
        "reason": pl.String(),
        "source_file": pl.String(),
        "batch_id": pl.String(),
        "ingested_at": UTC_MS,
    }
)
#: Rows within an events file are sorted by these so row-group statistics prune.
SORT_KEYS: Final = ("campaign_id", "event_time")
PARQUET_COMPRESSION: Final = "zstd"
#: zstd level 1 (pyarrow's default; Polars' is 3): a consumer file of 200k hex33 events cost
#: 84 ms of CPU to write against 105 at level 3, for the same size (5.42 against 5.45 MB).
PARQUET_COMPRESSION_LEVEL: Final = 1

#: The campaign dimension: required columns; others (``daily_budget_micros``, ...) are optional.
CAMPAIGN_COLUMNS: Final = ("campaign_id", "advertiser_id", "campaign_name")
CAMPAIGN_SCHEMA: Final = pl.Schema(
    {
        "campaign_id": pl.String(),
        "advertiser_id": pl.String(),
        "campaign_name": pl.String(),
        "daily_budget_micros": pl.Int64(),
    }
)

#: One row per batch in ``ledger/``. rows_in = accepted + duplicates + quarantined, always.
LEDGER_SCHEMA: Final = pl.Schema(
    {
        "batch_id": pl.String(),
        "source_file": pl.String(),
        "status": pl.String(),  # "ok" or a FILE_REASONS code
        "rows_in": pl.Int64(),
        "accepted": pl.Int64(),
        "duplicates": pl.Int64(),
        "quarantined": pl.Int64(),
        **{f"quarantined_{r}": pl.Int64() for r in REASONS},
        "unknown_campaigns": pl.Int64(),
        "ignored_columns": pl.Int64(),
        "min_event_time": UTC_MS,
        "max_event_time": UTC_MS,
        "arrived_at": UTC_MS,
        "committed_at": UTC_MS,
        "lag_ms": pl.Int64(),
        "processing_ms": pl.Float64(),
        "read_ms": pl.Float64(),
        "validate_ms": pl.Float64(),
        "dedupe_ms": pl.Float64(),
        "enrich_ms": pl.Float64(),
        "write_ms": pl.Float64(),
        "commit_ms": pl.Float64(),
        "consumer": pl.String(),
    }
)


@dataclass
class LedgerRow:
    """One row of the ledger, field for field as LEDGER_SCHEMA (tests/test_schema.py checks):
    what became of one spool file. Times are epoch milliseconds, durations milliseconds."""

    batch_id: str
    source_file: str
    status: str = "ok"  # or a FILE_REASONS code
    rows_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantined_invalid_event_id: int = 0
    quarantined_invalid_event_type: int = 0
    quarantined_missing_field: int = 0
    quarantined_field_too_long: int = 0
    quarantined_invalid_money: int = 0
    quarantined_invalid_country: int = 0
    quarantined_invalid_device_type: int = 0
    quarantined_future_event: int = 0
    quarantined_late_event: int = 0
    unknown_campaigns: int = 0
    ignored_columns: int = 0
    min_event_time: int | None = None
    max_event_time: int | None = None
    arrived_at: int | None = None
    committed_at: int | None = None
    lag_ms: int = 0
    processing_ms: float | None = None
    read_ms: float | None = None
    validate_ms: float | None = None
    dedupe_ms: float | None = None
    enrich_ms: float | None = None
    write_ms: float | None = None
    commit_ms: float | None = None
    consumer: str | None = None

    def count_reasons(self, counts: Mapping[str, int]) -> None:
        """Set the per-reason quarantine counters (every REASONS code; absent ones are 0)."""
        for reason in REASONS:
            setattr(self, f"quarantined_{reason}", int(counts.get(reason, 0)))


def ledger_frame(rows: Sequence[LedgerRow]) -> pl.DataFrame:
    """Ledger rows as a LEDGER_SCHEMA frame."""
    return pl.DataFrame([asdict(r) for r in rows], schema=LEDGER_SCHEMA)


#: ``rollups/<granularity>/``: one row per campaign per bucket, written by the rollup job.
#: unique_users is a HyperLogLog estimate of distinct non-null user_id in that hour or day
#: (~1.6 % error; it does not add up across buckets or levels), null in minute rows
#: (docs/decisions/0003-incremental-rollups.md).
ROLLUP_SCHEMA: Final = pl.Schema(
    {
        "campaign_id": pl.String(),
        "bucket": UTC_MS,
        "impressions": pl.Int64(),
        "clicks": pl.Int64(),
        "conversions": pl.Int64(),
        "spend_micros": pl.Int64(),
        "revenue_micros": pl.Int64(),
        "unique_users": pl.Int64(),
    }
)

#: ``alerts/alerts.parquet``: stored alerts, newest first by ``started_at`` (the first column,
#: which readers sort by), written by the alerts job.
ALERT_SCHEMA: Final = pl.Schema(
    {
        "started_at": UTC_MS,
        "alert_id": pl.String(),
        "rule": pl.String(),
        "subject": pl.String(),
        "severity": pl.String(),
        "status": pl.String(),
        "value": pl.Float64(),
        "threshold": pl.Float64(),
        "message": pl.String(),
        "updated_at": UTC_MS,
        "ended_at": UTC_MS,
    }
)


class Layout:
    """Where everything lives under DATA_DIR (the lake lives at LAKE_URI, see ``lake``); the only
    place that knows the local directory names."""

    def __init__(self, data_dir: str) -> None:
        from pathlib import Path

        self.root = Path(data_dir)
        self.incoming = self.root / "incoming"
        self.processed = self.root / "processed"
        self.quarantine_files = self.root / "quarantine" / "files"
        self.dimensions = self.root / "dimensions"
        self.campaigns = self.dimensions / "campaigns.parquet"
        self.state = self.root / "state"
        self.rollups = self.root / "rollups"
        self.alerts = self.root / "alerts"

    def ensure(self) -> None:
        for d in (self.incoming, self.quarantine_files, self.dimensions, self.state):
            d.mkdir(parents=True, exist_ok=True)
