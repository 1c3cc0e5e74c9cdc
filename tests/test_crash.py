"""Exactly once across kill -9: a real consumer killed at every step lands the same lake."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from s3_server import S3Server

from lake.location import LakeLocation
from pipeline.faults import POINTS
from pipeline.groups import waiting_entries
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table, lake_contents, tables_contents

BASE_MS = int(time.time() * 1000) - 3_600_000


def build_spool(incoming: Path, files: int = 8, rows: int = 400) -> None:
    """Files with duplicates within and across files, invalid rows and late events."""
    writer = SpoolWriter(incoming, "crash")
    rng = random.Random(7)
    for f in range(files):
        ids = [f"e{f:03d}-{i:05d}" for i in range(rows)]
        times = [BASE_MS + f * 60_000 + i for i in range(rows)]
        # ~5 % re-sends of earlier files' events and a few in-file copies; a re-sent event
        # carries its original's event_time, as the contract says
        for i in rng.sample(range(rows), rows // 20):
            src, j = rng.randrange(0, f + 1), rng.randrange(rows)
            ids[i], times[i] = f"e{src:03d}-{j:05d}", BASE_MS + src * 60_000 + j
        countries = ["US"] * rows
        countries[3] = "usa"
        if f == 5:
            times[10] = BASE_MS - 10 * 3_600_000  # late: far behind the watermark
        campaign = ["cmp-0001"] * rows
        campaign[7] = "cmp-unknown"
        writer.write(event_table(ids, time_ms=times, country=countries, campaign_id=campaign))


def consume(data_dir: Path, env: dict[str, str], crash_at: str | None = None) -> int:
    run_env = {**env, "DATA_DIR": str(data_dir), "FSYNC": "false", "MAX_EVENTS_PER_SECOND": "0"}
    # A fresh Redis prefix is rebuilt at start, first sleeping the grace (2 s by default) for
    # other consumers' commits: there are none here.
    run_env["REBUILD_GRACE"] = "50ms"
    # Two 400-row files per commit group: several groups, so every step is visited 4 times.
    run_env["COMMIT_TARGET_ROWS"] = "800"
    run_env.pop("ADEVENTS_CRASH_AT", None)
    if crash_at:
        run_env["ADEVENTS_CRASH_AT"] = crash_at
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "consume", "--once", "--log-level", "WARNING"],
        env=run_env,
        check=False,
        capture_output=True,
        timeout=120,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr.decode())
    return proc.returncode


@pytest.fixture(params=["embedded", "redis"])
def cache_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATA_DIR")}
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
        env["REDIS_KEY_PREFIX"] = request.getfixturevalue("redis_prefix")
    return env


def embedded_env() -> dict[str, str]:
    """This environment without a Redis (so the embedded key cache) or a DATA_DIR."""
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATA_DIR")}


def reference_run(root: Path, spool: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The lake an uninterrupted consumer (embedded key cache) makes of ``spool``.

    Killed runs with either key cache are compared with it: both caches make the same
    decisions, so one uninterrupted run is the answer for both.
    """
    ref = root / f"ref-{spool.name}"
    shutil.copytree(spool, ref / "incoming")
    assert consume(ref, embedded_env()) == 0
    events, quarantine = lake_contents(ref)
    assert len(events) > 0 and len(quarantine) > 0
    assert events["event_id"].is_unique().all()
    return events, quarantine


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, tuple[pl.DataFrame, pl.DataFrame]]:
    """The spool every kill test starts from (copied), and its uninterrupted run: one for the
    module, not one per kill test."""
    root = tmp_path_factory.mktemp("crash")
    build_spool(root / "spool")
    return root / "spool", reference_run(root, root / "spool")


