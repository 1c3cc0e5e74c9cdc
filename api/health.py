"""Health checks: key cache, DATA_DIR writable and its free space, consumer lag and state, each
Kafka partition's lag, the lake's tables (Delta versions, last commit from the ledger); cached
for a second.

A failed check makes the API ``unhealthy`` (503); a Kafka partition lagging beyond
KAFKA_LAG_MAX only makes it ``degraded`` (200): the API serves every read and the ingest, and a
load balancer taking it out would not make the consumer catch up.

Reasons are codes (``disk_low``, ``consumer_retrying:redis_unavailable``, ...) that anyone may
see on ``/health``; sentences and raw errors are for ``/health/detail`` (see ``api/routes.py``).
Raw errors, which may name hosts or paths, are logged when a check fails. The lake's URI (which
names a bucket) is never part of a report.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

import anyio.to_thread

from api.disk import DiskSpace
from api.models import ConsumerHealth, Health, KeyCacheHealth, PartitionLagHealth
from pipeline.redis_client import Client, connect
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.spool import list_incoming, oldest_waiting_age
from pipeline.status import ConsumerStatus, PartitionLag, kafka_lags, read_statuses
from queries import ops
from queries.lake import Lake

log = logging.getLogger("adevents.api")

#: Unhealthy when the oldest file in incoming/ has waited longer than this.
MAX_LAG_SECONDS: Final = 60.0
#: How long a report is reused; the checks touch the disk and Redis.
TTL_SECONDS: Final = 1.0
#: Connect and reply timeout of the Redis probes (/health, /metrics): a down Redis answers fast.
REDIS_TIMEOUT_S: Final = 0.5
#: Bytes written to prove DATA_DIR takes writes (an empty file needs no free block).
_PROBE: Final = b"\0" * 4096


def consumer_health(s: ConsumerStatus, now: float) -> ConsumerHealth:
    """``s`` for the API: a consumer that stopped reporting is ``stale``, not running."""

    def ms(t: float | None) -> int | None:
        return None if t is None else int(t * 1000)

    stale = s.is_stale(now)
    return ConsumerHealth(
        name=s.name,
        state="stale" if stale else s.state,
        fault=None if stale else s.fault,
        since=int(s.since * 1000),
        attempts=s.attempts,
        next_retry_at=None if stale else ms(s.next_retry_at),
        updated_at=int(s.updated_at * 1000),
        detail=s.detail,
    )


def partition_lag_health(lag: PartitionLag) -> PartitionLagHealth:
    return PartitionLagHealth(
        topic=lag.topic,
        partition=lag.partition,
        consumer=lag.consumer,
        messages=lag.messages,
        updated_at=int(lag.updated_at * 1000),
        current=lag.current,
    )


def kafka_lag_message(over: list[PartitionLag], limit: int, now: float) -> str:
    """One sentence on the partitions ``over`` KAFKA_LAG_MAX (most behind first); it names
    partitions, never a consumer (whose default name holds the host name)."""
    worst = over[0]
    if worst.current:
        behind = f"is {worst.messages:,} messages behind its end"
    else:
        behind = (
            f"was {worst.messages:,} messages behind its end when its consumer stopped "
            f"reporting {now - worst.updated_at:.0f}s ago (nobody reports it now)"
        )
    more = f"; {len(over) - 1} more partition(s) too" if len(over) > 1 else ""
    return (
        f"Kafka consumer lag: partition {worst.key} {behind}, more than KAFKA_LAG_MAX "
        f"({limit:,}){more}"
    )


def retrying(consumers: list[ConsumerHealth]) -> list[ConsumerHealth]:
    """Consumers that are alive and waiting out a transient fault."""
    return [c for c in consumers if c.state == "retrying"]


def lock_is_held(path: Path) -> bool | None:
    """Whether some process holds a flock on ``path`` (Linux /proc/locks); None if unknown."""
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF"; a blocked waiter has "->" first.
        if "FLOCK" in fields and wanted in fields:
            return True
    return False


class HealthChecker:
    """Runs the checks at most once per TTL; concurrent callers share one report."""

    def __init__(self, settings: Settings, lake: Lake, *, ttl: float = TTL_SECONDS) -> None:
        self.settings = settings
        self.lake = lake
        self.ttl = ttl
        self._report: Health | None = None
        self._at = 0.0
        self._lock = threading.Lock()
        self._redis: Client | None = None
        self.layout = Layout(settings.data_dir)
        self.disk = DiskSpace(self.layout.root, settings.disk_min_free)

    def _key_cache(self) -> KeyCacheHealth:
        if self.settings.redis_url:
            try:
                if self._redis is None:
                    self._redis = connect(self.settings.redis_url, timeout=REDIS_TIMEOUT_S)
                self._redis.ping()
            except Exception as exc:  # any failure to reach Redis makes the cache unhealthy
                log.warning("health: Redis ping failed: %s", exc)
                return KeyCacheHealth("redis", False, "Redis did not answer PING", error=str(exc))
            return KeyCacheHealth("redis", True, "Redis answered PING")
        layout = self.layout
        running = lock_is_held(layout.state / "consumer.lock")
        if not (layout.state / "embedded").is_dir():
            return KeyCacheHealth(
                "embedded",
                False,
                "the embedded key cache has no state: no consumer has run on this DATA_DIR",
                running,
            )
        return KeyCacheHealth("embedded", True, "state directory present", running)

    def _writable(self) -> bool:
        """Whether a file can be created and written in DATA_DIR right now (a full disk or a
        read-only mount says no: creating an empty file alone would still succeed)."""
        try:
            with tempfile.TemporaryFile(dir=self.layout.root) as fh:
                fh.write(_PROBE)
                fh.flush()
            return True
        except OSError as exc:
            log.warning("health: DATA_DIR is not writable: %s", exc)
            return False

    def check(self) -> Health:
        """Run every check now."""
        now = time.time()
        reasons: list[str] = []
        messages: list[str] = []
        degraded: list[str] = []

        def fail(code: str, message: str) -> None:
            reasons.append(code)
            messages.append(message)

        def degrade(code: str, message: str) -> None:
            fail(code, message)
            degraded.append(code)

        cache = self._key_cache()
        if not cache.ok:
            if cache.kind == "redis":
                fail("key_cache_unavailable", "key cache: Redis did not answer PING")
            else:
                fail("key_cache_missing", f"key cache: {cache.detail}")
        writable = self._writable()
        if not writable:
            fail("data_dir_not_writable", "DATA_DIR is not writable")
        free = self.disk.free()
        if self.disk.low():
            fail(
                "disk_low",
                f"DATA_DIR's disk has {free} bytes free, less than DISK_MIN_FREE "
                f"({self.settings.disk_min_free}): the ingest refuses events until space is freed",
            )
        incoming = self.layout.incoming
        lag = oldest_waiting_age(incoming, now)
        if lag > MAX_LAG_SECONDS:
            fail(
                "consumer_lag",
                f"consumer lag: the oldest file in incoming/ has waited {lag:.1f}s "
                f"(more than {MAX_LAG_SECONDS:.0f}s)",
            )
        statuses = read_statuses(self.layout.state)
        consumers = [consumer_health(s, now) for s in statuses]
        for fault in sorted({c.fault or "unknown" for c in retrying(consumers)}):
            stuck = [c for c in retrying(consumers) if (c.fault or "unknown") == fault]
            longest = max(now - c.since / 1000 for c in stuck)
            fail(
                f"consumer_retrying:{fault}",
                f"{len(stuck)} consumer(s) retrying a transient fault, {fault}, "
                f"for up to {longest:.0f}s",
            )
        lags = kafka_lags(statuses, now)
        limit = self.settings.kafka.kafka_lag_max
        over = [lag for lag in lags if lag.messages > limit]
        if over:
            degrade("kafka_lag", kafka_lag_message(over, limit, now))
        versions: dict[str, int] = {}
        files: dict[str, int] = {}
        last = None
        try:
            view = self.lake.view()
            versions = view.versions
            files = {name: len(view.table(name).stats) for name in versions}
            last = ops.last_commit_ms(self.lake)
        except Exception as exc:  # an unreadable lake is a reason, not a crash
            log.warning(
                "health: the lake could not be read: %s", self.lake.location.redact(repr(exc))
            )
            fail("lake_unreadable", "the lake's tables could not be read")
        return Health(
            status="ok" if not reasons else "degraded" if reasons == degraded else "unhealthy",
            reasons=reasons,
            messages=messages,
            checked_at=int(now * 1000),
            key_cache=cache,
            data_dir_writable=writable,
            disk_free_bytes=free,
            disk_min_free_bytes=self.settings.disk_min_free,
            consumer_lag_seconds=round(lag, 3),
            files_waiting=len(list_incoming(incoming)),
            last_commit=last,
            seconds_since_last_commit=None if last is None else round(now - last / 1000, 3),
            consumers=consumers,
            kafka_lag=[partition_lag_health(lag) for lag in lags],
            kafka_lag_max_messages=limit,
            lake_versions=versions,
            lake_files=files,
            data_dir=str(self.layout.root.resolve()),
        )

    def cached(self) -> Health:
        """The last report if it is fresh, else a new one (one thread runs the checks)."""
        report = self._report
        if report is not None and time.monotonic() - self._at < self.ttl:
            return report
        with self._lock:
            if self._report is None or time.monotonic() - self._at >= self.ttl:
                self._report = self.check()
                self._at = time.monotonic()
            return self._report

    async def report(self) -> Health:
        report = self._report
        if report is not None and time.monotonic() - self._at < self.ttl:
            return report
        return await anyio.to_thread.run_sync(self.cached)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
