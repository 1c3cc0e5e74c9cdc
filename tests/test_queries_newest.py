"""A campaign's newest events (and its stats' sums of events) are exactly what one full sort (one
aggregation) gives, whichever way each file is read: clustered hours (DuckDB), compacted
unclustered files and uncompacted files on disk (their row groups, queries.row_groups and
queries.event_sums), and the small files held in memory (queries.ordered)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake import maintenance
from lake.cluster import cluster_hour
from lake.location import LakeLocation
from lake.tables import EVENTS, open_table
from lake.testing import START_MS, append, enriched_frame
from pipeline.schema import HOUR_MS, UTC_MS
from pipeline.settings import QuerySettings
from queries import campaigns, event_sums, events, ordered, row_groups
from queries.lake import Lake

#: The hour boundaries of the lake: A (clustered), B (compacted, not clustered), C (as written).
A, B, C = START_MS, START_MS + HOUR_MS, START_MS + 2 * HOUR_MS
BIG, SMALL = "00001", "00007"


def local(path: Path) -> LakeLocation:
    return LakeLocation.from_env({"LAKE_URI": str(path / "lake")})


def tied(prefix: str, at_ms: int, rows: int, campaign: str = BIG) -> pl.DataFrame:
    """``rows`` events of one campaign at one millisecond (ties broken by event_id only)."""
    frame = enriched_frame(rows, seed=len(prefix), start_ms=at_ms, span_ms=1, id_prefix=prefix)
    return frame.with_columns(campaign_id=pl.lit(campaign), event_time=pl.lit(at_ms).cast(UTC_MS))


def build(location: LakeLocation) -> None:
    def put(frame: pl.DataFrame) -> None:
        append(location, {"events": frame})

    # A: two batches over the hour and a tie at its last millisecond, then clustered (in row
    # groups of its own per campaign: DuckDB reads them).
    put(enriched_frame(30_000, seed=1, start_ms=A, id_prefix="a"))
    put(pl.concat([enriched_frame(30_000, seed=2, start_ms=A), tied("ta", B - 1, 150)]))
    table = open_table(location, EVENTS)
    hour = table.partitions()[0]
    cluster_hour(
        location,
        table,
        hour["date"],
        hour["hour"],
        target_bytes=128 * 1024**2,
        memory_bytes=256 * 1024**2,
        row_group_rows=8_192,
    )
    # B: three batches compacted into one file of small row groups holding every campaign.
    for seed in (3, 4, 5):
        put(enriched_frame(20_000, seed=seed, start_ms=B, id_prefix="b"))
    put(tied("tb", B, 120))  # on the hour boundary, the first millisecond of B
    table = open_table(location, EVENTS)
    maintenance.optimize(table, [("hour", "=", "01")], row_group_rows=4_096)
    # C: small files as the consumer writes them, one with a tie across two of them.
    for seed in (6, 7, 8, 9):
        put(enriched_frame(5_000, seed=seed, start_ms=C, span_ms=600_000, id_prefix="c"))
    put(pl.concat([tied("tc1", C + 300_000, 80), tied("tc0", C + 300_000, 5, SMALL)]))
    put(tied("tc2", C + 300_000, 70))


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("newest")
    build(local(path))
    return path


@pytest.fixture(scope="module")
def stored(lake_dir: Path) -> pl.DataFrame:
    frame = pl.from_arrow(open_table(local(lake_dir), EVENTS).to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(time_ms=pl.col("event_time").dt.epoch("ms"))


@pytest.fixture(params=["clustered by duckdb", "clustered by row groups"])
def lake(lake_dir: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Lake:
    """The lake with only the newest of C's small files in memory (the others on disk), its
    clustered hour read by DuckDB or by row groups."""
    if request.param == "clustered by duckdb":
        monkeypatch.setattr(row_groups, "SMALL_GROUP_ROWS", 0)
    return Lake(local(lake_dir), memory=QuerySettings(query_small_files_bytes=3 * 1024**2))


def reference(stored: pl.DataFrame, limit: int, where: events.EventFilter) -> list[Any]:
    """The straightforward answer: filter, one full sort, the first ``limit`` rows."""
    rows = stored.filter(pl.col("campaign_id") == where.campaign_id)
    if where.event_type is not None:
        rows = rows.filter(pl.col("event_type") == where.event_type)
    if where.since_ms is not None:
        rows = rows.filter(pl.col("time_ms") >= where.since_ms)
    if where.until_ms is not None:
        rows = rows.filter(pl.col("time_ms") < where.until_ms)
    if (b := where.before) is not None:
        t, i = pl.col("time_ms"), pl.col("event_id")
        rows = rows.filter((t < b.time_ms) | ((t == b.time_ms) & (i < b.event_id)))
    top = rows.sort(["time_ms", "event_id"], descending=True).head(limit)
    fields = list(events.Event.__dataclass_fields__)
    return [events.Event(*r) for r in top.select(fields).iter_rows()]


def test_the_lake_has_every_kind_of_file(lake: Lake) -> None:
    view = lake.view("events")
    table = view.table("events")
    root = table.local_root
    assert root is not None
    disk = [f for f in view.files("events") if f not in table.small]
    kinds = {lake.row_groups.clustered(f"{root}/{f}") for f in disk}
    assert kinds == {True, False}  # clustered A; B and C's older files by row groups
    assert table.small and disk


UNTILS = [None, B - 1, B, B + 1, C + 300_000, C + 300_001, C + 10**9]


@pytest.mark.parametrize("campaign", [BIG, SMALL, "00150", "absent"])
@pytest.mark.parametrize("limit", [1, 100, 1001])
@pytest.mark.parametrize("until", UNTILS)
def test_newest_matches_a_full_sort(
    lake: Lake, stored: pl.DataFrame, campaign: str, limit: int, until: int | None
) -> None:
    where = events.EventFilter(campaign, until_ms=until)
    assert events.newest(lake, limit, where) == reference(stored, limit, where)


@pytest.mark.parametrize("event_type", ["click", "conversion"])
@pytest.mark.parametrize("since", [None, B, C + 300_000])
def test_event_type_and_since_bound_the_answer(
    lake: Lake, stored: pl.DataFrame, event_type: str, since: int | None
) -> None:
    where = events.EventFilter(BIG, event_type, since, C + 400_000)
    assert events.newest(lake, 100, where) == reference(stored, 100, where)


# 2, not 1: a page still ends inside a tie, at half the requests (1 walked ~1 min a reader).
@pytest.mark.parametrize("page_size", [2, 37, 100])
def test_cursor_pages_walk_ties_and_hours_exactly(
    lake: Lake, stored: pl.DataFrame, page_size: int
) -> None:
    where = events.EventFilter(BIG, since_ms=B - 5_000, until_ms=C + 300_001)
    expected = reference(stored, 10**6, where)
    walked: list[events.Event] = []
    before = None
    for _ in range(len(expected) // page_size + 2):
        page, before = events.page(
            lake, page_size, events.EventFilter(**{**vars(where), "before": before})
        )
        walked += page
        if before is None:
            break
    assert walked == expected


def reference_series(
    stored: pl.DataFrame, campaign: str, runs: list[tuple[int, int]], width: int
) -> list[campaigns.Bucket]:
    """The straightforward stats: the campaign's events in the runs, summed by bucket."""
    time = pl.col("time_ms")
    inside = pl.any_horizontal([(time >= lo) & (time < hi) for lo, hi in runs])
    rows = stored.filter((pl.col("campaign_id") == campaign) & inside)
    kind = pl.col("event_type")
    sums = (
        rows.group_by(bucket=time - time % width)
        .agg(
            (kind == "impression").sum().cast(pl.Int64),
            (kind == "click").sum().cast(pl.Int64).alias("c"),
            (kind == "conversion").sum().cast(pl.Int64).alias("v"),
            pl.col("cost_micros").sum().cast(pl.Int64),
            pl.col("revenue_micros").sum().cast(pl.Int64),
        )
        .sort("bucket")
    )
    return [campaigns.Bucket(r[0], campaigns.Totals(*r[1:])) for r in sums.iter_rows()]


