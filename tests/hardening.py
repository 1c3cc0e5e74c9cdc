"""Helpers of the hardening tests: long-running consumer processes, condition waits, lake checks.

No test here counts on the machine's speed: every wait is for a condition (a file gone, a
status published, a log line), with a generous timeout that only bounds a failing run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from lake.location import LakeLocation
from lake.snapshot import snapshot
from pipeline.groups import waiting_entries
from pipeline.status import ConsumerStatus, read_statuses
from pipeline.testing import lake_contents

#: Upper bound of any wait for a condition; reached only when something is broken.
TIMEOUT_S = 120.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def drained(data: Path) -> bool:
    """Nothing waits in incoming/ (claimed or not) and no commit group is unfinished."""
    groups = data / "state" / "groups"
    return not waiting_entries(data / "incoming") and (
        not groups.exists() or not any(groups.glob("*/*.json"))
    )


def statuses(data: Path) -> list[ConsumerStatus]:
    return read_statuses(data / "state")


def lake_table(data: Path, name: str) -> pl.DataFrame:
    """One Delta table of DATA_DIR's default lake, as committed now (empty before the first)."""
    dataset = snapshot(LakeLocation.from_env({}, data_dir=str(data))).datasets[name]
    frame = pl.from_arrow(dataset.to_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def ledger(data: Path) -> pl.DataFrame:
    return lake_table(data, "ledger")


def base_env(data: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADEVENTS_") and k not in ("REDIS_URL", "DATA_DIR")
    }
    return {
        **env,
        "DATA_DIR": str(data),
        "FSYNC": "false",
        "MAX_EVENTS_PER_SECOND": "0",
        "POLL_INTERVAL": "20ms",
        "REBUILD_GRACE": "50ms",
        "RETRY_MAX_DELAY": "500ms",
        "DISK_MIN_FREE": "0",
        "LOG_LEVEL": "INFO",
        # One spool file per commit group, so that stop and crash points count files.
        "COMMIT_TARGET_ROWS": "1",
        **extra,
    }


@dataclass
class ConsumerProcess:
    """One real ``adevents consume`` process, its stderr kept in a file."""

    env: dict[str, str]
    log: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ConsumerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "consume", *self.args],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_stopped_at_point(self) -> None:
        """Wait until the process stopped itself (ADEVENTS_STOP_AT)."""
        assert self.proc is not None

        def stopped() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, "the consumer exited instead of stopping\n" + (
                self.text()
            )
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            return stat.rsplit(")", 1)[-1].split()[0] == "T"

        wait_for(stopped, "the consumer to reach its stop point")

    def cont(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self, timeout: float = TIMEOUT_S) -> int:
        """SIGTERM once its handler is installed; its exit code."""
        assert self.proc is not None
        from test_scaleout import wait_catches_sigterm

        wait_catches_sigterm(self.proc)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def assert_same_lake(data: Path, reference: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    """The lake equals the reference run's: nothing lost, nothing duplicated, nothing left."""
    events, quarantine = lake_contents(data)
    assert events["event_id"].is_unique().all()
    assert_frame_equal(events, reference[0])
    assert_frame_equal(quarantine, reference[1])
    assert drained(data)
    rows = ledger(data)
    assert rows["source_file"].is_unique().all() and rows["batch_id"].is_unique().all()
    assert (rows["rows_in"] == rows["accepted"] + rows["duplicates"] + rows["quarantined"]).all()


def consume_refused(
    env: dict[str, str], timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """``adevents consume --once`` that must refuse to start: exit 2 (a setting or another
    consumer is in the way), without a traceback. Its output, for the message checks."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "consume", "--once"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def copy_spool(spool: Path, data: Path) -> None:
    shutil.copytree(spool, data / "incoming", dirs_exist_ok=True)


def no_leftovers(root: Path) -> list[str]:
    """Temporary or partial files anywhere under ``root`` (there should be none)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            if name.endswith((".tmp", ".partial")):
                out.append(os.path.join(dirpath, name))
    return out
