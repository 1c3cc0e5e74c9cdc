"""Prometheus metrics of the HTTP ingest, true across every API worker process.

``adevents serve --workers N`` runs N processes behind one port, and a scrape reaches one of
them: a counter in one process's memory would make /metrics jump between workers' numbers.
So each process counts into files of its own under ``DATA_DIR/state/ingest-metrics/``, in
prometheus_client's multiprocess format (a ``counter_<slot>.db`` and a ``histogram_<slot>.db``
of mmapped doubles), and every process's /metrics adds all the files up with prometheus_client's
own ``MultiProcessCollector.merge``: any worker answers the totals of all.

A process holds its slot with an exclusive ``flock`` on ``slot-<n>.lock`` for as long as it
runs; the lock dies with the process, and the next process to start takes the lowest free slot
and goes on counting in its files. So totals never drop when a worker restarts (a drop would
read as a counter reset), no two live processes write one file, and there are never more files
than processes ever ran at once. Counts live in the page cache: a machine crash can lose the
last increments (never a process crash, whose writes are already in the mapped file).

Only this module writes these files; a process's writes happen under one lock. A DATA_DIR that
cannot hold them (read-only) costs the counts of that process, with a warning in the log; the
names are still exposed, at zero.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pipeline.schema import REASONS, Layout

log = logging.getLogger("adevents.ingest")

REQUESTS: Final = "adevents_ingest_requests"
REQUESTS_HELP: Final = "POST /ad_events requests answered, by HTTP status"
EVENTS: Final = "adevents_ingest_events"
EVENTS_HELP: Final = (
    "Events POST /ad_events made durable in the spool: accepted (reason empty) or rejected by "
    "a row rule (reason code, on their way to the quarantine table)"
)
ACK: Final = "adevents_ingest_ack_seconds"
ACK_HELP: Final = "Time from a POST /ad_events request to its 202, once its rows are durable"
#: The ack waits for a group commit (BATCH_INTERVAL, 100 ms by default) and an fsync.
ACK_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 10.0)
#: Label sets shown at zero before anything is counted, so dashboards and alert rules find
#: every series from the start. ``late_event`` is the consumer's decision, never the ingest's.
INGEST_REASONS: Final = tuple(r for r in REASONS if r != "late_event")
_BASE_STATUSES: Final = ("202",)
#: More slots than API processes will ever run at once on one DATA_DIR.
MAX_SLOTS: Final = 1024


def metrics_dir(layout: Layout) -> Path:
    """Where the ingest's per-process metric files live."""
    return layout.state / "ingest-metrics"


def _key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    return mmap_key(metric, sample, list(labels), list(labels.values()), help_text)


#: Bytes of each file, allocated when it is made: a few dozen series of ~150 bytes fit many
#: times over, so the file never grows (prometheus_client's own initial size).
FILE_BYTES: Final = 64 * 1024


# prometheus_client's file format, merge and number format are untyped: typed wrappers, once.
def _mapped(path: Path) -> MmapedDict:
    # Blocks allocated up front: a write into a hole of a mapped file on a full disk is a SIGBUS
    # that kills the process, where a full disk must only cost a 503.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, FILE_BYTES)
    finally:
        os.close(fd)
    return MmapedDict(str(path))  # type: ignore[no-untyped-call]


