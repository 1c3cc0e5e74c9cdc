"""The consumer end to end, in-process, with both key caches against real files and real Redis."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import ipc

from lake.location import LakeLocation
from lake.snapshot import snapshot
from pipeline.consumer import Consumer, ConsumerLockedError
from pipeline.factory import make_key_cache
from pipeline.groups import waiting_entries
from pipeline.landing import Pacer
from pipeline.schema import CAMPAIGN_SCHEMA, ENRICHED_SCHEMA, LEDGER_SCHEMA, REASONS, Layout
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table

NOW_MS = int(time.time() * 1000)
HOUR_MS = 3_600_000

ConsumerFactory = Callable[..., Consumer]


@pytest.fixture(params=["embedded", "redis"])
def cache_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, cache_kind: str, make_settings: Callable[..., Settings]
) -> Settings:
    if cache_kind == "redis":
        return make_settings(
            redis_url=request.getfixturevalue("redis_url"),
            redis_key_prefix=request.getfixturevalue("redis_prefix"),
        )
    return make_settings()


@pytest.fixture
def new_consumer(settings: Settings) -> Iterator[ConsumerFactory]:
    """Factory of started consumers over the same DATA_DIR; each is closed at the end."""
    made: list[Consumer] = []

    def factory(**changes: Any) -> Consumer:
        s = settings.replace(**changes) if changes else settings
        consumer = Consumer(s, make_key_cache(s))
        consumer.start()
        made.append(consumer)
        return consumer

    yield factory
    for c in made:
        c.close()


def writer(settings: Settings) -> SpoolWriter:
    return SpoolWriter(Layout(settings.data_dir).incoming, "test")


def table(settings: Settings, name: str) -> pl.DataFrame:
    """One Delta table's rows (without the partition columns), in commit order."""
    dataset = snapshot(LakeLocation.from_settings(settings)).datasets[name]
    frame = pl.from_arrow(dataset.to_table())
    assert isinstance(frame, pl.DataFrame)
    # Delta stores timestamps in microseconds; the contract's columns are milliseconds.
    ms = {c: pl.Datetime("ms", "UTC") for c, t in frame.schema.items() if t == pl.Datetime}
    return frame.drop([c for c in ("date", "hour") if c in frame.columns]).cast(ms)  # type: ignore[arg-type]


def events(settings: Settings) -> pl.DataFrame:
    return table(settings, "events")


def quarantine(settings: Settings) -> pl.DataFrame:
    return table(settings, "quarantine")


def ledger(settings: Settings) -> pl.DataFrame:
    return table(settings, "ledger")


