"""Rollups: HyperLogLog maths; incremental runs on a Delta lake equal a full recomputation."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from jobs import hll
from jobs.compact import compact
from jobs.rollup import (
    GRANULARITIES,
    appended_ranges,
    full_rollups,
    minute_ranges,
    read_rollups,
    run_rollup,
    touched_minutes,
)
from jobs.testing import commit_batches, random_batch
from lake import maintenance
from lake.location import LakeLocation
from lake.snapshot import snapshot
from lake.tables import LEDGER, open_table
from pipeline.schema import ENRICHED_SCHEMA, LEDGER_SCHEMA, ROLLUP_SCHEMA, Layout
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
    sketch = hll.registers(_users(n), ["g"]).collect()
    estimate = hll.estimate(sketch.lazy(), ["g"]).collect()["unique_users"].item()
    # small counts are (nearly) exact by linear counting; large ones within 4 standard errors
    tolerance = 0 if n <= 10 else max(2, 4 * hll.relative_error() * n)
    assert abs(estimate - n) <= tolerance


def test_hll_merge_is_the_sketch_of_the_union_and_ignores_nulls() -> None:
    users = [f"u{i % 7_000}" for i in range(20_000)] + [None] * 50
    frame = pl.DataFrame({"g": ["a"] * len(users), "user_id": users})
    whole = hll.registers(frame.lazy(), ["g"]).collect().sort("g", "reg")
    parts = [
        hll.registers(frame[i : i + 3_000].lazy(), ["g"]).collect()
        for i in range(0, len(frame), 3_000)
    ]
    merged = hll.merge(parts, ["g"])
    assert_frame_equal(merged, whole)
    assert_frame_equal(hll.merge([merged, *parts], ["g"]), whole)  # idempotent
    assert hll.merge_into(whole, parts[0], ["g"]) is None  # nothing grows: nothing to write
    first_two = hll.merge(parts[:2], ["g"])
    assert_frame_equal(hll.merge_into(first_two, merged, ["g"]), whole)  # type: ignore[arg-type]
    only_nulls = pl.LazyFrame(
        {"g": ["b"], "user_id": [None]}, schema={"g": pl.String, "user_id": pl.String}
    )
    assert hll.registers(only_nulls, ["g"]).collect().is_empty()


def test_touched_minutes_and_runs() -> None:
    t = datetime(2026, 11, 27, 9, 58, 30, tzinfo=UTC)
    ledger = pl.DataFrame(
        [
            {"status": "ok", "accepted": 3, "min_event_time": t, "max_event_time": t},
            {
                "status": "ok",
                "accepted": 2,
                "min_event_time": datetime(2026, 11, 27, 9, 59, tzinfo=UTC),
                "max_event_time": datetime(2026, 11, 27, 10, 1, 5, tzinfo=UTC),
            },
            {"status": "ok", "accepted": 0, "min_event_time": None, "max_event_time": None},
            {"status": "unreadable_file", "accepted": 0},
        ],
        schema={k: LEDGER_SCHEMA[k] for k in ("status", "accepted", "min_event_time")}
        | {"max_event_time": LEDGER_SCHEMA["max_event_time"]},
    )
    minutes = touched_minutes(ledger).to_list()
    base = int(datetime(2026, 11, 27, 9, 58, tzinfo=UTC).timestamp() * 1000)
    assert minutes == [base + i * 60_000 for i in range(4)]
    assert minute_ranges([0, 60_000, 180_000]) == [(0, 120_000), (180_000, 240_000)]


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
    assert first.batches == 6 and first.minutes > 0
    before = _files(layout.rollups)
    again = run_rollup(layout, location, durable=False)
    assert again.batches == 0
    assert _files(layout.rollups) == before  # not even rewritten
    # Compaction commits add no batch: the next run reads none.
    compact(layout, location, JobSettings(compact_min_age=0), now=datetime.now(UTC), durable=False)
    assert run_rollup(layout, location, durable=False).batches == 0

    # Forget which batches were seen (as a crash before the state write would): same answer.
    state = layout.rollups / "_state.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({"hll_check": saved["hll_check"]}))
    replay = run_rollup(layout, location, durable=False)
    assert replay.batches == 6
    after = _files(layout.rollups)
    changed = {k for k in after if k in before and after[k][1] != before[k][1]}
    assert changed <= {"_state.json"}
    _assert_reconciled(layout, location)


def test_a_late_event_updates_its_old_minute_hour_and_day(
    lake: tuple[Layout, LakeLocation],
) -> None:
    layout, location = lake
    rng = random.Random(9)
    _commit(location, random_batch(rng, batch=0, rows=50, time_ms=NOW_MS - 30 * 60_000))
    run_rollup(layout, location, durable=False)
    old = NOW_MS - 45 * 60_000
    _commit(location, random_batch(rng, batch=1, rows=20, time_ms=NOW_MS - 60_000, spread_ms=1))
    late = event_table(
        ["late-1"], time_ms=old, cost_micros=[123], user_id=["late-user"], campaign_id=["cmp-0000"]
    )
    _commit(location, late)
    report = run_rollup(layout, location, durable=False)
    assert report.batches == 2
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
    assert report.rebuilt and report.batches == 4
    _assert_reconciled(layout, location)


def test_an_unreadable_change_feed_falls_back_to_every_batch(
    lake: tuple[Layout, LakeLocation],
) -> None:
    """The ledger files appended after the state's version were compacted and vacuumed away
    (a rollup behind by more than VACUUM_RETENTION): the run reads the whole ledger instead."""
    layout, location = lake
    rng = random.Random(4)
    _commit(location, random_batch(rng, batch=0, rows=30, time_ms=NOW_MS - 20 * 60_000))
    run_rollup(layout, location, durable=False)
    for b in range(1, 4):
        _commit(location, random_batch(rng, batch=b, rows=30, time_ms=NOW_MS - b * 60_000))
    compact(layout, location, JobSettings(compact_min_age=0), now=datetime.now(UTC), durable=False)
    ledger = open_table(location, LEDGER)
    assert maintenance.vacuum(ledger, 0, full=False, allow_short_retention=True)
    report = run_rollup(layout, location, durable=False)
    assert report.batches == 4
    _assert_reconciled(layout, location)
