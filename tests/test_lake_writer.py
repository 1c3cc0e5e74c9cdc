"""The lake's exactly-once commit path on local disk and on a real S3 server (moto, loopback).

Covers table creation (also racing processes), commits carrying an application transaction,
skip/redo after a crash between the Parquet write and the commit (orphans invisible, vacuum
removes them), concurrent writers (threads and processes), and the same (app_id, version)
committed twice, sequentially and racing. Every assertion is on final state, never on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal
from s3_server import S3Server

from lake import maintenance, snapshot
from lake.location import LakeLocation
from lake.tables import (
    CHECKPOINT_INTERVAL,
    EVENTS,
    TABLE_PROPERTIES,
    ensure_table,
    ensure_tables,
)
from lake.testing import (
    START_MS,
    MemoryLakeWriter,
    enriched_frame,
    ledger_frame,
    quarantine_frame,
)
from lake.writer import (
    _BUCKET,
    DeltaLakeWriter,
    LakeWriter,
    Outcome,
    _packed_order,
    commit_batch,
    commit_files,
    committed_version,
    committed_versions,
    lowest_committed,
    prepare,
    write_files,
)
from pipeline.schema import CATEGORICAL_COLUMNS, HOUR_MS, IN_FLIGHT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120.0

#: A writer process: waits for the ``go`` file, then commits ``versions`` of ``app_id``.
WORKER = """
import json, os, sys, time
from pathlib import Path
from lake.location import LakeLocation
from lake.tables import ensure_tables
from lake.testing import enriched_frame
from lake.writer import commit_batch, write_files
from lake.tables import EVENTS
args = json.loads(sys.argv[1])
location = LakeLocation.from_env(args["env"])
go = Path(args["go"])
while not go.exists():
    time.sleep(0.005)
if args.get("crash_after_write"):
    write_files(location, EVENTS, enriched_frame(args["rows"], seed=99, id_prefix="crash"))
    print("written", flush=True)
    time.sleep(3600)
tables = ensure_tables(location)
out = []
for v in args["versions"]:
    frame = enriched_frame(args["rows"], seed=v, id_prefix=args["app_id"])
    res = commit_batch(location, args["app_id"], v, {"events": frame}, tables=tables)
    out.append(res[0].outcome.value)
print(json.dumps(out), flush=True)
"""


@pytest.fixture(params=["local", "s3"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The lake's settings: a fresh local directory or a fresh prefix of the S3 bucket."""
    if request.param == "local":
        return {"LAKE_URI": str(tmp_path / "lake")}
    server: S3Server = request.getfixturevalue("s3")
    return server.env()


@pytest.fixture
def location(env: dict[str, str]) -> LakeLocation:
    loc = LakeLocation.from_env(env)
    loc.check()
    return loc


def count(location: LakeLocation, table: str = "events", where: str = "true") -> int:
    con = duckdb.connect()
    snapshot.register(con, snapshot.snapshot(location))
    return int(con.sql(f"SELECT count(*) FROM {table} WHERE {where}").fetchall()[0][0])


def files_on_storage(location: LakeLocation, table: str) -> set[str]:
    fs = location.filesystem()
    root = location.path(table)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {
        i.path[len(root) + 1 :]
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and "_delta_log" not in i.path
    }


