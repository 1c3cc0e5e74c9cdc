"""Rollups: HyperLogLog maths; incremental runs on a Delta lake equal a full recomputation."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from jobs import hll, rollup
from jobs.compact import compact
from jobs.rollup import GRANULARITIES, full_rollups, minute_version, read_rollups, run_rollup
from jobs.testing import commit_batches, random_batch
from lake import maintenance
from lake.changes import appended_ranges
from lake.location import LakeLocation
from lake.snapshot import snapshot
from lake.tables import EVENTS, open_table
from pipeline.schema import ENRICHED_SCHEMA, ROLLUP_SCHEMA, Layout
from pipeline.settings import JobSettings
from pipeline.testing import event_table

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)


def _users(n: int, prefix: str = "u") -> pl.LazyFrame:
    return pl.LazyFrame(
        {"g": ["a"] * n, "user_id": [f"{prefix}{i}" for i in range(n)]},
        schema={"g": pl.String, "user_id": pl.String},
    )


@pytest.mark.parametrize("n", [1, 7, 100, 2_000, 50_000, 300_000])
def test_hll_estimates_within_its_error(n: int) -> None:
    sketch = hll.registers(_users(n), ["g"])
    estimate = hll.estimate(sketch, ["g"])["unique_users"].item()
    # small counts are (nearly) exact by linear counting; large ones within 4 standard errors
    tolerance = 0 if n <= 10 else max(2, 4 * hll.relative_error() * n)
    assert abs(estimate - n) <= tolerance


def test_hll_is_unbiased_around_the_old_switch_to_the_raw_estimate() -> None:
    """200 groups of 10k users (where the classic estimator switched from linear counting to
    its raw estimate, +1.8 % biased): mean error within 0.5 %, spread within 2.5 %."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(200), 10_000)
    users = pl.Series(rng.integers(0, 10**12, len(groups))).cast(pl.String)
    frame = pl.DataFrame({"g": groups, "user_id": users})
    exact = frame.group_by("g").agg(pl.col("user_id").n_unique().alias("exact"))
    found = hll.estimate(hll.registers(frame, ["g"]), ["g"]).join(exact, on="g")
    error = found["unique_users"] / found["exact"] - 1.0
    bias, spread = error.mean(), (error**2).mean()
    assert isinstance(bias, float) and isinstance(spread, float)
    assert abs(bias) < 0.005 and spread**0.5 < 0.025


def test_hll_merge_is_the_sketch_of_the_union_and_ignores_nulls() -> None:
    users = [f"u{i % 7_000}" for i in range(20_000)] + [None] * 50
    frame = pl.DataFrame({"g": ["a"] * len(users), "user_id": users})
    whole = hll.registers(frame.lazy(), ["g"])
    parts = [hll.registers(frame[i : i + 3_000], ["g"]) for i in range(0, len(frame), 3_000)]
    merged = hll.merge(parts, ["g"])
    assert_frame_equal(merged, whole)
    assert_frame_equal(hll.merge([merged, *parts], ["g"]), whole)  # idempotent
    assert hll.merge_into(whole, parts[0], ["g"]) is None  # nothing grows: nothing to write
    first_two = hll.merge(parts[:2], ["g"])
    assert_frame_equal(hll.merge_into(first_two, merged, ["g"]), whole)  # type: ignore[arg-type]
    only_nulls = pl.LazyFrame(
        {"g": ["b"], "user_id": [None]}, schema={"g": pl.String, "user_id": pl.String}
    )
    assert hll.registers(only_nulls, ["g"]).is_empty()


def test_hll_sketches_of_many_groups_merge_group_by_group() -> None:
    """Groups in any order and split across sketches merge into the sketch of each group's
    rows; the estimate of every group stays within its error."""
    rng = random.Random(2)
    rows = [(f"c{rng.randrange(50)}", f"u{rng.randrange(4_000)}") for _ in range(60_000)]
    frame = pl.DataFrame(rows, schema={"g": pl.String, "user_id": pl.String}, orient="row")
    whole = hll.registers(frame, ["g"]).sort("g")
    parts = [hll.registers(frame.sample(fraction=0.3, seed=s), ["g"]) for s in range(6)]
    merged = hll.merge([*parts, hll.registers(frame, ["g"])], ["g"])
    assert_frame_equal(merged, whole)
    exact = frame.group_by("g").agg(pl.col("user_id").n_unique()).sort("g")
    got = hll.estimate(whole, ["g"]).sort("g")
    error = (got["unique_users"] - exact["user_id"]).abs() / exact["user_id"]
    worst = error.max()
    assert isinstance(worst, float) and worst <= 4 * hll.relative_error()


def test_appended_ranges_skip_deletes_and_need_the_whole_span() -> None:
    ops = ["WRITE", "OPTIMIZE", "WRITE", "DELETE", "WRITE", "WRITE"]
    history = [{"version": v, "operation": op} for v, op in enumerate(ops, start=1)]
    assert appended_ranges(history, 0, 6) == [(1, 3), (5, 6)]
    assert appended_ranges(history, 3, 4) == []
    assert appended_ranges(history[2:], 0, 6) is None  # versions 1-2 are no longer in the log


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Layout, LakeLocation]:
    return Layout(str(tmp_path / "data")), LakeLocation.from_env({"LAKE_URI": str(tmp_path / "l")})