@pytest.mark.parametrize("campaign", [BIG, SMALL, "00150", "absent"])
@pytest.mark.parametrize("granularity", campaigns.GRANULARITIES)
@pytest.mark.parametrize(
    ("since", "until"),
    [
        (A, C + 10**9),
        (A + 1, B),  # until on an hour boundary
        (B - 60_000, B + 1),  # across the clustered and compacted hours
        (A + 1_234_567, A + 1_234_567 + 59_999),  # a partial minute inside the clustered hour
        (B + 600_000, C + 300_001),  # into the files as written, ties at the end
        (C, C + 300_000),
    ],
)
def test_stats_from_events_match_an_aggregation(
    lake: Lake,
    stored: pl.DataFrame,
    campaign: str,
    granularity: campaigns.Granularity,
    *,
    since: int,
    until: int,
) -> None:
    """Stats read from events (local files by their row groups, small files through DuckDB)
    sum exactly what one aggregation of the stored events does."""
    width = campaigns.BUCKET_MS[granularity]
    got = campaigns.RawEventsSource().series(lake, campaign, since, until, granularity)
    assert got == reference_series(stored, campaign, [(since - since % width, until)], width)


@pytest.mark.parametrize("campaign", [BIG, SMALL])
def test_a_plans_raw_runs_are_read_exactly(lake: Lake, stored: pl.DataFrame, campaign: str) -> None:
    """Disjoint raw runs (dirty minutes, the partial minute at until) in every kind of file,
    one row group holding two of them, count each event once."""
    runs = [(A + 60_000, A + 120_000), (A + 180_000, A + 180_500), (B - 1, B + 1)]
    runs += [(B + 60_000, B + 61_000), (C + 299_999, C + 300_001)]
    # Partial minutes at a later and later until (the minute's running totals are kept).
    ends = [A + 1_200_001, A + 1_234_567, A + 1_259_999, B - 60_000, B - 30_000, B]
    plans = [runs, *([(A + 1_200_000, end)] for end in ends)]
    plans += [[(B - 60_000, B - 1)], [(B - 1, B)], [(B, B + 1)], [(B + 1, B + 59_000)]]
    for granularity in campaigns.GRANULARITIES:
        width = campaigns.BUCKET_MS[granularity]
        for chosen in plans:
            p = campaigns.Plan(raw=tuple(chosen))
            got = campaigns.read_plan(lake.view("events"), campaign, granularity, p)
            assert got == reference_series(stored, campaign, chosen, width), chosen


