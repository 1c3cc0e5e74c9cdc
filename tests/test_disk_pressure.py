"""A full disk pauses the consumer, leaves no partial files, and loses or duplicates nothing.

DATA_DIR is a small tmpfs mounted by the test (root only), so the disk really fills: below
DISK_MIN_FREE the consumer waits before writing (its status says ``disk_full``), and writes that
fail with ENOSPC are cleaned up and retried once space is back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from hardening import (
    ConsumerProcess,
    assert_same_lake,
    base_env,
    copy_spool,
    drained,
    ledger,
    no_leftovers,
    statuses,
    wait_for,
)
from test_crash import build_spool

from pipeline.consumer import Consumer
from pipeline.factory import make_key_cache
from pipeline.settings import Settings
from pipeline.spool import SpoolWriter, atomic_write_bytes
from pipeline.testing import event_table, lake_contents

Lake = tuple[pl.DataFrame, pl.DataFrame]
MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of this test's own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    build_spool(path, files=6, rows=2000)
    return path


@pytest.fixture
def reference(tmp_path: Path, spool: Path) -> Lake:
    work = tmp_path / "reference"
    copy_spool(spool, work)
    s = Settings.from_env(
        {}, data_dir=str(work), fsync=False, max_events_per_second=0, disk_min_free=0
    )
    consumer = Consumer(s, make_key_cache(s))
    consumer.start()
    consumer.run(once=True)
    consumer.close()
    return lake_contents(work)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A file taking all free space of ``path``'s disk but ``leave`` bytes (0: every byte)."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as fh:
        size = max(0, free_bytes(path) - leave)
        if size:
            os.posix_fallocate(fh.fileno(), 0, size)
        if leave == 0:  # the last blocks, one write at a time, until the disk says no
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
    return filler


def test_below_disk_min_free_the_consumer_waits_then_finishes(
    small_disk: Path, spool: Path, reference: Lake, tmp_path: Path
) -> None:
    data = small_disk / "data"
    copy_spool(spool, data)
    filler = fill(small_disk, leave=8 * MIB)  # below DISK_MIN_FREE=16MiB, with room to spare
    consumer = ConsumerProcess(
        base_env(data, DISK_MIN_FREE="16MiB"), tmp_path / "consumer.log"
    ).start()
    try:

        def waiting_for_space() -> bool:
            found = statuses(data)
            return bool(found) and found[0].state == "retrying" and found[0].attempts >= 2

        wait_for(waiting_for_space, "the status to show disk_full")
        (status,) = statuses(data)
        assert status.fault == "disk_full" and "DISK_MIN_FREE" in (status.detail or "")
        assert consumer.running()
        assert ledger(data).is_empty()  # nothing was written meanwhile
        assert not no_leftovers(data)
        filler.unlink()
        wait_for(lambda: drained(data) or not consumer.running(), "the spool to drain")
        assert consumer.terminate() == 0, consumer.text()
    finally:
        consumer.kill()
    text = consumer.text()
    assert text.count("pausing: disk_full") == 1, text
    assert "resumed after" in text and "Traceback" not in text, text
    assert_same_lake(data, reference)
    assert statuses(data)[0].state == "stopped"


def test_writes_failing_with_enospc_are_cleaned_up_and_redone(
    small_disk: Path, spool: Path, reference: Lake, tmp_path: Path
) -> None:
    data = small_disk / "data"
    copy_spool(spool, data)
    consumer = ConsumerProcess(
        base_env(data, DISK_MIN_FREE="0", ADEVENTS_STOP_AT="after_claim:3"),
        tmp_path / "consumer.log",
    ).start()
    try:
        consumer.wait_stopped_at_point()  # two batches landed, the third is decided
        filler = fill(small_disk, leave=0)
        consumer.cont()  # its writes now fail with ENOSPC
        wait_for(lambda: "pausing: disk_full" in consumer.text(), "the consumer to pause")
        assert consumer.running()
        # The paused consumer's status heartbeat still tries its atomic writes: a temporary
        # file may exist for the moment one is being written and removed. A leftover is one
        # that stays (CI once caught a heartbeat's file mid-write here).
        wait_for(lambda: not no_leftovers(data), "the temporary files to go")
        filler.unlink()
        wait_for(lambda: drained(data) or not consumer.running(), "the spool to drain")
        assert consumer.terminate() == 0, consumer.text()
    finally:
        consumer.kill()
    text = consumer.text()
    assert "resumed after" in text and "Traceback" not in text, text
    assert_same_lake(data, reference)
    assert not no_leftovers(data)


def test_spool_writes_on_a_full_disk_leave_no_temp_files(small_disk: Path) -> None:
    incoming = small_disk / "incoming"
    writer = SpoolWriter(incoming, "full")
    filler = fill(small_disk, leave=64 * 1024)
    table = event_table([f"e{i}" for i in range(20_000)], time_ms=0)
    with pytest.raises(OSError) as failed:
        writer.write(table)
    assert failed.value.errno in (errno.ENOSPC, None) or "space" in str(failed.value)
    with pytest.raises(OSError):
        atomic_write_bytes(small_disk / "blob", b"x" * (1 << 20))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "incoming"]
    assert not list(incoming.iterdir())
    filler.unlink()
    assert writer.write(table).exists()  # and once there is space, it writes
