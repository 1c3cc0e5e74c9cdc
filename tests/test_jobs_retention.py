"""Retention: expired events, quarantine and ledger rows by Delta delete + vacuum, each table by
its own days; orphans by age; set-aside files with the quarantine; rollups by their own days."""

from __future__ import annotations

import json
import os
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from jobs.retention import (
    cutoff_ms,
    expired,
    first_kept_date,
    run_retention,
    table_retention_days,
)
from jobs.rollup import read_rollups, run_rollup
from jobs.testing import commit_batches, random_batch, write_ledger
from lake.location import LakeLocation
from lake.snapshot import snapshot
from lake.tables import EVENTS, LEDGER, QUARANTINE, TableSpec, open_table
from lake.testing import append, quarantine_frame
from pipeline.schema import UTC_MS, Layout
from pipeline.settings import JobSettings, SettingsError
from queries.lake import Lake
from queries.rollups import coverage, rolled_up_version

DAY_MS = 86_400_000
NOW_MS = int(time.time() * 1000)
NOW = datetime.fromtimestamp(NOW_MS / 1000, UTC)
AGES = (40, 10, 3, 1)


def test_expired_is_by_end_of_span_and_zero_keeps_everything() -> None:
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    cut = cutoff_ms(now, 1)
    assert cut == int(datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp() * 1000)
    spans = [(Path("a"), cut - 1), (Path("b"), cut), (Path("c"), cut + 1)]
    assert expired(spans, cut) == [Path("a"), Path("b")]
    assert cutoff_ms(now, 0) is None and expired(spans, None) == []
    # 2026-11-25 ended before the cutoff, 2026-11-26 has not ended by then
    assert first_kept_date(cut) == "2026-11-26"
    assert first_kept_date(int(datetime(2026, 11, 26, tzinfo=UTC).timestamp() * 1000)) == (
        "2026-11-26"
    )


def test_vacuum_retention_is_at_least_an_hour() -> None:
    assert JobSettings.from_env({}).vacuum_retention == 24 * 3600
    assert JobSettings.from_env({"VACUUM_RETENTION": "1h"}).vacuum_retention == 3600
    with pytest.raises(SettingsError, match="VACUUM_RETENTION"):
        JobSettings.from_env({"VACUUM_RETENTION": "59m"})


@pytest.fixture
def aged(tmp_path: Path) -> tuple[Layout, LakeLocation]:
    """Events and rollups 40, 10, 3 and 1 days old, every file written two hours ago."""
    layout = Layout(str(tmp_path / "data"))
    location = LakeLocation.from_env({"LAKE_URI": str(tmp_path / "lake")})
    rng = random.Random(2)
    for i, days in enumerate(AGES):
        at = NOW_MS - days * DAY_MS
        at -= at % 60_000  # one minute bucket per batch: _days() counts each age once
        batch = random_batch(rng, batch=i, rows=30, time_ms=at, spread_ms=1000)
        commit_batches(location, [batch], at=datetime.fromtimestamp(at / 1000 + 5, UTC))
    run_rollup(layout, location, durable=False)
    _age(Path(location.uri), 2 * 3600)
    return layout, location


def _age(root: Path, seconds: float) -> None:
    for f in root.rglob("*.parquet"):
        os.utime(f, (time.time() - seconds, time.time() - seconds))


