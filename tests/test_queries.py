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
from pathlib import Path

import polars as pl
import pytest

from pipeline.consumer import Consumer
from pipeline.factory import make_key_cache
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table
from queries import campaigns, command, events, ops
from queries.campaigns import RawEventsSource, RollupSource, Totals
from queries.lake import TABLES, Lake, LakeBusyError, SnapshotChangedError, Table
from queries.testing import land

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
#: Start of the previous UTC hour: test events sit in it and in the current one.
H = NOW_MS - NOW_MS % HOUR_MS - HOUR_MS
TYPES = ("impression", "click", "conversion")


def random_batches(seed: int, batches: int = 12, size: int = 40) -> list[object]:
    """Batches of events with times scattered over two hours (files overlap in time)."""
    rng = random.Random(seed)
    out = []
    for b in range(batches):
        ids = [f"e{b:03d}-{i:03d}" for i in range(size)]
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
    assert ops.active_alerts(lake) == []
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


def test_rollups_give_the_same_series(
    random_lake: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollup table plugged in as the stats source answers exactly like raw events."""
    lake = Lake(random_lake.data_dir)
    raw = RawEventsSource().series(lake, "cmp-3", H, NOW_MS + 1, "minute")
    assert raw
    rollup_dir = Path(random_lake.data_dir) / "rollups" / "minute"
    rollup_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "campaign_id": ["cmp-3"] * len(raw),
            "bucket": [b.start_ms for b in raw],
            **{f: [getattr(b.totals, f) for b in raw] for f in Totals.__dataclass_fields__},
        }
    ).with_columns(pl.col("bucket").cast(pl.Datetime("ms", "UTC"))).write_parquet(
        rollup_dir / "part-0.parquet"
    )
    schema = pl.Schema(
        {"campaign_id": pl.String, "bucket": pl.Datetime("ms", "UTC")}
        | dict.fromkeys(Totals.__dataclass_fields__, pl.Int64)
    )
    monkeypatch.setitem(TABLES, "rollups_minute", Table("rollups_minute", "rollups/minute", schema))
    try:
        assert isinstance(campaigns.stats_source(lake, "minute"), RollupSource)
        assert isinstance(campaigns.stats_source(lake, "hour"), RawEventsSource)
        assert campaigns.series(lake, "cmp-3", H, NOW_MS + 1, "minute") == raw
    finally:
        shutil.rmtree(rollup_dir.parent)


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


def compact(root: Path, seq: int) -> None:
    """Merge one hour partition's files the way a compaction job must: staged, then swapped."""
    layout = Layout(str(root))
    hours = sorted(layout.events.glob("date=*/hour=*"))
    if not hours:
        return
    hour = random.Random(seq).choice(hours)
    done = {p.stem for p in layout.ledger.rglob("*.parquet")}
    old = [p for p in sorted(hour.glob("*.parquet")) if p.stem in done]
    if len(old) < 2:
        return
    unit = f"compacted-{seq:06d}"
    staged = layout.staging / f"{unit}.partial"
    staged.mkdir(parents=True)
    pl.concat([pl.read_parquet(p) for p in old]).write_parquet(staged / "out.parquet")
    replaces = [str(p.relative_to(root)) for p in old]
    (staged / "manifest.json").write_text(json.dumps({"batch_id": unit, "replaces": replaces}))
    committed = staged.with_suffix(".committed")
    os.replace(staged, committed)
    os.replace(committed / "out.parquet", hour / f"{unit}.parquet")
    for p in old:
        p.unlink()
    shutil.rmtree(committed)


def test_reads_during_concurrent_writes_and_compaction_are_whole(tmp_path: Path) -> None:
    """A consumer lands batches that span two hours while a compactor swaps files; readers loop
    and must never fail nor see part of a batch."""
    per_batch, batches = 50, 40
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), fsync="false", max_events_per_second="0", dedupe_window="3h"
    )
    writer = SpoolWriter(Layout(settings.data_dir).incoming, "w")
    for b in range(batches):
        ids = [f"c{b:03d}-{i:02d}" for i in range(per_batch)]
        # Half in the previous hour, half in the current one: two files per batch.
        times = [H + HOUR_MS - 1000 * (i + 1) if i % 2 else NOW_MS for i in range(per_batch)]
        writer.write(event_table(ids, time_ms=times))
    consumer = Consumer(settings.replace(poll_interval=0.001), make_key_cache(settings))
    consumer.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def consume() -> None:
        for path in sorted(Layout(settings.data_dir).incoming.glob("*.arrow")):
            consumer.process_file(path)
            time.sleep(0.005)
        stop.set()

    def compactor() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                compact(tmp_path, seq)
            except BaseException as exc:
                errors.append(exc)
                return
            time.sleep(0.01)

    threads = [threading.Thread(target=consume), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    lake = Lake(tmp_path)
    seen: list[int] = []
    checks: list[Callable[[], int]] = [
        lambda: events.count(lake),
        lambda: len(events.newest(lake, 1000)),
        lambda: sum(c.totals.impressions for c in campaigns.top(lake, "spend", 10)),
        lambda: int(lake.sql("SELECT count(*) FROM events")[1][0][0]),
    ]
    try:
        while not stop.is_set():
            for check in checks:
                n = check()
                assert n % per_batch == 0, f"{checks.index(check)} saw {n}: part of a batch"
                seen.append(n)
    finally:
        stop.set()
        for t in threads:
            t.join()
        consumer.close()
    assert not errors
    assert events.count(lake) == per_batch * batches
    counts = [n for n in seen[0::4]]
    assert counts == sorted(counts)
    assert len(seen) > 20


# -- ledger ------------------------------------------------------------------------------------
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


def test_alerts_come_from_an_alerts_table_once_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = Lake(tmp_path)
    schema = pl.Schema({"raised_at": pl.Datetime("ms", "UTC"), "message": pl.String})
    monkeypatch.setitem(TABLES, "alerts", Table("alerts", "alerts", schema))
    assert ops.active_alerts(lake) == []
    (tmp_path / "alerts").mkdir()
    pl.DataFrame(
        {"raised_at": [NOW_MS], "message": ["spend spike on cmp-1"]}, schema=schema
    ).write_parquet(tmp_path / "alerts" / "a.parquet")
    (alert,) = ops.active_alerts(lake)
    assert alert["message"] == "spend spike on cmp-1"


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