def test_a_minutes_running_totals_keep_one_entry_per_distinct_time() -> None:
    """A busy campaign's minute holds many rows a millisecond: its running totals are kept per
    distinct time, and every [lo, hi) still sums exactly its rows, ties included."""
    rng = np.random.default_rng(7)
    minute = 1_796_000_040_000
    times = minute + rng.integers(0, 500, 5_000)  # ~10 rows a millisecond
    kinds = rng.choice(["impression", "click", "conversion"], 5_000)
    cost = rng.integers(0, 1_000, 5_000)
    table = pa.table(
        {
            "campaign_id": ["c"] * 4_000 + ["other"] * 1_000,
            "event_time": pa.array(times * 1000, pa.timestamp("us", "UTC")),
            "event_type": kinds,
            "cost_micros": cost,
            "revenue_micros": cost * 2,
        }
    )
    kept = event_sums._Minute.of(table, "c", minute)
    mine = times[:4_000]
    assert len(kept.times_us) == len(np.unique(mine))
    for lo, hi in [(0, 500), (0, 1), (3, 4), (250, 251), (10, 499), (499, 500), (7, 7), (600, 700)]:
        rows = (mine >= minute + lo) & (mine < minute + hi)
        expected = [
            int((kinds[:4_000][rows] == k).sum()) for k in ("impression", "click", "conversion")
        ]
        expected += [int(cost[:4_000][rows].sum()), int(2 * cost[:4_000][rows].sum())]
        got = kept.between((minute + lo) * 1000, (minute + hi) * 1000)
        assert got == (expected if rows.any() else None), (lo, hi)


