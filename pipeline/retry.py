"""Transient faults: which errors a consumer waits out, the backoff between tries, its status.

A consumer treats a transient fault like a crash it survives: it drops the group in hand
(every commit group is redone exactly, see ``pipeline.consumer``), waits, then recovers
exactly as a restart would. This module only decides *whether* and *how long* to wait, and
tells the world (log and ``state/consumers/``); the consumer does the recovering.

The policy (which errors, the backoff, when ``--once`` gives up, the interruptible wait) is a
tenacity ``Retrying``; the :class:`Supervisor` feeds it the consumer's failures one at a time,
because the consumer's loop (not a wrapped function) decides what one try is.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Final, NoReturn

import tenacity
from tenacity.wait import wait_base

from pipeline.status import HEARTBEAT_SECONDS, ConsumerStatus, State, write_status

log = logging.getLogger("adevents.consumer")

#: errno values meaning "no space": the disk or the user's quota is full.
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values of a filesystem (a shared one above all) that failed for a while.
_LAKE_DOWN: Final = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EROFS,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ECONNRESET,
    }
)
#: Polars and Arrow report I/O errors with the OS message but often without ``errno``.
_NO_SPACE_TEXT: Final = ("no space left on device", "os error 28", "disk quota exceeded")
#: What delta-rs (object_store) and pyarrow's S3 client say when the lake's store failed for
#: a while: no connection, a timeout, a 5xx or throttling. Their errors carry no errno.
_LAKE_DOWN_TEXT: Final = (
    "error sending request",
    "connection refused",
    "connection reset",
    "timed out",
    "timeout",
    "network_connection",
    "service unavailable",
    "slowdown",
    "slow down",
    "internal error",
    "internalerror",
    "status 500",
    "status 502",
    "status 503",
    "status 504",
    "broken pipe",
)
#: Redis replies that say "not now" rather than "never".
_REDIS_BUSY: Final = ("LOADING", "BUSY", "MISCONF", "OOM", "READONLY", "MASTERDOWN", "TRYAGAIN")
#: The first wait of a pause, in seconds; each next one doubles, up to RETRY_MAX_DELAY.
FIRST_DELAY: Final = 0.1


def _redis_not_now() -> tuple[type[Exception], ...]:
    # redis-py maps some "not now" replies to types of its own, without the reply's prefix.
    from redis import exceptions as e

    return (
        e.ClusterDownError,  # and MasterDownError
        e.TryAgainError,
        e.SlotNotCoveredError,
        e.ReadOnlyError,  # a replica being promoted
        e.OutOfMemoryError,  # noeviction at maxmemory: expiry or more memory frees it
    )


_REDIS_NOT_NOW: Final = _redis_not_now()


class DiskFullError(OSError):
    """DATA_DIR's disk has less free space than DISK_MIN_FREE: wait before writing more."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class GaveUpError(RuntimeError):
    """With ``--once``, a transient fault lasted longer than ONCE_RETRY_TIMEOUT."""


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (its nearest existing
    ancestor's, if it does not exist yet)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        return st.f_bavail * st.f_frsize
    raise FileNotFoundError(errno.ENOENT, "no existing directory on the path", str(path))


def check_free_space(path: Path, minimum: int) -> None:
    """Raise :class:`DiskFullError` when ``path``'s filesystem has less than ``minimum`` free."""
    if minimum <= 0:
        return
    free = free_bytes(path)
    if free < minimum:
        raise DiskFullError(
            f"{free} bytes free on DATA_DIR's disk, below DISK_MIN_FREE ({minimum} bytes)"
        )


def classify(exc: BaseException) -> str | None:
    """The status fault ``exc`` is an instance of (see ``pipeline.status.FAULTS``), or None when
    it is not transient (a bug, or bad input the consumer should have isolated)."""
    import redis

    from pipeline.keycache import CacheLostError

    if isinstance(exc, CacheLostError | redis.exceptions.NoScriptError):
        return "redis_lost"  # Redis answered, but without our keys or scripts
    busy = isinstance(exc, _REDIS_NOT_NOW) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(_REDIS_BUSY)
    )
    # A Redis Cluster client cannot even be built while no node answers.
    cluster = isinstance(exc, redis.exceptions.RedisClusterException)
    no_node = cluster and "cannot be connected" in str(exc)
    if busy or no_node or isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return "redis_unavailable"
    # Polars and Arrow wrap some I/O errors in their own types; the OS message survives.
    if any(t in str(exc).lower() for t in _NO_SPACE_TEXT) or (
        isinstance(exc, OSError) and exc.errno in _NO_SPACE
    ):
        return "disk_full"
    if isinstance(exc, OSError) and exc.errno in _LAKE_DOWN:
        return "lake_unavailable"
    return _kafka_fault(exc) or _lake_fault(exc)


