"""Clustering an events hour (lake/cluster.py) on a local and an S3 lake: the same rows, in
(campaign_id, event_time, event_id) order so that a campaign's rows sit in few row groups, one
maintenance commit that the change feed ignores, and races that lose nothing and revive
nothing: a concurrent append is kept, a concurrent retention delete makes the clustering
fail (and its files go), and a commit that may have landed leaves its files to vacuum."""

from __future__ import annotations

import math

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from lake import changes, cluster, maintenance
from lake.location import LakeLocation
from lake.tables import EVENTS, open_table
from lake.testing import START_MS, append, enriched_frame

DATE, HOUR = "2026-12-02", "00"
ROW_GROUP = 500
BATCHES = 6
ROWS = 2_000


def fill(location: LakeLocation) -> pl.DataFrame:
    """BATCHES commits of ROWS events each in hour 00 (each commit its own file), their times
    cut to the second so that many rows tie on (campaign_id, event_time); all rows."""
    frames = [
        enriched_frame(ROWS, seed=s, id_prefix="c", campaigns=40).with_columns(
            pl.col("event_time").dt.truncate("1s")
        )
        for s in range(BATCHES)
    ]
    for frame in frames:
        append(location, {"events": frame})
    return pl.concat(frames)


def rows_of(table: DeltaTable) -> pl.DataFrame:
    frame = pl.from_arrow(
        table.to_pyarrow_table(columns=["event_id", "campaign_id", "cost_micros"])
    )
    assert isinstance(frame, pl.DataFrame)
    return frame.sort("event_id")


def run(location: LakeLocation, table: DeltaTable) -> cluster.ClusterResult:
    return cluster.cluster_hour(
        location,
        table,
        DATE,
        HOUR,
        target_bytes=1 << 30,
        memory_bytes=64 << 20,
        row_group_rows=ROW_GROUP,
    )


def files_on_storage(location: LakeLocation) -> set[str]:
    fs = location.filesystem()
    root = location.path("events", f"date={DATE}", f"hour={HOUR}")
    return {info.path.rsplit("/", 1)[-1] for info in fs.get_file_info(pafs.FileSelector(root))}


def test_clustering_keeps_every_row_and_sorts_campaigns_into_few_row_groups(
    location: LakeLocation,
) -> None:
    expected = fill(location)
    table = open_table(location, EVENTS)
    before = table.version()
    result = run(location, table)
    assert (result.files_removed, result.files_added, result.rows) == (BATCHES, 1, len(expected))
    got = rows_of(table)
    assert got.equals(expected.select(got.columns).sort("event_id"))
    fs = location.filesystem()
    (uri,) = table.file_uris()
    path = uri.removeprefix("file://").removeprefix("s3://")
    data = pq.read_table(path, filesystem=fs, columns=list(cluster.CLUSTER_KEYS))
    keys = pl.from_arrow(data)
    assert isinstance(keys, pl.DataFrame)
    # event_id breaks the ties: the order queries.ordered reads in, with no sort of its own.
    assert keys.select("campaign_id", "event_time").is_duplicated().sum() > ROWS
    assert keys.equals(keys.sort("campaign_id", "event_time", "event_id"))
    metadata = pq.read_metadata(path, filesystem=fs)
    column = metadata.schema.to_arrow_schema().get_field_index("campaign_id")
    groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
    assert max(g.num_rows for g in groups) <= ROW_GROUP
    per_campaign = expected.group_by("campaign_id").len()
    for campaign, n in per_campaign.iter_rows():
        holding = sum(
            g.column(column).statistics.min <= campaign <= g.column(column).statistics.max
            for g in groups
        )
        # Sorted: a campaign's rows fill consecutive groups, plus at most one shared at each end.
        assert holding <= math.ceil(n / ROW_GROUP) + 1, (campaign, n, holding)
    # A maintenance commit: the change feed (what rollups read) sees no new rows.
    assert list(changes.inserted(table, before, table.version(), ["event_id"])) == []


def test_an_append_during_clustering_is_kept(
    location: LakeLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = fill(location)
    late = enriched_frame(50, seed=99, id_prefix="late", campaigns=40)
    real_close = cluster._Files.close

    def close_then_append(self: cluster._Files) -> None:
        real_close(self)
        append(location, {"events": late})  # after the clustering's snapshot, before its commit

    monkeypatch.setattr(cluster._Files, "close", close_then_append)
    table = open_table(location, EVENTS)
    assert run(location, table).files_removed == BATCHES
    got = rows_of(open_table(location, EVENTS))
    assert got.equals(pl.concat([expected, late]).select(got.columns).sort("event_id"))
    assert len(open_table(location, EVENTS).file_uris()) == 2  # the clustered file, the late one


def test_a_concurrent_delete_fails_the_clustering_and_nothing_comes_back(
    location: LakeLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(location)
    real_close = cluster._Files.close
    written: list[str] = []

    def close_then_delete(self: cluster._Files) -> None:
        real_close(self)
        written.extend(self.paths)
        maintenance.delete_before(open_table(location, EVENTS), "2026-12-03")  # retention

    monkeypatch.setattr(cluster._Files, "close", close_then_delete)
    table = open_table(location, EVENTS)
    with pytest.raises(CommitFailedError):
        run(location, table)
    assert len(rows_of(open_table(location, EVENTS))) == 0  # the deleted rows stay deleted
    assert written and not {p.rsplit("/", 1)[-1] for p in written} & files_on_storage(location)


def test_a_commit_that_may_have_landed_leaves_its_files_to_vacuum(
    location: LakeLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = fill(location)
    table = open_table(location, EVENTS)

    def lost_answer(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset while committing")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", lost_answer)
    with pytest.raises(OSError, match="connection reset"):
        run(location, table)
    monkeypatch.undo()
    table = open_table(location, EVENTS)
    assert rows_of(table).equals(
        expected.select(["event_id", "campaign_id", "cost_micros"]).sort("event_id")
    )
    orphans = [f for f in files_on_storage(location) if f.startswith("part-cluster-")]
    assert len(orphans) == 1  # never read (no commit names it) until vacuum deletes it
    maintenance.vacuum(table, 0, allow_short_retention=True)
    assert not [f for f in files_on_storage(location) if f.startswith("part-cluster-")]


def test_an_empty_hour_is_nothing_to_do(location: LakeLocation) -> None:
    append(location, {"events": enriched_frame(10, start_ms=START_MS + 3_600_000)})
    assert run(location, open_table(location, EVENTS)) == cluster.ClusterResult(0, 0, 0)
