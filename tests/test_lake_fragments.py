"""Fragments built once per file from the add actions: pruning never drops a matching row, files
outside a filter are skipped, and a fragment outlives the versions that keep its file."""

from __future__ import annotations

import operator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow.compute as pc

from lake.location import LakeLocation
from lake.testing import START_MS, append, enriched_frame
from pipeline.schema import HOUR_MS
from pipeline.settings import QuerySettings
from queries.lake import Lake

#: Every file is scanned from storage through its fragment (none kept in memory).
ON_STORAGE = QuerySettings(query_small_files_bytes=0)


def frames() -> list[pl.DataFrame]:
    """Four commits over three hours; the last one's times carry microseconds (the log's
    statistics keep milliseconds), and its campaigns are a narrow range of their own."""
    parts = [
        enriched_frame(
            300, seed=i, start_ms=START_MS + i * HOUR_MS, span_ms=HOUR_MS, batch_id=f"b{i}"
        )
        for i in range(3)
    ]
    fine = enriched_frame(50, seed=9, start_ms=START_MS + HOUR_MS, span_ms=1_000, batch_id="b3")
    fine = fine.with_columns(
        event_time=pl.col("event_time").cast(pl.Datetime("us", "UTC"))
        + pl.duration(microseconds=999),
        campaign_id=pl.lit("zz-campaign"),
    )
    return [*parts, fine]  # the table's times are microseconds: the writer keeps them


def fill(tmp_path: Path) -> tuple[LakeLocation, pl.DataFrame]:
    location = LakeLocation.from_env({"LAKE_URI": str(tmp_path / "lake")})
    written = frames()
    for frame in written:
        append(location, {"events": frame})
    micros = pl.col("event_time").cast(pl.Datetime("us", "UTC"))
    return location, pl.concat([f.with_columns(event_time=micros) for f in written])


def at(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def test_pruned_answers_are_exact_at_every_file_boundary(tmp_path: Path) -> None:
    location, truth = fill(tmp_path)
    view = Lake(location, memory=ON_STORAGE).view("events")
    assert not view.table("events").small  # the fragments' path, not memory
    edges = truth.group_by("batch_id").agg(
        lo=pl.col("event_time").min(),
        hi=pl.col("event_time").max(),
        c_lo=pl.col("campaign_id").min(),
        c_hi=pl.col("campaign_id").max(),
    )
    times = [t for row in edges.iter_rows(named=True) for t in (row["lo"], row["hi"])]
    campaigns = [c for row in edges.iter_rows(named=True) for c in (row["c_lo"], row["c_hi"])]
    compare = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
    for t in times:
        for op, holds in {**compare, "=": operator.eq}.items():
            sql = f"SELECT count(*) FROM {{events}} WHERE event_time {op} $t"
            expected = truth.filter(holds(pl.col("event_time"), t)).height
            assert view.query(sql, {"t": t}) == [(expected,)], (op, t)
    for c in campaigns:
        sql = "SELECT count(*) FROM {events} WHERE campaign_id = $c"
        assert view.query(sql, {"c": c}) == [(truth.filter(pl.col("campaign_id") == c).height,)]


def test_files_outside_a_filter_are_skipped(tmp_path: Path) -> None:
    location, _ = fill(tmp_path)
    dataset = Lake(location, memory=ON_STORAGE).view("events").table("events").dataset
    every = list(dataset.get_fragments())
    assert len(every) >= 4
    first_hour = pc.field("event_time") < pc.scalar(at(START_MS + HOUR_MS // 2))
    assert 0 < len(list(dataset.get_fragments(filter=first_hour))) < len(every)
    narrow = pc.field("campaign_id") == "zz-campaign"
    assert len(list(dataset.get_fragments(filter=narrow))) == 1
    assert not list(dataset.get_fragments(filter=pc.field("campaign_id") == "no-such"))


def test_a_fragment_is_built_once_and_kept_while_its_file_lives(tmp_path: Path) -> None:
    location, _ = fill(tmp_path)
    lake = Lake(location, memory=ON_STORAGE)
    lake.view("events")
    cache = lake._files["events"].fragments
    assert cache is not None
    kept = dict(cache._fragments)
    append(location, {"events": enriched_frame(10, seed=20, batch_id="b9")})
    fresh = lake.view("events").table("events").dataset
    assert len(list(fresh.get_fragments())) == len(kept) + 1
    assert all(cache._fragments[p] is f for p, f in kept.items())  # not built again
