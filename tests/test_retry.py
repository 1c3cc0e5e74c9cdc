"""The pure parts of riding out faults: which errors are transient, the backoff, giving up."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import polars as pl
import pytest
import redis
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from pipeline.keycache import CacheLostError
from pipeline.redis_cache import ExpiredSliceError
from pipeline.retry import (
    DiskFullError,
    GaveUpError,
    StatusBoard,
    Supervisor,
    check_free_space,
    classify,
    equal_jitter,
)
from pipeline.status import FAULTS, read_statuses


@pytest.mark.parametrize(
    ("exc", "fault"),
    [
        (redis.ConnectionError("Connection refused"), "redis_unavailable"),
        (redis.TimeoutError("timed out"), "redis_unavailable"),
        (redis.BusyLoadingError("LOADING Redis is loading"), "redis_unavailable"),
        (redis.ResponseError("MISCONF unable to persist"), "redis_unavailable"),
        (redis.exceptions.ReadOnlyError("You can't write against a replica"), "redis_unavailable"),
        (redis.exceptions.ClusterDownError("The cluster is down"), "redis_unavailable"),
        (redis.exceptions.OutOfMemoryError("command not allowed"), "redis_unavailable"),
        (redis.exceptions.NoScriptError("NOSCRIPT No matching script"), "redis_lost"),
        (CacheLostError("lost the rebuild lock during the rebuild"), "redis_lost"),
        (ExpiredSliceError("slices expired"), "redis_lost"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_full"),
        (DiskFullError("below DISK_MIN_FREE"), "disk_full"),
        (pl.exceptions.ComputeError("underlying IO error: No space left on device"), "disk_full"),
        (OSError(errno.EIO, "Input/output error"), "lake_unavailable"),
        (OSError(errno.ESTALE, "Stale file handle"), "lake_unavailable"),
        (redis.ResponseError("ERR wrong number of arguments"), None),
        (OSError(errno.ENAMETOOLONG, "File name too long"), None),
        (ValueError("a bug"), None),
    ],
)
def test_classify(exc: BaseException, fault: str | None) -> None:
    assert classify(exc) == fault
    assert fault is None or fault in FAULTS


@given(attempt=st.integers(1, 10_000), cap=st.floats(0.01, 3600))
def test_backoff_grows_is_capped_and_jittered(attempt: int, cap: float) -> None:
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    nominal = min(cap, 0.1 * 2.0 ** min(attempt - 1, 60))
    assert nominal / 2 <= equal_jitter(0.1, cap)(state) <= nominal


def test_free_space_check(tmp_path: Path) -> None:
    check_free_space(tmp_path, 0)  # 0 = no check
    check_free_space(tmp_path, 1)
    with pytest.raises(DiskFullError) as exc:
        check_free_space(tmp_path, 1 << 62)
    assert classify(exc.value) == "disk_full"


def test_supervisor_publishes_each_retry_and_gives_up_with_once(tmp_path: Path) -> None:
    board = StatusBoard(tmp_path, "c1")
    board.start()
    stop = threading.Event()
    stop.set()  # no waiting in this test: wait() returns at once
    supervisor = Supervisor(board, stop, max_delay=1.0, give_up_after=None)
    supervisor.failed(redis.ConnectionError("refused"))
    supervisor.failed(redis.ConnectionError("refused"))
    (status,) = read_statuses(tmp_path)
    assert (status.state, status.fault, status.attempts) == ("retrying", "redis_unavailable", 2)
    assert status.next_retry_at is not None
    supervisor.failed(CacheLostError("lost"))  # a new fault: a new state, attempts go on
    assert read_statuses(tmp_path)[0].fault == "redis_lost"
    supervisor.ok()
    assert read_statuses(tmp_path)[0].state == "running"
    with pytest.raises(ValueError, match="a bug"):
        supervisor.failed(ValueError("a bug"))
    once = Supervisor(board, stop, max_delay=1.0, give_up_after=0.0)
    with pytest.raises(GaveUpError, match="ONCE_RETRY_TIMEOUT"):
        once.failed(redis.ConnectionError("refused"))
    board.stop()
    assert read_statuses(tmp_path)[0].state == "stopped"


def test_a_pause_is_logged_when_it_starts_and_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    board = StatusBoard(tmp_path, "c1")
    stop = threading.Event()
    stop.set()
    supervisor = Supervisor(board, stop, max_delay=1.0)
    with caplog.at_level(logging.WARNING, logger="adevents.consumer"):
        for _ in range(5):
            supervisor.failed(redis.ConnectionError("refused"))
        assert read_statuses(tmp_path)[0].attempts == 5
        supervisor.ok()
        supervisor.ok()  # running already: nothing more to say
    pausing, resumed = (r.getMessage() for r in caplog.records)
    assert pausing.startswith("pausing: redis_unavailable")
    assert resumed.startswith("resumed after") and resumed.endswith("(5 retries)")
    supervisor.failed(redis.ConnectionError("refused"))  # a new pause counts from one again
    assert read_statuses(tmp_path)[0].attempts == 1


class _RecordedWaits(threading.Event):
    """A stop event that records the waits asked of it and returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


def test_once_waits_no_longer_than_the_time_left(tmp_path: Path) -> None:
    """With ``--once``, no wait reaches past ONCE_RETRY_TIMEOUT, whatever RETRY_MAX_DELAY is."""
    stop = _RecordedWaits()
    supervisor = Supervisor(StatusBoard(tmp_path, "c1"), stop, max_delay=3600.0, give_up_after=5.0)
    for _ in range(20):  # the 20th nominal wait would be 3600 s
        supervisor.failed(redis.ConnectionError("refused"))
    assert len(stop.waits) == 20
    assert max(stop.waits) <= 5.01
