"""Compaction: what it rewrites, readers alongside it, and kill -9 at every step of a swap."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from jobs.compact import (
    OUTPUT_PREFIX,
    POINTS,
    FileInfo,
    assign_bins,
    compact,
    plan,
    rows_per_output,
)
from jobs.testing import land, random_batch
from pipeline.lake import window_keys
from pipeline.livefiles import read_live, read_units
from pipeline.schema import ENRICHED_SCHEMA, Layout
from pipeline.settings import JobSettings, Settings
from queries.lake import Lake

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
#: The hour that started three hours ago: closed, and within a 6h dedupe window.
BASE_MS = NOW_MS - NOW_MS % HOUR_MS - 3 * HOUR_MS
LATER = datetime.fromtimestamp(NOW_MS / 1000, UTC)


def cfg(**changes: object) -> JobSettings:
    values: dict[str, object] = {"compact_target_rows": 300, "compact_min_age": 0}
    values.update(changes)
    return JobSettings(**values)  # type: ignore[arg-type]


def _read(files: list[Path]) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(schema=ENRICHED_SCHEMA)
    return pl.read_parquet(files, hive_partitioning=False)


def live(layout: Layout) -> pl.DataFrame:
    """What a reader following the rule sees, in a canonical order."""
    frame = read_live(layout, _read)
    return frame.sort("event_id", "batch_id")


def other_readers(layout: Layout) -> tuple[int, int, int]:
    """(rows, distinct event ids) through queries.Lake, and how many keys the consumer's key-cache
    rebuild (pipeline.lake.window_keys) reads: all equal the number of stored events."""
    lake = Lake(layout.root)
    try:
        _, rows = lake.sql("SELECT count(*), count(DISTINCT event_id) FROM events")
    finally:
        lake.close()
    keys, _ = window_keys(layout, 6 * HOUR_MS, 1000)
    return int(rows[0][0]), int(rows[0][1]), len(keys)


def raw_files(layout: Layout) -> list[Path]:
    return sorted(layout.events.rglob("*.parquet"))


def build_lake(settings: Settings, *, hours: int = 2, batches: int = 12, seed: int = 1) -> None:
    """``batches`` small batches per closed hour, plus a few in the current (open) hour."""
    rng = random.Random(seed)
    tables = [
        random_batch(
            rng,
            batch=h * 100 + b,
            rows=rng.randrange(20, 90),
            time_ms=BASE_MS + h * HOUR_MS + b * (HOUR_MS // batches),
            spread_ms=HOUR_MS // batches,
        )
        for h in range(hours)
        for b in range(batches)
    ]
    tables.append(random_batch(rng, batch=9000, rows=30, time_ms=NOW_MS - 1000, spread_ms=500))
    land(settings, tables)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(dedupe_window="6h")


# -- the plan (pure) ---------------------------------------------------------------------------
def test_plan_merges_new_files_with_small_outputs_only() -> None:
    big = FileInfo(f"{OUTPUT_PREFIX}a-0000.parquet", 10_000, 900)
    small = FileInfo(f"{OUTPUT_PREFIX}a-0001.parquet", 1_000, 100)
    fresh = [FileInfo(f"00{i}-x.parquet", 500) for i in range(3)]
    chosen = plan([big, small, *fresh], target_rows=1000, target_bytes=10**9)
    assert [f.name for f in chosen] == sorted(f.name for f in [small, *fresh])
    assert plan([big, small], target_rows=1000, target_bytes=10**9) == []  # already compact
    assert plan([fresh[0]], target_rows=1000, target_bytes=10**9) == []  # nothing to merge
    assert plan([big, fresh[0]], target_rows=1000, target_bytes=10**9) == []


def test_outputs_are_even_and_bins_contiguous() -> None:
    assert rows_per_output(2_500, 10**6, target_rows=1_000, target_bytes=10**12) == 834
    assert rows_per_output(900, 10**6, target_rows=1_000, target_bytes=10**12) == 900
    # the byte target wins when rows are wide: 1 MB over 1000 rows, 100 kB per file
    assert rows_per_output(1_000, 10**6, target_rows=10**6, target_bytes=10**5) == 100
    counts = pl.DataFrame(
        {"campaign_id": ["b", "a", "a", "c"], "minute": [1, 2, 1, 1], "len": [5, 5, 5, 5]}
    )
    bins = assign_bins(counts, per_output=10)
    assert bins.rows() == [("a", 1, 0), ("a", 2, 0), ("b", 1, 1), ("c", 1, 1)]


# -- a run -------------------------------------------------------------------------------------
def test_compaction_rewrites_closed_hours_sorted_and_a_second_run_is_a_no_op(
    settings: Settings,
) -> None:
    build_lake(settings)
    layout = Layout(settings.data_dir)
    before = live(layout)
    open_hour = layout.events / f"date={LATER:%Y-%m-%d}" / f"hour={LATER:%H}"
    open_files = sorted(open_hour.iterdir())
    report = compact(layout, cfg(compact_row_group_rows=100), now=LATER, durable=False)
    assert len(report.partitions) == 2
    for part in report.partitions:
        assert part.files_before == 12
        assert part.files_after == -(-part.rows // 300)
        directory = layout.events / part.partition
        outputs = sorted(directory.iterdir())
        assert all(p.name.startswith(OUTPUT_PREFIX) for p in outputs)
        whole = pl.concat([pl.read_parquet(p, hive_partitioning=False) for p in outputs])
        assert whole.schema == ENRICHED_SCHEMA
        assert whole.equals(whole.sort("campaign_id", "event_time", "event_id"))
        for p in outputs:
            meta = pq.ParquetFile(p).metadata
            assert meta.num_row_groups == -(-meta.num_rows // 100)
            assert meta.row_group(0).column(0).compression == "ZSTD"
    assert sorted(open_hour.iterdir()) == open_files  # the open hour is left alone
    assert_frame_equal(live(layout), before)
    assert not list((layout.staging / "compact").glob("*.*"))

    listing = [(p, p.stat().st_mtime_ns) for p in raw_files(layout)]
    again = compact(layout, cfg(compact_row_group_rows=100), now=LATER, durable=False)
    assert again.partitions == []
    assert [(p, p.stat().st_mtime_ns) for p in raw_files(layout)] == listing


def test_late_events_after_compaction_merge_with_small_outputs_only(
    settings: Settings,
) -> None:
    build_lake(settings, hours=1)
    layout = Layout(settings.data_dir)
    compact(layout, cfg(compact_target_rows=250), now=LATER, durable=False)
    partition = next(layout.events.glob("date=*/hour=*"))
    outputs = {p.name: pq.read_metadata(p).num_rows for p in partition.iterdir()}
    big = {n for n, rows in outputs.items() if rows >= 125}
    rng = random.Random(4)
    land(
        settings,
        [
            random_batch(rng, batch=500 + i, rows=5, time_ms=BASE_MS + 60_000 * i, spread_ms=1000)
            for i in range(3)
        ],
    )
    before = live(layout)
    report = compact(layout, cfg(compact_target_rows=250), now=LATER, durable=False)
    assert len(report.partitions) == 1
    after = {p.name for p in partition.iterdir()}
    assert big <= after  # the big outputs were not rewritten
    assert_frame_equal(live(layout), before)


def test_files_of_a_batch_the_consumer_is_publishing_are_left_alone(
    settings: Settings,
) -> None:
    build_lake(settings, hours=1)
    layout = Layout(settings.data_dir)
    partition = next(layout.events.glob("date=*/hour=*"))
    busy = sorted(partition.iterdir())[0]
    # As if the consumer crashed mid-publish: it will re-read this file when it recovers.
    (layout.staging / f"{busy.stem}.committed").mkdir(parents=True)
    compact(layout, cfg(), now=LATER, durable=False)
    assert busy.exists()
    assert sum(not p.name.startswith(OUTPUT_PREFIX) for p in partition.iterdir()) == 1


def test_readers_never_see_a_row_twice_or_miss_one(settings: Settings) -> None:
    """Readers in a loop (Polars and DuckDB, over the live files) while compaction swaps files
    again and again and the consumer keeps adding late events to the closed hours."""
    build_lake(settings, hours=2, batches=10)
    layout = Layout(settings.data_dir)
    baseline = set(live(layout)["event_id"])
    stop = threading.Event()
    seen: list[dict[str, int]] = []
    errors: list[BaseException] = []
    reads = [0]

    def polars_reader() -> None:
        try:
            while not stop.is_set():
                frame = read_live(
                    layout,
                    lambda files: pl.read_parquet(
                        files, columns=["event_id", "batch_id"], hive_partitioning=False
                    ),
                )
                assert frame["event_id"].is_unique().all(), "a row seen twice"
                assert baseline <= set(frame["event_id"]), "a row missed"
                seen.append(dict(frame.group_by("batch_id").len().iter_rows()))
                reads[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def duckdb_reader() -> None:
        con = duckdb.connect()
        try:
            while not stop.is_set():

                def count(files: list[Path]) -> tuple[int, int]:
                    try:
                        row = con.execute(
                            "SELECT count(*), count(DISTINCT event_id) FROM read_parquet($f)",
                            {"f": [str(f) for f in files]},
                        ).fetchone()
                    except duckdb.IOException as exc:
                        raise FileNotFoundError(str(exc)) from exc
                    assert row is not None
                    return int(row[0]), int(row[1])

                total, distinct = read_live(layout, count)
                assert total == distinct, "a row seen twice"
                assert total >= len(baseline), "a row missed"
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            con.close()

    def lake_reader() -> None:
        lake = Lake(layout.root)
        try:
            while not stop.is_set():
                _, rows = lake.sql(
                    "SELECT batch_id, count(*), count(DISTINCT event_id) FROM events GROUP BY ALL"
                )
                assert all(n == unique for _, n, unique in rows), "a row seen twice"
                assert sum(n for _, n, _ in rows) >= len(baseline), "a row missed"
                seen.append({b: n for b, n, _ in rows})
                keys, _ = window_keys(layout, 6 * HOUR_MS, 1000)
                assert len(keys) == len(set(zip(keys.hi, keys.lo, strict=True))), "a key twice"
                assert len(keys) >= len(baseline), "a key missed"
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            lake.close()

    threads = [
        threading.Thread(target=polars_reader),
        threading.Thread(target=duckdb_reader),
        threading.Thread(target=lake_reader),
    ]
    for t in threads:
        t.start()
    rng = random.Random(8)
    swaps = 0
    try:
        for i in range(8):
            late = [
                random_batch(
                    rng,
                    batch=700 + i * 3 + j,
                    rows=rng.randrange(5, 40),
                    time_ms=BASE_MS + rng.randrange(2 * HOUR_MS),
                    spread_ms=60_000,
                )
                for j in range(3)
            ]
            land(settings, late)
            # Each phase is held open a little so that reads land inside every one of them.
            config = cfg(compact_target_rows=rng.choice([150, 400]))
            hold = lambda _: time.sleep(0.01)  # noqa: E731
            swaps += len(compact(layout, config, now=LATER, durable=False, on_step=hold).partitions)
            if errors:
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    assert swaps >= 8 and reads[0] >= 15
    final = dict(live(layout).group_by("batch_id").len().iter_rows())
    for snapshot in seen:  # every batch a reader saw, it saw whole
        assert all(final[b] == n for b, n in snapshot.items())


# -- kill -9 -----------------------------------------------------------------------------------
def run_compaction(
    data_dir: Path, crash_at: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "ADEVENTS_CRASH_AT"}
    env.update(
        DATA_DIR=str(data_dir),
        FSYNC="false",
        COMPACT_MIN_AGE="0",
        COMPACT_TARGET_ROWS="200",
    )
    if crash_at:
        env["ADEVENTS_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "cli", "compact", "--once", "--log-level", "WARNING"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def crash_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake with two closed hours of small files, built once and copied by each test."""
    root = tmp_path_factory.mktemp("crash") / "data"
    settings = Settings.from_env(
        {}, data_dir=str(root), fsync=False, max_events_per_second=0, dedupe_window="6h"
    )
    build_lake(settings, hours=2, batches=8, seed=3)
    return root


