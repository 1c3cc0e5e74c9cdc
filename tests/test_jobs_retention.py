"""Retention: events partitions and each rollup level go after their own number of days."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobs.retention import cutoff_ms, expired, run_retention
from jobs.rollup import read_rollups, run_rollup
from jobs.testing import land, random_batch
from pipeline.livefiles import live_event_files
from pipeline.schema import Layout
from pipeline.settings import JobSettings, Settings

DAY_MS = 86_400_000
NOW_MS = int(time.time() * 1000)
NOW = datetime.fromtimestamp(NOW_MS / 1000, UTC)


def test_expired_is_by_end_of_span_and_zero_keeps_everything() -> None:
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    cut = cutoff_ms(now, 1)
    assert cut == int(datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp() * 1000)
    spans = [(Path("a"), cut - 1), (Path("b"), cut), (Path("c"), cut + 1)]
    assert expired(spans, cut) == [Path("a"), Path("b")]
    assert cutoff_ms(now, 0) is None and expired(spans, None) == []


@pytest.fixture
def aged_lake(make_settings: Callable[..., Settings]) -> Layout:
    """Events and rollups 1, 3, 10 and 40 days old (the consumer takes them as of each day)."""
    settings = make_settings()
    layout = Layout(settings.data_dir)
    rng = random.Random(2)
    for i, days in enumerate((40, 10, 3, 1)):
        at = NOW_MS - days * DAY_MS
        at -= at % 60_000  # one minute bucket per batch: _days() counts each age once
        land(
            settings,
            [random_batch(rng, batch=i, rows=30, time_ms=at, spread_ms=1000)],
            clock=lambda at=at: datetime.fromtimestamp(at / 1000 + 5, UTC),  # type: ignore[misc]
        )
    run_rollup(layout, durable=False)
    return layout


def _days(layout: Layout, granularity: str) -> set[int]:
    rows = read_rollups(layout, granularity)
    return {int((NOW - b).total_seconds() // 86_400) for b in rows["bucket"].to_list()}


def test_each_kind_is_kept_for_its_own_number_of_days(aged_lake: Layout) -> None:
    layout = aged_lake
    assert len(_days(layout, "minute")) == 4
    report = run_retention(
        layout,
        JobSettings(
            retention_days=30,
            rollup_minute_retention_days=2,
            rollup_hour_retention_days=5,
            rollup_day_retention_days=0,
        ),
        now=NOW,
    )
    assert report.deleted["events_hours"] == 1
    assert _days(layout, "minute") == {1}
    assert _days(layout, "hour") == {1, 3}
    assert _days(layout, "day") == {1, 3, 10, 40}  # 0 = forever
    assert len({f.parent for f in live_event_files(layout)}) == 3
    sketches = list((layout.rollups / "_hll").rglob("*.parquet"))
    assert len(sketches) == 2  # the hour and day sketch of the day kept at minute level
    again = run_retention(
        layout,
        JobSettings(
            retention_days=30,
            rollup_minute_retention_days=2,
            rollup_hour_retention_days=5,
            rollup_day_retention_days=0,
        ),
        now=NOW,
    )
    assert sum(again.deleted.values()) == 0
    assert not (layout.staging / "trash").exists() or not any((layout.staging / "trash").iterdir())


def test_rollups_outlive_their_events_even_through_a_rebuild(aged_lake: Layout) -> None:
    layout = aged_lake
    before = read_rollups(layout, "hour")
    run_retention(layout, JobSettings(retention_days=5), now=NOW)
    assert len({f.parent for f in live_event_files(layout)}) == 2
    report = run_rollup(layout, durable=False, rebuild=True)
    assert report.rebuilt and report.hours == 2  # only hours that still have events
    assert read_rollups(layout, "hour").equals(before)


def test_a_partition_being_compacted_is_not_deleted_under_it(aged_lake: Layout) -> None:
    from pipeline.livefiles import read_units

    layout = aged_lake
    oldest = sorted(layout.events.glob("date=*/hour=*"))[0]
    unit = layout.staging / "compact" / "compacted-1-x.committed"
    unit.mkdir(parents=True)
    key = oldest.relative_to(layout.events).as_posix()
    (unit / "manifest.json").write_text(
        f'{{"unit": "compacted-1-x", "partition": "{key}", "outputs": [], "replaces": []}}'
    )
    assert read_units(layout)[0].partition == key
    run_retention(layout, JobSettings(retention_days=30), now=NOW)
    assert oldest.exists()
