"""Health checks: key cache, DATA_DIR writable, consumer lag, last commit; cached for a second."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import anyio.to_thread

from api.models import Health, KeyCacheHealth
from pipeline.settings import Settings
from pipeline.spool import list_incoming, oldest_waiting_age
from queries import ops
from queries.lake import Lake

#: Unhealthy when the oldest file in incoming/ has waited longer than this.
MAX_LAG_SECONDS: Final = 60.0
#: How long a report is reused; the checks touch the disk and Redis.
TTL_SECONDS: Final = 1.0


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
        self._redis: Any = None

    def _key_cache(self) -> KeyCacheHealth:
        if self.settings.redis_url:
            try:
                if self._redis is None:
                    import redis

                    url = self.settings.redis_url
                    timeouts = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
                    if url.startswith("redis+cluster://"):
                        self._redis = redis.RedisCluster.from_url(
                            "redis://" + url.removeprefix("redis+cluster://"), **timeouts
                        )
                    else:
                        self._redis = redis.Redis.from_url(url, **timeouts)
                self._redis.ping()
            except Exception as exc:  # any failure to reach Redis makes the cache unhealthy
                return KeyCacheHealth("redis", False, f"Redis ping failed: {exc}")
            return KeyCacheHealth("redis", True, "Redis answered PING")
        layout = self.lake.layout
        running = lock_is_held(layout.state / "consumer.lock")
        if not (layout.state / "embedded").is_dir():
            return KeyCacheHealth(
                "embedded",
                False,
                f"{layout.state / 'embedded'} does not exist: no consumer has run on this DATA_DIR",
                running,
            )
        return KeyCacheHealth("embedded", True, "state directory present", running)

    def _writable(self) -> bool:
        try:
            with tempfile.TemporaryFile(dir=self.lake.root):
                return True
        except OSError:
            return False

    def check(self) -> Health:
        """Run every check now."""
        now = time.time()
        reasons: list[str] = []
        cache = self._key_cache()
        if not cache.ok:
            reasons.append(f"key cache: {cache.detail}")
        writable = self._writable()
        if not writable:
            reasons.append(f"DATA_DIR {self.lake.root} is not writable")
        incoming = self.lake.layout.incoming
        lag = oldest_waiting_age(incoming, now)
        if lag > MAX_LAG_SECONDS:
            reasons.append(
                f"consumer lag: the oldest file in incoming/ has waited {lag:.1f}s "
                f"(more than {MAX_LAG_SECONDS:.0f}s)"
            )
        try:
            last = ops.last_commit_ms(self.lake, int(now * 1000))
        except Exception as exc:  # an unreadable ledger is a reason, not a crash
            reasons.append(f"ledger unreadable: {exc}")
            last = None
        return Health(
            status="unhealthy" if reasons else "ok",
            reasons=reasons,
            checked_at=int(now * 1000),
            key_cache=cache,
            data_dir=str(self.lake.root),
            data_dir_writable=writable,
            consumer_lag_seconds=round(lag, 3),
            files_waiting=len(list_incoming(incoming)),
            last_commit=last,
            seconds_since_last_commit=None if last is None else round(now - last / 1000, 3),
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
