"""Retention: expired rows leave the lake by Delta delete + vacuum; old rollups are deleted.

Each lake table has its own number of days: events RETENTION_DAYS (by the date of event_time),
quarantine QUARANTINE_RETENTION_DAYS (by the date of ingested_at, when the row was rejected),
ledger LEDGER_RETENTION_DAYS (by the date of committed_at). Expired rows are deleted by whole
UTC days (``lake.maintenance.delete_before``: a commit that removes the days' files in the log,
so a reader sees a day whole or not at all). ``vacuum`` then deletes, in every lake table, the
files no version within VACUUM_RETENTION needs: files removed that long ago (by retention or by
compaction) and, a full vacuum, orphans of failed writes older than that. Until then a reader's
snapshot stays readable.

What a ledger delete does to its readers: the change feed leaves DELETE commits out
(:mod:`lake.changes`), so the rollups' record of which batches they folded in, and the minutes
newer batches touched, are unaffected; the alert rules read only the last minutes. The
all-time ledger totals of /metrics (``queries.ops.ledger_totals``) lose the deleted rows, which
Prometheus reads as a counter reset.

Whole files the consumer set aside (``quarantine/files/<batch_id>/``, with ``reason.json``) go
with the quarantine rows of their day: a directory is deleted once the day it was quarantined
(its sidecar's ``quarantined_at``) is expired.

Rollup files (DATA_DIR/rollups) go after their own number of days, a whole file at a time;
unique-user sketches follow the minute rollups (they only matter while an hour can still
receive late events).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from jobs.storage import job_lock
from lake import maintenance
from lake.location import LakeLocation
from lake.tables import EVENTS, LEDGER, QUARANTINE, TABLES, TableSpec, open_table
from pipeline.schema import DAY_MS, HOUR_MS, Layout
from pipeline.settings import JobSettings
from pipeline.tables import RollupPaths

log = logging.getLogger("adevents.jobs.retention")


def cutoff_ms(now: datetime, days: int) -> int | None:
    """Data that ended at or before this instant (epoch ms) is expired; None keeps everything."""
    if days <= 0:
        return None
    return int(now.timestamp() * 1000) - days * DAY_MS


def expired(spans: Sequence[tuple[Path, int]], cutoff: int | None) -> list[Path]:
    """The paths whose data ends (epoch ms, exclusive) at or before ``cutoff``."""
    if cutoff is None:
        return []
    return [path for path, end_ms in spans if end_ms <= cutoff]


def first_kept_date(cutoff: int) -> str:
    """The first UTC date (``YYYY-MM-DD``) that has not ended at or before ``cutoff``: every
    date before it is expired."""
    return f"{datetime.fromtimestamp(cutoff / 1000, UTC):%Y-%m-%d}"


def _date_end_ms(date: str) -> int:
    start = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)
    return int(start.timestamp() * 1000) + DAY_MS


def _dated(root: Path, prefix: str = "date=") -> list[tuple[str, Path]]:
    """(date, path) of the entries ``<prefix>YYYY-MM-DD[...]`` directly under ``root``."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            value = entry.name[len(prefix) : len(prefix) + 10]
            if entry.name.startswith(prefix) and not entry.name.startswith("."):
                try:
                    datetime.strptime(value, "%Y-%m-%d")
                except ValueError:
                    continue
                out.append((value, Path(entry.path)))
    return sorted(out)


def _hour_end_ms(date: str, name: str) -> int | None:
    """End of hour ``HH`` of ``date`` from an entry named ``hour=HH[...]``."""
    digits = name[5:7]
    if not name.startswith("hour=") or not digits.isdigit() or int(digits) > 23:
        return None
    return _date_end_ms(date) - (23 - int(digits)) * HOUR_MS


def _hours(root: Path) -> list[tuple[Path, int]]:
    """(path, end ms) of each ``date=…/hour=…`` entry under ``root``."""
    out = []
    for date, directory in _dated(root):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                end = _hour_end_ms(date, entry.name)
                if end is not None:
                    out.append((Path(entry.path), end))
    return out


def _remove(path: Path) -> None:
    """Delete a rollup file, or a directory of them (each file goes atomically)."""
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        with contextlib.suppress(OSError):
            path.rmdir()
    else:
        path.unlink(missing_ok=True)


def _prune_empty_dates(root: Path) -> None:
    for _, directory in _dated(root):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty


@dataclass
class RetentionReport:
    deleted: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in sorted(self.deleted.items()))
        return f"retention deleted {parts or 'nothing'}"


def _delete_expired(table: DeltaTable, cutoff: int | None) -> int:
    """Delete the days of ``table`` that ended at or before ``cutoff``; how many rows went."""
    if cutoff is None:
        return 0
    first = first_kept_date(cutoff)
    if not any(p["date"] < first for p in table.partitions()):
        return 0  # nothing expired: no empty commit
    metrics = maintenance.delete_before(table, first)
    return int(metrics.get("num_deleted_rows", 0))


