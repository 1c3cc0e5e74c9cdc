"""Free space of DATA_DIR's filesystem against DISK_MIN_FREE, read at most once a second."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Final

from pipeline import retry

#: How long one statvfs answer is reused: the ingest asks on every request.
TTL_SECONDS: Final = 1.0


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem; None if unknown."""
    try:
        return retry.free_bytes(path)
    except OSError:
        return None


class DiskSpace:
    """``free()`` and ``low()`` of one directory; statvfs is cheap, but not free at thousands
    of requests a second, so an answer is reused for ``ttl`` seconds."""

    def __init__(self, path: Path, min_free: int, *, ttl: float = TTL_SECONDS) -> None:
        self.path = Path(path)
        self.min_free = min_free
        self.ttl = ttl
        self._free: int | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def free(self) -> int | None:
        if time.monotonic() - self._at >= self.ttl:
            with self._lock:
                if time.monotonic() - self._at >= self.ttl:
                    self._free = free_bytes(self.path)
                    self._at = time.monotonic()
        return self._free

    def low(self) -> bool:
        """Whether free space is below the minimum (never, with DISK_MIN_FREE=0 or unknown)."""
        if self.min_free <= 0:
            return False
        free = self.free()
        return free is not None and free < self.min_free