def _events(location: LakeLocation) -> pl.LazyFrame:
    rows = snapshot(location).datasets["events"].to_table()
    return pl.DataFrame(rows).lazy().cast(dict(ENRICHED_SCHEMA))  # type: ignore[arg-type]


def _assert_reconciled(layout: Layout, location: LakeLocation) -> None:
    expected = full_rollups(_events(location))
    for g in GRANULARITIES:
        got = read_rollups(layout, g)
        assert got.schema == ROLLUP_SCHEMA
        assert len(got) > 0
        assert_frame_equal(got, expected[g])


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _commit(location: LakeLocation, *tables: pa.Table) -> None:
    commit_batches(location, list(tables), at=datetime.now(UTC))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_rollups_equal_a_full_recomputation(
    lake: tuple[Layout, LakeLocation], seed: int
) -> None:
    """Batches over 3 hours, late events (old buckets), re-sent copies, runs after random
    batches, compactions (the open hour's too) and a Z-order in between."""
    layout, location = lake
    rng = random.Random(seed)
    history: list[tuple[str, int]] = []
    start = NOW_MS - 3 * HOUR_MS
    batches = 24
    for b in range(batches):
        t = start + b * (3 * HOUR_MS // batches)
        table = random_batch(
            rng,
            batch=b,
            rows=rng.choice([0, 1, 40, 150]),
            time_ms=t,
            history=history,
            late_ms=50 * 60_000,
            late_rate=0.15,
        )
        _commit(location, table)
        if rng.random() < 0.5:
            run_rollup(layout, location, durable=False)
        if b in (batches // 3, batches // 2):
            compact(
                layout,
                location,
                JobSettings(compact_min_age=0),
                now=datetime.fromtimestamp(NOW_MS / 1000, UTC),
                durable=False,
            )
    run_rollup(layout, location, durable=False)
    _assert_reconciled(layout, location)


def _rolled_up_batch(
    layout: Layout, location: LakeLocation, rng: random.Random, *, rows: int, minutes_ago: int
) -> None:
    """A first batch committed ``minutes_ago`` and rolled up: what later runs fold onto."""
    _commit(location, random_batch(rng, batch=0, rows=rows, time_ms=NOW_MS - minutes_ago * 60_000))
    run_rollup(layout, location, durable=False)


def _rollups(layout: Layout) -> dict[str, pl.DataFrame]:
    return {g: read_rollups(layout, g) for g in GRANULARITIES}


def test_a_second_run_changes_nothing_and_a_replay_gives_the_same_rollups(
    lake: tuple[Layout, LakeLocation],
) -> None:
    layout, location = lake
    rng = random.Random(5)
    history: list[tuple[str, int]] = []
    for b in range(6):
        at = NOW_MS - 40 * 60_000 + b * 60_000
        _commit(location, random_batch(rng, batch=b, rows=80, time_ms=at, history=history))
    first = run_rollup(layout, location, durable=False)
    assert first.recomputed > 0 and first.minutes > 0  # the first run reads a snapshot
    before = _files(layout.rollups)
    again = run_rollup(layout, location, durable=False)
    assert (again.commits, again.rows, again.recomputed) == (0, 0, 0)
    assert _files(layout.rollups) == before  # not even rewritten
    # Compaction and Z-order commits add no rows: the next run folds none, writes nothing.
    compact(layout, location, JobSettings(compact_min_age=0), now=datetime.now(UTC), durable=False)
    after_compaction = run_rollup(layout, location, durable=False)
    assert (after_compaction.rows, after_compaction.minutes) == (0, 0)
    assert {k: v for k, v in _files(layout.rollups).items() if k != "_state.json"} == {
        k: v for k, v in before.items() if k != "_state.json"
    }

    # Forget which commits were folded (as a lost state file would): the same rollups.
    state = layout.rollups / "_state.json"
    saved = json.loads(state.read_text())
    kept = _rollups(layout)
    state.write_text(json.dumps({"hll_check": saved["hll_check"]}))
    replay = run_rollup(layout, location, durable=False)
    assert replay.recomputed == first.recomputed
    for g, frame in _rollups(layout).items():
        assert_frame_equal(frame, kept[g])
    _assert_reconciled(layout, location)


def test_new_rows_are_folded_in_and_each_minute_file_names_its_version(
    lake: tuple[Layout, LakeLocation],
) -> None:
    layout, location = lake
    rng = random.Random(6)
    _rolled_up_batch(layout, location, rng, rows=50, minutes_ago=20)
    for b in range(1, 4):
        _commit(location, random_batch(rng, batch=b, rows=40, time_ms=NOW_MS - b * 60_000))
    report = run_rollup(layout, location, durable=False)
    assert (report.commits, report.rows, report.recomputed) == (3, 120, 0)
    version = open_table(location, EVENTS).version()
    minute_files = sorted((layout.rollups / "minute").rglob("rollup.parquet"))
    assert minute_files and max(minute_version(p) for p in minute_files) == version
    _assert_reconciled(layout, location)


class _CrashError(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(1, 9))
def test_a_crash_between_any_two_file_writes_folds_no_row_twice(
    lake: tuple[Layout, LakeLocation], monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """Each write is atomic, but a run writes many files: stop it before its n-th write (as
    kill -9 would), then run again. Minute files take only rows of commits they do not have."""
    layout, location = lake
    rng = random.Random(crash_at)
    history: list[tuple[str, int]] = []
    _rolled_up_batch(layout, location, rng, rows=60, minutes_ago=90)
    for b in range(1, 5):  # over two hours, late events into the first one
        at = NOW_MS - (80 - 25 * b) * 60_000
        table = random_batch(
            rng, batch=b, rows=50, time_ms=at, history=history, late_ms=60 * 60_000, late_rate=0.3
        )
        _commit(location, table)
    real_write = rollup.write_parquet_atomic
    writes = 0

    def failing_write(*args: object, **kwargs: object) -> None:
        nonlocal writes
        writes += 1
        if writes == crash_at:
            raise _CrashError
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rollup, "write_parquet_atomic", failing_write)
    with pytest.raises(_CrashError):
        run_rollup(layout, location, durable=False)
    monkeypatch.setattr(rollup, "write_parquet_atomic", real_write)
    run_rollup(layout, location, durable=False)
    _assert_reconciled(layout, location)


def test_rows_are_folded_in_bounded_parts(
    lake: tuple[Layout, LakeLocation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partial sums and sketches of many small parts add up to those of all rows at once."""
    layout, location = lake
    rng = random.Random(8)
    _rolled_up_batch(layout, location, rng, rows=10, minutes_ago=30)
    for b in range(1, 6):
        _commit(location, random_batch(rng, batch=b, rows=90, time_ms=NOW_MS - b * 300_000))
    monkeypatch.setattr(rollup, "FOLD_ROWS", 7)
    assert run_rollup(layout, location, durable=False).rows == 450
    _assert_reconciled(layout, location)


def test_a_late_event_updates_its_old_minute_hour_and_day(
    lake: tuple[Layout, LakeLocation],
) -> None:
    layout, location = lake
    rng = random.Random(9)
    _rolled_up_batch(layout, location, rng, rows=50, minutes_ago=30)
    old = NOW_MS - 45 * 60_000
    _commit(location, random_batch(rng, batch=1, rows=20, time_ms=NOW_MS - 60_000, spread_ms=1))
    late = event_table(
        ["late-1"], time_ms=old, cost_micros=[123], user_id=["late-user"], campaign_id=["cmp-0000"]
    )
    _commit(location, late)
    report = run_rollup(layout, location, durable=False)
    assert report.commits == 2
    minute = datetime.fromtimestamp((old - old % 60_000) / 1000, UTC)
    rows = read_rollups(layout, "minute").filter(
        (pl.col("campaign_id") == "cmp-0000") & (pl.col("bucket") == minute)
    )
    assert rows["spend_micros"].to_list() == [123]
    _assert_reconciled(layout, location)


def test_a_changed_hash_rebuilds_from_events(lake: tuple[Layout, LakeLocation]) -> None:
    layout, location = lake
    rng = random.Random(3)
    for b in range(4):
        _commit(location, random_batch(rng, batch=b, rows=60, time_ms=NOW_MS - b * 600_000))
    run_rollup(layout, location, durable=False)
    state = layout.rollups / "_state.json"
    saved = json.loads(state.read_text())
    saved["hll_check"] = "from-another-polars"
    state.write_text(json.dumps(saved))
    report = run_rollup(layout, location, durable=False)
    hours = {(p["date"], p["hour"]) for p in open_table(location, EVENTS).partitions()}
    assert report.rebuilt and report.recomputed == len(hours)
    _assert_reconciled(layout, location)


def test_an_unreadable_change_feed_falls_back_to_a_recomputation(
    lake: tuple[Layout, LakeLocation],
) -> None:
    """The events files appended after the state's version were compacted and vacuumed away
    (a rollup behind by more than VACUUM_RETENTION): the run recomputes from a snapshot."""
    layout, location = lake
    rng = random.Random(4)
    _rolled_up_batch(layout, location, rng, rows=30, minutes_ago=20)
    for b in range(1, 4):
        _commit(location, random_batch(rng, batch=b, rows=30, time_ms=NOW_MS - b * 60_000))
    compact(layout, location, JobSettings(compact_min_age=0), now=datetime.now(UTC), durable=False)
    events = open_table(location, EVENTS)
    assert maintenance.vacuum(events, 0, full=False, allow_short_retention=True)
    report = run_rollup(layout, location, durable=False)
    assert report.recomputed > 0 and report.commits == 0
    _assert_reconciled(layout, location)