def _kafka_fault(exc: BaseException) -> str | None:
    from lake.writer import TxnOverlapError
    from pipeline.kafka import is_retriable

    if isinstance(exc, TxnOverlapError):
        return "partition_moved"
    return "kafka_unavailable" if is_retriable(exc) else None


def _lake_fault(exc: BaseException) -> str | None:
    """``lake_unavailable`` for delta-rs and pyarrow errors of a store that failed for a while,
    and for a commit that kept losing races with other writers (delta-rs retries those)."""
    from deltalake.exceptions import CommitFailedError, DeltaError

    if isinstance(exc, CommitFailedError):
        return "lake_unavailable"
    if isinstance(exc, DeltaError | OSError):
        text = str(exc).lower()
        if any(t in text for t in _LAKE_DOWN_TEXT):
            return "lake_unavailable"
    return None


def equal_jitter(base: float, cap: float) -> wait_base:
    """Exponential backoff with "equal jitter": try n waits ``min(cap, base * 2**(n-1))``, half
    of it fixed and half random.

    The random half keeps consumers that failed together (one Redis for all) from coming back in
    lockstep; the fixed half keeps any wait from being shorter than half its nominal value.
    """
    half = tenacity.wait_exponential(multiplier=base / 2, max=cap / 2)
    return half + tenacity.wait_random_exponential(multiplier=base / 2, max=cap / 2)


class StatusBoard:
    """This consumer's published status: rewritten on every change and by a heartbeat thread."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.state_dir = state_dir
        now = time.time()
        self._status = ConsumerStatus(
            name=name, pid=os.getpid(), state="running", since=now, updated_at=now
        )
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> ConsumerStatus:
        with self._guard:
            return self._status

    def start(self) -> None:
        self.set("running")
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="adevents-status", daemon=True)
            self._thread.start()

    def set(
        self,
        state: State,
        *,
        fault: str | None = None,
        detail: str | None = None,
        attempts: int = 0,
        next_retry_at: float | None = None,
    ) -> None:
        now = time.time()
        with self._guard:
            old = self._status
            changed = (old.state, old.fault) != (state, fault)
            self._status = replace(
                old,
                state=state,
                fault=fault,
                detail=detail,
                since=now if changed else old.since,
                attempts=attempts,
                next_retry_at=next_retry_at,
                updated_at=now,
            )
            status = self._status
        write_status(self.state_dir, status)

    def set_kafka_lag(self, lag: dict[str, int]) -> None:
        """Publish the lag of each assigned partition (``"<topic>/<partition>"`` -> messages)."""
        with self._guard:
            now = time.time()
            self._status = replace(
                self._status, kafka_lag=dict(lag), kafka_lag_at=now, updated_at=now
            )
            status = self._status
        write_status(self.state_dir, status)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._guard:
                self._status = replace(self._status, updated_at=time.time())
                status = self._status
            write_status(self.state_dir, status)

    def stop(self) -> None:
        """The consumer exits cleanly: say so, and stop the heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS)
            self._thread = None
        self.set("stopped")