def test_duplicates_within_and_across_batches(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    w = writer(settings)
    w.write(event_table(["a", "b", "a", "c"], time_ms=NOW_MS))
    w.write(event_table(["c", "d", "b", "e"], time_ms=NOW_MS))
    w.write(event_table(["a", "a"], time_ms=NOW_MS))  # an all-duplicate batch
    consumer = new_consumer()
    totals = consumer.run(once=True)
    stored = events(settings)
    assert sorted(stored["event_id"]) == ["a", "b", "c", "d", "e"]
    assert (totals.rows_in, totals.accepted, totals.duplicates) == (10, 5, 5)
    assert not waiting_entries(Layout(settings.data_dir).incoming)


def test_first_copy_wins_in_file_then_row_order(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    w = writer(settings)
    w.write(event_table(["x", "x"], time_ms=NOW_MS, ad_id=["first", "second"]))
    w.write(event_table(["x"], time_ms=NOW_MS, ad_id=["third"]))
    new_consumer().run(once=True)
    assert events(settings)["ad_id"].to_list() == ["first"]


def test_duplicates_across_a_restart(settings: Settings, new_consumer: ConsumerFactory) -> None:
    w = writer(settings)
    w.write(event_table(["a", "b"], time_ms=NOW_MS))
    first = new_consumer()
    first.run(once=True)
    first.close()
    w.write(event_table(["b", "c"], time_ms=NOW_MS))
    new_consumer().run(once=True)
    assert sorted(events(settings)["event_id"]) == ["a", "b", "c"]


def test_empty_and_single_row_batches(settings: Settings, new_consumer: ConsumerFactory) -> None:
    w = writer(settings)
    w.write(event_table([], time_ms=NOW_MS))
    w.write(event_table(["solo"], time_ms=NOW_MS))
    new_consumer().run(once=True)
    assert events(settings)["event_id"].to_list() == ["solo"]
    rows = ledger(settings)
    assert sorted(rows["rows_in"].to_list()) == [0, 1]


def test_late_and_future_events_are_quarantined(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    now = int(time.time() * 1000)  # fresh: a module-level "now" ages while other tests run
    w = writer(settings)
    w.write(event_table(["recent"], time_ms=now))
    window_ms = int(settings.dedupe_window * 1000)
    w.write(
        event_table(
            ["late", "edge", "future", "soon"],
            time_ms=[
                now - window_ms - 1,
                now - window_ms,
                now + 6 * 60_000,
                now + 60_000,
            ],
        )
    )
    new_consumer().run(once=True)
    assert sorted(events(settings)["event_id"]) == ["edge", "recent", "soon"]
    q = quarantine(settings)
    assert dict(zip(q["event_id"], q["reason"], strict=True)) == {
        "late": "late_event",
        "future": "future_event",
    }


def test_duplicate_of_an_expired_key_is_late_not_stored_twice(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(dedupe_window=60.0)
    consumer = Consumer(settings, make_key_cache(settings))
    consumer.start()
    w = writer(settings)
    w.write(event_table(["old"], time_ms=NOW_MS - 120_000))
    w.write(event_table(["new"], time_ms=NOW_MS))  # moves the watermark 2 minutes on
    w.write(event_table(["old"], time_ms=NOW_MS - 120_000))  # its key may have expired...
    consumer.run(once=True)
    consumer.close()
    assert sorted(events(settings)["event_id"]) == ["new", "old"]  # ...but it is late, not new
    assert quarantine(settings)["reason"].to_list() == ["late_event"]


def test_unknown_campaign_is_kept_with_null_enrichment(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    dim = pl.DataFrame(
        {
            "campaign_id": ["cmp-0001"],
            "advertiser_id": ["adv-1"],
            "campaign_name": ["Spring"],
            "daily_budget_micros": [10_000_000],
        },
        schema=CAMPAIGN_SCHEMA,
    )
    layout = Layout(settings.data_dir)
    layout.ensure()
    dim.write_parquet(layout.campaigns)
    writer(settings).write(
        event_table(["k", "u"], time_ms=NOW_MS, campaign_id=["cmp-0001", "cmp-nope"])
    )
    new_consumer().run(once=True)
    stored = events(settings).sort("event_id")
    assert stored["advertiser_id"].to_list() == ["adv-1", None]
    assert stored["campaign_name"].to_list() == ["Spring", None]
    assert ledger(settings)["unknown_campaigns"].to_list() == [1]


def test_output_layout_types_sorting_and_compression(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    t0 = datetime(2026, 11, 27, 9, 59, 59, 998_000, tzinfo=UTC)
    base = int(t0.timestamp() * 1000)
    ids = [f"id{i}" for i in range(6)]
    times = [base, base + 1, base - 5, base + 2, base + 3, base + 4]
    campaigns = ["c2", "c1", "c2", "c1", "c2", "c1"]
    now = datetime.fromtimestamp(base / 1000 + 60, UTC)
    s = settings
    consumer = Consumer(s, make_key_cache(s), clock=lambda: now)
    consumer.start()
    writer(s).write(event_table(ids, time_ms=times, campaign_id=campaigns))
    consumer.run(once=True)
    consumer.close()
    root = Path(s.data_dir) / "lake" / "events"
    files = sorted(root.rglob("*.parquet"))
    parts = sorted(str(f.parent.relative_to(root)) for f in files)
    assert parts == ["date=2026-11-27/hour=09", "date=2026-11-27/hour=10"]
    for f in files:
        frame = pl.read_parquet(f, hive_partitioning=False)
        assert frame.columns == ENRICHED_SCHEMA.names()
        assert frame.equals(frame.sort(["campaign_id", "event_time"]))
        meta = pq.ParquetFile(f).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert meta.row_group(0).column(0).statistics is not None
    assert events(s).schema == ENRICHED_SCHEMA
    assert not any(p.name.startswith(".") for p in root.glob("date=*/**/*"))


def test_every_row_reason_lands_in_quarantine_with_source(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    rows = {
        "invalid_event_id": dict(event_id="x" * 129),
        "invalid_event_type": dict(event_type="view"),
        "missing_field": dict(publisher_id=""),
        "invalid_money": dict(cost_micros=-1),
        "invalid_country": dict(country="usa"),
        "invalid_device_type": dict(device_type="phone"),
        "future_event": dict(event_time=NOW_MS + 3_600_000),
    }
    ids = [f"r-{r}" for r in rows]
    columns: dict[str, list[Any]] = {}
    base = event_table(ids, time_ms=NOW_MS).to_pydict()
    for i, override in enumerate(rows.values()):
        for k, v in override.items():
            base[k][i] = v
    columns = {k: v for k, v in base.items()}
    columns["event_time"] = [
        v if isinstance(v, int) else int(v.timestamp() * 1000) for v in columns["event_time"]
    ]
    path = writer(settings).write(
        event_table(columns.pop("event_id"), time_ms=columns.pop("event_time"), **columns)
    )
    new_consumer().run(once=True)
    q = quarantine(settings)
    assert sorted(q["reason"].to_list()) == sorted(rows)
    assert set(q["source_file"]) == {path.name}
    assert q.filter(pl.col("reason") == "invalid_money")["cost_micros"].to_list() == [-1]
    assert events(settings).is_empty()
    led = ledger(settings).row(0, named=True)
    for reason in REASONS:
        assert led[f"quarantined_{reason}"] == (1 if reason in rows else 0)


def _write_raw(settings: Settings, name: str, data: bytes) -> Path:
    incoming = Layout(settings.data_dir).incoming
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / name
    path.write_bytes(data)
    return path


def _ipc_stream_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write(table)
    return bytes(sink.getvalue().to_pybytes())


def _ipc_file_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write(table)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize(
    ("content", "reason", "words"),
    [
        (lambda: b"", "unreadable_file", "Arrow IPC"),
        (lambda: b"this is not arrow at all", "unreadable_file", "Arrow IPC"),
        (
            lambda: _ipc_file_bytes(event_table(["a"], time_ms=NOW_MS))[:-40],
            "unreadable_file",
            "Arrow IPC",
        ),
        (
            lambda: _ipc_stream_bytes(event_table(["a"], time_ms=NOW_MS)),
            "unreadable_file",
            "Arrow IPC",
        ),
        (
            lambda: _ipc_file_bytes(event_table(["a"], time_ms=NOW_MS).drop_columns(["ad_id"])),
            "schema_mismatch",
            "ad_id",
        ),
        (
            lambda: _ipc_file_bytes(
                event_table(["a"], time_ms=NOW_MS).set_column(9, "cost_micros", pa.array([1.5]))
            ),
            "schema_mismatch",
            "cost_micros",
        ),
    ],
    ids=["empty", "garbage", "truncated", "stream-format", "missing-column", "float-money"],
)
def test_bad_files_are_moved_aside_with_a_reason(
    settings: Settings,
    new_consumer: ConsumerFactory,
    content: Callable[[], bytes],
    reason: str,
    words: str,
) -> None:
    _write_raw(settings, "000000000000001-bad-000000001.arrow", content())
    writer(settings).write(event_table(["good"], time_ms=NOW_MS))
    new_consumer().run(once=True)
    layout = Layout(settings.data_dir)
    (moved,) = layout.quarantine_files.glob("*/000000000000001-bad-000000001.arrow")
    assert moved.parent.name.startswith("000000000000001-bad-000000001-")  # the batch_id
    import json

    sidecar = json.loads((moved.parent / "reason.json").read_text())
    assert sidecar["file"] == moved.name
    assert sidecar["reason"] == reason
    assert words in sidecar["message"]
    assert events(settings)["event_id"].to_list() == ["good"]  # a bad file never stops the consumer
    assert set(ledger(settings)["status"]) == {"ok", reason}


def test_ledger_conserves_rows(settings: Settings, new_consumer: ConsumerFactory) -> None:
    w = writer(settings)
    for b in range(5):
        ids = [f"{b}-{i}" for i in range(50)] + [f"{b - 1}-{i}" for i in range(10)]
        w.write(event_table(ids, time_ms=NOW_MS, country=["US"] * 55 + ["xx"] * 5, extra=[1] * 60))
    new_consumer().run(once=True)
    led = ledger(settings)
    assert len(led) == 5
    assert (led["rows_in"] == led["accepted"] + led["duplicates"] + led["quarantined"]).all()
    by_reason = led.select(pl.sum_horizontal(f"quarantined_{r}" for r in REASONS)).to_series()
    assert (by_reason == led["quarantined"]).all()
    assert led["ignored_columns"].to_list() == [1] * 5
    assert led.schema == LEDGER_SCHEMA
    assert (led["lag_ms"] >= 0).all() and (led["processing_ms"] > 0).all()
    assert int(led["accepted"].sum()) == len(events(settings))


def test_keep_processed_moves_inputs(settings: Settings, new_consumer: ConsumerFactory) -> None:
    path = writer(settings).write(event_table(["a"], time_ms=NOW_MS))
    new_consumer(keep_processed=True).run(once=True)
    assert (Layout(settings.data_dir).processed / path.name).exists()


def test_second_embedded_consumer_is_refused(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    first = Consumer(settings, make_key_cache(settings))
    first.start()
    second = Consumer(settings, make_key_cache(settings))
    with pytest.raises(ConsumerLockedError, match="already running"):
        second.start()
    first.close()


def test_throughput_cap(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_events_per_second=4000)
    w = writer(settings)
    for b in range(4):
        w.write(event_table([f"{b}-{i}" for i in range(1000)], time_ms=NOW_MS))
    consumer = Consumer(settings, make_key_cache(settings))
    consumer.start()
    started = time.perf_counter()
    consumer.run(once=True)
    consumer.close()
    assert time.perf_counter() - started >= 0.7  # 4000 events at 4000/s: ~1 s, never much less


class FakeTime:
    """A clock that moves only when told, or when slept on."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept += seconds
        self.now += seconds

    def pacer(self, cap: int) -> Pacer:
        return Pacer(cap, clock=self.clock, sleep=self.sleep)


def test_the_pacer_sleeps_what_a_groups_work_left_of_its_share() -> None:
    """A group's share of the cap (rows / cap) counts the time spent on it: the pacer sleeps
    only the rest. Sleeping a whole share after each landing held a consumer able to land
    ~730k events/s at ~400k under the default cap of 1M events/s."""
    t = FakeTime()
    pacer = t.pacer(1_000_000)
    pacer.landed(200_000)  # the first group: when its work began is unknown, a whole share
    assert t.slept == pytest.approx(0.2)
    for work, sleeps in ((0.15, 0.05), (0.21, 0.0), (0.1, 0.1), (0.0, 0.2)):
        t.slept = 0.0
        t.now += work
        pacer.landed(200_000)
        assert t.slept == pytest.approx(sleeps)
    t.now += 60.0  # idle: no credit builds up
    pacer.landed(200_000)
    t.slept = 0.0
    t.now += 0.01
    pacer.landed(200_000)
    assert t.slept == pytest.approx(0.19)


@pytest.mark.parametrize("seed", range(5))
def test_the_pacer_holds_the_cap_and_a_group_waits_only_for_its_own_share(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cap = 1_000_000
    for slowest in (0.05, 0.5):  # a consumer faster than the cap, then one around it
        t = FakeTime()
        pacer = t.pacer(cap)
        pacer.landed(100_000)
        start, landed, paced = t.now, 0, 0.0
        sizes, works = rng.integers(1, 400_000, 500), rng.uniform(0, slowest, 500)
        for rows, work in zip(sizes, works, strict=True):
            t.now += work
            pacer.landed(int(rows))
            landed += int(rows)
            paced += max(work, rows / cap)
            # The cap holds at every landing, on average since the first.
            assert landed <= cap * (t.now - start) * (1 + 1e-9)
        # Each group took its work or its share, whichever is longer: no more.
        assert t.now - start == pytest.approx(paced)


def test_redis_loss_between_batches_is_rebuilt_without_duplicates(
    make_settings: Callable[..., Settings], redis_server: Any
) -> None:
    import redis

    settings = make_settings(redis_url=redis_server.url)
    consumer = Consumer(settings, make_key_cache(settings))
    consumer.start()
    w = writer(settings)
    w.write(event_table(["a", "b"], time_ms=NOW_MS))
    consumer.run(once=True)
    redis.Redis.from_url(redis_server.url).flushall()
    w.write(event_table(["b", "c"], time_ms=NOW_MS))
    consumer.run(once=True)
    redis_server.restart()  # comes back empty, and without the Lua scripts
    w.write(event_table(["a", "c", "d"], time_ms=NOW_MS))
    consumer.run(once=True)
    consumer.close()
    assert sorted(events(settings)["event_id"]) == ["a", "b", "c", "d"]
    assert int(ledger(settings)["duplicates"].sum()) == 3


def test_stale_temp_files_of_dead_producers_are_swept(
    settings: Settings, new_consumer: ConsumerFactory
) -> None:
    """A producer killed mid-write leaves ``.<name>.tmp``; after an hour the consumer removes it.

    A fresh temp file (a live writer), a link and a directory named like one stay untouched.
    """
    spool = writer(settings)
    incoming = spool.incoming
    hour_ago = time.time() - 3601
    stale, fresh = incoming / ".1-dead-000000001.arrow.tmp", incoming / ".2-live.arrow.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    link, directory = incoming / ".3-link.tmp", incoming / ".4-dir.tmp"
    link.symlink_to(stale)
    directory.mkdir()
    for path in (stale, link, directory):
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    spool.write(event_table(["a"], time_ms=NOW_MS))
    new_consumer().run(once=True)
    assert not stale.exists()
    assert fresh.exists() and link.is_symlink() and directory.is_dir()
    assert events(settings)["event_id"].to_list() == ["a"]
