"""queries/: exact newest-first reads, aggregates, rollups, the ledger, `adevents sql` over a
Delta lake filled by hand (``lake.testing.append``)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from jobs.alerts import save_alerts
from jobs.rollup import run_rollup
from lake import maintenance
from lake.location import LakeLocation
from lake.tables import EVENTS, LEDGER, open_table
from lake.testing import append, cluster_every_hour, ledger_frame
from pipeline.schema import ROLLUP_SCHEMA, Layout
from pipeline.settings import Settings
from pipeline.spool import atomic_write_bytes
from pipeline.tables import Alert
from pipeline.testing import event_table
from queries import campaigns, command, events, ops, rollups
from queries.campaigns import Bucket, RawEventsSource, RollupSource, Totals
from queries.lake import Lake, View
from queries.rollup_rows import RollupRows
from queries.testing import enriched

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
#: Start of the previous UTC hour: test events sit in it and in the current one.
H = NOW_MS - NOW_MS % HOUR_MS - HOUR_MS
TYPES = ("impression", "click", "conversion")


def make_settings(data_dir: Path) -> Settings:
    return Settings.from_env({}, data_dir=str(data_dir), fsync="false")


def lake_of(settings: Settings) -> Lake:
    return Lake.from_settings(settings)


def ledger_row(batch_id: str, frame: pl.DataFrame, **values: Any) -> pl.DataFrame:
    """The ledger row of a batch that stored ``frame`` (``values`` override its columns)."""
    row = ledger_frame(batch_id, rows_in=len(frame), at_ms=NOW_MS)
    times = frame["event_time"]
    return row.with_columns(
        min_event_time=pl.lit(times.min()).cast(row.schema["min_event_time"]),
        max_event_time=pl.lit(times.max()).cast(row.schema["max_event_time"]),
        processing_ms=pl.lit(12.5),
        **{k: pl.lit(v).cast(row.schema[k]) for k, v in values.items()},
    )


def commit(settings: Settings, tables: list[pa.Table], prefix: str = "b") -> None:
    """Store each contract table as one batch, as the consumer would: events, then ledger."""
    location = LakeLocation.from_settings(settings)
    for i, table in enumerate(tables):
        batch_id = f"{prefix}{i:03d}"
        frame = enriched(table, batch_id=batch_id, ingested_ms=NOW_MS)
        append(location, {"events": frame, "ledger": ledger_row(batch_id, frame)})


def random_batches(
    seed: int, batches: int = 12, size: int = 40, prefix: str = "e"
) -> list[pa.Table]:
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
    settings = make_settings(tmp_path_factory.mktemp("lake"))
    commit(settings, random_batches(1))
    return settings


@pytest.fixture(scope="module")
def stored(random_lake: Settings) -> pl.DataFrame:
    table = open_table(LakeLocation.from_settings(random_lake), EVENTS)
    frame = pl.from_arrow(table.to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(time_ms=pl.col("event_time").dt.epoch("ms"))


def expected_newest(frame: pl.DataFrame, limit: int) -> list[tuple[int, str]]:
    top = frame.sort(["time_ms", "event_id"], descending=True).head(limit)
    return list(zip(top["time_ms"].to_list(), top["event_id"].to_list(), strict=True))


# -- empty lakes -------------------------------------------------------------------------------
def test_an_empty_lake_answers_with_empty_results(tmp_path: Path) -> None:
    lake = lake_of(make_settings(tmp_path / "nothing-here"))
    assert events.count(lake) == 0
    assert events.newest(lake, 10) == []
    assert events.page(lake, 10, events.EventFilter(campaign_id="x")) == ([], None)
    assert campaigns.series(lake, "x", 0, NOW_MS, "hour") == []
    assert campaigns.top(lake, "roas", 10) == []
    assert ops.processing_rate(lake, NOW_MS) == 0.0
    assert ops.last_commit_ms(lake) is None
    assert ops.overview(lake, NOW_MS).batches == 0
    assert ops.ledger_totals(lake).rows_in == 0
    assert ops.alerts(lake) == []
    columns, rows = lake.sql("SELECT count(*) AS n FROM events")
    assert (columns, rows) == (["n"], [(0,)])
    _, described = lake.sql("DESCRIBE events")
    types = {r[0]: r[1] for r in described}
    assert types["event_time"] == "TIMESTAMP WITH TIME ZONE"
    assert types["cost_micros"] == "BIGINT"
    assert types["hour"] == "VARCHAR"  # Delta partition values: 'HH'


# -- newest first, exactly ---------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_newest_matches_a_full_sort(
    random_lake: Settings, stored: pl.DataFrame, limit: int
) -> None:
    found = events.newest(lake_of(random_lake), limit)
    assert [(e.time_ms, e.event_id) for e in found] == expected_newest(stored, limit)


@pytest.mark.parametrize("event_type", [None, "click"])
def test_cursor_pages_walk_a_campaign_newest_first(
    random_lake: Settings, stored: pl.DataFrame, event_type: str | None
) -> None:
    lake = lake_of(random_lake)
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
    lake = lake_of(random_lake)
    since, until = H + HOUR_MS // 2, H + HOUR_MS + HOUR_MS // 4
    found = events.newest(lake, 1000, events.EventFilter(since_ms=since, until_ms=until))
    subset = stored.filter((pl.col("time_ms") >= since) & (pl.col("time_ms") < until))
    assert [(e.time_ms, e.event_id) for e in found] == expected_newest(subset, 1000)


def test_count_is_the_number_of_stored_events(random_lake: Settings, stored: pl.DataFrame) -> None:
    assert events.count(lake_of(random_lake)) == len(stored)


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
    lake = lake_of(random_lake)
    width = campaigns.BUCKET_MS[granularity]
    got = campaigns.series(lake, "cmp-2", H, NOW_MS + 1, granularity)
    subset = stored.filter(pl.col("campaign_id") == "cmp-2")
    buckets = subset.with_columns(b=pl.col("time_ms") - pl.col("time_ms") % width)
    want = [
        campaigns.Bucket(int(key), totals_of(group))
        for (key,), group in sorted(buckets.group_by("b"), key=lambda kv: int(str(kv[0][0])))
    ]
    assert got == want


@pytest.mark.parametrize("rollups_bytes", [64 * 1024**2, 0, 2_000])
def test_rollups_give_the_same_series(tmp_path: Path, rollups_bytes: int) -> None:
    """Stats from rollups equal stats from events, bucket for bucket and to the micro, while
    batches land that the rollup job has not seen (late ones too), after optimize rewrote the
    events, and for ranges that end mid-minute: with the rollup files' rows kept in memory
    (replaced files read again), with none kept (DuckDB reads them), and with files too big
    for the memory allowed (DuckDB reads those)."""
    settings = make_settings(tmp_path)
    settings = dataclasses.replace(
        settings, query=dataclasses.replace(settings.query, query_rollups_bytes=rollups_bytes)
    )
    layout, location = Layout(settings.data_dir), LakeLocation.from_settings(settings)
    lake = lake_of(settings)
    from_memory: list[bool] = []
    rows_add = lake.rollup_rows.add

    def add_spy(*args: Any, **kwargs: Any) -> bool:
        from_memory.append(rows_add(*args, **kwargs))
        return from_memory[-1]

    lake.rollup_rows.add = add_spy  # type: ignore[method-assign]
    rng = random.Random(7)
    batches = random_batches(3, batches=10, size=60, prefix="s")
    plans: list[campaigns.Plan] = []
    read_plan = campaigns.read_plan

    def spy(view: View, cid: str, g: campaigns.Granularity, p: campaigns.Plan) -> list[Bucket]:
        plans.append(p)
        return read_plan(view, cid, g, p)

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
        # The leaderboard too: from rollups and events, as from events alone.
        view = lake.view("ledger", "events")
        for since in (None, H - HOUR_MS, H + rng.randrange(HOUR_MS), NOW_MS - 90_500):
            for metric in ("spend", "ctr"):
                everything = campaigns.Plan(raw=((since or 0, 2**53),))
                want = top_of(view, everything, metric, 5)
                assert campaigns.top(lake, metric, 5, since) == want, (since, metric)

    top_of = campaigns._top_of
    top_plans: list[campaigns.Plan] = []

    def top_spy(
        view: View, p: campaigns.Plan, metric: campaigns.Metric, limit: int
    ) -> list[campaigns.CampaignTotals]:
        top_plans.append(p)
        return top_of(view, p, metric, limit)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaigns, "read_plan", spy)
        mp.setattr(campaigns, "_top_of", top_spy)
        assert isinstance(campaigns.stats_source(lake), RawEventsSource)  # no rollups yet
        commit(settings, batches[:4], "s")
        run_rollup(layout, location, durable=False)
        assert isinstance(campaigns.stats_source(lake), RollupSource)
        same_answers()
        commit(settings, batches[4:7], "t")  # not rolled up yet
        same_answers()
        run_rollup(layout, location, durable=False)
        maintenance.optimize(open_table(location, EVENTS))
        cluster_every_hour(location, open_table(location, EVENTS))
        commit(settings, batches[7:], "u")
        same_answers()
        run_rollup(layout, location, durable=False)
        same_answers()
    assert any(p.rollup and p.raw for p in plans) and any(p.minutes for p in plans)
    assert any(p.minutes or p.rollup for p in top_plans)  # the leaderboard used rollups
    if rollups_bytes == 0:
        assert not any(from_memory)
    elif rollups_bytes < 64 * 1024**2:
        assert not all(from_memory) and any(from_memory)  # the smallest files fit
    else:
        assert from_memory and all(from_memory)
        replaced = {key[0] for key in lake.rollup_rows._kept}
        assert len(lake.rollup_rows._kept) > len(replaced)  # files the job replaced, read again
    # Right after a run, a range on whole buckets is all rollups.
    coverage = rollups.coverage(lake, lake.view("ledger", "events"))
    assert coverage is not None and coverage.dirty == ()
    whole = campaigns.plan(H, H + HOUR_MS, "minute", coverage)
    assert whole == campaigns.Plan(rollup=((H, H + HOUR_MS),))
    # Compacting the ledger adds no batch, so it leaves no minute dirty (it once made every
    # minute of the rewritten files look new).
    metrics = maintenance.optimize(open_table(location, LEDGER))
    assert metrics["compact"]["numFilesRemoved"] > 1
    after = rollups.coverage(lake, lake.view("ledger", "events"))
    assert after is not None and after.dirty == ()


def test_the_rolled_up_version_is_read_again_whenever_the_state_file_changes(
    tmp_path: Path,
) -> None:
    """The version the rollup job records is remembered per state file, and read again as soon
    as the file is replaced (as the job replaces it), rewritten or removed."""
    lake = lake_of(make_settings(tmp_path))
    state = Layout(str(tmp_path)).rollups / "_state.json"
    assert rollups.rolled_up_version(lake) is None and not rollups.has_rollups(lake)
    state.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state, json.dumps({"ledger_version": 7}).encode(), durable=False)
    assert rollups.rolled_up_version(lake) == 7
    atomic_write_bytes(state, json.dumps({"ledger_version": 8}).encode(), durable=False)
    assert rollups.rolled_up_version(lake) == 8  # same size: a new file all the same
    state.write_text(json.dumps({"ledger_version": 12345}))  # in place, another size
    assert rollups.rolled_up_version(lake) == 12345
    state.write_text("not json")
    assert rollups.rolled_up_version(lake) is None
    state.unlink()
    assert rollups.rolled_up_version(lake) is None


def test_plans_cover_the_range_with_disjoint_runs() -> None:
    """Rollups where they answer whole buckets, minute rollups inside dirty buckets, events for
    dirty minutes, minutes older than the minute rollups and the partial minute at the end."""
    day = 86_400_000
    d0 = 20_000 * day
    cov = rollups.Coverage(
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
    got = campaigns.top(lake_of(random_lake), metric, 3)
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


# -- ledger ------------------------------------------------------------------------------------
def test_ledger_totals_grow_with_each_new_batch(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    location = LakeLocation.from_settings(settings)
    lake = lake_of(settings)
    first = enriched(event_table(["a", "b"], time_ms=NOW_MS), batch_id="x1", ingested_ms=NOW_MS)
    append(location, {"events": first, "ledger": ledger_row("x1", first, rows_in=3, duplicates=1)})
    totals = ops.ledger_totals(lake)
    assert (totals.rows_in, totals.accepted, totals.duplicates) == (3, 2, 1)
    second = enriched(event_table(["c"], time_ms=NOW_MS), batch_id="x2", ingested_ms=NOW_MS)
    row = ledger_row("x2", second, rows_in=2, quarantined=1, quarantined_invalid_country=1)
    append(location, {"events": second, "ledger": row})
    totals = ops.ledger_totals(lake)
    assert (totals.rows_in, totals.accepted, totals.duplicates) == (5, 3, 1)
    assert totals.quarantined_by_reason["invalid_country"] == 1
    assert totals.batches_by_status == {"ok": 2}
    assert totals.latency_counts[ops.LATENCY_BUCKETS_S.index(0.025)] == 2  # 12.5 ms each
    assert totals.latency_sum_s == pytest.approx(0.025)
    view = ops.overview(lake, NOW_MS + 1000)
    assert (view.batches, view.rows_in, view.duplicates, view.quarantined) == (2, 5, 1, 1)
    assert view.duplicate_rate == pytest.approx(0.2)
    assert sum(view.events_in_per_s) * view.step_ms / 1000 == pytest.approx(5)
    assert view.latency_ms is not None and view.latency_ms.p50 == pytest.approx(12.5)
    assert ops.processing_rate(lake, NOW_MS + 1000) == pytest.approx(0.5)
    assert ops.last_commit_ms(lake) == NOW_MS


def test_alerts_are_listed_open_first_and_are_a_table(tmp_path: Path) -> None:
    lake = lake_of(make_settings(tmp_path))
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


def test_range_plans_read_exactly_the_range() -> None:
    """The leaderboard's plan: events for the partial minutes at both ends and for dirty
    minutes, minute rollups for whole minutes, hour rollups for whole hours inside."""
    day = 86_400_000
    d0 = 20_000 * day
    cov = rollups.Coverage(
        dirty=(d0 + HOUR_MS + 5 * 60_000,),
        since_ms={"minute": d0, "hour": d0, "day": d0},
    )
    p = campaigns.range_plan(d0 + 30_250, d0 + 2 * HOUR_MS + 90_500, cov)
    assert p.raw == (
        (d0 + 30_250, d0 + 60_000),
        (d0 + HOUR_MS + 5 * 60_000, d0 + HOUR_MS + 6 * 60_000),
        (d0 + 2 * HOUR_MS + 60_000, d0 + 2 * HOUR_MS + 90_500),
    )
    assert p.minutes == (
        (d0 + 60_000, d0 + HOUR_MS + 5 * 60_000),
        (d0 + HOUR_MS + 6 * 60_000, d0 + 2 * HOUR_MS + 60_000),
    )
    assert p.rollup == ()  # the only whole hour holds a dirty minute
    clean = rollups.Coverage(dirty=(), since_ms=cov.since_ms)
    p = campaigns.range_plan(d0 + 30_250, d0 + 2 * HOUR_MS + 90_500, clean)
    assert p.rollup == ((d0 + HOUR_MS, d0 + 2 * HOUR_MS),)
    assert campaigns.range_plan(d0, d0 + 500, None) == campaigns.Plan(raw=((d0, d0 + 500),))


def test_rollup_rows_sum_a_campaigns_buckets_and_see_a_replaced_file(tmp_path: Path) -> None:
    """A rollup file's rows, summed for one campaign within runs into coarser buckets; the file
    replaced by rename (as the rollup job writes) is read again; one gone since it was listed
    is left to DuckDB, with nothing added."""
    path = tmp_path / "rollup.parquet"

    def write(rows: list[tuple[str, int, int]]) -> None:
        frame = pl.DataFrame(
            {
                "campaign_id": [c for c, _, _ in rows],
                "bucket": [b for _, b, _ in rows],
                "impressions": [n for _, _, n in rows],
                "clicks": [1] * len(rows),
                "conversions": [0] * len(rows),
                "spend_micros": [10 * n for _, _, n in rows],
                "revenue_micros": [0] * len(rows),
                "unique_users": [1] * len(rows),
            }
        ).with_columns(pl.col("bucket").cast(pl.Datetime("ms", "UTC")))
        frame.cast(ROLLUP_SCHEMA).write_parquet(tmp_path / "next.parquet")
        (tmp_path / "next.parquet").replace(path)

    minute = 60_000
    write([("b", 2 * minute, 5), ("a", 3 * minute, 2), ("a", minute, 1), ("a", 62 * minute, 4)])
    rows = RollupRows()
    out: dict[int, list[int]] = {}
    runs = [(0, 2 * minute), (3 * minute, 70 * minute)]  # minute 2 is left out
    assert rows.add(out, [str(path)], "a", runs, HOUR_MS)
    assert out == {0: [3, 2, 0, 30, 0], HOUR_MS: [4, 1, 0, 40, 0]}
    write([("a", minute, 7)])
    out = {}
    assert rows.add(out, [str(path)], "a", runs, minute)
    assert out == {minute: [7, 1, 0, 70, 0]}
    out = {}
    assert not rows.add(out, [str(path), str(tmp_path / "gone.parquet")], "a", runs, minute)
    assert out == {}
    assert not RollupRows(0).add(out, [str(path)], "a", runs, minute)  # none kept: DuckDB
