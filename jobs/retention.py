"""Retention: delete events partitions and rollups older than their configured number of days.

A partition disappears whole: it is renamed out of the lake (into ``staging/trash/``) first and
deleted from there, so a reader lists either all of its files or none. Unique-user sketches
follow the minute rollups (they only matter while an hour can still receive late events).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from jobs.storage import EVENTS_LOCK, job_lock
from pipeline.livefiles import date_dirs, hour_partitions, read_units
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


def _date_end_ms(date: str) -> int:
    start = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)
    return int(start.timestamp() * 1000) + DAY_MS


@dataclass
class RetentionReport:
    deleted: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in sorted(self.deleted.items()))
        return f"retention deleted {parts or 'nothing'}"


def _remove(layout: Layout, path: Path) -> None:
    """Take ``path`` out of the lake in one rename, then delete it."""
    trash = layout.staging / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{path.name}-{secrets.token_hex(4)}"
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)


def _prune_empty_dates(root: Path) -> None:
    for _, directory in date_dirs(root):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty


def run_retention(layout: Layout, jobs: JobSettings, *, now: datetime) -> RetentionReport:
    """Delete what is past its retention (RETENTION_DAYS, ROLLUP_*_RETENTION_DAYS of ``jobs``);
    returns counts per kind."""
    report = RetentionReport()
    paths = RollupPaths(layout)
    with job_lock(layout, "retention"):
        # Leftovers of an interrupted run.
        shutil.rmtree(layout.staging / "trash", ignore_errors=True)
        with job_lock(layout, EVENTS_LOCK, wait=True):
            busy = {u.partition for u in read_units(layout)}
            parts = [p for p in hour_partitions(layout.events) if p.key not in busy]
            gone = expired([(p.path, p.end_ms) for p in parts], cutoff_ms(now, jobs.retention_days))
            for path in gone:
                _remove(layout, path)
            _prune_empty_dates(layout.events)
            report.deleted["events_hours"] = len(gone)

        minute_cut = cutoff_ms(now, jobs.rollup_minute_retention_days)
        minutes = hour_partitions(paths.level("minute"))
        gone = expired([(p.path, p.end_ms) for p in minutes], minute_cut)
        sketch_root = paths.sketches / "hour"
        sketches = [
            (path, _date_end_ms(date) - (23 - int(path.stem[5:])) * HOUR_MS)
            for date, directory in date_dirs(sketch_root)
            for path in directory.glob("hour=*.parquet")
        ]
        day_sketches = [
            (p, _date_end_ms(p.stem[5:])) for p in (paths.sketches / "day").glob("date=*.parquet")
        ]
        gone_sketches = expired(sketches, minute_cut) + expired(day_sketches, minute_cut)
        for path in gone + gone_sketches:
            _remove(layout, path)
        _prune_empty_dates(paths.level("minute"))
        _prune_empty_dates(sketch_root)
        report.deleted["minute_rollup_hours"] = len(gone)
        report.deleted["sketches"] = len(gone_sketches)

        for level, days in (
            ("hour", jobs.rollup_hour_retention_days),
            ("day", jobs.rollup_day_retention_days),
        ):
            dates = date_dirs(paths.level(level))
            gone = expired([(d, _date_end_ms(date)) for date, d in dates], cutoff_ms(now, days))
            for path in gone:
                _remove(layout, path)
            report.deleted[f"{level}_rollup_days"] = len(gone)
    for kind, n in report.deleted.items():
        if n:
            log.info("retention: deleted %d %s", n, kind.replace("_", " "))
    return report