def assert_same_lake(data_dir: Path, reference: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    events, quarantine = lake_contents(data_dir)
    assert events["event_id"].is_unique().all()
    assert_frame_equal(events, reference[0])
    assert_frame_equal(quarantine, reference[1])
    assert not waiting_entries(data_dir / "incoming")
    assert not list((data_dir / "state" / "groups" / "slot-0").iterdir())


#: (point, nth visit, key cache) of every kill. The first visit (first group, nothing landed
#: yet) with both key caches; the fourth (last group: three landed before it, whose keys a
#: restart must know again) with the embedded cache, which has to rebuild them from its
#: snapshot and the lake, while Redis keeps them (the random kills below, and the Redis
#: fault tests, put Redis through later groups). The quarantine sidecar is visited once
#: (one bad file), so it has no fourth visit.
KILLS = [
    pytest.param(point, nth, cache, id=f"{point}-{nth}-{cache}")
    for point in POINTS
    for nth, cache in ((1, "embedded"), (1, "redis"), (4, "embedded"))
    if nth == 1 or point != "after_quarantine_sidecar"
]


@pytest.mark.parametrize(("point", "nth", "cache_env"), KILLS, indirect=["cache_env"])
def test_kill_at_each_step_then_restart(
    tmp_path: Path,
    cache_env: dict[str, str],
    reference: tuple[Path, tuple[pl.DataFrame, pl.DataFrame]],
    point: str,
    nth: int,
) -> None:
    spool, lake = reference
    data = tmp_path / "run"
    shutil.copytree(spool, data / "incoming")
    # Files that reach the quarantine step are rare: add one so that point is visited too.
    (data / "incoming" / "000000000000001-bad-000000000.arrow").write_bytes(b"not arrow")
    code = consume(data, cache_env, crash_at=f"{point}:{nth}")
    assert code == -signal.SIGKILL, f"the consumer never reached {point}"
    assert consume(data, cache_env) == 0
    assert_same_lake_with_bad_file(data, lake)


def assert_same_lake_with_bad_file(
    data_dir: Path, reference: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    assert_same_lake(data_dir, reference)
    # One directory (named by the batch), however often the quarantine was redone after a kill.
    (copy_dir,) = (data_dir / "quarantine" / "files").iterdir()
    assert copy_dir.name.startswith("000000000000001-bad-000000000-")
    assert sorted(p.name for p in copy_dir.iterdir()) == [
        "000000000000001-bad-000000000.arrow",
        "reason.json",
    ]


@pytest.fixture(scope="module")
def s3_reference(
    s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, tuple[pl.DataFrame, pl.DataFrame]]:
    """A spool, and the S3 lake an uninterrupted consumer (embedded key cache) makes of it."""
    root = tmp_path_factory.mktemp("s3-crash")
    build_spool(root / "spool", files=4)
    shutil.copytree(root / "spool", root / "ref" / "incoming")
    env = {**os.environ, **s3.env()}
    env.pop("REDIS_URL", None)
    assert consume(root / "ref", env) == 0
    return root / "spool", tables_contents(LakeLocation.from_env(env))


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_on_an_s3_lake(
    tmp_path: Path,
    s3: S3Server,
    s3_reference: tuple[Path, tuple[pl.DataFrame, pl.DataFrame]],
    point: str,
) -> None:
    """The same steps with the tables on S3 (moto on loopback): a kill between a Parquet PUT
    and its commit, or between two tables' commits, leaves the S3 lake as a clean run does."""
    spool, reference = s3_reference
    env = {**os.environ, **s3.env()}
    env.pop("REDIS_URL", None)
    data = tmp_path / "run"
    shutil.copytree(spool, data / "incoming")
    (data / "incoming" / "000000000000001-bad-000000000.arrow").write_bytes(b"not arrow")
    nth = 1 if point == "after_quarantine_sidecar" else 2  # one bad file: one visit
    assert consume(data, env, crash_at=f"{point}:{nth}") == -signal.SIGKILL
    assert consume(data, env) == 0
    events, quarantine = tables_contents(LakeLocation.from_env(env))
    assert events["event_id"].is_unique().all()
    assert_frame_equal(events, reference[0])
    assert_frame_equal(quarantine, reference[1])
    assert not waiting_entries(data / "incoming")


@pytest.fixture(scope="module")
def big_reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, tuple[pl.DataFrame, pl.DataFrame]]:
    """A 200k-event spool, and its uninterrupted run (one for both key caches)."""
    root = tmp_path_factory.mktemp("random-kills")
    build_spool(root / "bigspool", files=40, rows=5000)
    return root / "bigspool", reference_run(root, root / "bigspool")


@pytest.mark.slow
def test_kill_at_random_moments(
    tmp_path: Path,
    cache_env: dict[str, str],
    big_reference: tuple[Path, tuple[pl.DataFrame, pl.DataFrame]],
) -> None:
    """SIGKILL at random instants (not only at named steps), many times, then finish."""
    spool, reference = big_reference
    data = tmp_path / "run"
    shutil.copytree(spool, data / "incoming")
    rng = random.Random(11)
    # One file per commit group and a cap of 100k events/s: the 200k events take ~2 s of
    # paced groups after start-up, so kills land all along (start-up, resume, any step).
    run_env = {**cache_env, "DATA_DIR": str(data), "FSYNC": "false", "REBUILD_GRACE": "50ms"}
    run_env.update(MAX_EVENTS_PER_SECOND="100000", COMMIT_TARGET_ROWS="5000")
    kills = 0  # kills that struck while work was left: the only ones that test anything
    for _ in range(30):
        if kills >= 3 or not waiting_entries(data / "incoming"):
            break
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "consume", "--once", "--log-level", "ERROR"],
            env=run_env,
        )
        time.sleep(rng.uniform(0.5, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += bool(waiting_entries(data / "incoming"))
        proc.wait()
    assert consume(data, cache_env) == 0
    assert kills >= 1, "no kill struck while work was left"
    assert_same_lake(data, reference)