class Supervisor:
    """Decides, after each failure, whether to wait and try again; logs once per state change.

    One pause (from the first failure to the next :meth:`ok`) is one run of the tenacity policy:
    its attempt count and clock go on across a change of fault, as the status board shows.
    """

    def __init__(
        self,
        board: StatusBoard,
        stop: threading.Event,
        *,
        max_delay: float,
        give_up_after: float | None = None,
    ) -> None:
        self.board = board
        self.stop = stop
        self.max_delay = max_delay
        self.give_up_after = give_up_after
        self.fault: str | None = None
        self._backoff = equal_jitter(FIRST_DELAY, max_delay)
        self._policy = tenacity.Retrying(
            sleep=self._sleep,
            retry=tenacity.retry_if_exception(lambda exc: classify(exc) is not None),
            wait=self._wait,
            stop=(
                tenacity.stop_never
                if give_up_after is None
                else tenacity.stop_after_delay(give_up_after)
            ),
            before_sleep=self._pausing,
            retry_error_callback=self._give_up,
        )
        self._tries: Iterator[tenacity.AttemptManager] | None = None
        self._try: tenacity.AttemptManager | None = None

    def failed(self, exc: BaseException) -> None:
        """Wait before the next try (or until stopped); re-raise what is not transient."""
        if self._tries is None or self._try is None:
            self._tries = iter(self._policy)  # the pause's clock starts at its first failure
            self._try = next(self._tries)
        self._try.retry_state.set_exception((type(exc), exc, exc.__traceback__))
        try:
            self._try = next(self._tries)  # waits, or raises (not transient, or gave up)
        except BaseException:
            self._tries = self._try = None
            raise

    def ok(self) -> None:
        """A try went through: back to running, logged once."""
        if self._try is None:
            return
        state = self._try.retry_state
        log.warning(
            "resumed after %.1fs of %s (%d retries)",
            time.monotonic() - state.start_time,
            self.fault,
            state.attempt_number - 1,
        )
        self._tries = self._try = None
        self.fault = None
        self.board.set("running")

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)  # a stop (SIGTERM) ends the wait at once

    def _wait(self, state: tenacity.RetryCallState) -> float:
        delay = self._backoff(state)
        if self.give_up_after is None:
            return delay
        # The last wait ends at the deadline: --once gives up after ONCE_RETRY_TIMEOUT, not up
        # to RETRY_MAX_DELAY later.
        return min(delay, max(0.0, self.give_up_after - (state.seconds_since_start or 0.0)) + 0.01)

    def _pausing(self, state: tenacity.RetryCallState) -> None:
        exc = _failure(state)
        fault = classify(exc)
        if fault != self.fault:
            log.warning(
                "pausing: %s (%s: %s); retrying with backoff (at most %gs apart)",
                fault,
                type(exc).__name__,
                exc,
                self.max_delay,
            )
            self.fault = fault
        else:
            log.debug("still %s after %d tries: %s", fault, state.attempt_number, exc)
        self.board.set(
            "retrying",
            fault=fault,
            detail=f"{type(exc).__name__}: {exc}",
            attempts=state.attempt_number,
            next_retry_at=time.time() + state.upcoming_sleep,
        )

    def _give_up(self, state: tenacity.RetryCallState) -> NoReturn:
        exc = _failure(state)
        raise GaveUpError(
            f"gave up after {state.seconds_since_start or 0.0:.0f}s of {classify(exc)} "
            f"(ONCE_RETRY_TIMEOUT={self.give_up_after:g}s): {type(exc).__name__}: {exc}"
        ) from exc


def _failure(state: tenacity.RetryCallState) -> BaseException:
    """The exception the try that ``state`` describes failed with."""
    exc = state.outcome.exception() if state.outcome is not None else None
    assert exc is not None, "the supervisor only hands tenacity failures"
    return exc
