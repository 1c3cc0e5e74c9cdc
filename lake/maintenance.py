"""Table maintenance through delta-rs: optimize (compact, Z-order), checkpoints, retention, vacuum.

(Closed events hours are clustered by ``lake.cluster``, not Z-ordered: see
docs/decisions/0006-clustered-hours.md.)

Every operation is a Delta commit, so readers keep their snapshot and concurrent appends
commit around it (an append conflicts with none of these). ``optimize`` is safe on the open
hour too: files it rewrites are removed in the log, not on disk. Files leave the disk only
through ``vacuum``, after ``retention_hours``; that retention bounds both how long a reader
may hold a snapshot and, with ``full=True`` (which also deletes files no commit ever named:
the orphans of a crashed attempt), how long a writer may take from Parquet write to commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from deltalake import DeltaTable, WriterProperties

#: Rows per row group of rewritten files, unless told: COMPACT_ROW_GROUP_ROWS's default
#: (a campaign's rows in a clustered hour are then a few small groups, read without DuckDB).
DEFAULT_ROW_GROUP_ROWS: Final = 16_384
#: The least retention ``vacuum`` accepts unless told otherwise: far above any commit's
#: write-to-commit time and any reader's query time.
MIN_RETENTION_HOURS: Final = 1

PartitionFilters = list[tuple[str, str, Any]]


def hour_filter(date: str, hour: str | None = None) -> PartitionFilters:
    """Partition filters selecting one date, or one hour of it (``hour`` as ``HH``)."""
    filters: PartitionFilters = [("date", "=", date)]
    if hour is not None:
        filters.append(("hour", "=", hour))
    return filters


def optimize(
    table: DeltaTable,
    partition_filters: PartitionFilters | None = None,
    *,
    z_order: Sequence[str] | None = None,
    target_size: int | None = None,
    memory_bytes: int | None = None,
    row_group_rows: int | None = None,
) -> dict[str, Any]:
    """Compact small files in the selected partitions, then Z-order them if ``z_order``.

    Compaction only rewrites small files and is idempotent, so it can run often on the open
    hour; Z-order rewrites the whole selection each time, so run it once on a closed hour.
    Z-order sorts the whole selection: past ``memory_bytes`` it spills to local temporary
    files. Without that bound it holds the selection in memory (5M events took 1.2 GB here;
    an hour at 50k events/s, 180M events, drove a 24 GiB machine out of memory).
    Files are written zstd-compressed in row groups of ``row_group_rows``: delta-rs's default
    (1M rows, snappy) leaves readers little to prune, so every query reads 8x more.
    """
    properties = WriterProperties(
        compression="ZSTD", max_row_group_size=row_group_rows or DEFAULT_ROW_GROUP_ROWS
    )
    metrics = {
        "compact": table.optimize.compact(
            partition_filters=partition_filters,
            target_size=target_size,
            writer_properties=properties,
        )
    }
    if z_order:
        metrics["z_order"] = table.optimize.z_order(
            list(z_order),
            partition_filters=partition_filters,
            target_size=target_size,
            max_spill_size=memory_bytes,
            writer_properties=properties,
        )
    return metrics


def checkpoint(table: DeltaTable) -> None:
    """Write a checkpoint at the current version, so readers replay few JSON commits."""
    table.update_incremental()
    table.create_checkpoint()


def delete_before(table: DeltaTable, date: str) -> dict[str, Any]:
    """Retention: remove (in the log) every partition dated before ``date`` (``YYYY-MM-DD``)."""
    if len(date) != 10 or date[4] != "-" or date[7] != "-":
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    return table.delete(f"date < '{date}'")


def vacuum(
    table: DeltaTable,
    retention_hours: int,
    *,
    full: bool = True,
    dry_run: bool = False,
    allow_short_retention: bool = False,
) -> list[str]:
    """Delete files no version within ``retention_hours`` needs (and, ``full``, orphans)."""
    if retention_hours < MIN_RETENTION_HOURS and not allow_short_retention:
        raise ValueError(
            f"retention_hours={retention_hours} < {MIN_RETENTION_HOURS}: it would delete files "
            "of snapshots in use and of commits in flight"
        )
    return table.vacuum(
        retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=full,
    )


def cleanup_logs(table: DeltaTable) -> None:
    """Delete log files older than ``delta.logRetentionDuration`` (30 days) before a checkpoint."""
    table.cleanup_metadata()
