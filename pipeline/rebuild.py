"""Rebuilding a key cache from the lake: one orchestration for every cache, one rebuilder at a time.

A cache that lost its state (a flushed Redis, an embedded cache's unreadable files, a first
start) is made whole again from the events table through its primitives
(:class:`pipeline.keycache.RebuildableKeyCache`): replace its content with the keys of the
dedupe window, re-add those committed while that read ran, then open a new epoch. Claims made
before the loss are never committed on: the consumer checks ``valid`` before its events commit
and decides such a group again, which keeps a rebuild exact whatever the timing.
"""

from __future__ import annotations

import logging
import time
from typing import Final, Protocol

from pipeline import faults
from pipeline.keycache import CacheLostError, Loader, RebuildableKeyCache

log = logging.getLogger("adevents.keycache")
#: How long a consumer waits for another one's rebuild before giving up (and retrying).
REBUILD_WAIT_S: Final = 3600.0
#: How often a waiting consumer looks whether the rebuild it waits for is done.
POLL_S: Final = 0.1


class RebuildLock(Protocol):
    """The lock of a cache shared by several consumers: one of them rebuilds, the others wait.

    Guarantees: at most one holder at a time while it is held; :meth:`held` tells a holder
    that lost it meanwhile (it expired, or the store that keeps it lost it).
    """

    def acquire(self) -> object | None:
        """Take the lock without waiting: a token, or None when another holds it."""

    def held(self, token: object) -> bool:
        """True while ``token`` still holds the lock."""

    def release(self, token: object) -> None:
        """Give the lock up (a no-op for a token that lost it)."""


def ensure(
    cache: RebuildableKeyCache,
    loader: Loader,
    *,
    lock: RebuildLock | None = None,
    grace_s: float = 0.0,
    wait_s: float = REBUILD_WAIT_S,
    what: str = "key cache",
) -> bool:
    """Rebuild ``cache`` from ``loader`` if it lost its state; True if this call rebuilt it.

    A cache of one process passes no ``lock``: nobody else commits while it rebuilds, so one
    read of the lake is all. A shared cache passes its ``lock``: the rebuilder first waits
    ``grace_s``, so that groups whose commit was already under way land before it reads, then
    catches up with the files committed during its read, and opens the new epoch only if it
    still holds the lock (else another consumer is rebuilding after a second loss, and that
    one's epoch must stand: CacheLostError, and the caller starts again). ``what`` names the
    cache in the log line.
    """
    if not cache.needs_rebuild():
        return False
    if lock is None:
        cache.replace(*loader(None))
        faults.point("mid_rebuild")
        cache.open_epoch()
        return True
    deadline = time.monotonic() + wait_s
    while (token := lock.acquire()) is None:
        if not cache.needs_rebuild():
            return False  # the other consumer's rebuild is done
        if time.monotonic() > deadline:
            raise CacheLostError("timed out waiting for another consumer's rebuild")
        time.sleep(POLL_S)
    try:
        if not cache.needs_rebuild():
            return False
        log.warning(
            "the %s is empty or lost its data (a first start, a restart, a flush): "
            "rebuilding it from the events table",
            what,
        )
        time.sleep(grace_s)
        started = time.time()
        cache.replace(*loader(None))
        faults.point("mid_rebuild")
        # Files committed during the read: the margin covers the commit clocks' skew.
        late_keys, late_watermark = loader(started - grace_s - 1.0)
        cache.restore("rebuild", late_keys, late_watermark)
        if not lock.held(token):
            raise CacheLostError("lost the rebuild lock during the rebuild; starting again")
        cache.open_epoch()
        return True
    finally:
        lock.release(token)