def _merge(files: list[str]) -> Iterable[Any]:
    """Every file's samples added up; histogram buckets as counts per bucket (not cumulative)."""
    merged: Iterable[Any] = MultiProcessCollector.merge(files, accumulate=False)  # type: ignore[no-untyped-call]
    return merged


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it (``0.1``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class IngestMetrics:
    """This process's ingest counters, written where every worker's /metrics reads them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.slot: int | None = None
        self._lock = threading.Lock()
        self._slot_fd: int | None = None
        self._counters: MmapedDict | None = None
        self._histograms: MmapedDict | None = None
        self._tried = False

    def open(self) -> None:
        """Take a slot and its files (once; a failure is logged and the counts dropped)."""
        with self._lock:
            if self._tried:
                return
            self._tried = True
            try:
                self._open()
            except OSError as exc:
                log.warning(
                    "ingest metrics are not kept by this process: %s cannot hold them (%s)",
                    self.directory,
                    exc.strerror or exc,
                )
                self._close()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_SLOTS):
            fd = os.open(self.directory / f"slot-{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process has it
                os.close(fd)
                continue
            self.slot, self._slot_fd = n, fd
            break
        else:
            raise OSError(f"all {MAX_SLOTS} slots are taken")
        # prometheus_client's file format; its file names give the metric type.
        self._counters = _mapped(self.directory / f"counter_{self.slot}.db")
        self._histograms = _mapped(self.directory / f"histogram_{self.slot}.db")

    def close(self) -> None:
        """Release the slot (its files stay, with their counts, for the next process)."""
        with self._lock:
            self._close()
            self._tried = False

    def _close(self) -> None:
        for mapped in (self._counters, self._histograms):
            if mapped is not None:
                mapped.close()  # type: ignore[no-untyped-call]
        self._counters = self._histograms = None
        if self._slot_fd is not None:
            os.close(self._slot_fd)  # releases the flock
        self._slot_fd, self.slot = None, None

    def _add(self, mapped: MmapedDict | None, key: str, amount: float) -> None:
        if mapped is None:
            return
        value, _ = mapped.read_value(key)  # type: ignore[no-untyped-call]
        mapped.write_value(key, value + amount, 0.0)  # type: ignore[no-untyped-call]

    def request(self, status: int) -> None:
        """Count one answered request."""
        self.open()
        labels = {"status": str(status)}
        with self._lock:
            self._add(self._counters, _key(REQUESTS, f"{REQUESTS}_total", labels, REQUESTS_HELP), 1)

    def events(self, accepted: int, rejected: Iterable[str]) -> None:
        """Count the rows of one acknowledged request: ``accepted`` and each rejection's reason."""
        self.open()
        by_reason: dict[str, int] = {}
        for reason in rejected:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        sample = f"{EVENTS}_total"
        with self._lock:
            if accepted:
                labels = {"outcome": "accepted", "reason": ""}
                self._add(self._counters, _key(EVENTS, sample, labels, EVENTS_HELP), accepted)
            for reason, n in by_reason.items():
                labels = {"outcome": "rejected", "reason": reason}
                self._add(self._counters, _key(EVENTS, sample, labels, EVENTS_HELP), n)

    def acknowledged(self, seconds: float) -> None:
        """Observe one request's time to its 202."""
        self.open()
        # As prometheus_client's Histogram keeps it in multiprocess mode: a count in the first
        # bucket the value fits (the collector makes them cumulative) and the sum.
        bound = next((b for b in ACK_BUCKETS if seconds <= b), float("inf"))
        bucket = {"le": _le(bound)}
        with self._lock:
            self._add(self._histograms, _key(ACK, f"{ACK}_bucket", bucket, ACK_HELP), 1)
            self._add(self._histograms, _key(ACK, f"{ACK}_sum", {}, ACK_HELP), seconds)


class IngestCollector(Collector):
    """The ingest metrics of every process that wrote into ``directory``, added up."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _merged(self) -> dict[str, Any]:
        try:
            files = [str(p) for p in self.directory.glob("*.db")]
        except OSError:
            files = []
        return {m.name: m for m in _merge(files)}

    def collect(self) -> Iterator[Any]:
        merged = self._merged()

        def samples(name: str) -> Iterator[Any]:
            metric = merged.get(name)
            yield from () if metric is None else metric.samples

        requests = CounterMetricFamily(REQUESTS, REQUESTS_HELP, labels=["status"])
        by_status = dict.fromkeys(_BASE_STATUSES, 0.0)
        for s in samples(REQUESTS):
            by_status[s.labels["status"]] = by_status.get(s.labels["status"], 0.0) + s.value
        for status, value in sorted(by_status.items()):
            requests.add_metric([status], value)
        yield requests

        events = CounterMetricFamily(EVENTS, EVENTS_HELP, labels=["outcome", "reason"])
        counts = {("accepted", ""): 0.0, **{("rejected", r): 0.0 for r in INGEST_REASONS}}
        for s in samples(EVENTS):
            key = (s.labels["outcome"], s.labels["reason"])
            counts[key] = counts.get(key, 0.0) + s.value
        for (outcome, reason), value in counts.items():
            events.add_metric([outcome, reason], value)
        yield events

        bounds = (*ACK_BUCKETS, float("inf"))
        per_bucket = dict.fromkeys(bounds, 0.0)
        total = 0.0
        for s in samples(ACK):
            if s.name.endswith("_bucket"):
                # Into the first bucket that holds it (the same one, unless ACK_BUCKETS changed
                # since the file was written).
                le = float(s.labels["le"])
                per_bucket[next(b for b in bounds if le <= b)] += s.value
            elif s.name.endswith("_sum"):
                total += s.value
        cumulative, buckets = 0.0, []
        for bound in bounds:
            cumulative += per_bucket[bound]
            buckets.append((_le(bound), cumulative))
        yield HistogramMetricFamily(ACK, ACK_HELP, buckets=buckets, sum_value=total)


__all__ = [
    "ACK",
    "ACK_BUCKETS",
    "EVENTS",
    "REQUESTS",
    "IngestCollector",
    "IngestMetrics",
    "metrics_dir",
]
