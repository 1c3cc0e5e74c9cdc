"""queries/: snapshots, exact newest-first reads, aggregates, concurrent reads, `adevents sql`."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from jobs.alerts import save_alerts
from jobs.compact import compact as compact_lake
from jobs.rollup import run_rollup
from jobs.storage import read_ledger
from pipeline.consumer import Consumer
from pipeline.factory import make_key_cache
from pipeline.schema import LEDGER_SCHEMA, Layout
from pipeline.settings import JobSettings, Settings
from pipeline.spool import SpoolWriter
from pipeline.tables import Alert
from pipeline.testing import event_table
from queries import campaigns, command, events, ops
from queries.campaigns import Bucket, RawEventsSource, RollupSource, Totals
from queries.lake import Lake, LakeBusyError, SnapshotChangedError
from queries.testing import land

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
#: Start of the previous UTC hour: test events sit in it and in the current one.
H = NOW_MS - NOW_MS % HOUR_MS - HOUR_MS
TYPES = ("impression", "click", "conversion")
#: A moment after every test event: every hour partition counts as closed for compaction.
LATER = datetime.fromtimestamp(NOW_MS / 1000 + 2 * 3600, UTC)


def random_batches(seed: int, batches: int = 12, size: int = 40, prefix: str = "e") -> list[object]:
    """Batches of events with times scattered over two hours (files overlap in time)."""
    rng = random.Random(seed)
    out = []
    for b in range(batches):
        ids = [f"{prefix}{b:03d}-{i:03d}" for i in range(size)]
        out.append(
            event_table(
                ids,
                time_ms=[H + rng.randrange(0, min(2 * HOUR_MS, NOW_MS - H)) for _ in ids],
                event_type=[rng.choice(TYPES) for _ in ids],
                campaign_id=[f"cmp-{rng.randrange(4)}" for _ in ids],
                cost_micros=[rng.randrange(0, 3_000_000) for _ in ids],
                revenue_micros=[rng.choice([0, 0, rng.randrange(10_000_000)]) for _ in ids],
            )
        )
    return out


@pytest.fixture(scope="module")
def random_lake(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings.from_env(
        {},
        data_dir=str(tmp_path_factory.mktemp("lake")),
        fsync="false",
        max_events_per_second="0",
        dedupe_window="3h",  # nothing is late: every event generated is stored
    )
    land(settings, *random_batches(1))  # type: ignore[arg-type]
    return settings


@pytest.fixture(scope="module")
def stored(random_lake: Settings) -> pl.DataFrame:
    files = sorted(Layout(random_lake.data_dir).events.rglob("*.parquet"))
    frame = pl.concat([pl.read_parquet(f) for f in files])
    return frame.with_columns(time_ms=pl.col("event_time").dt.epoch("ms"))


def expected_newest(frame: pl.DataFrame, limit: int) -> list[tuple[int, str]]:
    top = frame.sort(["time_ms", "event_id"], descending=True).head(limit)
    return list(zip(top["time_ms"].to_list(), top["event_id"].to_list(), strict=True))


# -- empty lakes -------------------------------------------------------------------------------
def test_an_empty_lake_answers_with_empty_results(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "nothing-here")
    assert events.count(lake) == 0
    assert events.newest(lake, 10) == []
    assert events.page(lake, 10, events.EventFilter(campaign_id="x")) == ([], None)
    assert campaigns.series(lake, "x", 0, NOW_MS, "hour") == []
    assert campaigns.top(lake, "roas", 10) == []
    assert ops.processing_rate(lake, NOW_MS) == 0.0
    assert ops.last_commit_ms(lake, NOW_MS) is None
    assert ops.overview(lake, NOW_MS).batches == 0
    assert ops.LedgerCounter(lake).update().rows_in == 0
    assert ops.alerts(lake) == []
    columns, rows = lake.sql("SELECT count(*) AS n FROM events")
    assert (columns, rows) == (["n"], [(0,)])
    _, described = lake.sql("DESCRIBE events")
    types = {r[0]: r[1] for r in described}
    assert types["event_time"] == "TIMESTAMP WITH TIME ZONE"
    assert types["cost_micros"] == "BIGINT"
    assert types["hour"] == "INTEGER"


# -- newest first, exactly ---------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_newest_matches_a_full_sort(
    random_lake: Settings, stored: pl.DataFrame, limit: int
) -> None:
    found = events.newest(Lake(random_lake.data_dir), limit)
    assert [(e.time_ms, e.event_id) for e in found] == expected_newest(stored, limit)


@pytest.mark.parametrize("event_type", [None, "click"])
def test_cursor_pages_walk_a_campaign_newest_first(
    random_lake: Settings, stored: pl.DataFrame, event_type: str | None
) -> None:
    lake = Lake(random_lake.data_dir)
    subset = stored.filter(pl.col("campaign_id") == "cmp-1")
    if event_type:
        subset = subset.filter(pl.col("event_type") == event_type)
    walked: list[tuple[int, str]] = []
    before = None
    while True:
        where = events.EventFilter("cmp-1", event_type, before=before)
        page, before = events.page(lake, 9, where)
        walked += [(e.time_ms, e.event_id) for e in page]
        if before is None:
            break
    assert walked == expected_newest(subset, len(subset))


def test_campaign_pages_are_exact_over_compacted_files(tmp_path: Path) -> None:
    """After compaction, files hold campaign ranges (their footers say which): pages still
    walk every event of a campaign newest first, and files of other campaigns are skipped."""
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), fsync="false", max_events_per_second="0", dedupe_window="3h"
    )
    land(settings, *random_batches(11, batches=10, size=60))  # type: ignore[arg-type]
    config = JobSettings(compact_target_rows=120, compact_min_age=0)
    assert compact_lake(Layout(settings.data_dir), config, now=LATER, durable=False).partitions
    lake = Lake(tmp_path)
    files = lake.files("events")
    stored = pl.concat([pl.read_parquet(f) for f in files]).with_columns(
        time_ms=pl.col("event_time").dt.epoch("ms")
    )
    bounds = lake.bounds("events", files, "campaign_id")
    assert any(high < "cmp-3" for _, high in bounds.values() if high)  # files of some only
    for cid in ("cmp-0", "cmp-3"):
        walked: list[tuple[int, str]] = []
        before = None
        while True:
            page, before = events.page(lake, 7, events.EventFilter(cid, before=before))
            walked += [(e.time_ms, e.event_id) for e in page]
            if before is None:
                break
        subset = stored.filter(pl.col("campaign_id") == cid)
        assert walked == expected_newest(subset, len(subset))


def test_since_and_until_bound_the_events(random_lake: Settings, stored: pl.DataFrame) -> None:
    lake = Lake(random_lake.data_dir)
    since, until = H + HOUR_MS // 2, H + HOUR_MS + HOUR_MS // 4
    found = events.newest(lake, 1000, events.EventFilter(since_ms=since, until_ms=until))
    subset = stored.filter((pl.col("time_ms") >= since) & (pl.col("time_ms") < until))
    assert [(e.time_ms, e.event_id) for e in found] == expected_newest(subset, 1000)


def test_count_is_the_number_of_stored_events(random_lake: Settings, stored: pl.DataFrame) -> None:
    assert events.count(Lake(random_lake.data_dir)) == len(stored)


# -- aggregates --------------------------------------------------------------------------------
def totals_of(frame: pl.DataFrame) -> Totals:
    return Totals(
        impressions=int((frame["event_type"] == "impression").sum()),
        clicks=int((frame["event_type"] == "click").sum()),
        conversions=int((frame["event_type"] == "conversion").sum()),
        spend_micros=int(frame["cost_micros"].sum()),
        revenue_micros=int(frame["revenue_micros"].sum()),
    )


@pytest.mark.parametrize("granularity", campaigns.GRANULARITIES)
def test_series_matches_a_polars_aggregation(
    random_lake: Settings, stored: pl.DataFrame, granularity: campaigns.Granularity
) -> None:
    lake = Lake(random_lake.data_dir)
    width = campaigns.BUCKET_MS[granularity]
    got = campaigns.series(lake, "cmp-2", H, NOW_MS + 1, granularity)
    subset = stored.filter(pl.col("campaign_id") == "cmp-2")
    buckets = subset.with_columns(b=pl.col("time_ms") - pl.col("time_ms") % width)
    want = [
        campaigns.Bucket(int(key), totals_of(group))
        for (key,), group in sorted(buckets.group_by("b"), key=lambda kv: int(str(kv[0][0])))
    ]
    assert got == want


def test_rollups_give_the_same_series(tmp_path: Path) -> None:
    """Stats from rollups equal stats from events, bucket for bucket and to the micro, while
    batches land that the rollup job has not seen (late ones too), after a compaction, and for
    ranges that end mid-minute."""
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), fsync="false", max_events_per_second="0", dedupe_window="3h"
    )
    layout = Layout(settings.data_dir)
    lake = Lake(tmp_path)
    rng = random.Random(7)
    batches = random_batches(3, batches=10, size=60, prefix="s")
    plans: list[campaigns.Plan] = []
    read_plan = campaigns.read_plan

    def spy(lake: Lake, cid: str, g: campaigns.Granularity, p: campaigns.Plan) -> list[Bucket]:
        plans.append(p)
        return read_plan(lake, cid, g, p)

    def same_answers() -> None:
        for granularity in campaigns.GRANULARITIES:
            width = campaigns.BUCKET_MS[granularity]
            starts = [H - width, H + rng.randrange(HOUR_MS)]
            ends = [NOW_MS + 1, NOW_MS - rng.randrange(HOUR_MS), H + HOUR_MS]
            for since, until in ((a, b) for a in starts for b in ends if a < b):
                for cid in ("cmp-0", "cmp-3"):
                    raw = RawEventsSource().series(lake, cid, since, until, granularity)
                    rolled = RollupSource().series(lake, cid, since, until, granularity)
                    assert rolled == raw, (granularity, since, until, cid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaigns, "read_plan", spy)
        assert isinstance(campaigns.stats_source(lake), RawEventsSource)  # no rollups yet
        land(settings, *batches[:4])  # type: ignore[arg-type]
        run_rollup(layout, durable=False)
        assert isinstance(campaigns.stats_source(lake), RollupSource)
        same_answers()
        land(settings, *batches[4:7])  # type: ignore[arg-type]  # not rolled up yet
        same_answers()
        run_rollup(layout, durable=False)
        compact_lake(layout, JobSettings(compact_min_age=0), now=LATER, durable=False)
        land(settings, *batches[7:])  # type: ignore[arg-type]
        same_answers()
        run_rollup(layout, durable=False)
        same_answers()
    assert any(p.rollup and p.raw for p in plans) and any(p.minutes for p in plans)
    # Right after a run, a range on whole buckets is all rollups.
    coverage = campaigns.rollups.coverage(lake)
    assert coverage is not None and coverage.dirty == ()
    whole = campaigns.plan(H, H + HOUR_MS, "minute", coverage)
    assert whole == campaigns.Plan(rollup=((H, H + HOUR_MS),))


def test_plans_cover_the_range_with_disjoint_runs() -> None:
    """Rollups where they answer whole buckets, minute rollups inside dirty buckets, events for
    dirty minutes, minutes older than the minute rollups and the partial minute at the end."""
    day = 86_400_000
    d0 = 20_000 * day
    cov = campaigns.Coverage(
        dirty=(d0 + HOUR_MS + 5 * 60_000,),
        since_ms={"minute": d0 + HOUR_MS, "hour": d0 - day, "day": d0},
    )
    p = campaigns.plan(d0, d0 + 2 * HOUR_MS + 30_500, "hour", cov)
    assert p.rollup == ((d0, d0 + HOUR_MS),)
    assert p.minutes == (
        (d0 + HOUR_MS, d0 + HOUR_MS + 5 * 60_000),
        (d0 + HOUR_MS + 6 * 60_000, d0 + 2 * HOUR_MS),
    )
    assert p.raw == (
        (d0 + HOUR_MS + 5 * 60_000, d0 + HOUR_MS + 6 * 60_000),
        (d0 + 2 * HOUR_MS, d0 + 2 * HOUR_MS + 30_500),
    )
    # Before the minute rollups begin, a bucket the coarse level cannot answer is read raw.
    old = campaigns.plan(d0 - 2 * day, d0 - day + HOUR_MS, "day", cov)
    assert old == campaigns.Plan(raw=((d0 - 2 * day, d0 - day + HOUR_MS),))
    assert campaigns.plan(d0, d0 + 1, "minute", None) == campaigns.Plan(raw=((d0, d0 + 1),))


@pytest.mark.parametrize("metric", campaigns.METRICS)
def test_top_orders_campaigns_by_metric(
    random_lake: Settings, stored: pl.DataFrame, metric: campaigns.Metric
) -> None:
    got = campaigns.top(Lake(random_lake.data_dir), metric, 3)
    per = {cid: totals_of(g) for (cid,), g in stored.group_by("campaign_id")}

    def key(t: Totals) -> float:
        value = {
            "spend": t.spend_micros,
            "revenue": t.revenue_micros,
            "clicks": t.clicks,
            "conversions": t.conversions,
            "ctr": t.clicks / t.impressions if t.impressions else -1,
            "roas": t.revenue_micros / t.spend_micros if t.spend_micros else -1,
        }[metric]
        return float(value)

    want = sorted(per, key=lambda c: (-key(per[c]), c))[:3]
    assert [c.campaign_id for c in got] == want
    assert all(c.totals == per[c.campaign_id] for c in got)


def test_ratios_follow_the_standard_definitions() -> None:
    r = campaigns.ratios(Totals(1000, 20, 5, 4_000_000, 10_000_000))
    assert r.ctr == 0.02 and r.cvr == 0.25 and r.roas == 2.5
    assert r.cpm_micros == 4_000_000 and r.cpc_micros == 200_000 and r.cpa_micros == 800_000
    zero = campaigns.ratios(Totals())
    assert zero == campaigns.Ratios(None, None, None, None, None, None)


# -- snapshots and retries ---------------------------------------------------------------------
def test_batches_being_published_are_left_out(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false")
    land(settings, event_table(["a", "b"], time_ms=NOW_MS))
    lake = Lake(tmp_path)
    assert len(lake.files("events")) == 1
    # A batch whose staging directory is still there is mid-publish: invisible.
    (only,) = lake.files("events")
    bid = Path(only).stem
    committed = Layout(str(tmp_path)).staging / f"{bid}.committed"
    committed.mkdir(parents=True)
    (committed / "manifest.json").write_text(json.dumps({"batch_id": bid, "files": []}))
    assert lake.files("events") == []
    shutil.rmtree(committed)
    # A batch that gains a file between the two listings was half-published at the first.
    walk = lake._walk
    calls = {"n": 0}

    def growing(*args: object) -> dict[str, list[str]]:
        out = walk(*args)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 2:
            out = {k: [*v, v[0] + ".other-hour"] for k, v in out.items()}
        return out

    lake._walk = growing  # type: ignore[method-assign]
    assert lake.files("events") == []


def test_a_file_removed_while_listing_restarts_the_snapshot(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false")
    land(settings, event_table(["a", "b"], time_ms=NOW_MS))
    lake = Lake(tmp_path)
    walk = lake._walk
    calls = {"n": 0}

    def shrinking(*args: object) -> dict[str, list[str]]:
        out = walk(*args)  # type: ignore[arg-type]
        calls["n"] += 1
        return {} if calls["n"] == 2 else out

    lake._walk = shrinking  # type: ignore[method-assign]
    with pytest.raises(SnapshotChangedError):
        lake.files("events")
    assert events.count(lake) == 2  # read() retried on a fresh snapshot


def test_a_file_that_vanishes_before_it_is_read_is_retried(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false")
    land(settings, event_table(["a", "b"], time_ms=NOW_MS))
    lake = Lake(tmp_path)
    files = lake.files
    calls = {"n": 0}

    def stale(name: str, **kw: int | None) -> list[str]:
        calls["n"] += 1
        real = files(name, **kw)
        return [*real, str(tmp_path / "events" / "gone.parquet")] if calls["n"] == 1 else real

    lake.files = stale  # type: ignore[method-assign]
    assert [e.event_id for e in events.newest(lake, 10)] == ["b", "a"]
    assert calls["n"] >= 2
    lake.files = lambda name, **kw: [str(tmp_path / "gone.parquet")]  # type: ignore[method-assign]
    with pytest.raises(LakeBusyError):
        lake.read(
            lambda: lake.query("SELECT 1 FROM {events}", sources={"events": lake.files("events")})
        )


def test_reads_during_concurrent_writes_and_compaction_are_exact(tmp_path: Path) -> None:
    """A consumer lands batches that span two hours while the real compaction job swaps files
    (each phase held open a little); readers of Lake loop and must never fail, never see part of
    a batch, a row twice or a landed batch missing."""
    per_batch, batches = 50, 40
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), fsync="false", max_events_per_second="0", dedupe_window="3h"
    )
    layout = Layout(settings.data_dir)
    writer = SpoolWriter(layout.incoming, "w")
    for b in range(batches):
        ids = [f"c{b:03d}-{i:02d}" for i in range(per_batch)]
        # Half in the previous hour, half in the current one: two files per batch.
        times = [H + HOUR_MS - 1000 * (i + 1) if i % 2 else NOW_MS for i in range(per_batch)]
        writer.write(event_table(ids, time_ms=times))
    consumer = Consumer(settings.replace(poll_interval=0.001), make_key_cache(settings))
    consumer.start()
    stop = threading.Event()
    errors: list[BaseException] = []
    landed = [0]  # batches whose publication has finished
    swaps = [0]

    def consume() -> None:
        try:
            for path in sorted(layout.incoming.glob("*.arrow")):
                consumer.process_file(path)
                landed[0] += 1
                time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def compactor() -> None:
        config = JobSettings(compact_min_age=0)
        while not stop.is_set():
            try:
                swaps[0] += len(
                    compact_lake(
                        layout,
                        config,
                        now=LATER,
                        durable=False,
                        on_step=lambda _: time.sleep(0.002),
                    ).partitions
                )
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=consume), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    lake = Lake(tmp_path)
    seen: list[int] = []

    def distinct() -> int:
        _, rows = lake.sql("SELECT count(*), count(DISTINCT event_id) FROM events")
        total, unique = rows[0]
        assert total == unique, f"{total - unique} rows seen twice"
        return int(total)

    checks: list[Callable[[], int]] = [
        lambda: events.count(lake),
        lambda: len(events.newest(lake, 2000)),
        lambda: sum(c.totals.impressions for c in campaigns.top(lake, "spend", 10)),
        distinct,
    ]
    try:
        while not stop.is_set():
            for check in checks:
                before = landed[0]
                n = check()
                after = landed[0]
                assert n % per_batch == 0, f"check {checks.index(check)} saw {n}: part of a batch"
                # Every batch landed before the read, at most the one being published after it.
                assert before * per_batch <= n <= (after + 1) * per_batch, (before, n, after)
                seen.append(n)
    finally:
        stop.set()
        for t in threads:
            t.join()
        consumer.close()
    if errors:
        raise errors[0]
    assert swaps[0] >= 3, "compaction never swapped files while readers read"
    assert events.count(lake) == per_batch * batches == distinct()
    counts = seen[0::4]
    assert counts == sorted(counts)
    assert len(seen) > 20


def test_a_reader_loops_exactly_while_compaction_swaps(tmp_path: Path) -> None:
    """Rounds of: land late batches into closed hours, then compact them (phases held open).
    A Lake reader loops all along; while compaction runs nothing lands, so every read then must
    count every row exactly once."""
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), fsync="false", max_events_per_second="0", dedupe_window="3h"
    )
    layout = Layout(settings.data_dir)
    rounds = [random_batches(10 + r, batches=4, size=25, prefix=f"r{r}-") for r in range(5)]
    land(settings, *random_batches(5, batches=12, size=25))  # type: ignore[arg-type]
    lake = Lake(tmp_path)
    window = [events.count(lake)] * 2  # what a read may count: [before, after] a landing
    stop = threading.Event()
    exact = [0]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                lo = window[0]
                _, rows = lake.sql("SELECT count(*), count(DISTINCT event_id) FROM events")
                counts = {events.count(lake), len(events.newest(lake, 1000)), *rows[0]}
                hi = window[1]
                for n in counts:  # each read on its own snapshot: a landing may come between
                    assert lo <= n <= hi and n % 25 == 0, (lo, n, hi)
                if lo == hi:  # nothing landed: every read counted every row exactly once
                    assert counts == {lo}
                    exact[0] += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()

    def hold(_: object) -> None:
        # Hold each compaction phase open until the reader has done a whole read inside it,
        # however slow the machine is (the second read started after the phase began).
        seen = exact[0]
        deadline = time.monotonic() + 30
        while exact[0] < seen + 2 and not errors and thread.is_alive():
            assert time.monotonic() < deadline, "the reader made no progress"
            time.sleep(0.001)

    config = JobSettings(compact_target_rows=150, compact_min_age=0)
    try:
        for batches in rounds:
            window[1] = window[0] + 25 * len(batches)
            land(settings, *batches)  # type: ignore[arg-type]
            window[0] = window[1]
            assert compact_lake(layout, config, now=LATER, durable=False, on_step=hold).partitions
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    assert exact[0] >= 5
    assert events.count(lake) == window[0] == 25 * (12 + 4 * len(rounds))


def test_remembered_listings_never_hide_a_new_file(tmp_path: Path) -> None:
    """Listings are reused while directory mtimes are unchanged, but not when the mtime could
    be the same coarse clock tick as the listing (as if the kernel stamped a later change with
    the same time)."""
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false", dedupe_window="3h")
    land(settings, event_table(["a", "b"], time_ms=NOW_MS))
    lake = Lake(tmp_path)
    (first,) = lake.files("events")
    hour = Path(first).parent
    tick = time.time_ns() + 10**9  # a coarse clock: the listing falls in the mtime's tick
    os.utime(hour, ns=(tick, tick))
    assert lake.files("events") == [first]
    twin = hour / "00-copy.parquet"
    shutil.copy(first, twin)
    os.utime(hour, ns=(tick, tick))  # the new file's change carries the same mtime
    assert lake.files("events") == sorted([first, str(twin)])
    twin.unlink()
    settled = time.time_ns() - 10**9
    for directory in [tmp_path, *(p for p in tmp_path.rglob("*") if p.is_dir())]:
        os.utime(directory, ns=(settled, settled))  # long before any listing: reusable
    assert lake.files("events") == [first]
    calls = {"n": 0}
    listdir = os.listdir

    def counting(path: object) -> list[str]:
        calls["n"] += 1
        return listdir(path)  # type: ignore[call-overload,no-any-return]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "listdir", counting)
        assert lake.files("events") == [first]
        assert events.count(lake) == 2
    assert calls["n"] == 0  # nothing was listed again


# -- ledger ------------------------------------------------------------------------------------
def _as_old_ledger(path: Path, dropped: str = "quarantined_field_too_long") -> None:
    """Rewrite a ledger file as a version before ``dropped`` was a column wrote it."""
    pl.read_parquet(path, hive_partitioning=False).drop(dropped).write_parquet(path)


@pytest.mark.parametrize("all_old", [True, False], ids=["only-old-files", "old-and-new"])
def test_ledger_files_from_before_a_new_reason_code_still_read(
    tmp_path: Path, all_old: bool
) -> None:
    """A reason code adds a ``quarantined_<reason>`` ledger column; older files lack it and
    every reader (counters, dashboard, ad-hoc SQL, the jobs' reader) takes them as null."""
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false")
    land(settings, event_table(["a", "b"], time_ms=NOW_MS, country=["US", "usa"]))
    for path in (tmp_path / "ledger").rglob("*.parquet"):
        _as_old_ledger(path)
    if not all_old:
        land(settings, event_table(["c", "d"], time_ms=NOW_MS, campaign_id=["c", "x" * 300]))
    lake = Lake(tmp_path)
    totals = ops.LedgerCounter(lake).update()
    assert totals.quarantined_by_reason["invalid_country"] == 1
    assert totals.quarantined_by_reason["field_too_long"] == (0 if all_old else 1)
    view = ops.overview(lake, int(time.time() * 1000))
    assert view.rows_in == (2 if all_old else 4)
    _, rows = lake.sql("SELECT sum(quarantined_field_too_long), count(*) FROM ledger")
    assert rows == [(None if all_old else 1, 1 if all_old else 2)]
    files = sorted((tmp_path / "ledger").rglob("*.parquet"))
    frame = read_ledger(files)
    assert frame.schema == LEDGER_SCHEMA and len(frame) == len(files)


def test_ledger_totals_grow_with_each_new_batch(tmp_path: Path) -> None:
    settings = Settings.from_env({}, data_dir=str(tmp_path), fsync="false")
    lake = Lake(tmp_path)
    counter = ops.LedgerCounter(lake)
    land(settings, event_table(["a", "a", "b"], time_ms=NOW_MS))
    first = counter.update()
    assert (first.rows_in, first.accepted, first.duplicates) == (3, 2, 1)
    land(settings, event_table(["c", "d"], time_ms=NOW_MS, country=["US", "usa"]))
    second = counter.update()
    assert (second.rows_in, second.accepted, second.duplicates) == (5, 3, 1)
    assert second.quarantined_by_reason["invalid_country"] == 1
    assert second.batches_by_status == {"ok": 2}
    assert sum(second.latency_counts) == 2
    view = ops.overview(lake, int(time.time() * 1000))
    assert (view.batches, view.rows_in, view.duplicates, view.quarantined) == (2, 5, 1, 1)
    assert view.duplicate_rate == pytest.approx(0.2)
    assert sum(view.events_in_per_s) * view.step_ms / 1000 == pytest.approx(5)
    assert view.latency_ms is not None and view.latency_ms.p50 > 0
    assert ops.processing_rate(lake, int(time.time() * 1000)) == pytest.approx(0.5)


def test_alerts_are_listed_open_first_and_are_a_table(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    assert ops.alerts(lake) == []
    now = datetime.fromtimestamp(NOW_MS // 1000, UTC)

    def alert(rule: str, severity: str, minutes_ago: int, ended: bool = False) -> Alert:
        started = now - timedelta(minutes=minutes_ago)
        return Alert(
            alert_id=f"{rule}:pipeline:{minutes_ago}",
            rule=rule,
            subject="pipeline",
            severity=severity,
            status="resolved" if ended else "firing",
            value=1.0,
            threshold=0.5,
            message=f"{rule} is off",
            started_at=started,
            updated_at=now,
            ended_at=now if ended else None,
        )

    stored = [
        alert("latency_p95", "warning", 1),
        alert("error_rate", "critical", 5),
        alert("consumer_lag", "warning", 30, ended=True),
    ]
    save_alerts(Layout(str(tmp_path)), stored, durable=False)
    assert [a.rule for a in ops.alerts(lake)] == ["error_rate", "latency_p95", "consumer_lag"]
    assert [a.rule for a in ops.alerts(lake, open_only=True, limit=1)] == ["error_rate"]
    columns, rows = lake.sql("SELECT rule, status FROM alerts ORDER BY started_at DESC")
    assert columns == ["rule", "status"]
    assert rows == [
        ("latency_p95", "firing"),
        ("error_rate", "firing"),
        ("consumer_lag", "resolved"),
    ]


# -- adevents sql --------------------------------------------------------------------------------
def sql_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.configure(parser)
    return parser.parse_args(argv)


QUERY = "SELECT event_id, cost_micros / 1e6 AS usd, date FROM events ORDER BY event_id LIMIT 2"


def test_sql_prints_a_table(random_lake: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(sql_args(QUERY), random_lake) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split(" | ")[0].strip() == "event_id"
    assert out[1].startswith("-")
    assert out[2].startswith("e000-")
    assert out[-1] == "(2 rows)"


def test_sql_prints_csv_and_json(random_lake: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(sql_args(QUERY, "--format", "csv"), random_lake) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "event_id,usd,date" and len(lines) == 3
    assert command.run(sql_args(QUERY, "--format", "json"), random_lake) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in rows] == [["date", "event_id", "usd"]] * 2
    assert isinstance(rows[0]["usd"], float) and len(rows[0]["date"]) == 10


def test_sql_reports_errors(random_lake: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(sql_args("SELECT nope FROM events"), random_lake) == 1
    assert "nope" in capsys.readouterr().err


def test_sql_without_a_query_reads_statements(
    random_lake: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "SELECT count(*) AS n\nFROM ledger;\n.tables\nSELECT broken;\nSELECT 41 + 1 AS x;\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert command.run(sql_args("--format", "csv"), random_lake) == 0
    captured = capsys.readouterr()
    assert "n\n12\n" in captured.out
    assert "events\nquarantine\nledger\ncampaigns" in captured.out
    assert "x\n42\n" in captured.out
    assert "broken" in captured.err