@pytest.mark.parametrize("point", POINTS)
def test_kill_during_compaction_keeps_readers_exact_and_the_next_run_finishes(
    tmp_path: Path, crash_lake: Path, point: str
) -> None:
    data = tmp_path / "data"
    shutil.copytree(crash_lake, data)
    layout = Layout(str(data))
    reference = live(layout)
    killed = run_compaction(data, crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    # Mid-swap: a reader following the rule still sees every row exactly once.
    assert_frame_equal(live(layout), reference)
    assert other_readers(layout) == (len(reference),) * 3
    if point in ("compact_after_place", "compact_after_swap", "compact_mid_delete"):
        # ...while a plain glob would not (outputs and the files they replace side by side).
        assert len(_read(raw_files(layout))) > len(reference)
    finished = run_compaction(data)
    assert finished.returncode == 0, finished.stderr.decode()
    assert_frame_equal(live(layout), reference)
    assert_frame_equal(_read(raw_files(layout)).sort("event_id", "batch_id"), reference)
    assert read_units(layout) == ()
    assert not [p for p in (data / "staging" / "compact").iterdir() if p.name != "generation"]
    closed = [p for p in raw_files(layout) if p.parent.name != f"hour={LATER:%H}"]
    assert closed and all(p.name.startswith(OUTPUT_PREFIX) for p in closed)


def test_bench_smoke(tmp_path: Path) -> None:
    """The compaction benchmark runs (tiny), so it does not rot."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "compaction.py"
    args = ["--events", "20000", "--batch-rows", "500", "--hours", "2", "--repeat", "1"]
    out = subprocess.run(
        [sys.executable, str(bench), "--dir", str(tmp_path / "bench"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    first = out.stdout.splitlines()[0]  # events=20,000 files <before> -> <after>, ...
    assert first.startswith("events=20,000 files "), out.stdout
    before, after = first.split(" files ")[1].split(",")[0].split(" -> ")
    assert int(after) < int(before)


def test_at_every_step_of_a_swap_a_reader_sees_each_row_once(settings: Settings) -> None:
    """In-process, the rule checked at each step (the kill test checks the same across crashes)."""
    build_lake(settings, hours=1)
    layout = Layout(settings.data_dir)
    reference = live(layout)
    views: dict[str, pl.DataFrame] = {}
    others: dict[str, tuple[int, int, int]] = {}

    def look(step: str) -> None:
        views[step] = live(layout)
        others[step] = other_readers(layout)

    compact(layout, cfg(compact_target_rows=200), now=LATER, durable=False, on_step=look)
    assert set(views) == set(others) == set(POINTS)
    for frame in views.values():
        assert_frame_equal(frame, reference)
    assert set(others.values()) == {(len(reference),) * 3}


def test_a_listing_that_straddles_a_phase_change_is_taken_again(settings: Settings) -> None:
    from jobs import compact as module

    layout = Layout(settings.data_dir)
    calls: list[int] = []

    def listing() -> int:
        calls.append(module.read_generation(layout))
        if len(calls) == 1:
            module._bump(layout, durable=False)  # a unit changed phase while we listed
        return len(calls)

    result, view = module.consistent(layout, listing)
    assert result == 2 and view.generation == 1


def test_a_campaign_minute_bigger_than_an_output_leaves_no_empty_bin() -> None:
    counts = pl.DataFrame(
        {"campaign_id": ["a", "b", "c", "d"], "minute": [1, 1, 1, 1], "len": [5, 50, 5, 5]}
    )
    assert assign_bins(counts, per_output=10)["_bin"].to_list() == [0, 0, 1, 2]
