"""Many machines, one lake: consumers with their own spools share one Redis and one S3 table.

Each consumer process has its own DATA_DIR (its spool and local state), standing in for a
machine with no shared filesystem. The same events are sent to several spools; consumers are
killed with SIGKILL and restarted; at the end every event is in ``events`` exactly once, every
rejected row of every spool file once in ``quarantine``, and the ledger conserves rows.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from s3_server import S3Server

from lake.location import LakeLocation
from lake.snapshot import snapshot
from pipeline.groups import waiting_entries
from pipeline.spool import SpoolWriter
from pipeline.testing import event_table

MACHINES = 3
ROWS = 300
BASE_MS = int(time.time() * 1000) - 1_800_000


def build_spools(root: Path) -> tuple[set[str], int]:
    """Each event goes to one to three machines' spools; one row per file is invalid.

    Returns (every valid event id, number of files, each with one rejected row).
    """
    rng = random.Random(3)
    writers = [SpoolWriter(root / f"m{m}" / "incoming", f"m{m}") for m in range(MACHINES)]
    ids: set[str] = set()
    rejected = 0
    per_machine: list[list[tuple[str, int]]] = [[] for _ in range(MACHINES)]
    for n in range(MACHINES * 6 * ROWS):
        event = (f"ev-{n:06d}", BASE_MS + n)
        ids.add(event[0])
        for m in rng.sample(range(MACHINES), rng.choice([1, 2, 3])):
            per_machine[m].append(event)
    for m, events in enumerate(per_machine):
        rng.shuffle(events)
        for start in range(0, len(events), ROWS):
            chunk = events[start : start + ROWS]
            countries = ["US"] * len(chunk)
            bad = f"bad-m{m}-{start}"
            writers[m].write(
                event_table(
                    [e for e, _ in chunk] + [bad],
                    time_ms=[t for _, t in chunk] + [BASE_MS],
                    country=[*countries, "usa"],
                )
            )
            rejected += 1
    return ids, rejected


def consumer(root: Path, m: int, env: dict[str, str], *, once: bool) -> subprocess.Popen[bytes]:
    run_env = {
        **env,
        "DATA_DIR": str(root / f"m{m}"),
        "CONSUMER_NAME": f"m{m}",
        "FSYNC": "false",
        "MAX_EVENTS_PER_SECOND": "0",
        "COMMIT_TARGET_ROWS": str(2 * ROWS),
        "COMMIT_INTERVAL": "200ms",
    }
    args = [sys.executable, "-m", "cli", "consume", "--log-level", "ERROR"]
    return subprocess.Popen(args + (["--once"] if once else []), env=run_env)


@pytest.mark.slow
def test_three_machines_one_s3_lake_exactly_once_across_kills(
    tmp_path: Path, s3: S3Server, redis_url: str, redis_prefix: str
) -> None:
    ids, files = build_spools(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "LAKE_URI")}
    env.update(s3.env(), REDIS_URL=redis_url, REDIS_KEY_PREFIX=redis_prefix)
    rng = random.Random(5)
    procs = {m: consumer(tmp_path, m, env, once=False) for m in range(MACHINES)}
    try:
        for _ in range(6):  # kills land wherever each process happens to be
            time.sleep(rng.uniform(0.5, 1.5))
            m = rng.randrange(MACHINES)
            procs[m].send_signal(signal.SIGKILL)
            procs[m].wait()
            procs[m] = consumer(tmp_path, m, env, once=False)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    # Drain: every machine finishes what is left (its intents first), one after the other.
    for m in range(MACHINES):
        assert consumer(tmp_path, m, env, once=True).wait(timeout=300) == 0
        assert not waiting_entries(tmp_path / f"m{m}" / "incoming")

    location = LakeLocation.from_env(env)
    snap = snapshot(location)
    events = pl.from_arrow(snap.datasets["events"].to_table(columns=["event_id"]))
    quarantine = pl.from_arrow(snap.datasets["quarantine"].to_table(columns=["event_id"]))
    ledger = pl.from_arrow(snap.datasets["ledger"].to_table())
    assert isinstance(events, pl.DataFrame) and isinstance(quarantine, pl.DataFrame)
    assert isinstance(ledger, pl.DataFrame)
    assert events["event_id"].is_unique().all()
    assert set(events["event_id"]) == ids
    assert len(quarantine) == files
    assert quarantine["event_id"].is_unique().all()
    # One ledger row per spool file, each conserving its rows.
    assert len(ledger) == files
    assert ledger["batch_id"].is_unique().all()
    conserved = ledger["accepted"] + ledger["duplicates"] + ledger["quarantined"]
    assert (ledger["rows_in"] == conserved).all()
    assert ledger["accepted"].sum() == len(ids)
    assert ledger["quarantined"].sum() == files
