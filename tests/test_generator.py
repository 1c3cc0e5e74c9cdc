"""Tests of the synthetic event generator: contract, realism, rates, truth, pacing, determinism."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from pyarrow import ipc

from generator import ID_SHAPES, command, model
from generator.runner import GenerateSummary, generate
from pipeline.normalize import normalize
from pipeline.schema import (
    CAMPAIGN_SCHEMA,
    DEVICE_TYPES,
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    KEY_COLUMN,
    TIME_COLUMN,
    Layout,
)
from pipeline.settings import Settings
from pipeline.spool import list_incoming
from pipeline.validate import reason_expr

FIXED_NOW = 1_795_000_000.0  # seconds since the epoch, for reproducible event times


def read_files(data_dir: Path) -> list[pl.DataFrame]:
    """Every spool file in arrival order, read as the consumer does (normalised to the contract)."""
    frames = []
    for path in list_incoming(Layout(str(data_dir)).incoming):
        with pa.OSFile(str(path)) as source:
            table, ignored = normalize(ipc.open_file(source).read_all())
        assert not ignored
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        frames.append(frame)
    return frames


def read_all(data_dir: Path) -> pl.DataFrame:
    frames = read_files(data_dir)
    return pl.concat(
        [f.with_columns(file=pl.lit(i)) for i, f in enumerate(frames)], how="vertical"
    ).with_row_index("arrival")


def first_violation(frame: pl.DataFrame) -> pl.Series:
    """The consumer's row reason (null = valid), before any watermark: the contract's oracle."""
    now_ms = int(time.time() * 1000)
    expr = reason_expr(now_ms=now_ms, watermark_ms=None, window_ms=3_600_000)
    return frame.select(expr).to_series()


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., tuple[GenerateSummary, Path]]:
    """Factory: generate into a fresh data dir under tmp_path; return the summary and the dir."""
    counter = iter(range(1000))

    def go(
        *,
        dup_rate: float = 0.01,
        late_rate: float = 0.0,
        invalid_rate: float = 0.0,
        restamp_rate: float = 0.0,
        dedupe_window: float = 3600.0,
        data_dir: Path | None = None,
        **kwargs: Any,
    ) -> tuple[GenerateSummary, Path]:
        data_dir = data_dir or tmp_path / f"data{next(counter)}"
        settings = Settings(
            data_dir=str(data_dir),
            dup_rate=dup_rate,
            late_rate=late_rate,
            invalid_rate=invalid_rate,
            restamp_rate=restamp_rate,
            dedupe_window=dedupe_window,
        )
        kwargs.setdefault("rate", 0)
        kwargs.setdefault("truth", data_dir / "truth.parquet")
        return generate(settings, **kwargs), data_dir

    return go


@dataclass(frozen=True)
class Big:
    summary: GenerateSummary
    events: pl.DataFrame
    data_dir: Path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """500k events at the default rates, read back."""
    data_dir = tmp_path_factory.mktemp("big")
    settings = Settings(data_dir=str(data_dir))
    summary = generate(
        settings, events=500_000, rate=0, seed=11, batch_size=20_000, truth=data_dir / "t.parquet"
    )
    return Big(summary, read_all(data_dir), data_dir)


def test_files_follow_the_contract(big: Big) -> None:
    summary, events = big.summary, big.events
    assert summary.events == events.height == 500_000
    assert first_violation(events).null_count() == events.height  # INVALID_RATE 0: all valid
    path = list_incoming(Layout(str(big.data_dir)).incoming)[0]
    with pa.OSFile(str(path)) as source:
        schema = ipc.open_file(source).schema
    assert tuple(schema.names) == EVENT_COLUMNS
    for field in schema:
        expected = EVENT_SCHEMA.field(field.name).type
        actual = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        assert actual == expected, field.name
    ids = events.get_column(KEY_COLUMN)
    assert ids.str.len_bytes().is_between(24, 36).all()


def test_duplicates_match_dup_rate_and_retry_delays(
    big: Big,
) -> None:
    summary, events = big.summary, big.events
    assert summary.duplicates / summary.distinct == pytest.approx(0.01, rel=0.1)
    copies = events.group_by(KEY_COLUMN).agg(
        pl.len().alias("n"), pl.col("file").min().alias("first"), pl.col("file").max().alias("last")
    )
    assert copies.get_column("n").max() == 2
    dups = copies.filter(pl.col("n") == 2)
    gap = dups.get_column("last") - dups.get_column("first")
    assert (gap == 0).mean() == pytest.approx(0.25, abs=0.05)  # some in the same batch
    assert gap.to_numpy().max() <= 20  # the rest 1..20 batches later
    # A duplicate is an exact copy of its original.
    assert events.drop("arrival", "file").unique().height == copies.height


def test_funnel_rates_and_references(big: Big) -> None:
    events = big.events
    counts = dict(events.get_column("event_type").value_counts().iter_rows())
    assert 0.01 <= counts["click"] / counts["impression"] <= 0.02
    assert 0.02 <= counts["conversion"] / counts["click"] <= 0.05
    times = events.group_by("event_type", "user_id", "ad_id").agg(pl.col(TIME_COLUMN).min())
    for later, earlier in (("click", "impression"), ("conversion", "click")):
        follow = times.filter(pl.col("event_type") == later).join(
            times.filter(pl.col("event_type") == earlier),
            on=["user_id", "ad_id"],
            how="left",
            suffix="_before",
        )
        assert follow.get_column(f"{TIME_COLUMN}_before").null_count() == 0, later
        assert (follow.get_column(f"{TIME_COLUMN}_before") <= follow.get_column(TIME_COLUMN)).all()


def test_prices_devices_and_countries(big: Big) -> None:
    events = big.events
    by_type = events.group_by("event_type").agg(
        pl.col("cost_micros").min().alias("cost_min"),
        pl.col("revenue_micros").min().alias("revenue_min"),
        pl.col("revenue_micros").max().alias("revenue_max"),
    )
    rows = {r["event_type"]: r for r in by_type.iter_rows(named=True)}
    assert rows["impression"]["cost_min"] > 0 and rows["impression"]["revenue_max"] == 0
    assert rows["click"]["cost_min"] > 0 and rows["click"]["revenue_max"] == 0
    assert rows["conversion"]["revenue_min"] > 0
    assert events.filter(pl.col("event_type") == "conversion")["cost_micros"].max() == 0
    # CPM pricing: one price per campaign for impressions, far below a click's CPC.
    per_campaign = events.filter(pl.col("event_type") == "impression").group_by("campaign_id")
    assert per_campaign.agg(pl.col("cost_micros").n_unique()).get_column("cost_micros").max() == 1
    imp_cost = events.filter(pl.col("event_type") == "impression")["cost_micros"].median()
    click_cost = events.filter(pl.col("event_type") == "click")["cost_micros"].median()
    assert isinstance(imp_cost, float) and isinstance(click_cost, float)
    assert click_cost > 20 * imp_cost
    devices = events.get_column("device_type").value_counts(normalize=True, sort=True)
    assert devices.row(0)[0] == "mobile" and devices.row(0)[1] > 0.5
    assert set(devices.get_column("device_type")) <= set(DEVICE_TYPES)
    countries = events.get_column("country").drop_nulls().value_counts(normalize=True, sort=True)
    assert countries.row(0)[0] == "US" and 0.3 < countries.row(0)[1] < 0.5
    assert countries.height > 20
    assert countries.get_column("country").str.contains(r"^[A-Z]{2}$").all()


def test_campaign_popularity_is_zipf_skewed(big: Big) -> None:
    events = big.events
    counts = events.get_column("campaign_id").value_counts().get_column("count").to_numpy()
    assert counts.max() > 20 * np.median(counts)


def test_truth_matches_the_files(big: Big) -> None:
    summary, events = big.summary, big.events
    truth = pl.read_parquet(big.data_dir / "t.parquet")
    assert truth.columns == ["event_id", "copies", "valid", "late_ms"]
    assert truth.get_column("copies").sum() == events.height == summary.events
    assert truth.height == events.get_column(KEY_COLUMN).n_unique() == summary.distinct
    sent = events.group_by(KEY_COLUMN).agg(pl.len().cast(pl.Int64).alias("sent"))
    joined = truth.join(sent, on=KEY_COLUMN, how="full", coalesce=True)
    assert joined.filter(pl.col("copies") != pl.col("sent")).height == 0
    assert joined.get_column("copies").null_count() == joined.get_column("sent").null_count() == 0


def test_invalid_rows_and_late_events(run: Callable[..., tuple[GenerateSummary, Path]]) -> None:
    summary, data_dir = run(
        events=200_000, seed=3, invalid_rate=0.05, late_rate=0.02, batch_size=5_000
    )
    events = read_all(data_dir)
    truth = pl.read_parquet(data_dir / "truth.parquet")
    assert summary.events == events.height == truth.get_column("copies").sum() == 200_000
    events = events.with_columns(first_violation(events))
    assert events.get_column("reason").is_not_null().mean() == pytest.approx(0.05, rel=0.1)
    assert summary.invalid == events.get_column("reason").is_not_null().sum()
    assert set(events.get_column("reason").drop_nulls()) == set(model.ROW_REASONS)
    # Each row's validity agrees with the truth; every invalid row carries exactly one defect.
    judged = events.group_by(KEY_COLUMN).agg(pl.col("reason").is_null().all().alias("passes"))
    joined = truth.join(judged, on=KEY_COLUMN)
    assert joined.height == truth.height
    assert (joined.get_column("valid") == joined.get_column("passes")).all()
    late = truth.filter(pl.col("late_ms") > 0)
    assert late.height / truth.height == pytest.approx(0.02, rel=0.15)
    late_ms = late.get_column("late_ms").to_numpy()
    assert late_ms.min() >= 60_000 and late_ms.max() > 3_600_000  # some beyond a 1 h window
    # A late event arrives with a time well behind the rest of its file (the last file holds
    # only the rows flushed at the end).
    newest = events.group_by("file").agg(pl.col(TIME_COLUMN).max().alias("newest"))
    behind = (
        events.join(late.filter(pl.col("valid")).select(KEY_COLUMN), on=KEY_COLUMN)
        .join(newest, on="file")
        .filter(pl.col("file") < events.get_column("file").max())
        .select((pl.col("newest") - pl.col(TIME_COLUMN)).dt.total_milliseconds())
        .to_series()
        .drop_nulls()
        .to_numpy()
    )
    assert len(behind) > 0.5 * late.height
    assert behind.min() >= 59_000


@pytest.mark.parametrize("ids", ID_SHAPES)
def test_deterministic_with_seed(
    run: Callable[..., tuple[GenerateSummary, Path]], ids: str
) -> None:
    rates = {"dup_rate": 0.05, "late_rate": 0.01, "invalid_rate": 0.01, "restamp_rate": 0.3}
    clock = lambda: FIXED_NOW  # noqa: E731
    one, dir_one = run(events=60_000, seed=7, batch_size=7_000, clock=clock, ids=ids, **rates)
    two, dir_two = run(events=60_000, seed=7, batch_size=7_000, clock=clock, ids=ids, **rates)
    assert one.restamped == two.restamped > 0
    files_one, files_two = read_files(dir_one), read_files(dir_two)
    assert len(files_one) == len(files_two) == one.files == two.files
    for a, b in zip(files_one, files_two, strict=True):
        assert a.equals(b)
    assert pl.read_parquet(dir_one / "truth.parquet").equals(
        pl.read_parquet(dir_two / "truth.parquet")
    )
    _, dir_three = run(events=10_000, seed=8, ids=ids)
    _, dir_four = run(events=10_000, seed=7, producer="gen2", ids=ids)
    ids = [read_all(d).get_column(KEY_COLUMN) for d in (dir_one, dir_three, dir_four)]
    assert not set(ids[0]) & set(ids[1]) and not set(ids[0]) & set(ids[2])


def test_simulated_clock_ends_now_and_never_runs_ahead(
    run: Callable[..., tuple[GenerateSummary, Path]],
) -> None:
    _, data_dir = run(events=100_000, seed=1, clock=lambda: FIXED_NOW)
    times = read_all(data_dir).get_column(TIME_COLUMN).dt.epoch("ms").to_numpy()
    now_ms = int(FIXED_NOW * 1000)
    # 100k events at EVENTS_PER_SECOND = 50000 span the two seconds before now, each seen
    # after a collection delay of 150 ms on average.
    assert times.max() <= now_ms
    ages = now_ms - np.quantile(times, [0.99, 0.5, 0.01])
    assert 0 < ages[0] < 300 and 1_000 < ages[1] < 1_300 and 2_000 < ages[2] < 2_600
    assert times.min() > now_ms - 5_000
    # With --duration and no --events simulated time starts now, and never passes the wall
    # clock although far more than EVENTS_PER_SECOND are written.
    before = time.time() * 1000
    _, data_dir = run(duration=0.3, seed=2)
    times = read_all(data_dir).get_column(TIME_COLUMN).dt.epoch("ms").to_numpy()
    assert times.min() >= before - 5_000  # the longest collection delays
    assert np.quantile(times, 0.01) >= before - 1_000
    assert times.max() <= time.time() * 1000


def test_campaign_dimension_written_then_reused(
    run: Callable[..., tuple[GenerateSummary, Path]], tmp_path: Path
) -> None:
    _, data_dir = run(events=5_000, campaigns=50)
    path = Layout(str(data_dir)).campaigns
    dimension = pl.read_parquet(path)
    assert dimension.schema == CAMPAIGN_SCHEMA
    assert dimension.height == dimension.get_column("campaign_id").n_unique() == 50
    assert not list(path.parent.glob(".*"))  # no temporary file left
    written = path.read_bytes()
    run(events=5_000, campaigns=10, data_dir=data_dir)
    assert path.read_bytes() == written
    assert set(read_all(data_dir).get_column("campaign_id")) <= set(dimension["campaign_id"])

    own = tmp_path / "own"
    Layout(str(own)).dimensions.mkdir(parents=True)
    pl.DataFrame(
        {
            "campaign_id": ["summer", "winter", "brand"],
            "advertiser_id": ["a1", "a1", "a2"],
            "campaign_name": ["Summer", "Winter", "Brand"],
        }
    ).write_parquet(Layout(str(own)).campaigns)
    run(events=20_000, data_dir=own)
    assert set(read_all(own).get_column("campaign_id")) == {"summer", "winter", "brand"}


def test_real_time_pacing(run: Callable[..., tuple[GenerateSummary, Path]]) -> None:
    began = time.monotonic()
    summary, data_dir = run(rate=20_000, duration=1.0)
    elapsed = time.monotonic() - began
    assert 0.95 <= elapsed < 1.8
    assert summary.events == pytest.approx(20_000, rel=0.05)
    assert 9 <= summary.files <= 12
    names = [p.name for p in Layout(str(data_dir)).incoming.iterdir()]
    assert len(names) == summary.files and all(n.endswith(".arrow") for n in names)
    times = read_all(data_dir).get_column(TIME_COLUMN).dt.epoch("ms").to_numpy()
    assert times.max() <= time.time() * 1000


def test_stop_finishes_cleanly_and_files_appear_complete(
    run: Callable[..., tuple[GenerateSummary, Path]], tmp_path: Path
) -> None:
    stop = threading.Event()
    result: list[tuple[GenerateSummary, Path]] = []
    data_dir = tmp_path / "stopped"
    worker = threading.Thread(
        target=lambda: result.append(
            run(rate=200_000, batch_size=5_000, stop=stop, data_dir=data_dir)
        )
    )
    worker.start()
    incoming = Layout(str(data_dir)).incoming
    seen: set[Path] = set()
    # Stopped once five files were seen (a count, not a time: a loaded machine writes fewer).
    deadline = time.monotonic() + 60
    while len(seen) < 5 and time.monotonic() < deadline:
        for path in list_incoming(incoming):
            if path not in seen:  # every visible file is whole
                with pa.OSFile(str(path)) as source:
                    assert ipc.open_file(source).read_all().num_rows > 0
                seen.add(path)
        time.sleep(0.01)
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    summary, _ = result[0]
    assert len(seen) >= 5
    truth = pl.read_parquet(data_dir / "truth.parquet")
    assert truth.get_column("copies").sum() == summary.events == read_all(data_dir).height


def test_command_flags_override_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(
        ["--events", "30_000", "--rate", "0", "--seed", "4", "--dup-rate", "0", "--truth",
         str(tmp_path / "t.parquet"), "--producer", "cli", "--batch-size", "10000"]
    )  # fmt: skip
    settings = Settings(data_dir=str(tmp_path / "d"), dup_rate=0.5)
    assert command.run(args, settings) == 0
    line = capsys.readouterr().out.strip()
    assert "30000 events" in line and "0 duplicates" in line and "events/s" in line
    events = read_all(tmp_path / "d")
    assert events.height == events.get_column(KEY_COLUMN).n_unique() == 30_000
    assert events.get_column(KEY_COLUMN).str.starts_with("cli-").all()
    assert len(read_files(tmp_path / "d")) == 3

    bad = parser.parse_args(["--events", "10", "--producer", "a-b"])
    assert command.run(bad, settings) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--dup-rate", "1.5"])


def test_hex_strings() -> None:
    values = np.array([0, 1, 0xABCD, 2**48 - 1], dtype=np.int64)
    assert model.hex_strings(b"p-", values, 12).to_pylist() == [
        "p-000000000000",
        "p-000000000001",
        "p-00000000abcd",
        "p-ffffffffffff",
    ]


def test_nothing_to_send_still_writes_truth(
    run: Callable[..., tuple[GenerateSummary, Path]],
) -> None:
    summary, data_dir = run(events=0)
    assert (summary.files, summary.events, summary.distinct) == (0, 0, 0)
    assert pl.read_parquet(data_dir / "truth.parquet").height == 0


def test_sigint_stops_cleanly(
    run: Callable[..., tuple[GenerateSummary, Path]], tmp_path: Path
) -> None:
    before = signal.getsignal(signal.SIGINT)
    data_dir = tmp_path / "interrupted"

    def interrupt_after_the_first_file() -> None:
        deadline = time.monotonic() + 60
        while not list_incoming(Layout(str(data_dir)).incoming) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_after_the_first_file)
    interrupter.start()
    summary, _ = run(rate=100_000, data_dir=data_dir)  # no limit: only the signal ends it
    interrupter.join()
    assert signal.getsignal(signal.SIGINT) is before
    assert summary.events == read_all(data_dir).height > 0
    assert pl.read_parquet(data_dir / "truth.parquet").get_column("copies").sum() == summary.events


def test_each_malformed_row_fails_with_its_intended_reason() -> None:
    rng = np.random.default_rng(5)
    population = model.build_population(rng, ["c1", "c2", "c3"], users=1_000)
    now_ms = int(time.time() * 1000)
    spec = model.BatchSpec(model.event_id_prefix("t", 1), 0, 30_000, now_ms - 2_000, now_ms, 0.2)
    batch = model.generate_batch(rng, population, spec)
    assert batch.frame.columns == list(EVENT_COLUMNS)
    table, _ = normalize(model.to_spool_table(batch.frame, population))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    expected = np.full(spec.size, None, dtype=object)
    expected[batch.invalid] = np.array(model.ROW_REASONS)[batch.reasons]
    assert first_violation(frame).to_list() == expected.tolist()
    assert len(batch.invalid) / spec.size == pytest.approx(0.2, rel=0.05)


def copy_pairs(events: pl.DataFrame) -> pl.DataFrame:
    """One row per duplicated event_id: how far its copy's event_time lies from the original's
    (the copy is the later arrival), both times, and how many rows carry the id."""
    return (
        events.sort("arrival")
        .group_by(KEY_COLUMN)
        .agg(
            pl.len().alias("n"),
            pl.col(TIME_COLUMN).first().alias("original"),
            pl.col(TIME_COLUMN).last().alias("copy"),
        )
        .filter(pl.col("n") > 1)
        .with_columns(shift_ms=(pl.col("copy") - pl.col("original")).dt.total_milliseconds())
    )


@pytest.mark.parametrize(("window", "longest_ms"), [(3600.0, 60_000), (60.0, 6_000)])
def test_restamped_copies_carry_other_times_and_stay_duplicates_in_the_truth(
    run: Callable[..., tuple[GenerateSummary, Path]], window: float, longest_ms: int
) -> None:
    summary, data_dir = run(
        events=100_000,
        seed=5,
        dup_rate=0.2,
        restamp_rate=0.5,
        dedupe_window=window,
        batch_size=5_000,
    )
    events = read_all(data_dir)
    pairs = copy_pairs(events)
    assert pairs.get_column("n").max() == 2
    moved = pairs.filter(pl.col("shift_ms") != 0)
    assert summary.restamped == moved.height
    assert moved.height / pairs.height == pytest.approx(0.5, abs=0.05)
    shift = moved.get_column("shift_ms").to_numpy()
    # Later and earlier copies, about as many of each, all well inside the window.
    assert (shift > 0).mean() == pytest.approx(0.5, abs=0.05)
    assert np.abs(shift).max() <= longest_ms
    assert np.abs(shift).max() > longest_ms / 2
    # Some copies are stamped under a second apart yet fall in another second.
    second = moved.select(
        (pl.col("copy").dt.epoch("ms") // 1000 != pl.col("original").dt.epoch("ms") // 1000)
        & (pl.col("shift_ms").abs() < 1000)
    ).to_series()
    assert second.sum() > 0
    # Apart from event_time, a re-stamped copy is its original.
    assert events.drop("arrival", "file", TIME_COLUMN).unique().height == (
        events.get_column(KEY_COLUMN).n_unique()
    )
    # The truth is by event_id: a re-stamped copy is a duplicate of its original.
    truth = pl.read_parquet(data_dir / "truth.parquet")
    assert truth.height == summary.distinct == events.get_column(KEY_COLUMN).n_unique()
    assert summary.duplicates == events.height - truth.height == pairs.height
    copies = truth.join(moved.select(KEY_COLUMN), on=KEY_COLUMN).get_column("copies")
    assert copies.len() == moved.height and (copies == 2).all()


def test_restamp_rate_zero_keeps_copies_exact(
    run: Callable[..., tuple[GenerateSummary, Path]],
) -> None:
    summary, data_dir = run(events=30_000, seed=5, dup_rate=0.2, batch_size=5_000)
    pairs = copy_pairs(read_all(data_dir))
    assert summary.restamped == 0 and pairs.height > 0
    assert (pairs.get_column("shift_ms") == 0).all()


def test_hex33_ids_are_random_hex_and_match_the_truth(
    run: Callable[..., tuple[GenerateSummary, Path]],
) -> None:
    summary, data_dir = run(events=40_000, seed=9, batch_size=10_000, ids="hex33")
    events = read_all(data_dir)
    ids = events.get_column(KEY_COLUMN)
    assert ids.str.contains(r"^[0-9a-f]{33}$").all()
    assert ids.n_unique() == summary.distinct
    # Random-looking: no shared prefix, every hex digit in every position.
    assert ids.str.slice(0, 8).n_unique() > 0.99 * ids.n_unique()
    for position in (0, 16, 32):
        assert ids.str.slice(position, 1).n_unique() == 16
    truth = pl.read_parquet(data_dir / "truth.parquet")
    assert set(truth.get_column(KEY_COLUMN)) == set(ids)
    with pytest.raises(ValueError, match="id shape"):
        run(events=10, ids="uuid")


def test_command_ids_and_restamp_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(
        ["--events", "20000", "--rate", "0", "--seed", "4", "--dup-rate", "0.1",
         "--restamp-rate", "1", "--ids", "hex33", "--batch-size", "5000"]
    )  # fmt: skip
    assert command.run(args, Settings(data_dir=str(tmp_path / "d"))) == 0
    assert "re-stamped" in capsys.readouterr().out
    events = read_all(tmp_path / "d")
    assert events.get_column(KEY_COLUMN).str.contains(r"^[0-9a-f]{33}$").all()
    pairs = copy_pairs(events)
    assert pairs.height > 0 and (pairs.get_column("shift_ms") != 0).all()
    for bad in (["--restamp-rate", "1.5"], ["--ids", "uuid"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