def spawn(args: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_create_is_idempotent_and_tables_have_their_partitions(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    again = ensure_tables(location)
    assert {n: t.version() for n, t in tables.items()} == {n: 0 for n in tables}
    assert again["events"].metadata().partition_columns == ["date", "hour"]
    assert again["quarantine"].metadata().partition_columns == ["date"]
    assert again["ledger"].metadata().partition_columns == ["date", "hour"]
    assert count(location) == 0


def test_racing_processes_create_one_table(
    location: LakeLocation, env: dict[str, str], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    args = {"env": env, "app_id": "x", "versions": [], "rows": 0, "go": str(go)}
    procs = [spawn(args) for _ in range(3)]
    go.touch()
    for p in procs:
        out, _ = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0 and json.loads(out) == []
    table = ensure_table(location, EVENTS)
    assert table.version() == 0


def test_commit_records_txn_stats_and_partitions(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    assert committed_version(tables["events"], "spool-a") is None
    frame = enriched_frame(40_000, seed=1, span_ms=2 * HOUR_MS)
    result = commit_batch(
        location,
        "spool-a",
        7,
        {
            "events": frame,
            "quarantine": quarantine_frame(3),
            "ledger": ledger_frame("b7", rows_in=40_003),
        },
        tables=tables,
    )
    assert [(r.table, r.outcome, r.rows, r.files) for r in result] == [
        ("events", Outcome.COMMITTED, 40_000, 2),
        ("quarantine", Outcome.COMMITTED, 3, 1),
        ("ledger", Outcome.COMMITTED, 1, 1),
    ]
    for table in tables.values():
        assert committed_version(table, "spool-a") == 7
        assert committed_version(table, "spool-b") is None
    assert count(location) == 40_000
    assert (
        count(location, "events", "date = '2026-12-02' AND hour = '01'")
        == frame.filter(frame["event_time"].dt.hour() == 1).height
    )
    adds = tables["events"].get_add_actions(flatten=True)
    assert adds.column("num_records").to_pylist() == [
        frame.filter(frame["event_time"].dt.hour() == h).height for h in (0, 1)
    ]
    assert adds.column("min.campaign_id").to_pylist()[0] == frame["campaign_id"].min()
    assert adds.column("null_count.event_id").to_pylist() == [0, 0]
    # Pruning: a campaign's query reads only the row groups whose statistics admit it...
    one = str(frame["campaign_id"].min())
    # ...and the log's file statistics leave out the files that cannot hold it.
    later = commit_batch(
        location,
        "spool-a",
        8,
        {
            "events": frame.with_columns(campaign_id=pl.lit("zzz")),
            "ledger": ledger_frame("b8", rows_in=1),
        },
        tables=tables,
    )
    assert later[0].files == 2
    pruned = snapshot.snapshot(location, prune={"events": f"campaign_id = '{one}'"})
    assert len(pruned.datasets["events"].files) == 2  # of 4
    assert pruned.datasets["events"].count_rows() == 40_000
    assert (
        count(location, "events", f"campaign_id = '{one}'") == (frame["campaign_id"] == one).sum()
    )


def test_same_app_version_twice_lands_once(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    frame = enriched_frame(1_000, seed=2)
    first = commit_batch(location, "spool-a", 1, {"events": frame}, tables=tables)
    again = commit_batch(location, "spool-a", 1, {"events": frame}, tables=tables)
    older = commit_batch(location, "spool-a", 0, {"events": frame}, tables=tables)
    assert [r.outcome for r in first + again + older] == [
        Outcome.COMMITTED,
        Outcome.SKIPPED,
        Outcome.SKIPPED,
    ]
    assert count(location) == 1_000
    assert committed_version(tables["events"], "spool-a") == 1


def test_racing_same_version_is_refused_by_the_txn_conflict_check(
    location: LakeLocation,
) -> None:
    """Both writers passed the skip check on the same snapshot; the second commit must fail."""
    first = ensure_table(location, EVENTS)
    second = ensure_table(location, EVENTS)
    ours = write_files(location, EVENTS, enriched_frame(500, seed=3), version=1)
    theirs = write_files(location, EVENTS, enriched_frame(500, seed=3), version=1)
    assert commit_files(first, EVENTS, ours, {"spool-a": 1}).outcome is Outcome.COMMITTED
    assert commit_files(second, EVENTS, theirs, {"spool-a": 1}).outcome is Outcome.CONCEDED
    assert count(location) == 500
    # The loser's files are orphans: on storage, not in the table; vacuum removes them.
    orphans = {a.path for a in theirs.actions}
    assert orphans <= files_on_storage(location, "events")
    removed = maintenance.vacuum(first, 0, allow_short_retention=True)
    assert {Path(p).name for p in removed} == {Path(p).name for p in orphans}
    assert files_on_storage(location, "events") == {a.path for a in ours.actions}
    assert count(location) == 500


def test_different_writers_on_one_snapshot_both_land(location: LakeLocation) -> None:
    """Two handles on one version commit: put-if-absent makes the second retry, not overwrite."""
    first = ensure_table(location, EVENTS)
    second = ensure_table(location, EVENTS)
    a = write_files(location, EVENTS, enriched_frame(300, seed=4, id_prefix="a"))
    b = write_files(location, EVENTS, enriched_frame(200, seed=4, id_prefix="b"))
    assert commit_files(first, EVENTS, a, {"spool-a": 1}).outcome is Outcome.COMMITTED
    assert commit_files(second, EVENTS, b, {"spool-b": 1}).outcome is Outcome.COMMITTED
    assert count(location) == 500
    assert ensure_table(location, EVENTS).version() == 2


def test_txn_versions_are_remembered_per_table_version_and_read_again_when_another_commits(
    location: LakeLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's 16 app ids are read once, not before every commit: what a handle read, or
    committed itself on top of what it read, holds until another writer's commit moves the
    table on; then every answer comes from the log again."""
    ours = ensure_table(location, EVENTS)
    theirs = ensure_table(location, EVENTS)
    apps = [f"group-topic-{p}" for p in range(16)]
    reads: list[str] = []
    original = DeltaTable.transaction_version

    def counted(table: DeltaTable, app_id: str) -> int | None:
        reads.append(app_id)
        return original(table, app_id)

    monkeypatch.setattr(DeltaTable, "transaction_version", counted)
    assert committed_versions(ours, apps) == dict.fromkeys(apps)
    assert len(reads) == 16
    for version in (1, 2):
        files = write_files(location, EVENTS, enriched_frame(10, seed=version), version=version)
        txns = dict.fromkeys(apps, version)
        assert commit_files(ours, EVENTS, files, txns).outcome is Outcome.COMMITTED
        assert committed_versions(ours, apps) == txns
    assert len(reads) == 16  # our own commits were remembered, not read back
    # Another handle (another consumer) commits one of the app ids and a new one.
    theirs.update_incremental()
    files = write_files(location, EVENTS, enriched_frame(10, seed=3), version=7)
    committed = commit_files(theirs, EVENTS, files, {apps[0]: 7, "other": 1})
    assert committed.outcome is Outcome.COMMITTED
    assert committed_versions(ours, [*apps, "other"]) == {
        **dict.fromkeys(apps, 2),
        apps[0]: 7,
        "other": 1,
    }
    assert len(reads) == 16 + 17  # the table moved on: all read again
    # Our next commit lands after theirs, on a handle that read their version first.
    files = write_files(location, EVENTS, enriched_frame(10, seed=4), version=8)
    assert commit_files(ours, EVENTS, files, dict.fromkeys(apps, 8)).outcome is Outcome.COMMITTED
    assert committed_versions(ours, [*apps, "other"]) == {**dict.fromkeys(apps, 8), "other": 1}
    assert committed_versions(ensure_table(location, EVENTS), [*apps, "other"]) == {
        **dict.fromkeys(apps, 8),
        "other": 1,
    }


def test_crash_between_write_and_commit_then_redo(location: LakeLocation) -> None:
    tables = ensure_tables(location)
    frame = enriched_frame(2_000, seed=5)
    # The crashed attempt: files written, no commit.
    crashed = write_files(location, EVENTS, frame, version=1)
    assert len(crashed.actions) == 1
    assert count(location) == 0
    # A crash between the events commit and the ledger commit.
    commit_batch(location, "spool-a", 1, {"events": frame}, tables=tables)
    assert lowest_committed(tables, "spool-a") is None  # quarantine and ledger lack batch 1
    # Restart: the caller redoes batch 1 for every table; each skips what it has.
    redo = commit_batch(
        location,
        "spool-a",
        1,
        {
            "events": frame,
            "quarantine": quarantine_frame(0),
            "ledger": ledger_frame("b1", rows_in=2_000),
        },
        tables=tables,
    )
    assert [(r.table, r.outcome) for r in redo] == [
        ("events", Outcome.SKIPPED),
        ("quarantine", Outcome.COMMITTED),
        ("ledger", Outcome.COMMITTED),
    ]
    assert committed_version(tables["quarantine"], "spool-a") == 1  # an empty commit, txn only
    assert lowest_committed(tables, "spool-a") == 1
    assert (count(location), count(location, "quarantine"), count(location, "ledger")) == (
        2_000,
        0,
        1,
    )
    orphan = crashed.actions[0].path
    assert orphan in files_on_storage(location, "events")
    maintenance.vacuum(tables["events"], 0, allow_short_retention=True)
    assert orphan not in files_on_storage(location, "events")
    assert count(location) == 2_000


def test_killed_writer_leaves_invisible_orphans(
    location: LakeLocation, env: dict[str, str], tmp_path: Path
) -> None:
    ensure_tables(location)
    go = tmp_path / "go"
    go.touch()
    proc = spawn(
        {
            "env": env,
            "app_id": "k",
            "versions": [],
            "rows": 1_000,
            "go": str(go),
            "crash_after_write": True,
        }
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
    proc.stdout.close()
    assert len(files_on_storage(location, "events")) == 1
    assert count(location) == 0
    table = ensure_table(location, EVENTS)
    assert committed_version(table, "k") is None
    assert maintenance.vacuum(table, 0, allow_short_retention=True, dry_run=True)


def test_concurrent_threads_commit_different_versions(location: LakeLocation) -> None:
    ensure_tables(location)
    errors: list[BaseException] = []

    def run(app: str) -> None:
        try:
            tables = ensure_tables(location)
            for v in range(1, 4):
                frame = enriched_frame(500, seed=v, id_prefix=app)
                commit_batch(
                    location,
                    app,
                    v,
                    {"events": frame, "ledger": ledger_frame(app, rows_in=500)},
                    tables=tables,
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"spool-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors
    assert count(location) == 3 * 3 * 500
    assert count(location, "ledger") == 9
    events = ensure_table(location, EVENTS)
    assert [committed_version(events, f"spool-{i}") for i in range(3)] == [3, 3, 3]


def test_concurrent_processes_commit_and_duplicate_racers_land_once(
    location: LakeLocation, env: dict[str, str], tmp_path: Path
) -> None:
    """Three processes with their own app_id, plus two racing the same versions of one app_id."""
    ensure_tables(location)
    go = tmp_path / "go"
    base = {"env": env, "rows": 400, "go": str(go), "versions": [1, 2, 3]}
    procs = [spawn({**base, "app_id": f"proc-{i}"}) for i in range(3)]
    procs += [spawn({**base, "app_id": "twin"}) for _ in range(2)]
    go.touch()
    outcomes = []
    for p in procs:
        out, _ = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, out
        outcomes.append(json.loads(out))
    assert outcomes[:3] == [["committed"] * 3] * 3
    # Each of the twin's versions was committed by exactly one of the two racers.
    for v in range(3):
        pair = sorted(o[v] for o in outcomes[3:])
        assert pair[0] == "committed" and pair[1] in ("conceded", "skipped"), outcomes
    assert count(location) == 4 * 3 * 400
    twin = count(location, "events", "starts_with(event_id, 'twin')")
    assert twin == 3 * 400
    table = ensure_table(location, EVENTS)
    assert committed_version(table, "twin") == 3


def test_file_stats_from_the_footer() -> None:
    """Bounds over row groups; a max in microseconds rounds up to the millisecond; float and
    all-null columns get no bounds but keep their null counts."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lake.writer import file_stats

    t0 = dt.datetime(2026, 12, 2, 9, 0, 0, 1500, tzinfo=dt.UTC)
    data = pa.table(
        {
            "t": pa.array([t0, None, t0 + dt.timedelta(seconds=1)], pa.timestamp("us", tz="UTC")),
            "s": ["b", "a", "c"],
            "f": [1.0, float("nan"), 2.0],
            "n": pa.array([None, None, None], pa.int64()),
        }
    )
    footer: list[pq.FileMetaData] = []
    pq.write_table(data, pa.BufferOutputStream(), row_group_size=2, metadata_collector=footer)
    stats = json.loads(file_stats(footer[0]))
    assert stats["numRecords"] == 3
    assert stats["minValues"] == {"t": "2026-12-02T09:00:00.001Z", "s": "a"}
    assert stats["maxValues"] == {"t": "2026-12-02T09:00:01.002Z", "s": "c"}
    assert stats["nullCount"] == {"t": 1, "s": 0, "f": 0, "n": 3}


# -- the LakeWriter contract: the Delta writer and the in-memory fake ------------------------------
#: The rows a writer's table holds (the contract's observable state).
Read = Callable[[str], pl.DataFrame]


@pytest.fixture(params=["delta", "memory"])
def writer(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[LakeWriter, Read]:
    if request.param == "memory":
        memory = MemoryLakeWriter()
        return memory, memory.rows
    location = LakeLocation.from_env({"LAKE_URI": str(tmp_path / "lake")})
    location.check()

    def read(table: str) -> pl.DataFrame:
        frame = pl.from_arrow(snapshot.snapshot(location).datasets[table].to_table())
        assert isinstance(frame, pl.DataFrame)
        return frame

    return DeltaLakeWriter(location, fsync=False), read


def test_writer_lands_a_batch_once_ledger_last(writer: tuple[LakeWriter, Read]) -> None:
    lake, read = writer
    events = enriched_frame(500, seed=20, span_ms=2 * HOUR_MS)
    batch = {  # in the wrong order on purpose: the writer keeps its own
        "ledger": ledger_frame("b1", rows_in=503),
        "quarantine": quarantine_frame(3, seed=20),
        "events": events,
    }
    first = lake.commit("spool-a", 1, batch)
    assert [(c.table, c.outcome, c.rows, c.files) for c in first] == [
        ("events", Outcome.COMMITTED, 500, 2),  # one file per hour partition
        ("quarantine", Outcome.COMMITTED, 3, 1),
        ("ledger", Outcome.COMMITTED, 1, 1),
    ]
    again = lake.commit("spool-a", 1, batch)
    older = lake.commit("spool-a", 0, batch)
    assert {c.outcome for c in again + older} == {Outcome.SKIPPED}
    for table in ("events", "quarantine", "ledger"):
        assert lake.committed_version(table, "spool-a") == 1
        assert lake.committed_version(table, "spool-b") is None
    assert sorted(read("events")["event_id"]) == sorted(events["event_id"])
    assert (read("quarantine").height, read("ledger").height) == (3, 1)


def test_writer_records_the_version_of_an_empty_batch_per_app(
    writer: tuple[LakeWriter, Read],
) -> None:
    lake, read = writer
    lake.commit("spool-a", 1, {"events": enriched_frame(10, seed=21)})
    (empty,) = lake.commit("spool-a", 2, {"events": enriched_frame(0)})
    assert (empty.outcome, empty.rows, empty.files) == (Outcome.COMMITTED, 0, 0)
    assert lake.committed_version("events", "spool-a") == 2
    # Another app's versions are its own: its version 1 lands after spool-a's 2.
    (other,) = lake.commit("spool-b", 1, {"events": enriched_frame(5, seed=22, id_prefix="b")})
    assert other.outcome is Outcome.COMMITTED
    assert read("events").height == 15
    assert lake.committed_version("quarantine", "spool-a") is None  # never named


def test_staged_files_are_invisible_until_committed_and_a_version_had_is_skipped(
    writer: tuple[LakeWriter, Read],
) -> None:
    lake, read = writer
    events = enriched_frame(200, seed=23, span_ms=2 * HOUR_MS)
    staged = lake.stage("events", 1, events)
    later = lake.stage("events", 2, enriched_frame(50, seed=24, id_prefix="l"))
    assert read("events").height == 0
    assert lake.committed_version("events", "spool-a") is None
    committed = lake.commit_staged("spool-a", 1, staged)
    assert (committed.outcome, committed.rows, committed.files) == (Outcome.COMMITTED, 200, 2)
    assert sorted(read("events")["event_id"]) == sorted(events["event_id"])
    # A version the table has by now (another writer landed it while we wrote) is skipped.
    lake.commit("spool-a", 2, {"events": enriched_frame(50, seed=24, id_prefix="l")})
    assert lake.commit_staged("spool-a", 2, later).outcome is Outcome.SKIPPED
    assert read("events").height == 250
    assert lake.committed_version("events", "spool-a") == 2
    with pytest.raises(ValueError, match="unknown"):
        lake.stage("nope", 3, events)


def test_writer_refuses_unknown_tables_and_bad_frames(writer: tuple[LakeWriter, Read]) -> None:
    lake, read = writer
    with pytest.raises(ValueError, match="unknown tables"):
        lake.commit("spool-a", 1, {"events": enriched_frame(5, seed=23), "clicks": pl.DataFrame()})
    with pytest.raises(ValueError, match="lacks columns"):
        lake.commit("spool-a", 1, {"events": enriched_frame(5, seed=23).drop("campaign_id")})
    assert lake.committed_version("events", "spool-a") is None
    assert read("events").height == 0


def _millis_after(ms: int) -> int:
    """The first clock reading in milliseconds past ``ms``: a later commit is stamped after it."""
    while (now := int(time.time() * 1000)) <= ms:
        time.sleep(0.001)
    return now


def test_writer_reads_back_the_window_and_a_batch_of_its_events(
    writer: tuple[LakeWriter, Read],
) -> None:
    lake, _ = writer
    nothing, no_top = lake.recent_events(HOUR_MS)
    assert (nothing.height, no_top) == (0, None)
    assert lake.batch_events(["b1"], (0, 2**62)).height == 0
    old = enriched_frame(300, seed=24, span_ms=3 * HOUR_MS, batch_id="b1")
    lake.commit("spool-a", 1, {"events": old})
    between = _millis_after(int(time.time() * 1000))
    new = enriched_frame(50, seed=25, start_ms=START_MS + HOUR_MS, batch_id="b2", id_prefix="n")
    lake.commit("spool-a", 2, {"events": new})

    both = pl.concat([old, new])
    newest = int(str(both["event_time"].dt.epoch("ms").max()))
    recent, top = lake.recent_events(HOUR_MS)
    assert top == newest
    in_window = both.filter(pl.col("event_time").dt.epoch("ms") >= newest - HOUR_MS)
    assert sorted(recent["event_id"]) == sorted(in_window["event_id"])
    assert recent.columns == ["event_id", "event_time"]

    # The catch-up read: only what was committed since ``between``.
    caught_up, new_top = lake.recent_events(10 * HOUR_MS, between)
    assert sorted(caught_up["event_id"]) == sorted(new["event_id"])
    assert new_top == int(str(new["event_time"].dt.epoch("ms").max()))

    low, high = START_MS, START_MS + HOUR_MS
    of_b1 = lake.batch_events(["b1"], (low, high))
    expected = old.filter(pl.col("event_time").dt.epoch("ms").is_between(low, high))
    assert sorted(of_b1["event_id"]) == sorted(expected["event_id"])


def test_tables_checkpoint_every_ten_commits_also_when_created_by_an_older_version(
    tmp_path: Path,
) -> None:
    """Refreshing a table replays the commits since its last checkpoint: new tables and ones
    created without the property (an older adevents) checkpoint every CHECKPOINT_INTERVAL."""
    legacy = LakeLocation(uri=str(tmp_path / "lake"))
    DeltaTable.create(
        legacy.table_uri(EVENTS.name), EVENTS.schema, partition_by=list(EVENTS.partition_by)
    )
    for location in (legacy, LakeLocation(uri=str(tmp_path / "new"))):
        table = ensure_table(location, EVENTS)
        assert table.metadata().configuration == TABLE_PROPERTIES
        for version in range(1, CHECKPOINT_INTERVAL + 3):
            files = write_files(location, EVENTS, enriched_frame(10, seed=version), version=version)
            commit_files(table, EVENTS, files, {"spool-a": version})
        log = Path(location.table_uri(EVENTS.name)) / "_delta_log"
        assert sorted(p.name for p in log.glob("*.checkpoint.parquet")), sorted(log.iterdir())
        assert committed_version(ensure_table(location, EVENTS), "spool-a") == version
        assert count(location) == 10 * version


@pytest.mark.parametrize("text", [pl.String(), pl.Categorical()], ids=["string", "categorical"])
@pytest.mark.parametrize("unit", ["ms", "us"])
def test_prepare_orders_rows_as_the_sort_on_three_keys(unit: str, text: pl.DataType) -> None:
    """The packed sort key (bucket offset, campaign rank, time in the bucket) orders the events
    exactly as sorting by (hour, campaign_id, event_time) does, across hours and days, with
    campaign ids whose order as text differs from any numbering (the prefix "c1" < "c10" < "c2")
    and, held as a categorical (as the consumer holds them), from their codes' order: codes
    follow the order of first appearance, "c0", "c1", "c2", ..., "c10"."""
    frame = enriched_frame(5_000, seed=7).with_columns(
        campaign_id=pl.format("c{}", pl.int_range(pl.len()) % 23),
        event_time=(
            pl.col("event_time") + pl.duration(minutes=(pl.int_range(pl.len()) * 37) % 3_000)
        ).dt.cast_time_unit(unit),  # type: ignore[arg-type]
    )
    frame = pl.concat([frame, frame.with_columns(event_id=pl.col("event_id") + "-tie")])
    got = prepare(EVENTS, frame.with_columns(pl.col("campaign_id").cast(text)))
    assert got.schema["campaign_id"] == text
    got = got.with_columns(pl.col("campaign_id").cast(pl.String))
    keys = [_BUCKET, "campaign_id", "event_time"]
    want = frame.with_columns(pl.col("event_time").dt.truncate("1h").alias(_BUCKET)).sort(
        keys, maintain_order=True
    )
    assert got.select(keys).equals(want.select(keys))
    assert got["event_id"].equals(want["event_id"])  # rows with equal keys in input order
    assert got.sort("event_id").equals(want.select(got.columns).sort("event_id"))
    assert got[_BUCKET].n_unique() > 24  # several hours, over more than a day
    held = want.select(got.columns).with_columns(pl.col("campaign_id").cast(text))
    assert _packed_order(EVENTS, held, "1h") is not None  # not the fallback


def test_a_prepared_frame_is_written_as_the_frame_it_came_from(location: LakeLocation) -> None:
    """The consumer sorts a group's events on its deciding thread (``prepare``) and its writer
    thread writes them: ``prepare`` returns a prepared frame as it is, and ``write_files``
    writes it exactly as the unprepared frame (same files, same statistics)."""
    frame = enriched_frame(3_000, seed=9, start_ms=START_MS, span_ms=2 * HOUR_MS)
    prepared = prepare(EVENTS, frame)
    assert prepare(EVENTS, prepared) is prepared
    direct = write_files(location, EVENTS, frame, version=1)
    early = write_files(location, EVENTS, prepared, version=2)
    assert [(a.partition_values, a.stats) for a in early.actions] == [
        (a.partition_values, a.stats) for a in direct.actions
    ]
    assert early.rows == direct.rows == 3_000


def test_categorical_columns_land_as_the_strings_of_the_tables_schema(
    location: LakeLocation,
) -> None:
    """The consumer holds its low-cardinality columns as categoricals (IN_FLIGHT_SCHEMA), so
    its files hold them as dictionary pages without a string decoded. Readers see the table's
    strings and the same rows, and the log gets the same statistics, as for the frame held
    in strings."""
    strings = enriched_frame(3_000, seed=5, start_ms=START_MS, span_ms=2 * HOUR_MS)
    held = strings.cast(IN_FLIGHT_SCHEMA)
    assert {n for n, t in held.schema.items() if t == pl.Categorical} == set(CATEGORICAL_COLUMNS)
    as_strings = write_files(location, EVENTS, strings, version=1)
    as_codes = write_files(location, EVENTS, held, version=2)
    assert [a.stats for a in as_codes.actions] == [a.stats for a in as_strings.actions]
    assert len(as_codes.actions) == 2  # one file an hour
    commit_files(ensure_table(location, EVENTS), EVENTS, as_codes, {"codes": 2})
    con = duckdb.connect()
    snapshot.register(con, snapshot.snapshot(location))
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE events)").fetchall())
    assert {types[c] for c in CATEGORICAL_COLUMNS} == {"VARCHAR"}
    read = con.sql("SELECT * EXCLUDE (date, hour) FROM events").pl()
    assert_frame_equal(read.cast(strings.schema).sort("event_id"), strings.sort("event_id"))
