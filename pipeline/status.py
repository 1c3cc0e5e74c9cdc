"""A consumer's live state (running, or retrying a transient fault), for /health and /metrics.

The consumer and the API are separate processes, so the consumer publishes its state as one
small JSON file per consumer under ``state/consumers/``: rewritten atomically on every change of
state and at least every :data:`HEARTBEAT_SECONDS` while it runs. Writing is best effort (a full
disk is one of the faults reported), so a reader treats a file older than :data:`STALE_SECONDS`
as a consumer that is gone, not as one that is healthy.

``detail`` may name hosts or paths: it is for the log and for authenticated readers only.
:func:`kafka_lags` reads the Kafka partitions' lag out of the statuses, once per partition.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal

#: A running consumer rewrites its file at least this often.
HEARTBEAT_SECONDS: Final = 5.0
#: A file not rewritten for this long belongs to a consumer that stopped or died.
STALE_SECONDS: Final = 3 * HEARTBEAT_SECONDS

State = Literal["running", "retrying", "stopped"]
#: The transient faults a consumer waits out, as shown in /health and /metrics.
FAULTS: Final = (
    "redis_unavailable",  # Redis does not answer (down, restarting, network)
    "redis_lost",  # Redis answered but lost the key cache; a rebuild is under way or failed
    "disk_full",  # DATA_DIR's disk is below DISK_MIN_FREE or a write failed with ENOSPC
    "lake_unavailable",  # the lake (S3 or its filesystem) refused or timed out
    "kafka_unavailable",  # the Kafka brokers do not answer, or a rebalance is under way
    "partition_moved",  # another consumer committed part of a group: it is formed again
)


@dataclass(frozen=True)
class ConsumerStatus:
    """One consumer's state at ``updated_at`` (epoch seconds)."""

    name: str
    pid: int
    state: State
    fault: str | None = None
    detail: str | None = None
    #: When the current state (and fault) began, epoch seconds.
    since: float = 0.0
    #: Retries of the current fault so far.
    attempts: int = 0
    #: When the next retry is due, epoch seconds (None when not retrying).
    next_retry_at: float | None = None
    updated_at: float = 0.0
    #: With ``consume --source kafka``: per assigned partition (``"<topic>/<partition>"``), the
    #: messages between the consumer's position and the partition's end, as of ``updated_at``.
    kafka_lag: dict[str, int] | None = None
    #: When ``kafka_lag`` was measured (epoch seconds): the heartbeat refreshes ``updated_at``
    #: while a consumer waits out a fault, and its lag is not measured meanwhile.
    kafka_lag_at: float | None = None

    def is_stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - self.updated_at > STALE_SECONDS


def status_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "consumers"


def _file_name(name: str) -> str:
    # Consumer names come from settings and may hold any character: keep the file name safe.
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:100]
    return f"{safe or 'consumer'}.json"


def write_status(state_dir: Path, status: ConsumerStatus) -> bool:
    """Publish ``status``; False (never an exception) when it could not be written."""
    directory = status_dir(state_dir)
    target = directory / _file_name(status.name)
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(status)))
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    return True


def read_statuses(state_dir: Path) -> list[ConsumerStatus]:
    """Every consumer's last published status (stale ones included; see ``is_stale``)."""
    out: list[ConsumerStatus] = []
    try:
        entries = sorted(status_dir(state_dir).glob("*.json"))
    except OSError:
        return out
    for path in entries:
        try:
            raw = json.loads(path.read_text())
            out.append(ConsumerStatus(**raw))
        except (OSError, ValueError, TypeError):
            continue  # a file being replaced, or not ours: skip it
    return out


@dataclass(frozen=True)
class PartitionLag:
    """One Kafka partition's lag as the consumer holding it last published it."""

    topic: str
    partition: int
    #: Messages between the consumer's position and the partition's end.
    messages: int
    consumer: str
    #: When that consumer last published its status, epoch seconds.
    updated_at: float
    #: False when that consumer has stopped or fell silent: ``messages`` is then its last
    #: known lag, not the lag now (see :func:`kafka_lags`).
    current: bool

    @property
    def key(self) -> str:
        """``"<topic>/<partition>"``, as in :attr:`ConsumerStatus.kafka_lag`."""
        return f"{self.topic}/{self.partition}"


def _partition(key: str) -> tuple[str, int] | None:
    # A topic name cannot hold "/" (Kafka allows letters, digits, ".", "_", "-"), so the last
    # "/" is the separator.
    topic, _, number = key.rpartition("/")
    return (topic, int(number)) if topic and number.isdigit() else None


def kafka_lags(statuses: Iterable[ConsumerStatus], now: float | None = None) -> list[PartitionLag]:
    """Each Kafka partition's lag, once, most behind first.

    A reading is current while its consumer is running or retrying and not stale. A consumer
    that stopped or fell silent leaves its last reading, kept (not current) rather than
    dropped: nobody consumes the partition then and its end never moves back, so the lag has
    not fallen since, unless another consumer took the partition over, which then reports it.
    A partition two consumers report (after a rebalance) takes the current reading, the most
    recently published one among equals.
    """
    now = time.time() if now is None else now
    best: dict[tuple[str, int], PartitionLag] = {}
    for s in statuses:
        measured = s.kafka_lag_at if s.kafka_lag_at is not None else s.updated_at
        fresh = now - measured <= STALE_SECONDS
        current = s.state != "stopped" and not s.is_stale(now) and fresh
        for key, messages in (s.kafka_lag or {}).items():
            where = _partition(key)
            if where is None:
                continue  # not a "<topic>/<partition>" key: not written by our consumer
            lag = PartitionLag(*where, int(messages), s.name, measured, current)
            seen = best.get(where)
            if seen is None or (lag.current, lag.updated_at) > (seen.current, seen.updated_at):
                best[where] = lag
    return sorted(best.values(), key=lambda x: (-x.messages, x.topic, x.partition))