def retain_lake(
    location: LakeLocation,
    jobs: JobSettings,
    *,
    now: datetime,
    specs: Sequence[TableSpec] = tuple(TABLES.values()),
) -> dict[str, int]:
    """Delete each table's expired days, then vacuum every table; counts by ``<table>_rows``
    deleted and ``<table>_files`` vacuumed."""
    deleted: dict[str, int] = {}
    hours = math.ceil(jobs.vacuum_retention / 3600)
    days = table_retention_days(jobs)
    for spec in specs:
        try:
            table = open_table(location, spec)
        except TableNotFoundError:
            continue  # nothing committed to it yet
        if spec.name in days:
            cutoff = cutoff_ms(now, days[spec.name])
            deleted[f"{spec.name}_rows"] = _delete_expired(table, cutoff)
        deleted[f"{spec.name}_files"] = len(maintenance.vacuum(table, hours, full=True))
    return deleted


def table_retention_days(jobs: JobSettings) -> dict[str, int]:
    """Days each lake table keeps (0 = forever), by table name; every table is partitioned by
    ``date`` of its own time column (lake.tables), which is what expires."""
    return {
        EVENTS.name: jobs.retention_days,
        QUARANTINE.name: jobs.quarantine_retention_days,
        LEDGER.name: jobs.ledger_retention_days,
    }


def _quarantined_at_ms(directory: Path) -> int | None:
    """When a set-aside file was quarantined (epoch ms): its sidecar's ``quarantined_at``, else
    the directory's mtime; None when it cannot be told (left alone)."""
    try:
        sidecar = json.loads((directory / "reason.json").read_text())
        return int(datetime.fromisoformat(sidecar["quarantined_at"]).timestamp() * 1000)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return int(directory.lstat().st_mtime * 1000)
    except OSError:
        return None


def _remove_entry(path: Path) -> None:
    """Remove what the consumer moved aside, as it is: a link is unlinked, never followed; a
    directory (one that came under a ``*.arrow`` name) is removed with what it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def retain_quarantine_files(layout: Layout, jobs: JobSettings, *, now: datetime) -> int:
    """Delete ``quarantine/files/<batch_id>/`` directories whose day of quarantine has expired
    (QUARANTINE_RETENTION_DAYS, whole UTC days as the table); how many went."""
    cutoff = cutoff_ms(now, jobs.quarantine_retention_days)
    if cutoff is None:
        return 0
    first = first_kept_date(cutoff)
    gone = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(layout.quarantine_files):
            directory = Path(entry.path)
            if not entry.is_dir(follow_symlinks=False):
                continue
            at = _quarantined_at_ms(directory)
            if at is None or f"{datetime.fromtimestamp(at / 1000, UTC):%Y-%m-%d}" >= first:
                continue
            for child in directory.iterdir():
                _remove_entry(child)
            with contextlib.suppress(OSError):
                directory.rmdir()
                gone += 1
    return gone


def retain_rollups(layout: Layout, jobs: JobSettings, *, now: datetime) -> dict[str, int]:
    """Delete rollup files and sketches past ROLLUP_*_RETENTION_DAYS; counts per kind."""
    deleted: dict[str, int] = {}
    paths = RollupPaths(layout)
    minute_cut = cutoff_ms(now, jobs.rollup_minute_retention_days)
    gone = expired(_hours(paths.level("minute")), minute_cut)
    sketch_root = paths.sketches / "hour"
    day_sketches = [(p, _date_end_ms(d)) for d, p in _dated(paths.sketches / "day")]
    gone_sketches = expired(_hours(sketch_root), minute_cut) + expired(day_sketches, minute_cut)
    for path in gone + gone_sketches:
        _remove(path)
    _prune_empty_dates(paths.level("minute"))
    _prune_empty_dates(sketch_root)
    deleted["minute_rollup_hours"] = len(gone)
    deleted["sketches"] = len(gone_sketches)
    for level, days in (
        ("hour", jobs.rollup_hour_retention_days),
        ("day", jobs.rollup_day_retention_days),
    ):
        dates = _dated(paths.level(level))
        gone = expired([(d, _date_end_ms(date)) for date, d in dates], cutoff_ms(now, days))
        for path in gone:
            _remove(path)
        deleted[f"{level}_rollup_days"] = len(gone)
    return deleted


def run_retention(
    layout: Layout, location: LakeLocation, jobs: JobSettings, *, now: datetime
) -> RetentionReport:
    """Delete what is past its retention (RETENTION_DAYS, QUARANTINE_RETENTION_DAYS,
    LEDGER_RETENTION_DAYS, VACUUM_RETENTION and ROLLUP_*_RETENTION_DAYS of ``jobs``); returns
    counts per kind."""
    report = RetentionReport()
    with job_lock(layout, "retention"):
        report.deleted.update(retain_lake(location, jobs, now=now))
        report.deleted.update(retain_rollups(layout, jobs, now=now))
        report.deleted["quarantined_file_dirs"] = retain_quarantine_files(layout, jobs, now=now)
    for kind, n in report.deleted.items():
        if n:
            log.info("retention: deleted %d %s", n, kind.replace("_", " "))
    return report
