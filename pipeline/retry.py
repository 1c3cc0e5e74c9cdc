"""Transient faults: which errors a consumer waits out, the backoff between tries, its status.

A consumer treats a transient fault like a crash it survives: it drops the group in hand
(every commit group is redone exactly, see ``pipeline.consumer``), waits, then recovers
exactly as a restart would. This module only decides *whether* and *how long* to wait, and
tells the world (log and ``state/consumers/``); the consumer does the recovering.

The backoff is hand-written in one small place (:class:`Backoff`) so that it can be swapped for
stamina or tenacity once the project depends on one; it is a few lines of arithmetic.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

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


_RNG: Final = random.Random()


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
    return _lake_fault(exc)


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


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: try n waits about ``base * 2**n``, at most ``cap``.

    Half of each wait is random ("equal jitter"), so consumers that failed together (one Redis
    for all) do not come back in lockstep, and no wait is shorter than half its nominal value.
    """

    base: float = 0.1
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        nominal = min(self.cap, self.base * 2.0 ** min(attempt, 60))
        jitter = (rng or _RNG).uniform(0, nominal / 2)
        return nominal / 2 + jitter


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
    """Decides, after each failure, whether to wait and try again; logs once per state change."""

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
        self.backoff = Backoff(cap=max_delay)
        self.give_up_after = give_up_after
        self.fault: str | None = None
        self.attempts = 0
        self._since = 0.0

    def failed(self, exc: BaseException) -> None:
        """Wait before the next try (or until stopped); re-raise what is not transient."""
        fault = classify(exc)
        if fault is None:
            raise exc
        now = time.monotonic()
        if fault != self.fault:
            log.warning(
                "pausing: %s (%s: %s); retrying with backoff (at most %gs apart)",
                fault,
                type(exc).__name__,
                exc,
                self.backoff.cap,
            )
            if self.fault is None:
                self._since = now
            self.fault = fault
        else:
            log.debug("still %s after %d tries: %s", fault, self.attempts, exc)
        waited = now - self._since
        if self.give_up_after is not None and waited >= self.give_up_after:
            raise GaveUpError(
                f"gave up after {waited:.0f}s of {fault} (ONCE_RETRY_TIMEOUT="
                f"{self.give_up_after:g}s): {type(exc).__name__}: {exc}"
            ) from exc
        delay = self.backoff.delay(self.attempts)
        if self.give_up_after is not None:
            delay = min(delay, max(0.0, self.give_up_after - waited) + 0.01)
        self.attempts += 1
        self.board.set(
            "retrying",
            fault=fault,
            detail=f"{type(exc).__name__}: {exc}",
            attempts=self.attempts,
            next_retry_at=time.time() + delay,
        )
        self.stop.wait(delay)

    def ok(self) -> None:
        """A try went through: back to running, logged once."""
        if self.fault is None:
            return
        log.warning(
            "resumed after %.1fs of %s (%d retries)",
            time.monotonic() - self._since,
            self.fault,
            self.attempts,
        )
        self.fault, self.attempts = None, 0
        self.board.set("running")
