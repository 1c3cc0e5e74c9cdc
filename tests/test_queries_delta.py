"""queries.Lake on Delta tables: committed data only, exact counts during commits, optimize and
vacuum, the same answers on S3 as on local disk, refresh by version, time travel."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import S3Server

from lake import maintenance
from lake.location import LakeLocation
from lake.tables import EVENTS, open_table
from lake.testing import START_MS, append, cluster_every_hour, enriched_frame, ledger_frame
from pipeline.schema import HOUR_MS
from pipeline.settings import QuerySettings
from queries import campaigns, events, ops
from queries import lake as queries_lake
from queries.lake import Lake
from queries.ordered import ORDER_BYTES_PER_ROW


def local(tmp_path: Path) -> LakeLocation:
    return LakeLocation.from_env({"LAKE_URI": str(tmp_path / "lake")})


def batch(i: int, rows: int = 100) -> dict[str, pl.DataFrame]:
    """Batch ``i``: ``rows`` events over two hours (two partitions) and its ledger row."""
    frame = enriched_frame(
        rows, seed=i, start_ms=START_MS, span_ms=2 * HOUR_MS, batch_id=f"b{i}", id_prefix="d"
    )
    return {"events": frame, "ledger": ledger_frame(f"b{i}", rows_in=rows, at_ms=START_MS + i)}


def test_files_no_commit_names_are_never_read(tmp_path: Path) -> None:
    """An orphan (Parquet written under the table, never committed: a crashed writer) and a file
    a commit has not named yet are invisible; only committed rows count."""
    location = local(tmp_path)
    append(location, batch(0))
    lake = Lake(location)
    assert events.count(lake) == 100
    committed = next(Path(location.uri, "events").rglob("*.parquet"))
    orphan = committed.with_name(f"part-orphan-{uuid.uuid4().hex}.parquet")
    pq.write_table(pq.read_table(committed), orphan)
    assert events.count(lake) == 100
    assert len(events.newest(lake, 1000)) == 100
    assert lake.sql("SELECT count(*) FROM events")[1] == [(100,)]
    assert (
        sum(
            c.totals.impressions + c.totals.clicks + c.totals.conversions
            for c in campaigns.top(lake, "spend", 1000)
        )
        == 100
    )


def test_a_view_keeps_its_versions_and_a_new_view_refreshes(tmp_path: Path) -> None:
    location = local(tmp_path)
    lake = Lake(location)
    empty = lake.view()
    assert empty.versions == {"events": -1, "quarantine": -1, "ledger": -1}
    assert empty.count("events") == 0
    append(location, batch(0))
    first = lake.view()
    assert first.versions["events"] >= 0
    assert lake.view().table("events") is first.table("events")  # no commit: nothing rebuilt
    append(location, batch(1))
    assert first.count("events") == 100  # pinned
    assert lake.view().count("events") == 200
    assert ops.ledger_totals(lake).rows_in == 200


def test_time_travel_reads_an_older_version(tmp_path: Path) -> None:
    location = local(tmp_path)
    append(location, batch(0))
    lake = Lake(location)
    old = lake.view().versions["events"]
    append(location, batch(1))
    assert lake.view(versions={"events": old}).count("events") == 100
    assert lake.sql("SELECT count(*) FROM events", versions={"events": old})[1] == [(100,)]
    assert lake.sql("SELECT count(*) FROM events")[1] == [(200,)]


def test_readers_see_exact_counts_during_commits_optimize_and_vacuum(tmp_path: Path) -> None:
    """A writer thread commits batches, compacts and clusters every hour, and vacuums with no
    retention, in phases; a reader thread counts all along, in four ways. Every count is the
    total of a prefix of the committed batches, never part of one, a row twice or an error;
    and at each phase's end, with the writer paused, it is exactly all batches committed."""
    location = local(tmp_path)
    lake = Lake(location)
    sizes = [50 + 10 * i for i in range(9)]
    prefixes = {sum(sizes[:k]) for k in range(len(sizes) + 1)}
    phase_done = threading.Event()
    barrier = threading.Barrier(2)
    stop = threading.Event()
    errors: list[BaseException] = []
    at_phase_end: list[int] = []
    seen: list[int] = []

    def counts() -> set[int]:
        _, rows = lake.sql("SELECT count(*), count(DISTINCT event_id) FROM events")
        total, distinct = rows[0]
        assert total == distinct, f"{total - distinct} rows seen twice"
        return {
            int(total),
            events.count(lake),
            len(events.newest(lake, 5000)),
            ops.ledger_totals(lake).rows_in,
        }

    def reader() -> None:
        try:
            while not stop.is_set():
                while not phase_done.is_set():
                    for n in counts():
                        assert n in prefixes, f"{n} rows: not a prefix of the batches"
                        seen.append(n)
                # The writer is paused: every way of counting sees every batch.
                found = counts()
                assert len(found) == 1, found
                at_phase_end.append(found.pop())
                barrier.wait()
                barrier.wait()  # the writer cleared phase_done
        except threading.BrokenBarrierError:
            if not stop.is_set():
                raise
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def end_phase() -> None:
        phase_done.set()
        barrier.wait()
        phase_done.clear()
        barrier.wait()

    thread = threading.Thread(target=reader)
    thread.start()
    table = None
    try:
        for i, size in enumerate(sizes):
            append(location, batch(i, size))
            if i % 3 == 2:
                table = table or open_table(location, EVENTS)
                table.update_incremental()
                maintenance.optimize(table)
                cluster_every_hour(location, table)
                end_phase()  # readers now hold snapshots taken after the optimize
                table.update_incremental()
                maintenance.vacuum(table, 0, allow_short_retention=True)
            end_phase()
    except threading.BrokenBarrierError:
        pass
    finally:
        stop.set()
        phase_done.set()
        barrier.abort()
        thread.join()
    if errors:
        raise errors[0]
    want = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert sorted(set(at_phase_end)) == want
    assert at_phase_end == sorted(at_phase_end)
    assert table is not None
    table.update_incremental()
    assert pa.table(table.get_add_actions()).num_rows == 2  # two hours, compacted


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_same_answers_on_s3_as_on_local_disk(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "local":
        location = local(tmp_path)
    else:
        server: S3Server = request.getfixturevalue("s3")
        location = LakeLocation.from_env(server.env())
    for i in range(3):
        append(location, batch(i))
    lake = Lake(location)
    frame = pl.concat([batch(i)["events"] for i in range(3)])
    newest = frame.sort("event_time", "event_id", descending=True).head(7)
    assert events.count(lake) == 300
    assert [e.event_id for e in events.newest(lake, 7)] == newest["event_id"].to_list()
    cid = frame["campaign_id"].mode()[0]
    page, _ = events.page(lake, 5, events.EventFilter(campaign_id=cid))
    mine = frame.filter(pl.col("campaign_id") == cid).sort(
        "event_time", "event_id", descending=True
    )
    assert [e.event_id for e in page] == mine["event_id"].head(5).to_list()
    series = campaigns.series(lake, cid, START_MS, START_MS + 2 * HOUR_MS, "hour")
    assert sum(b.totals.spend_micros for b in series) == mine["cost_micros"].sum()
    top = campaigns.top(lake, "spend", 1)
    spend = (
        frame.group_by("campaign_id")
        .agg(pl.col("cost_micros").sum())
        .sort("cost_micros", "campaign_id", descending=[True, False])
    )
    assert (top[0].campaign_id, top[0].totals.spend_micros) == tuple(spend.row(0))
    assert ops.ledger_totals(lake).rows_in == 300
    assert ops.last_commit_ms(lake) == START_MS + 2
    assert lake.sql("SELECT count(*) FROM events WHERE hour = '01'")[1] == [
        (int((frame["event_time"].dt.hour() == 1).sum()),)
    ]


def test_a_time_window_prunes_files_by_partition_and_statistics(tmp_path: Path) -> None:
    """Two commits an hour apart: a window inside the later hour reads only its file."""
    location = local(tmp_path)
    for i in range(2):
        frame = enriched_frame(40, seed=i, start_ms=START_MS + i * HOUR_MS, batch_id=f"h{i}")
        append(location, {"events": frame})
    view = Lake(location).view("events")
    later = view.files("events", START_MS + HOUR_MS, START_MS + 2 * HOUR_MS)
    assert len(view.files("events")) == 2 and len(later) == 1
    rows = view.query(
        "SELECT count(*) FROM {events} WHERE event_time >= make_timestamptz($s * 1000)",
        {"s": START_MS + HOUR_MS},
    )
    assert rows == [(40,)]
    memory, on_disk = view.table("events").parts(later)
    rows_read = (0 if memory is None else memory.num_rows) + (
        0 if on_disk is None else on_disk.count_rows()
    )
    assert rows_read == 40


def test_small_files_are_read_once_and_forgotten_when_compacted(tmp_path: Path) -> None:
    """The uncompacted tail of one-commit-a-second writing is read into memory once per file;
    after an optimize the version has one big file and the small ones are gone from memory,
    and every answer on the way is exact."""
    location = local(tmp_path)
    lake = Lake(location)
    total = 0
    for i in range(5):
        append(location, {"events": enriched_frame(30, seed=i, batch_id=f"s{i}")})
        total += 30
        state = lake.view("events").table("events")
        assert len(state.small) == i + 1 and not state._fragments
        assert lake.view("events").query("SELECT count(*) FROM {events}") == [(total,)]
    before = dict(lake.view("events").table("events").small)
    append(location, {"events": enriched_frame(30, seed=9, batch_id="s9")})
    after = lake.view("events").table("events").small
    assert all(after[p] is t for p, t in before.items())  # not read again
    maintenance.optimize(open_table(location, EVENTS))
    compacted = lake.view("events").table("events")
    assert lake.view("events").query("SELECT count(*) FROM {events}") == [(total + 30,)]
    assert set(compacted.small).isdisjoint(before)


def test_small_files_in_memory_are_bounded_by_their_arrow_size(tmp_path: Path) -> None:
    """Past QUERY_SMALL_FILES_BYTES of memory (Arrow bytes, far above the files' zstd bytes, and
    the campaign order questions build on an events file)
    the newest small files stay in memory and older ones are scanned from storage; answers stay
    exact."""
    location = local(tmp_path)
    append(location, {"events": enriched_frame(200, seed=0, batch_id="s0")})
    one_file = Lake(location).view("events").table("events").in_memory
    assert one_file is not None
    # A file held costs its Arrow rows and the order and totals questions build on them.
    held = one_file.nbytes + ORDER_BYTES_PER_ROW * one_file.num_rows
    tail = int(held * 3.1)
    # Before its first small file is read, a table's files are guessed at _FIRST_RATIO times
    # their size, which this budget cannot hold: the newest is read anyway, to learn.
    (file_bytes,) = Lake(location).view("events").table("events").actions["size_bytes"]
    assert file_bytes * queries_lake._FIRST_RATIO > tail
    lake = Lake(location, memory=QuerySettings(query_small_files_bytes=tail))
    assert lake.view("events").table("events").in_memory is not None
    batches = [f"s{i}" for i in range(1, 7)]
    for seed, batch in enumerate(batches, start=1):
        append(location, {"events": enriched_frame(200, seed=seed, batch_id=batch)})
    state = lake.view("events").table("events")
    assert len(state.small) == 3 and len(state._fragments) == 4
    assert sum(t.nbytes + ORDER_BYTES_PER_ROW * t.num_rows for t in state.small.values()) <= tail
    in_memory = {t.column("batch_id")[0].as_py() for t in state.small.values()}
    assert in_memory == set(batches[-3:])  # the newest
    answer = lake.view("events").query(
        "SELECT batch_id, count(*) FROM {events} GROUP BY batch_id ORDER BY batch_id"
    )
    assert answer == [(b, 200) for b in ["s0", *batches]]


@pytest.mark.parametrize("budget", ["under one file", "none"])
def test_a_budget_that_holds_no_file_keeps_none_and_answers_exactly(
    tmp_path: Path, budget: str
) -> None:
    """Under one file's Arrow size, the newest file is read once (to learn the ratio) and let
    go at the next version; QUERY_SMALL_FILES_BYTES=0 reads none into memory at all."""
    location = local(tmp_path)
    append(location, {"events": enriched_frame(200, seed=0, batch_id="s0")})
    one_file = Lake(location).view("events").table("events").in_memory
    assert one_file is not None
    tail = one_file.nbytes // 2 if budget == "under one file" else 0
    lake = Lake(location, memory=QuerySettings(query_small_files_bytes=tail))
    first = lake.view("events").table("events")
    assert len(first.small) == (1 if tail else 0)
    for seed in (1, 2):
        append(location, {"events": enriched_frame(200, seed=seed, batch_id=f"s{seed}")})
        state = lake.view("events").table("events")
        assert not state.small and len(state._fragments) == seed + 1
    assert lake.view("events").query("SELECT count(*) FROM {events}") == [(600,)]


def test_newest_is_exact_when_many_events_share_the_cut_time(tmp_path: Path) -> None:
    """The newest-first search reads whole rows only at or after the limit-th newest time;
    every row tied at that time is read, so ties still order by event_id."""
    location = local(tmp_path)
    tied = enriched_frame(300, seed=1, start_ms=START_MS, span_ms=1)  # one millisecond
    older = enriched_frame(300, seed=2, start_ms=START_MS - 60_000, span_ms=1, id_prefix="o")
    append(location, {"events": pl.concat([tied, older])})
    found = events.newest(Lake(location), 100)
    expected = tied.sort("event_id", descending=True)["event_id"].head(100).to_list()
    assert [e.event_id for e in found] == expected
    assert {e.time_ms for e in found} == {START_MS}