def _days(layout: Layout, granularity: str) -> set[int]:
    rows = read_rollups(layout, granularity)
    return {int((NOW - b).total_seconds() // 86_400) for b in rows["bucket"].to_list()}


def _event_files(location: LakeLocation) -> set[str]:
    root = Path(location.path("events"))
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*.parquet") if "_delta" not in str(p)
    }


def _rows(location: LakeLocation) -> int:
    return int(snapshot(location).datasets["events"].count_rows())


def _age_removals(location: LakeLocation, seconds: float) -> None:
    """Move the deletion time of every remove action in the events log ``seconds`` back, as if
    that long had passed since retention's delete."""
    for commit in Path(location.path("events", "_delta_log")).glob("*.json"):
        actions = [json.loads(line) for line in commit.read_text().splitlines() if line]
        for action in actions:
            if "remove" in action:
                action["remove"]["deletionTimestamp"] -= int(seconds * 1000)
        commit.write_text("".join(json.dumps(a) + "\n" for a in actions))


def test_expired_days_leave_the_table_then_the_disk(aged: tuple[Layout, LakeLocation]) -> None:
    layout, location = aged
    old_date = f"{datetime.fromtimestamp((NOW_MS - 40 * DAY_MS) / 1000, UTC):%Y-%m-%d}"
    partition = Path(location.path("events")) / f"date={old_date}"
    orphan_old = partition.parent / "date=2020-01-01" / "hour=00" / "crashed-old.parquet"
    orphan_new = partition.parent / "date=2020-01-01" / "hour=00" / "crashed-new.parquet"
    orphan_old.parent.mkdir(parents=True)
    for orphan, age in ((orphan_old, 2 * 3600), (orphan_new, 60)):
        orphan.write_bytes(b"PAR1 written, never committed")
        os.utime(orphan, (time.time() - age, time.time() - age))
    files = _event_files(location)
    jobs = JobSettings(retention_days=30, vacuum_retention=3600)

    report = run_retention(layout, location, jobs, now=NOW)
    assert report.deleted["events_rows"] == 30
    assert _rows(location) == 90
    assert old_date not in {p["date"] for p in open_table(location, EVENTS).partitions()}
    # The expired day's file stays on disk for readers of older snapshots; the orphan older
    # than VACUUM_RETENTION is gone, the younger one (a write still to be committed) is not.
    assert report.deleted["events_files"] == 1
    assert _event_files(location) == files - {orphan_old.relative_to(partition.parent).as_posix()}
    assert list(partition.rglob("*.parquet"))

    again = run_retention(layout, location, jobs, now=NOW)
    assert again.deleted["events_rows"] == 0 and again.deleted["events_files"] == 0
    _age_removals(location, 3601)
    later = run_retention(layout, location, jobs, now=NOW)
    assert later.deleted["events_files"] == 1 and not list(partition.rglob("*.parquet"))
    assert _rows(location) == 90


def test_each_rollup_kind_is_kept_for_its_own_number_of_days(
    aged: tuple[Layout, LakeLocation],
) -> None:
    layout, location = aged
    assert len(_days(layout, "minute")) == 4
    jobs = JobSettings(
        retention_days=30,
        rollup_minute_retention_days=2,
        rollup_hour_retention_days=5,
        rollup_day_retention_days=0,
    )
    report = run_retention(layout, location, jobs, now=NOW)
    assert report.deleted["minute_rollup_hours"] == 3
    assert _days(layout, "minute") == {1}
    assert _days(layout, "hour") == {1, 3}
    assert _days(layout, "day") == {1, 3, 10, 40}  # 0 = forever
    sketches = list((layout.rollups / "_hll").rglob("*.parquet"))
    assert len(sketches) == 2  # the hour and day sketch of the day kept at minute level
    again = run_retention(layout, location, jobs, now=NOW)
    assert sum(again.deleted.values()) == 0


def test_rollups_outlive_their_events_even_through_a_rebuild(
    aged: tuple[Layout, LakeLocation],
) -> None:
    layout, location = aged
    before = read_rollups(layout, "hour")
    run_retention(layout, location, JobSettings(retention_days=5), now=NOW)
    assert _rows(location) == 60
    report = run_rollup(layout, location, durable=False, rebuild=True)
    assert report.rebuilt and report.recomputed == 2  # only hours that still have events
    assert read_rollups(layout, "hour").equals(before)


def _dates(location: LakeLocation, spec: TableSpec) -> set[str]:
    return {p["date"] for p in open_table(location, spec).partitions()}


def _date_of(days: int) -> str:
    return f"{datetime.fromtimestamp((NOW_MS - days * DAY_MS) / 1000, UTC):%Y-%m-%d}"


def _set_aside(layout: Layout, batch_id: str, days: int, link_to: Path) -> Path:
    """A whole file the consumer set aside ``days`` ago: a symlink, as it was moved, and its
    sidecar."""
    directory = layout.quarantine_files / batch_id
    directory.mkdir(parents=True)
    (directory / "x.arrow").symlink_to(link_to)
    at = datetime.fromtimestamp((NOW_MS - days * DAY_MS) / 1000, UTC)
    sidecar = {"file": "x.arrow", "reason": "symlink", "quarantined_at": at.isoformat()}
    (directory / "reason.json").write_text(json.dumps(sidecar))
    return directory


def test_quarantine_and_ledger_keep_their_own_days(
    aged: tuple[Layout, LakeLocation], tmp_path: Path
) -> None:
    layout, location = aged
    for i, days in enumerate(AGES):
        at = NOW_MS - days * DAY_MS
        rows = quarantine_frame(10, seed=i, at_ms=at).with_columns(
            ingested_at=pl.lit(at).cast(UTC_MS)
        )
        append(location, {"quarantine": rows})
    target = tmp_path / "outside.arrow"
    target.write_bytes(b"not ours to delete")
    old = _set_aside(layout, "old-batch", 40, target)
    young = _set_aside(layout, "young-batch", 1, target)
    assert _dates(location, QUARANTINE) == _dates(location, LEDGER) == {_date_of(d) for d in AGES}
    jobs = JobSettings(retention_days=0, quarantine_retention_days=5, ledger_retention_days=20)

    report = run_retention(layout, location, jobs, now=NOW)
    assert report.deleted["events_rows"] == 0  # RETENTION_DAYS=0: events are kept forever
    assert report.deleted["quarantine_rows"] == 20
    assert report.deleted["ledger_rows"] == 1  # one ledger row per batch, one batch per age
    assert _dates(location, QUARANTINE) == {_date_of(3), _date_of(1)}
    assert _dates(location, LEDGER) == {_date_of(10), _date_of(3), _date_of(1)}
    assert _rows(location) == 120
    # The set-aside file of 40 days ago is gone (its link, never what it points to).
    assert report.deleted["quarantined_file_dirs"] == 1
    assert not old.exists() and young.is_dir() and target.read_bytes() == b"not ours to delete"

    again = run_retention(layout, location, jobs, now=NOW)
    assert again.deleted["quarantine_rows"] == again.deleted["ledger_rows"] == 0
    assert again.deleted["quarantined_file_dirs"] == 0


def test_ledger_retention_leaves_rollup_coverage_readable(
    aged: tuple[Layout, LakeLocation],
) -> None:
    """Readers find the minutes newer batches touched in the ledger's change feed since the
    rollups' ledger version: retention's DELETE commit is not one of them."""
    layout, location = aged
    lake = Lake(location, data_dir=layout.root)
    try:
        before = coverage(lake, lake.view("ledger"))
        assert before is not None and before.dirty == ()
        report = run_retention(layout, location, JobSettings(ledger_retention_days=5), now=NOW)
        assert report.deleted["ledger_rows"] == 2
        view = lake.view("ledger")
        rolled_up = rolled_up_version(lake)
        assert rolled_up is not None and view.versions["ledger"] > rolled_up
        after = coverage(lake, view)
        assert after is not None and after.dirty == ()
        # A batch committed after the delete is still seen as touching its minute.
        minute = NOW_MS - NOW_MS % 60_000
        stamp = datetime.fromtimestamp(minute / 1000, UTC)
        write_ledger(
            location,
            [
                {
                    "batch_id": "late",
                    "source_file": "late.arrow",
                    "status": "ok",
                    "min_event_time": stamp,
                    "max_event_time": stamp,
                    "committed_at": NOW,
                }
            ],
        )
        latest = coverage(lake, lake.view("ledger"))
        assert latest is not None and latest.dirty == (minute,)
    finally:
        lake.close()


def test_zero_days_keep_quarantine_and_ledger_forever() -> None:
    jobs = JobSettings.from_env({"QUARANTINE_RETENTION_DAYS": "0", "LEDGER_RETENTION_DAYS": "0"})
    assert table_retention_days(jobs) == {"events": 30, "quarantine": 0, "ledger": 0}
    defaults = JobSettings.from_env({})
    assert (defaults.quarantine_retention_days, defaults.ledger_retention_days) == (30, 30)
    with pytest.raises(SettingsError, match="LEDGER_RETENTION_DAYS"):
        JobSettings.from_env({"LEDGER_RETENTION_DAYS": "-1"})