def _sums_of(
    campaign: list[str | None], times: np.ndarray, kinds: np.ndarray, cost: np.ndarray
) -> Any:
    """The straightforward totals of a table's rows: (name, [lo, hi), width) -> Sums."""

    def sums(name: str, lo: int, hi: int, width: int) -> event_sums.Sums:
        out: event_sums.Sums = {}
        for c, t, k, v in zip(campaign, times.tolist(), kinds, cost.tolist(), strict=True):
            if c == name and t is not None and lo <= t < hi:
                counted = [int(k == x) for x in ("impression", "click", "conversion")]
                event_sums.add(out, t - t % width, [*counted, v, 2 * v])
        return out

    return sums


def test_groups_a_run_holds_whole_are_summed_once_for_every_campaign(tmp_path: Path) -> None:
    """A row group whose statistics put all its rows inside a run (and in one bucket) is summed
    from its per-campaign totals, built from one read for every campaign it holds: a compacted
    open hour's partial minute meets a dozen consumer files' groups, and each campaign's first
    question read them all again. Exact for runs that cut groups, hold them whole, or span
    buckets; a group with a row without a time is never taken as whole."""
    rng = np.random.default_rng(3)
    minute = 1_796_000_040_000
    n, per_group = 8_000, 1_000
    # Eight groups of ~7.5 s each, campaigns sorted within each (as a consumer file's).
    times = np.sort(minute + rng.integers(0, 60_000, n))
    campaign: list[str | None] = []
    for _ in range(n // per_group):
        campaign += sorted(rng.choice(["a", "b", "c", "d"], per_group).tolist())
    kinds = rng.choice(["impression", "click", "conversion", "other"], n)
    cost = rng.integers(0, 1_000, n)
    # A campaign whose rows count nothing (zero money, an uncounted type) still has its bucket.
    campaign[:10], kinds[:10], cost[:10] = ["0"] * 10, "other", 0
    stamps: list[int | None] = (times * 1000).tolist()
    stamps[7_500] = None  # the last group has a row without a time
    table = pa.table(
        {
            "campaign_id": campaign,
            "event_time": pa.array(stamps, pa.timestamp("us", "UTC")),
            "event_type": kinds,
            "cost_micros": cost,
            "revenue_micros": cost * 2,
        }
    )
    path = str(tmp_path / "groups.parquet")
    pq.write_table(table, path, row_group_size=per_group)
    groups = row_groups.RowGroups()
    found = groups.groups(path)
    assert [g.time_nulls for g in found] == [0] * 7 + [1]
    reads: list[tuple[str, ...]] = []
    read = groups.columns

    def counted(path: str, indices: Any, names: Any) -> pa.Table:
        reads.append(tuple(names))
        return read(path, indices, names)

    groups.columns = counted  # type: ignore[method-assign]
    minutes = event_sums.MinuteSums()
    plain_times = np.array([t // 1000 if t is not None else None for t in stamps], dtype=object)
    reference = _sums_of(campaign, plain_times, kinds, cost)
    everything = (minute - 5_000, minute + 65_000)
    for name in ("0", "a", "b", "c", "d", "absent"):
        got = event_sums.from_row_groups(
            groups, [path], name, [everything], 60_000, minutes=minutes
        )
        assert got == reference(name, *everything, 60_000), name
    # Seven whole groups, read once (without event_time) for all four campaigns; the last one
    # (a row without a time) per campaign, through its minute.
    whole = [r for r in reads if "event_time" not in r]
    assert len(whole) == 7
    assert len(reads) - len(whole) == 5  # "0" is not in the last group
    for lo, hi, width in [
        (minute, minute + 60_000, 60_000),
        (minute + 7_000, minute + 41_000, 60_000),
        (minute + 10_000, minute + 10_001, 60_000),
        (minute - 60_000, minute + 120_000, 1_000),
        (minute + 59_999, minute + 60_000, 60_000),
    ]:
        for name in ("a", "b", "d"):
            got = event_sums.from_row_groups(
                groups, [path], name, [(lo, hi)], width, minutes=minutes
            )
            assert got == reference(name, lo, hi, width), (name, lo, hi, width)


def test_small_files_in_memory_are_summed_from_their_campaign_order() -> None:
    """A file held in memory sums a campaign's rows in [since, until) by bucket from running
    totals over its campaign order: ties, bucket edges, runs outside the rows, absent
    campaigns, rows of other campaigns in between."""
    rng = np.random.default_rng(9)
    start = 1_796_000_040_000
    n = 5_000
    times = start + rng.integers(0, 180_000, n) // 7 * 7  # ties, three minutes
    campaign: list[str | None] = rng.choice(["a", "b", "c"], n).tolist()
    campaign[3] = None
    kinds = rng.choice(["impression", "click", "conversion", "other"], n)
    cost = rng.integers(0, 1_000, n)
    table = pa.table(
        {
            "event_id": [f"e{i:05d}" for i in range(n)],
            "campaign_id": campaign,
            "event_time": pa.array(times * 1000, pa.timestamp("us", "UTC")),
            "event_type": pa.array(kinds).dictionary_encode(),
            "cost_micros": cost,
            "revenue_micros": cost * 2,
        }
    )
    for name in ordered.EVENT_FIELDS:
        if name not in table.column_names and name != "time_ms":
            table = table.append_column(name, pa.nulls(n, pa.string()))
    rows = ordered.OrderedRows(table)
    reference = _sums_of(campaign, times.astype(object), kinds, cost)
    for lo, hi in [
        (start, start + 180_000),
        (start + 59_999, start + 60_001),
        (start + 7, start + 8),
        (start + 120_000, start + 120_000),
        (start - 10_000, start - 1),
        (start + 61_234, start + 179_000),
    ]:
        for width in (1_000, 60_000, 3_600_000):
            for name in ("a", "b", "c", "absent"):
                got = rows.totals(name, lo * 1000, hi * 1000, width)
                assert got == reference(name, lo, hi, width), (name, lo, hi, width)


def test_a_group_of_one_campaign_is_summed_without_its_campaign_ids(tmp_path: Path) -> None:
    """Row groups whose statistics say they hold one campaign only (a clustered hour's busy
    campaign) are summed without reading campaign_id, exactly as the mixed groups are; a group
    with a null campaign_id is not taken for one campaign's."""
    rng = np.random.default_rng(11)
    minute = 1_796_000_040_000
    n = 6_000
    campaign = ["a"] * 1_000 + ["b"] * 3_000 + ["c"] * 1_999 + [None]
    times = np.sort(minute + rng.integers(-5_000, 65_000, n))  # sorted in each campaign
    kinds = rng.choice(["impression", "click", "conversion", "other"], n)
    cost = rng.integers(0, 1_000, n)
    table = pa.table(
        {
            "campaign_id": campaign,
            "event_time": pa.array(times * 1000, pa.timestamp("us", "UTC")),
            "event_type": kinds,
            "cost_micros": cost,
            "revenue_micros": cost * 3,
        }
    )
    path = str(tmp_path / "clustered.parquet")
    pq.write_table(table, path, row_group_size=1_000)
    groups = row_groups.RowGroups()
    found = groups.groups(path)
    assert [g.holds_only("b") for g in found] == [False, True, True, True, False, False]
    assert not found[5].holds_only("c")  # its last row has no campaign
    sums = event_sums.MinuteSums()
    for name in ("a", "b", "c"):
        for g in found:
            if not g.may_hold(name, None, None):
                continue
            kept = sums.minute(groups, path, g, name, minute)
            rows = np.arange(g.index * 1_000, (g.index + 1) * 1_000)
            rows = rows[np.array(campaign, dtype=object)[rows] == name]
            for lo, hi in [(0, 60_000), (-5_000, 70_000), (1_234, 5_678), (59_999, 60_000)]:
                t = times[rows]
                mine = rows[(t >= minute + max(lo, 0)) & (t < minute + min(hi, 60_000))]
                expected = [int((kinds[mine] == k).sum()) for k in ("impression", "click")]
                expected += [int((kinds[mine] == "conversion").sum())]
                expected += [int(cost[mine].sum()), int(3 * cost[mine].sum())]
                got = kept.between((minute + lo) * 1000, (minute + hi) * 1000)
                assert got == (expected if len(mine) else None), (name, g.index, lo, hi)


def test_a_clustered_files_groups_of_a_campaign_are_found_by_bisection(tmp_path: Path) -> None:
    """In a file clustered by campaign, the groups that can hold a campaign are found by
    bisection, the same as testing every group: campaigns within one group, across several,
    at a boundary two groups share, absent between two, before the first and after the last;
    and with the outer bounds unknown."""
    names = [f"c{i:02d}" for i in range(0, 40, 2)]  # c00, c02, ... c38: odd ones are absent
    sizes = np.random.default_rng(5).integers(1, 900, len(names))
    campaign = [n for n, k in zip(names, sizes, strict=True) for _ in range(int(k))]
    stamps = pa.array(range(len(campaign)), pa.timestamp("ms", "UTC"))  # row i at i ms
    table = pa.table({"campaign_id": campaign, "event_time": stamps})
    path = str(tmp_path / "clustered.parquet")
    pq.write_table(table, path, row_group_size=500)
    groups = row_groups.RowGroups()
    assert groups.clustered(path) and len(groups.groups(path)) > 5
    footer = groups._footer(path)
    asked = ["", "a", *names, *(f"c{i:02d}" for i in range(1, 41, 2)), "c38x", "z"]
    for name in asked:
        every = [g.index for g in footer.groups if g.may_hold(name, None, None)]
        assert [g.index for g in footer.holding(name) if g.may_hold(name, None, None)] == every
        # The groups where one campaign ends and the next begins are told apart by their
        # campaigns' spans, read from two columns: only the groups with the campaign's rows
        # are left, each with the campaign's own newest time there, and none is decoded whole.
        rows = [i for i, c in enumerate(campaign) if c == name]
        newest = {i // 500: i * 1000 for i in rows}  # times ascend: the last row's is the max
        found = groups.candidates(path, name, None, None)
        assert {g.index: t for t, g in found} == newest, name
    assert not groups._decoded
    # The first group's min and the last group's max unknown: each then holds anything
    # below (above) its neighbour.
    first, *middle, last = footer.groups
    outer = [
        dataclasses.replace(first, min_campaign=None),
        *middle,
        dataclasses.replace(last, max_campaign=None),
    ]
    unknown = row_groups._Footer.of(footer.metadata, outer)
    assert unknown.clustered
    for name in asked:
        every = [g.index for g in unknown.groups if g.may_hold(name, None, None)]
        assert [g.index for g in unknown.holding(name) if g.may_hold(name, None, None)] == every


def test_rows_already_in_order_are_recognised_and_others_sorted() -> None:
    """A clustered group (in (campaign_id, event_time, event_id) order, ties included) keeps
    its order without a sort; rows out of order in any key, or with a null key, are sorted."""
    t0 = 1_796_000_040_000_000
    table = pa.table(
        {
            "event_id": ["b", "c", "a", "d", "a", "b"],
            "event_time": pa.array([t0, t0, t0 + 1, t0 + 1, t0, t0], pa.timestamp("us", "UTC")),
            "campaign_id": ["x", "x", "x", "x", "y", "y"],
        }
    )
    times = np.asarray(table.column("event_time").cast(pa.int64()).to_numpy())
    assert ordered._in_order(table, times)
    assert ordered._in_order(table.slice(0, 1), times[:1])
    swapped_ids = table.set_column(0, "event_id", pa.array(["c", "b", "a", "d", "a", "b"]))
    swapped_times = table.set_column(
        1, "event_time", table.column("event_time").take([2, 1, 0, 3, 4, 5])
    )
    swapped_campaigns = table.set_column(2, "campaign_id", pa.array(["y", "y", "y", "y", "x", "x"]))
    with_null = table.set_column(2, "campaign_id", pa.array(["x", "x", "x", "x", "y", None]))
    for rows in (swapped_ids, swapped_times, swapped_campaigns, with_null):
        stamps = np.asarray(rows.column("event_time").cast(pa.int64()).to_numpy())
        assert not ordered._in_order(rows, stamps)
