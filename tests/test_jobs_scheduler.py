"""The scheduler (no overlap, failures survive) and every CLI form, against a live Delta lake."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from jobs.rollup import full_rollups, read_rollups
from jobs.scheduler import build_scheduler
from jobs.tasks import JobSpec
from jobs.testing import commit_batches, random_batch, wait_for, webhook_server, write_ledger
from lake.location import LakeLocation
from lake.snapshot import snapshot
from lake.tables import EVENTS, open_table
from pipeline.schema import ENRICHED_SCHEMA, Layout
from pipeline.settings import JobSettings, SettingsError, parse_size
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table

HOUR_MS = 3_600_000
NOW_MS = int(time.time() * 1000)
CLOSED_MS = NOW_MS - NOW_MS % HOUR_MS - 2 * HOUR_MS


# -- settings ----------------------------------------------------------------------------------
def test_job_settings_parse_and_name_the_variable_when_invalid() -> None:
    cfg = JobSettings.from_env(
        {"COMPACT_TARGET_BYTES": "64MiB", "ALERT_LATENCY_P95_WARNING": "20ms"}
    )
    assert cfg.compact_target_bytes == 64 * 1024**2 and cfg.alert_latency_p95_warning == 0.02
    assert parse_size("128MB") == 128_000_000
    with pytest.raises(SettingsError, match="COMPACT_TARGET_BYTES='0' is invalid"):
        JobSettings.from_env({"COMPACT_TARGET_BYTES": "0"})
    with pytest.raises(SettingsError, match="ALERT_WEBHOOK_URL"):
        JobSettings.from_env({"ALERT_WEBHOOK_URL": "ftp://x"})
    with pytest.raises(SettingsError, match="ALERT_LAG_WARNING must be at most ALERT_LAG_CRITICAL"):
        JobSettings.from_env({"ALERT_LAG_WARNING": "10m"})
    assert JobSettings.from_env({}, retention_days="7").retention_days == 7


# -- scheduling --------------------------------------------------------------------------------
@pytest.fixture
def running() -> Iterator[Callable[[list[JobSpec]], None]]:
    schedulers = []

    def start(specs: list[JobSpec]) -> None:
        scheduler = build_scheduler(specs)
        scheduler.start()
        schedulers.append(scheduler)

    yield start
    for s in schedulers:
        s.shutdown(wait=True)


def test_a_failing_job_is_logged_and_runs_again_at_its_next_tick(
    running: Callable[[list[JobSpec]], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adevents.jobs.scheduler")
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("disk on fire")
        return "fine"

    running([JobSpec("flaky", 0.1, flaky)])
    assert wait_for(lambda: len(calls) >= 4, timeout=5)
    failures = [r for r in caplog.records if "flaky failed; it runs again" in r.message]
    assert len(failures) == 2 and failures[0].exc_info is not None
    assert any(r.message.startswith("flaky: fine") for r in caplog.records)


def test_a_job_never_overlaps_itself_and_missed_ticks_coalesce(
    running: Callable[[list[JobSpec]], None],
) -> None:
    active = [0]
    peak = [0]
    starts: list[float] = []
    lock = threading.Lock()

    def slow() -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            starts.append(time.monotonic())
        time.sleep(0.35)
        with lock:
            active[0] -= 1
        return "done"

    running([JobSpec("slow", 0.05, slow)])
    time.sleep(1.3)
    assert peak[0] == 1
    # ~25 ticks came and went; only the ones that found the job idle ran, no burst of catch-up
    assert 2 <= len(starts) <= 5


# -- the CLI -----------------------------------------------------------------------------------
def jobs_cli(data: Path, *args: str, env: dict[str, str] | None = None) -> str:
    run_env = {k: v for k, v in os.environ.items() if k != "ADEVENTS_CRASH_AT"}
    run_env.update(DATA_DIR=str(data), FSYNC="false", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "cli", *args, "--log-level", "WARNING"],
        env=run_env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_each_cli_form_runs_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    location = LakeLocation.from_env({"LAKE_URI": str(data / "lake")})
    rng = random.Random(1)
    for b in range(6):
        batch = random_batch(rng, batch=b, rows=40, time_ms=CLOSED_MS + b * 60_000)
        commit_batches(location, [batch], at=datetime.now(UTC))
    assert jobs_cli(data, "rollup", "--once").startswith("rollup commits=0 rows=240 ")
    assert "rows=0 " in jobs_cli(data, "rollup", "--once")
    out = jobs_cli(data, "compact", "--once", env={"COMPACT_MIN_AGE": "0"})
    assert out.startswith("compacted tables=2 files_before=12 files_after=2 clustered_hours=1")
    SpoolWriter(data / "incoming", "late").write(event_table(["x"], time_ms=NOW_MS))
    os.utime(next((data / "incoming").iterdir()), (time.time() - 45, time.time() - 45))
    # Only the lag rule may fire: batches processed slowly on a busy machine must not add one.
    slow_ok = {"ALERT_LATENCY_P95_WARNING": "1h", "ALERT_LATENCY_P95_CRITICAL": "1h"}
    assert "fired=1" in jobs_cli(data, "alerts", "check", env=slow_ok)
    listed = [json.loads(line) for line in jobs_cli(data, "alerts", "list", "--json").splitlines()]
    assert [(a["rule"], a["status"]) for a in listed] == [("consumer_lag", "firing")]
    out = jobs_cli(data, "retention", "--once", env={"VACUUM_RETENTION": "1h"})
    assert out.startswith("retention deleted ") and "events_rows=0" in out


def test_a_bad_lake_setting_exits_2_naming_it(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "staging").mkdir(parents=True)
    (v1 / "events" / "date=2026-12-01").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "ADEVENTS_CRASH_AT"}
    env.update(DATA_DIR=str(tmp_path / "data"), LAKE_URI=str(v1))
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "compact", "--once"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "LAKE_URI" in proc.stderr.decode()


@pytest.mark.timeout(120)
def test_the_scheduler_runs_every_job_against_a_live_lake(tmp_path: Path) -> None:
    """`scheduler` runs while batches are committed to the lake; every job does its part."""
    data = tmp_path / "data"
    location = LakeLocation.from_env({"LAKE_URI": str(data / "lake")})
    env = {k: v for k, v in os.environ.items() if k not in ("ADEVENTS_CRASH_AT", "REDIS_URL")}
    env.update(
        DATA_DIR=str(data),
        FSYNC="false",
        ROLLUP_INTERVAL="300ms",
        COMPACT_INTERVAL="500ms",
        COMPACT_MIN_AGE="0",
        ALERT_INTERVAL="300ms",
        ALERT_WEBHOOK_INTERVAL="200ms",
        RETENTION_INTERVAL="1s",
        VACUUM_RETENTION="1h",
        ALERT_ERROR_RATE_WARNING="0",  # any quarantined row fires the error-rate rule
        ALERT_LATENCY_P95_WARNING="1h",
        ALERT_LATENCY_P95_CRITICAL="1h",
    )
    with webhook_server("ok") as hook:
        env["ALERT_WEBHOOK_URL"] = hook.url
        rng = random.Random(3)
        for b in range(8):
            batch = random_batch(rng, batch=b, rows=50, time_ms=CLOSED_MS + b * 600_000)
            commit_batches(location, [batch], at=datetime.now(UTC))
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "cli", "scheduler", "--log-level", "INFO"],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            write_ledger(
                location,
                [
                    {
                        "batch_id": "bad",
                        "status": "ok",
                        "rows_in": 1,
                        "quarantined": 1,
                        "committed_at": datetime.now(UTC),
                    }
                ],
            )
            layout = Layout(str(data))

            def compacted() -> bool:
                table = open_table(location, EVENTS)
                return len(table.file_uris()) == len(table.partitions())

            def rolled_up() -> bool:
                rows = snapshot(location).datasets["events"].to_table()
                events = pl.DataFrame(rows).lazy().cast(dict(ENRICHED_SCHEMA))  # type: ignore[arg-type]
                return read_rollups(layout, "hour").equals(full_rollups(events)["hour"])

            assert wait_for(compacted, timeout=30), "compaction never ran"
            assert wait_for(rolled_up, timeout=30), "rollups never caught up"
            assert wait_for(lambda: bool(hook.received), timeout=30), "no alert reached the hook"
            assert hook.received[0]["rule"] == "error_rate"
        finally:
            scheduler.send_signal(signal.SIGTERM)
            _, log = scheduler.communicate(timeout=30)
    assert scheduler.returncode == 0, log.decode()
    text = log.decode()
    for job in ("rollup", "compact", "alerts", "retention", "webhook"):
        assert f"INFO adevents.jobs.scheduler: {job}: " in text, job
    assert "Traceback" not in text


def test_jobs_run_below_the_consumer_and_the_api_in_cpu_priority() -> None:
    """JOBS_NICE lowers the jobs' own process (a clustering takes whole cores for minutes)."""
    probe = (
        "import os\n"
        "from jobs.command import lower_priority\n"
        "from pipeline.settings import Settings\n"
        "before = os.nice(0)\n"
        "lower_priority(Settings.from_env({'JOBS_NICE': '7'}))\n"
        "print(os.nice(0) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "7"
    with pytest.raises(SettingsError, match="JOBS_NICE='20' is invalid"):
        JobSettings.from_env({"JOBS_NICE": "20"})
