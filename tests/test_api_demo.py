"""`adevents demo`: generator, consumer and API together; stops on --duration and on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from api.testing import free_port
from lake.location import LakeLocation
from lake.snapshot import snapshot

#: ``adevents demo`` without the installed script: the same configure/run pair the CLI wires.
DRIVER = """
import argparse, sys
from cli.demo import configure, run
from pipeline.settings import Settings
p = argparse.ArgumentParser(prog="adevents demo")
p.add_argument("--data-dir")
configure(p)
a = p.parse_args(sys.argv[1:])
sys.exit(run(a, Settings.from_env(data_dir=a.data_dir)))
"""


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        argv = [sys.executable, "-c", DRIVER, "--data-dir", str(tmp_path / "data")]
        proc = subprocess.Popen(
            [*argv, "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to the whole group, like a terminal's
            env={**os.environ, "LOG_LEVEL": "WARNING"},
        )
    return proc, port, log


def latest(port: int) -> Any:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/ad_events/latest?limit=1", timeout=5
    ) as r:
        return json.loads(r.read())


def wait_for_events(proc: subprocess.Popen[bytes], port: int, log: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            total = int(latest(port)["total_count"])
            if total > 0:
                return total
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no events landed: {log.read_text()}")


def test_demo_runs_everything_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc, port, log = start(tmp_path)
    try:
        assert wait_for_events(proc, port, log) > 0
        assert f"dashboard at http://127.0.0.1:{port}/" in log.read_text()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "adevents demo: stopped" in text
    assert "files=" in text  # the consumer's summary: it stopped cleanly
    # Nothing of the demo is left running: its process group is empty.
    try:
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_demo_stops_by_itself_after_duration(tmp_path: Path) -> None:
    proc, port, log = start(tmp_path, "--duration", "4")
    try:
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert f"dashboard at http://127.0.0.1:{port}/" in text
    assert "adevents demo: stopped" in text
    # SIGTERM lets the consumer finish the group it holds: no group is left unfinished, and
    # every batch the ledger records is in the events table of the Delta lake under
    # DATA_DIR/lake. How much the generator wrote within the 4 s depends on the machine (under
    # load, possibly nothing): the test above waits for events to land instead.
    data = tmp_path / "data"
    assert not list((data / "state" / "groups").glob("*/*.json"))
    lake = snapshot(LakeLocation.from_env({}, data_dir=str(data))).datasets
    accepted = pc.sum(lake["ledger"].to_table(columns=["accepted"])["accepted"]).as_py() or 0
    assert lake["events"].count_rows() == accepted
